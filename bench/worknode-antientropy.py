#!/usr/bin/env python3
"""Anti-entropy cost on reconnection (issue 21, slice 3): two release `referee node serve`
replicas; A holds N Eventual worknodes of about S bytes each; B connects and gets them, then
reconnects (isolate + heal) holding everything, then reconnects after missing one change.
Prints the bytes of state and of kept signed changes (store and forward) A sent, and the time
each round took, from `stats` -> `sync`.

usage: bench/worknode-antientropy.py [REFEREE] [N] [S]
"""
import json, os, sys, time

from worknode_replica import Replica, wait

ref = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/referee-target/release/referee")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
size = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000


def round_(a, b, a0, b0, digests, done=None):
    t = time.time()
    if done:
        # The states are sent in order: the last one merged, all are (`idle`: merges done).
        wait(lambda: done(b))
        b.ok("idle")
    wait(lambda: a.sync()["rounds"] > a0["rounds"] and b.sync()["rounds"] > b0["rounds"]
         and b.sync()["digests_received"] >= b0["digests_received"] + digests)
    # Until the states asked for are all sent (each side's `wanted` answered, no longer
    # growing) and merged.
    def settled():
        sa, sb = a.sync(), b.sync()
        return (sa["states_sent"] - a0["states_sent"] >= sb["wanted"] - b0["wanted"]
                and sb["states_sent"] - b0["states_sent"] >= sa["wanted"] - a0["wanted"]) and (sa, sb)
    last = None
    while True:
        now = wait(settled)
        if now == last:
            break
        last = now
        time.sleep(0.1)
    a.ok("idle"); b.ok("idle")
    return time.time() - t - 0.1


a, b = Replica(ref), Replica(ref)
try:
    value = "v" * (size // 2)
    lines = []
    for i in range(n):
        lines += [f"create /n{i} data eventual", f"send /n{i} set a {value}", f"send /n{i} insert s {value}"]
    for chunk in range(0, len(lines), 300):
        a.p.stdin.write("".join(l + "\n" for l in lines[chunk:chunk + 300]))
        a.p.stdin.flush()
        for _ in lines[chunk:chunk + 300]:
            assert "ok" in json.loads(a.p.stdout.readline())
    a0, b0 = a.sync(), b.sync()
    b.ok(f"peer {a.addr} {a.id}")
    t_first = round_(a, b, a0, b0, 0, lambda b: b.ask(f"get /n{n - 1}").get("ok", {}).get("state", {}).get("s"))
    a1, b1 = a.sync(), b.sync()
    b.ok("isolate"); b.ok("heal")
    t_again = round_(a, b, a1, b1, n)
    a2, b2 = a.sync(), b.sync()
    b.ok("isolate"); a.ok("send /n7 set a changed"); b.ok("heal")
    t_one = round_(a, b, a2, b2, n, lambda b: b.ask("get /n7")["ok"]["state"]["a"] == "changed")
    a3 = a.sync()
    print(f"{n} worknodes of ~{size} bytes")
    def kept(x, y):
        return f"{y['kept_bytes_sent'] - x['kept_bytes_sent']:,} B in {y['kept_sent'] - x['kept_sent']} kept signed changes"
    print(f"| first connection (B empty) | {a1['state_bytes_sent'] - a0['state_bytes_sent']:,} B of state, {a1['states_sent'] - a0['states_sent']} states | {kept(a0, a1)} | {t_first*1000:.0f} ms |")
    print(f"| reconnection, nothing missed | {a2['state_bytes_sent'] - a1['state_bytes_sent']:,} B of state, {a2['digests_sent'] - a1['digests_sent']} digests | {kept(a1, a2)} | {t_again*1000:.0f} ms |")
    print(f"| reconnection, one change missed | {a3['state_bytes_sent'] - a2['state_bytes_sent']:,} B of state, {a3['states_sent'] - a2['states_sent']} states | {kept(a2, a3)} | {t_one*1000:.0f} ms |")
finally:
    a.close(); b.close()
