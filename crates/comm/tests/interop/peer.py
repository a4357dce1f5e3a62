#!/usr/bin/env python3
"""An independent referee-comm peer built on the Python `noiseprotocol` package.

Used by `tests/all/interop.rs`. It re-implements, from docs/comm.md alone, the preamble, the
identity hello, the record and envelope formats (with a tiny MessagePack codec) and rekeying,
and talks to a Rust node over TCP:

  argv: HOST:PORT SERVER_PEER_ID_HEX
  stdout: "id <our peer id>", then "ok replies=N received=M" at the end
  stdin: "go" when the Rust side has queued its messages for us
"""
import socket
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from noise.connection import Keypair, NoiseConnection

BINDING_LABEL = b"referee-comm/v1 noise static key binding\x00"
PREAMBLE = b"RFCM\x01\x00"  # magic, wire version 1, pattern XX
REC_BATCH, REC_REKEY, REC_CLOSE, REC_ACCEPT = 0x01, 0x10, 0x11, 0x12
MESSAGE, REQUEST, REPLY = 1, 2, 3
REKEY_EVERY = 3  # our outgoing direction rekeys after this many records


def raw(key):
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- MessagePack, just the types the envelope uses -------------------------------------------
def mp_uint(n):
    if n < 0x80:
        return bytes([n])
    for tag, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * size):
            return bytes([tag]) + n.to_bytes(size, "big")
    raise ValueError(n)


def mp_bin(b):
    for tag, size in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        if len(b) < 1 << (8 * size):
            return bytes([tag]) + len(b).to_bytes(size, "big") + b
    raise ValueError(len(b))


def encode_envelope(kind, msg_id, corr, payload):
    return b"\x96" + mp_uint(1) + mp_uint(kind) + mp_uint(msg_id) + mp_uint(corr) + b"\xc0" + mp_bin(payload)


def mp_read(buf, i):
    t = buf[i]
    if t < 0x80:
        return t, i + 1
    if 0x90 <= t <= 0x9F:
        items, i = [], i + 1
        for _ in range(t & 0x0F):
            v, i = mp_read(buf, i)
            items.append(v)
        return items, i
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return buf[i + 1 : i + 1 + n].decode(), i + 1 + n
    if t == 0xC0:
        return None, i + 1
    sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
    if t in sizes:
        s = sizes[t]
        return int.from_bytes(buf[i + 1 : i + 1 + s], "big"), i + 1 + s
    lens = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2}
    if t in lens:
        s = lens[t]
        n = int.from_bytes(buf[i + 1 : i + 1 + s], "big")
        data = buf[i + 1 + s : i + 1 + s + n]
        return (data.decode() if t in (0xD9, 0xDA) else data), i + 1 + s + n
    raise ValueError("unsupported msgpack type %#x" % t)


# --- Framing ---------------------------------------------------------------------------------
class Peer:
    def __init__(self, sock, noise):
        self.sock, self.noise = sock, noise
        self.sent_records, self.next_id, self.inbound = 0, 1, []
        self.rekey_every = REKEY_EVERY

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError("peer closed")
            out += chunk
        return out

    def read_frame(self):
        (n,) = struct.unpack(">H", self.recv_exact(2))
        return self.recv_exact(n)

    def write_frame(self, body):
        self.sock.sendall(struct.pack(">H", len(body)) + body)

    def send_record(self, plain):
        self.write_frame(self.noise.encrypt(plain))
        self.sent_records += 1
        if self.sent_records % self.rekey_every == 0:
            self.write_frame(self.noise.encrypt(bytes([REC_REKEY])))
            self.noise.rekey_outbound_cipher()

    def send_envelope(self, kind, payload, corr=0):
        msg_id = self.next_id
        self.next_id += 1
        env = encode_envelope(kind, msg_id, corr, payload)
        self.send_record(bytes([REC_BATCH]) + struct.pack(">H", len(env)) + env)
        return msg_id

    def next_envelope(self):
        """Returns the next envelope [v, type, id, corr, topic, payload], applying rekeys."""
        while not self.inbound:
            plain = bytes(self.noise.decrypt(self.read_frame()))
            kind, body = plain[0], plain[1:]
            if kind == REC_REKEY:
                self.noise.rekey_inbound_cipher()
            elif kind == REC_BATCH:
                i = 0
                while i < len(body):
                    (n,) = struct.unpack(">H", body[i : i + 2])
                    env, end = mp_read(body, i + 2)
                    assert end == i + 2 + n, "entry length mismatch"
                    assert env[0] == 1, "protocol version"
                    self.inbound.append(env)
                    i += 2 + n
            elif kind == REC_CLOSE:
                raise EOFError("closed by peer: " + body.decode(errors="replace"))
            else:
                raise ValueError("unexpected record %#x" % kind)
        return self.inbound.pop(0)


