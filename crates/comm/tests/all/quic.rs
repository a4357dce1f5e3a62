//! QUIC transport with the TLS key pinned to the node identity.

use referee_comm::{AllowList, Config, ConnectError, Identity, Node};

use crate::helpers::*;

#[tokio::test]
async fn quic_request_reply_and_pubsub() -> TestResult {
    let mut p = pair_on("quic://127.0.0.1:0", Config::default(), Config::default()).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    assert_eq!(conn.peer().id, p.server_id.id());
    assert_eq!(&conn.request(&b"over quic"[..], GUARD).await?[..], b"over quic");
    let big = vec![5u8; 200_000];
    assert_eq!(conn.request(big.clone(), GUARD).await?.len(), big.len());
    Ok(())
}

#[tokio::test]
async fn quic_refuses_a_client_whose_tls_key_is_not_allowed() -> TestResult {
    let p = pair_on("quic://127.0.0.1:0", Config::default(), Config::default()).await?;
    let mut server_events = p.server.events();
    let (stranger, _i) = Node::new(Identity::generate()?, AllowList::new([p.server_id.id()]), Config::default());
    let err = stranger.connect(p.listener.local_addr()).await.err().ok_or("stranger accepted over QUIC")?;
    assert!(matches!(err, ConnectError::Quic(_) | ConnectError::Handshake { .. }), "{err}");
    let reason = wait_refused(&mut server_events).await?;
    assert!(reason.contains("QUIC/TLS"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn quic_client_refuses_a_server_whose_tls_key_is_not_pinned() -> TestResult {
    let p = pair_on("quic://127.0.0.1:0", Config::default(), Config::default()).await?;
    let (node, _i) = Node::new(p.client_id.clone(), AllowList::default(), Config::default());
    let err = node.connect(p.listener.local_addr()).await.err().ok_or("unpinned server accepted")?;
    assert!(err.to_string().contains("not the pinned/allowed referee identity"), "{err}");
    Ok(())
}
