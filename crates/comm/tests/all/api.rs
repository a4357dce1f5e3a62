//! The tokio API: request/reply with timeouts and correlation, pub/sub, reuse, reconnection
//! with backoff, backpressure, orderly close.

use std::time::Duration;

use referee_comm::{Addr, AllowList, Backoff, Config, ConnectOptions, Event, Identity, Node, RequestError};

use crate::helpers::*;

#[tokio::test]
async fn concurrent_requests_get_their_own_replies() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move { (i, conn.request(i.to_le_bytes().to_vec(), GUARD).await) }));
    }
    for t in tasks {
        let (i, reply) = t.await?;
        assert_eq!(reply?[..], i.to_le_bytes()[..]);
    }
    Ok(())
}

#[tokio::test]
async fn request_times_out_and_remote_errors_are_reported() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let err = conn.request(&b"ignore"[..], Duration::from_millis(50)).await.err().ok_or("no timeout")?;
    assert!(matches!(err, RequestError::Timeout(_)), "{err}");
    let err = conn.request(&b"fail"[..], GUARD).await.err().ok_or("no remote error")?;
    assert!(matches!(&err, RequestError::Remote(r) if r == "you asked for it"), "{err}");
    // The connection is still fine after both.
    assert_eq!(&conn.request(&b"ok"[..], GUARD).await?[..], b"ok");
    Ok(())
}

#[tokio::test]
async fn requests_fail_fast_when_the_connection_closes() -> TestResult {
    let p = tcp_pair().await?;
    let mut server_inbox = p.server_inbox.ok_or("inbox")?;
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.request(&b"never answered"[..], GUARD).await })
    };
    let req = tokio::time::timeout(GUARD, server_inbox.recv()).await?.ok_or("no request")?;
    req.connection().close("server going away").await;
    let err = pending.await?.err().ok_or("request succeeded")?;
    assert!(matches!(&err, RequestError::Closed(_)), "{err}");
    assert!(err.to_string().contains("server going away"), "{err}");
    Ok(())
}

#[tokio::test]
async fn publish_reaches_only_subscribers_of_the_topic() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let mut prices = conn.subscribe("prices").await?;
    // The subscription is in effect once a later request round-trips (same ordered stream).
    conn.request(&b"sync"[..], GUARD).await?;
    assert_eq!(p.server.publish("news", &b"ignored"[..]).await, 0);
    assert_eq!(p.server.publish("prices", &b"42"[..]).await, 1);
    assert_eq!(p.server.publish("prices", &b"43"[..]).await, 1);
    let got = tokio::time::timeout(GUARD, prices.recv()).await?.ok_or("subscription ended")?;
    assert_eq!(&got[..], b"42");
    let got = tokio::time::timeout(GUARD, prices.recv()).await?.ok_or("subscription ended")?;
    assert_eq!(&got[..], b"43");
    prices.unsubscribe().await?;
    conn.request(&b"sync"[..], GUARD).await?;
    assert_eq!(p.server.publish("prices", &b"44"[..]).await, 0);
    Ok(())
}

#[tokio::test]
async fn connections_are_reused_per_address() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let a = p.client.connect(p.listener.local_addr()).await?;
    let b = p.client.connect(p.listener.local_addr()).await?;
    a.request(&b"x"[..], GUARD).await?;
    b.request(&b"y"[..], GUARD).await?;
    assert_eq!(p.client.connections().len(), 1);
    assert_eq!(a.stats(), b.stats(), "both handles share one connection");
    Ok(())
}

#[tokio::test]
async fn connect_retries_with_backoff_until_the_listener_appears() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("late.sock");
    let addr: Addr = format!("unix://{}", path.display()).parse()?;
    let (sid, cid) = (Identity::generate()?, Identity::generate()?);
    let mut cfg = Config::default();
    cfg.reconnect = Backoff::new(Duration::from_millis(5), Duration::from_millis(50), 1000);
    let (client, _ci) = Node::new(cid.clone(), AllowList::new([sid.id()]), cfg);
    let mut events = client.events();
    let dialing = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::spawn(async move { client.connect(&addr).await })
    };
    // Wait until a dial attempt has actually failed, then start the server.
    wait_event(&mut events, |e| matches!(e, Event::Retrying { .. }).then_some(())).await?;
    let (server, inbox) = Node::new(sid.clone(), AllowList::new([cid.id()]), Config::default());
    let _l = server.listen(&addr).await?;
    let _msgs = spawn_echo(inbox);
    let conn = dialing.await??;
    assert_eq!(conn.peer().id, sid.id());
    assert_eq!(&conn.request(&b"late"[..], GUARD).await?[..], b"late");
    Ok(())
}

#[tokio::test]
async fn a_closed_connection_is_replaced_on_the_next_connect() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let mut client_events = p.client.events();
    let first = p.client.connect(p.listener.local_addr()).await?;
    first.request(&b"1"[..], GUARD).await?;
    let server_side = p.server.connections().pop().ok_or("no server connection")?;
    server_side.close("restart").await;
    let reason = wait_closed(&mut client_events).await?;
    assert!(reason.contains("restart"), "{reason}");
    let second = p.client.connect(p.listener.local_addr()).await?;
    assert!(!second.is_closed());
    assert!(second.peer().ik, "reconnect uses IK with the cached static key");
    assert_eq!(&second.request(&b"2"[..], GUARD).await?[..], b"2");
    Ok(())
}

#[tokio::test]
async fn a_slow_consumer_applies_backpressure_without_losing_messages() -> TestResult {
    let dir = tempfile::tempdir()?;
    let addr = format!("unix://{}", dir.path().join("bp.sock").display());
    let mut cfg = Config::default();
    cfg.inbox_capacity = 4;
    cfg.send_queue = 4;
    let mut p = pair_on(&addr, cfg.clone(), cfg).await?;
    let mut inbox = p.server_inbox.take().ok_or("inbox")?;
    let conn = p.client.connect(p.listener.local_addr()).await?;
    // Nobody reads the inbox: sends must eventually stop completing.
    let payload = bytes::Bytes::from(vec![9u8; 32 * 1024]);
    let mut sent = 0u32;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(200), conn.send(payload.clone())).await {
            Ok(r) => {
                r?;
                sent += 1;
                if sent > 100_000 {
                    break false;
                }
            }
            Err(_) => break true,
        }
    };
    assert!(blocked, "send never blocked: buffers are not bounded");
    // Drain: every message that was accepted arrives (the timed-out one may or may not be queued).
    for _ in 0..sent {
        let m = tokio::time::timeout(GUARD, inbox.recv()).await?.ok_or("inbox closed")?;
        assert_eq!(m.payload().len(), payload.len());
    }
    Ok(())
}

#[tokio::test]
async fn expected_peer_on_reuse_must_match() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let c = p.client.connect(p.listener.local_addr()).await?;
    let same =
        p.client.connect_with(p.listener.local_addr(), ConnectOptions::default().expect_peer(p.server_id.id())).await?;
    assert_eq!(c.stats(), same.stats());
    Ok(())
}

#[tokio::test]
async fn listening_on_a_taken_address_is_a_clear_bind_error() -> TestResult {
    let p = tcp_pair().await?;
    let err = p.server.listen(p.listener.local_addr()).await.err().ok_or("double bind succeeded")?;
    assert!(matches!(err, referee_comm::ConnectError::Bind { .. }), "{err}");
    assert!(err.to_string().contains("could not listen on"), "{err}");
    Ok(())
}
