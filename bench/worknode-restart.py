#!/usr/bin/env python3
"""What a start costs a replica (issue 21, slice 3c): two release `referee node serve` replicas;
A writes N Eventual worknodes of about S bytes each, which B merges and keeps (store and
forward). Then each is killed and served again from its store: the time to its first line
(`Relay::load` reads and merges again what B keeps; `Relay::own_state` signs what A made), what
it keeps after the start, and what it sends its peer on reconnection. A start on an empty store
is the floor.

usage: bench/worknode-restart.py [REFEREE] [N] [S]
"""
import json, os, subprocess, sys, tempfile, time

ref = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/referee-target/release/referee")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
size = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000


class Replica:
    def __init__(self, dir=None):
        self.dir = dir or tempfile.mkdtemp(prefix="restart-")
        env = {k: v for k, v in os.environ.items() if k not in ("REFEREE_HOME", "REFEREE_COMM_IDENTITY")}
        t = time.time()
        self.p = subprocess.Popen(
            [ref, "--json", "node", "serve", "--listen", "tcp://127.0.0.1:0", "--allow-any", "--dir", self.dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        hello = json.loads(self.p.stdout.readline())
        self.started = time.time() - t
        self.addr, self.id = hello["listening"], hello["id"]

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def ok(self, line):
        r = self.ask(line)
        assert "ok" in r, (line, r)
        return r["ok"]

    def sync(self):
        return self.ok("stats")["sync"]

    def rss_mb(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0

    def restart(self):
        self.close()
        return Replica(self.dir)

    def close(self):
        self.p.kill()
        self.p.wait()


def wait(pred, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit("timed out")


empty = Replica()
floor = empty.started
empty.close()
a, b = Replica(), Replica()
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
    wait(lambda: b.ask(f"get /n{n - 1}").get("ok", {}).get("state", {}).get("s"))
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
