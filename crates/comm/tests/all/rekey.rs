//! Rekeying in both directions under sustained load, with zero loss.

use std::time::Duration;

use bytes::Bytes;
use referee_comm::Config;

use crate::helpers::*;

fn rekeying(frames: u64, after: Duration) -> Config {
    let mut cfg = Config::default();
    cfg.rekey_after_frames = frames;
    cfg.rekey_after = after;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_under_sustained_load_loses_nothing_in_either_direction() -> TestResult {
    const ONE_WAY: u64 = 20_000;
    const REQUESTS: u64 = 2_000;
    let cfg = rekeying(3, Duration::from_secs(3600));
    let mut p = pair_on("tcp://127.0.0.1:0", cfg.clone(), cfg).await?;
    let mut msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;

    // Client -> server: numbered one-way messages, while requests flow both ways concurrently.
    let sender = {
        let conn = conn.clone();
        tokio::spawn(async move {
            for i in 0..ONE_WAY {
                conn.send(Bytes::copy_from_slice(&i.to_be_bytes())).await?;
            }
            Ok::<_, referee_comm::SendError>(())
        })
    };
    let requester = {
        let conn = conn.clone();
        tokio::spawn(async move {
            for i in 0..REQUESTS {
                let payload = vec![(i % 251) as u8; (i % 700) as usize + 1];
                let reply = conn.request(payload.clone(), GUARD).await?;
                if reply[..] != payload[..] {
                    return Err(referee_comm::RequestError::Remote(format!("reply {i} differs")));
                }
            }
            Ok(())
        })
    };
    for expect in 0..ONE_WAY {
        let m = recv_guarded(&mut msgs).await?;
        assert_eq!(m[..], expect.to_be_bytes()[..], "message {expect} lost or out of order");
    }
    sender.await??;
    requester.await??;
    let client = conn.stats();
    let server = p.server.connections().first().ok_or("server connection")?.stats();
    assert!(client.rekeys_sent > 100, "client rekeyed {} times", client.rekeys_sent);
    assert!(server.rekeys_sent > 100, "server rekeyed {} times", server.rekeys_sent);
    assert!(server.rekeys_received >= client.rekeys_sent - 1, "{server:?} vs {client:?}");
    assert_eq!(server.messages_received, ONE_WAY + REQUESTS);
    assert_eq!(client.messages_received, REQUESTS);
    Ok(())
}

#[tokio::test]
async fn time_based_rekey_applies_to_every_frame_when_the_interval_is_zero() -> TestResult {
    let cfg = rekeying(u64::MAX, Duration::ZERO);
    let mut p = pair_on("tcp://127.0.0.1:0", cfg.clone(), cfg).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    for i in 0..50u32 {
        assert_eq!(conn.request(i.to_be_bytes().to_vec(), GUARD).await?[..], i.to_be_bytes()[..]);
    }
    let s = conn.stats();
    assert!(s.rekeys_sent >= 50 && s.rekeys_received >= 50, "{s:?}");
    Ok(())
}

#[tokio::test]
async fn large_fragmented_messages_survive_rekeys_between_fragments() -> TestResult {
    let cfg = rekeying(2, Duration::from_secs(3600));
    let mut p = pair_on("tcp://127.0.0.1:0", cfg.clone(), cfg).await?;
    let _msgs = spawn_echo(p.server_inbox.take().ok_or("inbox")?);
    let conn = p.client.connect(p.listener.local_addr()).await?;
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let reply = conn.request(big.clone(), GUARD).await?;
    assert_eq!(reply.len(), big.len());
    assert!(reply[..] == big[..]);
    assert!(conn.stats().rekeys_sent >= 7);
    Ok(())
}
