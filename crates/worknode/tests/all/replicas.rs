//! Three replicas as separate processes on loopback: concurrent updates on both sides of a
//! partition (and a crash-restart during it) converge once the partition heals.

use std::time::{Duration, Instant};

use referee_worknode::cli::NodeCommand;
use serde_json::Value;

use crate::util::ChildProc;

/// Child role: `referee node serve` with `args[0]` as the store directory.
pub(crate) fn serve(args: &[String]) {
    let cmd = NodeCommand::Serve {
        dir: args[0].clone().into(),
        listen: "tcp://127.0.0.1:0".into(),
        identity: None,
        peers: vec![],
        allow: vec![],
        allow_any: true,
    };
    referee_worknode::cli::run(cmd, true).unwrap();
}

struct Replica {
    proc: ChildProc,
    addr: String,
    id: String,
}

fn start(dir: &std::path::Path) -> Replica {
    let proc = ChildProc::spawn("serve", &[dir.display().to_string()]);
    let hello: Value =
        serde_json::from_str(&proc.next_with("{", Duration::from_secs(30)).expect("replica did not start")).unwrap();
    Replica {
        addr: hello["listening"].as_str().unwrap().to_owned(),
        id: hello["id"].as_str().unwrap().to_owned(),
        proc,
    }
}

impl Replica {
    fn ok(&mut self, line: &str) -> Value {
        let reply = self.proc.ask(line);
        assert!(reply.get("error").is_none(), "{line:?} failed: {reply}");
        reply["ok"].clone()
    }

    fn state(&mut self, path: &str) -> Option<Value> {
        let reply = self.proc.ask(&format!("get {path}"));
        reply.get("ok").map(|v| v["state"].clone())
    }

    fn add(&mut self, n: i64, log: &mut Vec<i64>) {
        self.ok(&format!("send /acme/counter add hits {n}"));
        log.push(n);
    }
}

fn link(a: &mut Replica, to: &(String, String)) {
    a.ok(&format!("peer {} {}", to.0, to.1));
}

fn contact(r: &Replica) -> (String, String) {
    (r.addr.clone(), r.id.clone())
}

/// Polls (bounded) until `pred` holds for the replica's state of /acme/counter.
fn wait_for(r: &mut Replica, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = r.state("/acme/counter");
        if let Some(s) = &s
            && pred(s)
        {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last state {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_replicas_converge_after_a_partition_with_concurrent_updates() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut r: Vec<Replica> = dirs.iter().map(|d| start(d.path())).collect();
    let contacts: Vec<_> = r.iter().map(contact).collect();
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        link(&mut r[i], &contacts[j]);
    }
    let mut log = Vec::new();
    r[0].ok("create /acme data local");
    r[0].ok("create /acme/counter data eventual");
    r[0].add(1, &mut log);
    for replica in r.iter_mut().skip(1) {
        wait_for(replica, "the worknode to replicate", |s| s["hits"] == 1);
    }

    // Partition: replica 2 alone on one side, replicas 0 and 1 on the other.
    r[2].ok("isolate");
    let mut side_a = Vec::new();
    for n in [5, 5, 5] {
        r[0].add(n, &mut side_a);
    }
    r[1].add(7, &mut side_a);
    r[0].ok("send /acme/counter insert tags from-0");
    let mut side_b = Vec::new();
    for n in [11, 11, -3] {
        r[2].add(n, &mut side_b);
    }
    r[2].ok("send /acme/counter insert tags from-2");
    r[2].ok("send /acme/counter put notes owner two");
    let a_total: i64 = log.iter().chain(&side_a).sum();
    let b_total: i64 = log.iter().chain(&side_b).sum();
    wait_for(&mut r[1], "side A to converge", |s| s["hits"] == a_total);
    r[2].ok("idle");
    assert_eq!(r[2].state("/acme/counter").unwrap()["hits"], b_total, "the partition leaked");

    // Crash replica 1 during the partition and restart it from its store.
    r[1].proc.kill();
    let mut restarted = start(dirs[1].path());
    assert_eq!(restarted.state("/acme/counter").unwrap()["hits"], a_total, "replica 1 lost acknowledged state");
    link(&mut restarted, &contacts[0]);
    link(&mut restarted, &contacts[2]);
    restarted.add(2, &mut side_a);
    r[1] = restarted;

    // Heal: everything converges to the sum of every increment, derived from the log above.
    r[2].ok("heal");
    let total: i64 = log.iter().chain(&side_a).chain(&side_b).sum();
    let mut finals = Vec::new();
    for (i, replica) in r.iter_mut().enumerate() {
        finals.push(wait_for(replica, &format!("replica {i} to converge"), |s| {
            s["hits"] == total && s["tags"].as_array().is_some_and(|t| t.len() == 2)
        }));
    }
    assert_eq!(finals[0]["tags"], serde_json::json!(["from-0", "from-2"]));
    assert_eq!(finals[0]["notes"], serde_json::json!({"owner": "two"}));
    assert_eq!(finals[0], finals[1]);
    assert_eq!(finals[1], finals[2]);
}
