//! Garbage, replayed, reordered, tampered and oversized frames: clean refusal, never a panic.

use std::time::Duration;

use referee_comm::{Config, SendError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// Frame index (client to server) of the first transport record in an XX handshake.
const FIRST_DATA: usize = 2;

/// Sends message A (frame 2), waits for it, then message B (frame 3) and C (frame 4), each its
/// own frame, through a proxy applying `m`; returns what the server received and why it closed.
async fn run_through_proxy(m: Mutation) -> Res<(Vec<Vec<u8>>, String)> {
    let mut p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let mut msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let mut prox = proxy(tcp_addr(&p.listener)?, m).await?;
    let conn = p.client.connect(&prox.addr).await?;
    conn.send(&b"A"[..]).await?;
    assert_eq!(&recv_guarded(&mut msgs).await?[..], b"A");
    conn.send(&b"B"[..]).await?;
    prox.wait_seen(FIRST_DATA + 1).await?;
    conn.send(&b"C"[..]).await?;
    let reason = wait_closed(&mut server_events).await?;
    let mut got = Vec::new();
    while let Ok(m) = msgs.try_recv() {
        got.push(m.to_vec());
    }
    Ok((got, reason))
}

#[tokio::test]
async fn replayed_frame_closes_the_connection() -> TestResult {
    let (got, reason) = run_through_proxy(Mutation::Duplicate(FIRST_DATA + 1)).await?;
    assert!(reason.contains("failed authentication"), "{reason}");
    assert!(reason.contains("replayed"), "{reason}");
    assert_eq!(got, vec![b"B".to_vec()], "B once, the replay and everything after it refused");
    Ok(())
}

#[tokio::test]
async fn reordered_frames_close_the_connection() -> TestResult {
    let (got, reason) = run_through_proxy(Mutation::Swap(FIRST_DATA + 1)).await?;
    assert!(reason.contains("frame 1 failed authentication"), "{reason}");
    assert!(got.is_empty(), "nothing out of order is delivered: {got:?}");
    Ok(())
}

#[tokio::test]
async fn tampered_frame_closes_the_connection() -> TestResult {
    let (got, reason) = run_through_proxy(Mutation::Flip(FIRST_DATA + 1)).await?;
    assert!(reason.contains("frame 1 failed authentication"), "{reason}");
    assert!(got.is_empty(), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn garbage_frame_after_the_handshake_closes_the_connection() -> TestResult {
    let mut garbage = vec![0u8, 40];
    garbage.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    let (got, reason) = run_through_proxy(Mutation::InjectBefore(FIRST_DATA + 1, garbage)).await?;
    assert!(reason.contains("frame 1 failed authentication"), "{reason}");
    assert!(got.is_empty(), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn oversized_frame_is_refused_from_its_length_prefix() -> TestResult {
    // A 65535-byte frame announced but never sent: refused without waiting for (or allocating) it.
    let mut server_cfg = Config::default();
    server_cfg.max_frame_len = 4096;
    let mut p = pair_on("tcp://127.0.0.1:0", server_cfg.clone(), server_cfg).await?;
    let mut server_events = p.server.events();
    let mut msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let prox = proxy(tcp_addr(&p.listener)?, Mutation::InjectBefore(FIRST_DATA + 1, vec![0xff, 0xff])).await?;
    let conn = p.client.connect(&prox.addr).await?;
    conn.send(&b"A"[..]).await?;
    assert_eq!(&recv_guarded(&mut msgs).await?[..], b"A");
    conn.send(&b"B"[..]).await?;
    let reason = wait_closed(&mut server_events).await?;
    assert!(reason.contains("65535 bytes exceeds the maximum of 4096"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn peer_writing_frames_above_our_limit_is_refused() -> TestResult {
    let mut small = Config::default();
    small.max_frame_len = 1024;
    let mut p = pair_on("tcp://127.0.0.1:0", small, Config::default()).await?;
    let mut server_events = p.server.events();
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    conn.send(vec![7u8; 8000]).await?;
    let reason = wait_closed(&mut server_events).await?;
    assert!(reason.contains("exceeds the maximum of 1024"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn tampered_handshake_message_is_refused() -> TestResult {
    let p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let prox = proxy(tcp_addr(&p.listener)?, Mutation::Flip(1)).await?;
    let err = p.client.connect(&prox.addr).await.err().ok_or("tampered handshake accepted")?;
    let reason = wait_refused(&mut server_events).await?;
    assert!(reason.contains("noise handshake failed"), "{reason} / client saw {err}");
    Ok(())
}

#[tokio::test]
async fn garbage_before_the_handshake_is_refused_and_the_node_keeps_serving() -> TestResult {
    let mut p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let target = tcp_addr(&p.listener)?;
    // Plain garbage, an HTTP request, a valid magic with an unknown pattern, and a short write.
    for junk in [&b"\x00\xff\x13\x37garbage garbage"[..], b"GET / HTTP/1.1\r\n\r\n", b"RFCM\x01\x09rest", b"RF"] {
        let mut s = tokio::net::TcpStream::connect(target).await?;
        s.write_all(junk).await?;
        s.shutdown().await?;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "the node answers garbage with nothing");
        let reason = wait_refused(&mut server_events).await?;
        assert!(reason.contains("not speaking referee-comm") || reason.contains("closed"), "{reason}");
    }
    // A valid preamble followed by a garbage handshake frame.
    let mut s = tokio::net::TcpStream::connect(target).await?;
    s.write_all(b"RFCM\x01\x00\x00\x20").await?;
    s.write_all(&[0xAB; 32]).await?;
    s.write_all(&[0x00, 0x05, 1, 2, 3, 4, 5]).await?;
    let reason = wait_refused(&mut server_events).await?;
    assert!(!reason.is_empty());
    let conn = p.client.connect(p.listener.local_addr()).await?;
    assert_eq!(&conn.request(&b"still here"[..], GUARD).await?[..], b"still here");
    Ok(())
}

#[tokio::test]
async fn message_above_the_limit_is_refused_locally() -> TestResult {
    let mut cfg = Config::default();
    cfg.max_message_len = 1000;
    let mut p = pair_on("tcp://127.0.0.1:0", Config::default(), cfg).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let err = conn.send(vec![0u8; 1001]).await.err().ok_or("oversized message accepted")?;
    assert!(matches!(err, SendError::TooLarge { len: 1001, max: 1000 }), "{err}");
    assert_eq!(&conn.request(vec![1u8; 1000], Duration::from_secs(5)).await?[..], &[1u8; 1000][..]);
    Ok(())
}

/// Found attacking the admission fix: identities that hoard connections filled
/// `max_connections` and every other peer was refused. Now the peer holding the most gives up
/// its oldest connection to one that holds few.
#[tokio::test]
async fn a_full_node_evicts_a_hoarding_peers_oldest_connection_for_a_new_peer() -> TestResult {
    use referee_comm::{AllowList, ConnectOptions, Identity, Node};
    let server_id = Identity::generate()?;
    let mut cfg = Config::default();
    cfg.max_connections = 4;
    let (server, _inbox) = Node::new(server_id.clone(), AllowList::allow_any(), cfg);
    let listener = server.listen(&"tcp://127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr().clone();
    let opts = ConnectOptions::default().expect_peer(server_id.id()).reuse(false);
    let hog = Node::new(Identity::generate()?, AllowList::new([server_id.id()]), Config::default()).0;
    let mut hoarded = Vec::new();
    for _ in 0..4 {
        hoarded.push(hog.connect_with(&addr, opts.clone()).await?);
    }
    let other = Node::new(Identity::generate()?, AllowList::new([server_id.id()]), Config::default()).0;
    let conn = other.connect_with(&addr, opts.clone()).await?;
    let reason = tokio::time::timeout(GUARD, hoarded[0].closed()).await?;
    assert!(!conn.is_closed(), "the newcomer keeps its connection");
    assert!(hoarded[1..].iter().all(|c| !c.is_closed()), "only the oldest is evicted ({reason})");
    tokio::time::timeout(GUARD, async {
        while server.connections().len() != 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    // The hoarder cannot take its place back from a peer holding one connection.
    let refused = hog.connect_with(&addr, opts).await?;
    tokio::time::timeout(GUARD, refused.closed()).await?;
    assert!(!conn.is_closed());
    Ok(())
}
