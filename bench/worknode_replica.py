"""A release `referee node serve` replica driven over its stdin, for the worknode benchmark
scripts (`worknode-antientropy.py`, `worknode-restart.py`)."""
import json, os, subprocess, tempfile, time


class Replica:
    """`node serve --allow-any` on a store directory (a fresh one unless `dir` is given)."""

    def __init__(self, ref, dir=None):
        self.ref = ref
        self.dir = dir or tempfile.mkdtemp(prefix="wn-bench-")
        env = {k: v for k, v in os.environ.items() if k not in ("REFEREE_HOME", "REFEREE_COMM_IDENTITY")}
        t = time.time()
        self.p = subprocess.Popen(
            [ref, "--json", "node", "serve", "--listen", "tcp://127.0.0.1:0", "--allow-any", "--dir", self.dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        hello = json.loads(self.p.stdout.readline())
        # Until its first line: what a start costs.
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
        """Peak resident memory (VmHWM), MB."""
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0

    def restart(self):
        """Killed, and served again from its store."""
        self.close()
        return Replica(self.ref, self.dir)

    def close(self):
        self.p.kill()
        self.p.wait()


def wait(pred, timeout=120, every=0.02):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise SystemExit("timed out")
