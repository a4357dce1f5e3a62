//! Noise parameters (snow with the `ring-accelerated` resolver).

/// Noise protocol names. ChaCha20-Poly1305 + SHA-256 (both ring-accelerated) over X25519.
pub(crate) const XX: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
pub(crate) const IK: &str = "Noise_IK_25519_ChaChaPoly_SHA256";

/// The handshake pattern selected by the initiator's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// Mutual authentication, no prior knowledge (3 messages).
    Xx,
    /// Initiator already knows the responder's static key (2 messages).
    Ik,
}

impl Pattern {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Pattern::Xx => 0,
            Pattern::Ik => 1,
        }
    }
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Pattern::Xx),
            1 => Some(Pattern::Ik),
            _ => None,
        }
    }
}

pub(crate) fn builder(pattern: Pattern) -> snow::Builder<'static> {
    let name = match pattern {
        Pattern::Xx => XX,
        Pattern::Ik => IK,
    };
    // Both names are constants that snow parses; a failure here is a build defect caught by tests.
    #[allow(clippy::expect_used)]
    let params = name.parse().expect("constant Noise protocol name parses");
    snow::Builder::new(params)
}
