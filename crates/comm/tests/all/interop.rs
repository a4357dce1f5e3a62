//! Interoperability with an independent Noise implementation: Python `noiseprotocol`.

use std::process::Stdio;
use std::time::Duration;

use referee_comm::{AllowList, Config, Identity, Node, PeerId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::helpers::*;

/// Keep in sync with `.ci/run` (pip line) and `crates/comm/tests/interop/peer.py`.
const NOISEPROTOCOL: &str = "noiseprotocol==0.3.1";

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/peer.py")
}

#[tokio::test]
async fn python_noiseprotocol_peer_handshakes_and_exchanges_messages_across_rekeys() -> TestResult {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import noise, cryptography"])
        .output()
        .map_err(|e| format!("python3 is required for the interop test: {e}"))?;
    assert!(
        probe.status.success(),
        "the Python Noise peer is missing: run `pip install {NOISEPROTOCOL}` ({})",
        String::from_utf8_lossy(&probe.stderr).trim()
    );

    let server_id = Identity::generate()?;
    let mut cfg = Config::default();
    cfg.rekey_after_frames = 4;
    let (server, mut inbox) = Node::new(server_id.clone(), AllowList::allow_any(), cfg);
    let listener = server.listen(&"tcp://127.0.0.1:0".parse()?).await?;
    let mut events = server.events();
    let mut child = tokio::process::Command::new("python3")
        .arg(script())
        .arg(tcp_addr(&listener)?.to_string())
        .arg(server_id.id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = child.stderr.take().ok_or("stderr")?;
    let outcome = converse(&server, &mut inbox, &mut events, &mut child).await;
    if let Err(e) = outcome {
        let _ = child.start_kill();
        let mut err = String::new();
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut err)).await;
        return Err(format!("{e}\npython stderr:\n{err}").into());
    }
    Ok(())
}

async fn converse(
    server: &Node,
    inbox: &mut referee_comm::Inbox,
    events: &mut tokio::sync::broadcast::Receiver<referee_comm::Event>,
    child: &mut tokio::process::Child,
) -> TestResult {
    let mut lines = BufReader::new(child.stdout.take().ok_or("stdout")?).lines();
    let mut stdin = child.stdin.take().ok_or("stdin")?;

    // The script prints its identity, then handshakes.
    let first = tokio::time::timeout(GUARD, lines.next_line()).await??.ok_or("script ended early")?;
    let py_id: PeerId = first.strip_prefix("id ").ok_or(format!("unexpected line {first}"))?.parse()?;
    let conn = tokio::time::timeout(GUARD, async {
        loop {
            if let Some(c) = server.connections().into_iter().find(|c| c.peer().id == py_id) {
                return c;
            }
            let _ = events.recv().await;
        }
    })
    .await?;

    // Python -> Rust: 10 one-way messages and 10 requests (the script rekeys its direction every 3).
    for i in 0..20u32 {
        let m = tokio::time::timeout(GUARD, inbox.recv()).await?.ok_or("inbox closed")?;
        assert_eq!(m.from(), py_id);
        let text = String::from_utf8(m.payload().to_vec())?;
        assert_eq!(text, format!("py {i}"));
        if m.is_request() {
            m.reply(format!("re: {text}")).await?;
        }
    }
    // Rust -> Python: 12 messages (our side rekeys every 4 frames); the script echoes them back.
    for i in 0..12u32 {
        conn.send(format!("rs {i}")).await?;
    }
    stdin.write_all(b"go\n").await?;
    for i in 0..12u32 {
        let m = tokio::time::timeout(GUARD, inbox.recv()).await?.ok_or("inbox closed")?;
        assert_eq!(String::from_utf8(m.payload().to_vec())?, format!("echo rs {i}"));
    }
    let mut report = String::new();
    while let Some(line) = tokio::time::timeout(GUARD, lines.next_line()).await?? {
        report.push_str(&line);
        report.push('\n');
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(status.success(), "python peer failed: {report}");
    assert!(report.contains("ok replies=10 received=12"), "{report}");
    let stats = conn.stats();
    assert!(stats.rekeys_sent >= 2, "we rekeyed {stats:?}");
    assert!(stats.rekeys_received >= 3, "python rekeyed {stats:?}");
    Ok(())
}
