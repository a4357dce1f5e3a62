//! Tunables and limits. Every buffer in the crate is bounded by one of these.

use std::time::Duration;

use crate::frame::MAX_NOISE_MESSAGE;

/// Node configuration. `Config::default()` is what production uses; tests shrink the limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Largest accepted frame (ciphertext) in bytes; at most 65535 (the Noise maximum).
    pub max_frame_len: usize,
    /// Largest message payload in bytes (bigger envelopes are fragmented over several frames).
    pub max_message_len: usize,
    /// Rekey each direction after this many frames under one key (default 2^20).
    pub rekey_after_frames: u64,
    /// Rekey each direction after this much time under one key (default 24 h).
    pub rekey_after: Duration,
    /// Time allowed for connect + handshake.
    pub handshake_timeout: Duration,
    /// Outgoing messages queued per connection before `send` waits (backpressure).
    pub send_queue: usize,
    /// Incoming messages/requests queued for the application before reading pauses.
    pub inbox_capacity: usize,
    /// Publications queued per subscription before reading pauses.
    pub subscription_capacity: usize,
    /// Topics one peer may subscribe to on this node.
    pub max_topics_per_peer: usize,
    /// Requests awaiting replies per connection.
    pub max_pending_requests: usize,
    /// Concurrent connections per node (accepted + initiated); more are refused.
    pub max_connections: usize,
    /// Handshakes in progress before authentication, node-wide (TCP, Unix and QUIC together).
    /// When full, a new connection evicts the handshake idle longest, preferring one that has not
    /// sent a complete first message: strangers holding sockets cannot starve allowed peers.
    pub max_handshakes: usize,
    /// Handshakes in progress from one source (IP address; Unix: user id). A source over its
    /// share evicts its own oldest handshake, never another source's.
    pub max_handshakes_per_source: usize,
    /// Time allowed between accepting a socket and receiving the preamble and the complete first
    /// handshake message.
    pub first_message_timeout: Duration,
    /// An IK first message carries the initiator's clock; one older or newer than this (from the
    /// responder's clock), or not newer than the last one seen from that identity, is refused
    /// as a replay. See `docs/comm.md`, "Replay window".
    pub ik_replay_window: Duration,
    /// Connections one authenticated peer may hold on this node at once.
    pub max_connections_per_peer: usize,
    /// Bytes of received, not yet consumed data (partial fragmented messages, the inbox,
    /// subscriptions) one peer may hold, over all its connections. Reading from that peer pauses
    /// while it is spent. Also the bound on bytes queued *to* one peer (a separate budget).
    pub peer_buffer_bytes: usize,
    /// The same budget for the whole node, per direction: received data from all peers, and data
    /// queued to all peers.
    pub node_buffer_bytes: usize,
    /// A fragmented message must arrive in full within this time once its first fragment came.
    pub message_timeout: Duration,
    /// A peer that accepts no bytes of a pending write for this long is disconnected (its
    /// queued messages fail) rather than waited for.
    pub write_timeout: Duration,
    /// Frames are coalesced into one socket write up to this many bytes.
    pub write_coalesce_bytes: usize,
    /// Reconnection policy for [`crate::Node::connect`].
    pub reconnect: Backoff,
}

/// Exponential backoff for (re)connection.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Backoff {
    /// First retry delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Attempts in total (1 = no retry).
    pub attempts: u32,
}

impl Backoff {
    /// A policy with these values.
    pub fn new(initial: Duration, max: Duration, attempts: u32) -> Self {
        Self { initial, max, attempts: attempts.max(1) }
    }
    /// Delay before retry number `n` (1-based): `initial * 2^(n-1)`, capped at `max`.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(50), max: Duration::from_secs(5), attempts: 8 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_len: MAX_NOISE_MESSAGE,
            max_message_len: 16 * 1024 * 1024,
            rekey_after_frames: 1 << 20,
            rekey_after: Duration::from_secs(24 * 3600),
            handshake_timeout: Duration::from_secs(10),
            send_queue: 1024,
            inbox_capacity: 4096,
            subscription_capacity: 1024,
            max_topics_per_peer: 1024,
            max_pending_requests: 65536,
            max_connections: 16384,
            max_handshakes: 256,
            max_handshakes_per_source: 32,
            first_message_timeout: Duration::from_secs(3),
            ik_replay_window: Duration::from_secs(300),
            max_connections_per_peer: 1024,
            peer_buffer_bytes: 40 * 1024 * 1024,
            node_buffer_bytes: 256 * 1024 * 1024,
            message_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            write_coalesce_bytes: 256 * 1024,
            reconnect: Backoff::default(),
        }
    }
}

impl Config {
    /// Clamps values to what the wire format can carry.
    pub(crate) fn normalized(mut self) -> Self {
        self.max_frame_len = self.max_frame_len.clamp(crate::frame::TAG_LEN + 64, MAX_NOISE_MESSAGE);
        self.rekey_after_frames = self.rekey_after_frames.max(1);
        self.send_queue = self.send_queue.max(1);
        self.inbox_capacity = self.inbox_capacity.max(1);
        self.subscription_capacity = self.subscription_capacity.max(1);
        self.max_message_len = self.max_message_len.min(u32::MAX as usize - 1024);
        self.max_handshakes = self.max_handshakes.max(1);
        self.max_handshakes_per_source = self.max_handshakes_per_source.clamp(1, self.max_handshakes);
        self.max_connections_per_peer = self.max_connections_per_peer.max(1);
        // One whole message (plus its envelope) must always fit, or a reader would wait forever.
        let one = self.max_message_len + crate::frame::ENVELOPE_OVERHEAD + 1024;
        self.peer_buffer_bytes = self.peer_buffer_bytes.clamp(one, crate::budget::MAX_BUDGET);
        self.node_buffer_bytes = self.node_buffer_bytes.clamp(self.peer_buffer_bytes, crate::budget::MAX_BUDGET);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 5);
        assert_eq!(b.delay(1), Duration::from_millis(10));
        assert_eq!(b.delay(2), Duration::from_millis(20));
        assert_eq!(b.delay(3), Duration::from_millis(40));
        assert_eq!(b.delay(4), Duration::from_millis(50));
        assert_eq!(b.delay(100), Duration::from_millis(50));
    }
}
