#!/usr/bin/env python3
"""What a start costs a replica (issue 21, slice 3c): two release `referee node serve` replicas;
A writes N Eventual worknodes of about S bytes each, which B merges and keeps (store and
forward). Then each is killed and served again from its store: the time to its first line
(`Relay::load` reads and merges again what B keeps; `Relay::own_state` signs what A made), what
it keeps after the start, and what it sends its peer on reconnection. A start on an empty store
is the floor.

usage: bench/worknode-restart.py [REFEREE] [N] [S]
"""
import json, os, sys, time

from worknode_replica import Replica, wait

ref = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/referee-target/release/referee")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
size = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000


empty = Replica(ref)
floor = empty.started
empty.close()
a, b = Replica(ref), Replica(ref)
try:
    b.ok(f"peer {a.addr} {a.id}")
    wait(lambda: b.sync()["rounds"] > 0)
    value = "v" * (size // 2)
    lines = []
    for i in range(n):
        lines += [f"create /n{i} data eventual", f"send /n{i} set a {value}", f"send /n{i} insert s {value}"]
    for chunk in range(0, len(lines), 300):
        a.p.stdin.write("".join(l + "\n" for l in lines[chunk:chunk + 300]))
        a.p.stdin.flush()
        for _ in lines[chunk:chunk + 300]:
            assert "ok" in json.loads(a.p.stdout.readline())
    wait(lambda: b.ask(f"get /n{n - 1}").get("ok", {}).get("state", {}).get("s"), timeout=300)
    b.ok("idle")
    kb = b.sync()["kept"]
    print(f"{n} worknodes of ~{size} bytes; a start on an empty store: {floor * 1000:.0f} ms")
    print(f"| replica | kept before | first line after the start | kept after | peak RSS | sent to its peer after |")
    print(f"|---|---|---|---|---|---|")
    for name in ("B (keeps A's changes)", "A (signs its state)"):
        r = b if name.startswith("B") else a
        other = a if r is b else b
        o0 = other.sync()
        before = r.sync()["kept"]
        r2 = r.restart()
        if r is b:
            b = r2
        else:
            a = r2
        # The restarted replica dials its peer again.
        r2.ok(f"peer {other.addr} {other.id}")
        wait(lambda: r2.sync()["rounds"] > 0 and other.sync()["rounds"] > o0["rounds"])
        time.sleep(1.0)
        r2.ok("idle")
        s = r2.sync()
        print(f"| {name} | {before['messages']} messages, {before['bytes']:,} B | {r2.started * 1000:.0f} ms "
              f"| {s['kept']['messages']} messages, {s['kept']['bytes']:,} B | {r2.rss_mb():.0f} MB "
              f"| {s['kept_bytes_sent']:,} B kept, {s['state_bytes_sent']:,} B state |")
finally:
    a.close(); b.close()