class Keys:
    """An identity: Ed25519 signing key, X25519 static key and the identity hello."""

    def __init__(self):
        self.signing = ed25519.Ed25519PrivateKey.generate()
        self.static = x25519.X25519PrivateKey.generate()
        self.static_pub = raw(self.static.public_key())
        self.id = raw(self.signing.public_key())
        self.hello = b"RCH1" + bytes([1, 1]) + self.id + self.signing.sign(BINDING_LABEL + self.static_pub)

    def static_private(self):
        return self.static.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


def connect_xx(host, port, server_id, keys):
    """Runs the XX handshake as initiator and returns the established Peer."""
    sock = socket.create_connection((host, int(port)))
    sock.sendall(PREAMBLE)
    noise = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    noise.set_as_initiator()
    noise.set_keypair_from_private_bytes(Keypair.STATIC, keys.static_private())
    noise.set_prologue(PREAMBLE)
    noise.start_handshake()
    peer = Peer(sock, noise)

    peer.write_frame(noise.write_message())  # -> e
    their_hello = bytes(noise.read_message(peer.read_frame()))  # <- e, ee, s, es, hello
    their_static = bytes(noise.noise_protocol.handshake_state.rs.public_bytes)
    assert their_hello[:4] == b"RCH1" and len(their_hello) == 102, "bad hello"
    their_id, sig = their_hello[6:38], their_hello[38:]
    assert their_id == server_id, "unexpected server identity"
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(their_id).verify(sig, BINDING_LABEL + their_static)
    except InvalidSignature:
        sys.exit("server's identity does not sign its Noise static key")
    peer.write_frame(noise.write_message(keys.hello))  # -> s, se, hello
    accept = bytes(noise.decrypt(peer.read_frame()))
    assert accept == bytes([REC_ACCEPT, 1]), "expected ACCEPT v1, got %r" % accept
    return peer


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    server_id = bytes.fromhex(sys.argv[2])
    keys = Keys()
    print("id " + keys.id.hex(), flush=True)
    peer = connect_xx(host, port, server_id, keys)
    sock = peer.sock

    replies = 0
    for i in range(20):
        payload = ("py %d" % i).encode()
        if i % 2:
            req = peer.send_envelope(REQUEST, payload)
            env = peer.next_envelope()
            assert env[1] == REPLY and env[3] == req, "reply not correlated: %r" % env
            assert env[5] == b"re: " + payload, env
            replies += 1
        else:
            peer.send_envelope(MESSAGE, payload)

    assert sys.stdin.readline().strip() == "go"
    received = 0
    for i in range(12):
        env = peer.next_envelope()
        assert env[1] == MESSAGE and env[5] == ("rs %d" % i).encode(), env
        peer.send_envelope(MESSAGE, b"echo " + env[5])
        received += 1

    peer.send_record(bytes([REC_CLOSE]) + b"python peer done")
    sock.close()
    print("ok replies=%d received=%d" % (replies, received), flush=True)


if __name__ == "__main__":
    main()
