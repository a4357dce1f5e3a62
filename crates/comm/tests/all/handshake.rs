//! Identity, XX/IK handshakes and allow-list refusals.

use std::time::Duration;

use referee_comm::{AllowList, Config, ConnectError, ConnectOptions, Event, HandshakeError, Identity, Node};

use crate::helpers::*;

#[tokio::test]
async fn xx_handshake_authenticates_both_sides_over_tcp() -> TestResult {
    let mut p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    assert_eq!(conn.peer().id, p.server_id.id());
    assert!(!conn.peer().ik, "first contact uses XX");
    assert_eq!(conn.peer().version, 1);
    let who = wait_event(&mut server_events, |e| match e {
        Event::Connected { peer, inbound: true, .. } => Some(*peer),
        _ => None,
    })
    .await?;
    assert_eq!(who, p.client_id.id());
    assert_eq!(&conn.request(&b"hi"[..], GUARD).await?[..], b"hi");
    Ok(())
}

#[tokio::test]
async fn unix_socket_handshake_and_request() -> TestResult {
    let dir = tempfile::tempdir()?;
    let addr = format!("unix://{}", dir.path().join("comm.sock").display());
    let mut p = pair_on(&addr, Config::default(), Config::default()).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    assert_eq!(conn.peer().id, p.server_id.id());
    assert_eq!(&conn.request(&b"over unix"[..], GUARD).await?[..], b"over unix");
    Ok(())
}

#[tokio::test]
async fn ik_is_used_once_the_static_key_is_known() -> TestResult {
    let mut p = tcp_pair().await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let first = p.client.connect(p.listener.local_addr()).await?;
    assert!(!first.peer().ik);
    let second = p.client.connect_with(p.listener.local_addr(), ConnectOptions::default().reuse(false)).await?;
    assert!(second.peer().ik, "the cached static key selects IK");
    assert_eq!(&second.request(&b"ik"[..], GUARD).await?[..], b"ik");
    // An explicitly pinned static key works without any cache.
    let (fresh, _inbox) = Node::new(p.client_id.clone(), AllowList::new([p.server_id.id()]), Config::default());
    let opts = ConnectOptions::default().remote_static(*p.server_id.noise_public()).expect_peer(p.server_id.id());
    let third = fresh.connect_with(p.listener.local_addr(), opts).await?;
    assert!(third.peer().ik);
    Ok(())
}

#[tokio::test]
async fn unknown_client_is_refused_during_handshake() -> TestResult {
    let p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let stranger = Identity::generate()?;
    let (node, _inbox) = Node::new(stranger, AllowList::new([p.server_id.id()]), Config::default());
    let err = node.connect(p.listener.local_addr()).await.err().ok_or("stranger was accepted")?;
    match &err {
        ConnectError::Handshake { source: HandshakeError::Refused(reason), .. } => {
            assert!(reason.contains("not on the allow-list"), "{reason}");
        }
        other => return Err(format!("unexpected error: {other}").into()),
    }
    let reason = wait_refused(&mut server_events).await?;
    assert!(reason.contains("not on the allow-list"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn client_refuses_a_server_not_on_its_allow_list() -> TestResult {
    let p = tcp_pair().await?;
    let (node, _inbox) = Node::new(p.client_id.clone(), AllowList::default(), Config::default());
    let err = node.connect(p.listener.local_addr()).await.err().ok_or("unknown server was accepted")?;
    assert!(
        matches!(err, ConnectError::Handshake { source: HandshakeError::UnknownPeer(id), .. } if id == p.server_id.id()),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn ik_with_a_wrong_static_key_is_refused() -> TestResult {
    let p = tcp_pair().await?;
    let mut server_events = p.server.events();
    let impostor = Identity::generate()?;
    let opts = ConnectOptions::default().remote_static(*impostor.noise_public());
    let err = p.client.connect_with(p.listener.local_addr(), opts).await.err().ok_or("wrong static accepted")?;
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    let reason = wait_refused(&mut server_events).await?;
    assert!(reason.contains("noise handshake failed"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn a_different_responder_than_expected_is_refused() -> TestResult {
    let p = tcp_pair().await?;
    let other = Identity::generate()?;
    let opts = ConnectOptions::default().expect_peer(other.id());
    let err = p.client.connect_with(p.listener.local_addr(), opts).await.err().ok_or("wrong peer accepted")?;
    assert!(matches!(err, ConnectError::Handshake { source: HandshakeError::WrongPeer { .. }, .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn handshake_times_out_against_a_silent_server() -> TestResult {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("tcp://{}", silent.local_addr()?).parse()?;
    let mut cfg = Config::default();
    cfg.handshake_timeout = Duration::from_millis(200);
    let (node, _inbox) = Node::new(Identity::generate()?, AllowList::allow_any(), cfg);
    let err = node.connect(&addr).await.err().ok_or("silent server accepted")?;
    assert!(matches!(err, ConnectError::Handshake { source: HandshakeError::Timeout(_), .. }), "{err}");
    drop(silent);
    Ok(())
}
