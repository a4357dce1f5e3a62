#!/usr/bin/env python3
"""Hostile referee-comm peers, for the regression tests of the mesh's limits
(`crates/cli/tests/mesh.rs`), built on the independent Python peer in `peer.py`.

  hostile.py MODE HOST:PORT SERVER_ID_HEX [ARGS]

  ik-replay SERVER_STATIC_HEX N  an honest IK handshake (prints "ik accepted"), then its recorded
                                 first message replayed on N new sockets without the keys
                                 (prints "replays answered=K of N": K got any byte back)
  frag-hold CONNS                CONNS connections of one identity, each sending all but the last
                                 byte of a 16 MiB fragmented message, then holding it
  half-frames CONNS              CONNS connections of one identity, each sending a frame header
                                 announcing 65535 bytes and only 65000 of them
  announce IDS CONNS             IDS identities x CONNS connections, each announcing a 16 MiB
                                 message with a 100-byte first fragment, then nothing
  big-requests N                 N requests of 16 MiB on one connection, never reading replies
  slow-reader N                  N requests of 60 KiB on one connection, never reading replies

The last three print "holding sent=BYTES" once every send has finished or stalled for 3 s (the
node stopped reading: backpressure), then hold their sockets until stdin closes (or for
HOSTILE_HOLD seconds if that is set).
"""
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from noise.connection import Keypair, NoiseConnection  # noqa: E402

import peer as p  # noqa: E402

REC_FRAG_FIRST, REC_FRAG_MORE = 0x02, 0x03
CHUNK = 60000
BIG = 16 * 1024 * 1024 - 1


def connect_ik(host, port, server_static, keys):
    """An IK handshake with a fresh timestamp; returns (peer, recorded preamble + message 1)."""
    pre = b"RFCM\x01\x01"
    sock = socket.create_connection((host, int(port)))
    noise = NoiseConnection.from_name(b"Noise_IK_25519_ChaChaPoly_SHA256")
    noise.set_as_initiator()
    noise.set_keypair_from_private_bytes(Keypair.STATIC, keys.static_private())
    noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, server_static)
    noise.set_prologue(pre)
    noise.start_handshake()
    peer = p.Peer(sock, noise)
    m1 = noise.write_message(keys.hello + struct.pack(">Q", time.time_ns()))
    recorded = pre + struct.pack(">H", len(m1)) + bytes(m1)
    sock.sendall(recorded)
    noise.read_message(peer.read_frame())  # <- e, ee, se, hello
    accept = bytes(noise.decrypt(peer.read_frame()))
    assert accept == bytes([p.REC_ACCEPT, 1]), "expected ACCEPT v1, got %r" % accept
    peer.write_frame(noise.encrypt(accept))  # key confirmation: echo ACCEPT
    return peer, recorded


def answered(sock):
    sock.settimeout(2)
    try:
        return len(sock.recv(1)) > 0
    except (socket.timeout, ConnectionError):
        return False


def ik_replay(host, port, server_id, server_static, n):
    keys = p.Keys()
    print("id " + keys.id.hex(), flush=True)
    peer, recorded = connect_ik(host, port, server_static, keys)
    req = peer.send_envelope(p.REQUEST, b"honest")
    env = peer.next_envelope()
    assert env[1] == p.REPLY and env[3] == req and env[5] == b"honest", env
    print("ik accepted", flush=True)
    hits = 0
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(recorded)
        hits += answered(s)
        s.close()
    print("replays answered=%d of %d" % (hits, n), flush=True)


ZEROS = bytes(BIG)


def request_envelope(peer):
    """A complete 16 MiB request envelope (valid, so the node dispatches it)."""
    env = p.encode_envelope(p.REQUEST, peer.next_id, 0, ZEROS[: BIG - 32])
    peer.next_id += 1
    return env


def send_fragments(peer, env, leave):
    """Sends `env` as FRAG_FIRST + FRAG_MORE records, leaving out its last `leave` bytes."""
    total = len(env)
    first = env[: CHUNK - 5]
    peer.send_record(bytes([REC_FRAG_FIRST]) + struct.pack(">I", total) + first)
    sent, i = len(first), len(first)
    while i < total - leave:
        chunk = env[i : min(i + CHUNK, total - leave)]
        peer.send_record(bytes([REC_FRAG_MORE]) + chunk)
        sent += len(chunk)
        i += len(chunk)
    return sent


def flood(host, port, server_id, mode, n):
    keys = p.Keys()
    print("id " + keys.id.hex(), flush=True)
    conns = n if mode in ("frag-hold", "half-frames") else 1
    peers = []
    for _ in range(conns):
        peer = p.connect_xx(host, port, server_id, keys)
        peer.rekey_every = 1 << 30
        peer.sock.settimeout(3)
        peers.append(peer)
    sent = [0] * conns

    def run(k):
        peer = peers[k]
        try:
            if mode == "half-frames":
                # A frame header announcing 65535 bytes, and all but 535 of them.
                peer.sock.sendall(struct.pack(">H", 65535) + bytes(65000))
                sent[k] += 65002
            elif mode == "frag-hold":
                # Never completed, so its content does not matter: only the announced total.
                sent[k] += send_fragments(peer, ZEROS, leave=1)
            elif mode == "big-requests":
                for _ in range(n):
                    sent[k] += send_fragments(peer, request_envelope(peer), leave=0)
            else:
                for _ in range(n):
                    peer.send_envelope(p.REQUEST, b"\0" * 60000)
                    sent[k] += 60000
        except (socket.timeout, ConnectionError):
            pass  # the node stopped reading (backpressure) or hung up

    threads = [threading.Thread(target=run, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("holding sent=%d" % sum(sent), flush=True)
    hold = os.environ.get("HOSTILE_HOLD")
    if hold:
        time.sleep(float(hold))
    else:
        sys.stdin.read()


def announce(host, port, server_id, ids, conns):
    """IDS identities x CONNS connections, each announcing a 16 MiB message with a 100-byte
    first fragment and sending nothing more."""
    peers = []
    for _ in range(ids):
        keys = p.Keys()
        for _ in range(conns):
            peer = p.connect_xx(host, port, server_id, keys)
            peer.rekey_every = 1 << 30
            peer.send_record(bytes([REC_FRAG_FIRST]) + struct.pack(">I", BIG) + bytes(100))
            peers.append(peer)
    print("holding sent=%d" % (len(peers) * 105), flush=True)
    hold = os.environ.get("HOSTILE_HOLD")
    if hold:
        time.sleep(float(hold))
    else:
        sys.stdin.read()


def main():
    mode, addr, server_id = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    host, port = addr.rsplit(":", 1)
    if mode == "ik-replay":
        ik_replay(host, port, server_id, bytes.fromhex(sys.argv[4]), int(sys.argv[5]))
    elif mode == "announce":
        announce(host, port, server_id, int(sys.argv[4]), int(sys.argv[5]))
    elif mode in ("frag-hold", "half-frames", "big-requests", "slow-reader"):
        flood(host, port, server_id, mode, int(sys.argv[4]))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
