//! 1,000 concurrent connections held by one node.

use std::time::Duration;

use referee_comm::{AllowList, Config, ConnectOptions, Identity, Node};

use crate::helpers::*;

fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_are_held() -> TestResult {
    const N: usize = 1000;
    if let Some(limit) = open_files_limit() {
        assert!(limit >= 2 * N as u64 + 200, "open-files limit {limit} too low: run `ulimit -n 4096` first");
    }
    let dir = tempfile::tempdir()?;
    let addr = format!("unix://{}", dir.path().join("many.sock").display());
    let mut p = pair_on(&addr, Config::default(), Config::default()).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let target = p.listener.local_addr().clone();
    // Many client nodes, so every connection is a separate authenticated peer connection.
    let clients: Vec<Node> = (0..4)
        .map(|_| Node::new(p.client_id.clone(), AllowList::new([p.server_id.id()]), Config::default()).0)
        .collect();
    let mut conns = Vec::with_capacity(N);
    for chunk in 0..N / 50 {
        let mut batch = Vec::new();
        for i in 0..50 {
            let node = clients.get((chunk * 50 + i) % clients.len()).ok_or("client")?.clone();
            let target = target.clone();
            batch.push(tokio::spawn(async move {
                node.connect_with(&target, ConnectOptions::default().reuse(false)).await
            }));
        }
        for t in batch {
            conns.push(t.await??);
        }
    }
    assert_eq!(p.server.connections().len(), N);
    // Every connection still works after all are open.
    for (i, c) in conns.iter().enumerate().step_by(7) {
        let body = (i as u32).to_be_bytes().to_vec();
        assert_eq!(c.request(body.clone(), Duration::from_secs(10)).await?[..], body[..]);
    }
    assert!(conns.iter().all(|c| !c.is_closed()));
    Ok(())
}

#[tokio::test]
async fn identity_file_round_trips_with_owner_only_mode() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("id.key");
    let id = Identity::generate()?;
    id.save_new(&path)?;
    assert_eq!(Identity::load(&path)?.id(), id.id());
    assert!(id.save_new(&path).is_err(), "never overwrites");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    assert!(Identity::load(&path).is_err(), "group/world readable secret refused");
    Ok(())
}
