//! Helpers: spawning this test binary as a child process with a role.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub(crate) const ROLE_VAR: &str = "WN_CHILD_ROLE";

/// Runs the role named in `WN_CHILD_ROLE` (if any).
pub(crate) fn run_child_role() {
    let Ok(role) = std::env::var(ROLE_VAR) else { return };
    let args: Vec<String> =
        std::env::var("WN_CHILD_ARGS").unwrap_or_default().split('\u{1f}').map(str::to_owned).collect();
    match role.as_str() {
        "writer" => crate::crash::writer(&args),
        "serve" => crate::replicas::serve(&args),
        other => panic!("unknown child role {other}"),
    }
}

/// A child process speaking lines on stdin/stdout.
pub(crate) struct ChildProc {
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ChildProc {
    pub(crate) fn spawn(role: &str, args: &[String]) -> ChildProc {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "child_role", "--nocapture", "--test-threads=1", "-q"])
            .env(ROLE_VAR, role)
            .env("WN_CHILD_ARGS", args.join("\u{1f}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    // Only complete lines count: a line cut by SIGKILL was never acknowledged.
                    Ok(n) if n > 0 && buf.ends_with(b"\n") => {
                        if tx.send(String::from_utf8_lossy(&buf).trim_end().to_owned()).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        ChildProc { child, stdin, lines }
    }

    /// The next line containing `marker`, from `marker` on (libtest may prefix its own text).
    pub(crate) fn next_with(&self, marker: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if let Some(i) = line.find(marker) {
                return Some(line[i..].to_owned());
            }
        }
    }

    /// Every remaining complete line containing `marker`, until the child's stdout closes.
    pub(crate) fn drain_with(&self, marker: &str) -> Vec<String> {
        self.lines.iter().filter_map(|l| l.find(marker).map(|i| l[i..].to_owned())).collect()
    }

    /// Sends one command line and returns the JSON reply.
    pub(crate) fn ask(&mut self, line: &str) -> serde_json::Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let reply = self.next_with("{", Duration::from_secs(30)).unwrap_or_else(|| panic!("no reply to {line:?}"));
        serde_json::from_str(&reply).unwrap()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}
