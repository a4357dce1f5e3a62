//! Node identity: an Ed25519 key bound to a Noise X25519 static key, and the allow-list.
//!
//! The binding is an Ed25519 signature over `BINDING_LABEL || x25519_static_public`. It travels
//! inside the (encrypted) Noise handshake as the hello payload, so a peer learns both keys and
//! can check that the identity on its allow-list really owns the static key Noise authenticated.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::error::{HandshakeError, IdentityError};

/// Domain label of the identity binding signature (part of the wire format).
pub const BINDING_LABEL: &[u8] = b"referee-comm/v1 noise static key binding\0";
/// Magic opening every identity hello (see `docs/comm.md`).
pub const HELLO_MAGIC: &[u8; 4] = b"RCH1";
/// Encoded size of an identity hello.
pub const HELLO_LEN: usize = 4 + 1 + 1 + 32 + 64;
const FILE_HEADER: &str = "referee-comm-identity-v1";

/// A peer's public identity: its Ed25519 verifying key (32 bytes). Printed as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// The raw Ed25519 public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Builds a peer id from raw Ed25519 public key bytes (not checked for validity here).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    /// Whether `sig` is this identity's [`Identity::sign`] of `msg` for `domain` (strict
    /// Ed25519 verification; `false` for a key that is not a valid point).
    pub fn verify(&self, domain: &str, msg: &[u8], sig: &[u8; 64]) -> bool {
        VerifyingKey::from_bytes(&self.0)
            .is_ok_and(|k| k.verify_strict(&signed_message(domain, msg), &Signature::from_bytes(sig)).is_ok())
    }

    /// First 8 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(self.0.get(..4).unwrap_or_default())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdentityError::BadPeerId(s.to_owned()))?;
        VerifyingKey::from_bytes(&out).map_err(|_| IdentityError::BadPeerId(s.to_owned()))?;
        Ok(Self(out))
    }
}

/// A node's secret identity: Ed25519 signing key + Noise X25519 static key pair + the binding.
///
/// Cheap to clone (three small arrays); secrets are zeroized on drop. `Debug` prints only the
/// public id.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    noise_private: Zeroizing<[u8; 32]>,
    noise_public: [u8; 32],
    binding: [u8; 64],
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a fresh identity from the OS random generator.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|e| IdentityError::Random(e.to_string()))?;
        let kp = crate::noise::builder(crate::noise::Pattern::Xx)
            .generate_keypair()
            .map_err(|e| IdentityError::Random(e.to_string()))?;
        let mut private = Zeroizing::new([0u8; 32]);
        let mut public = [0u8; 32];
        if kp.private.len() != 32 || kp.public.len() != 32 {
            return Err(IdentityError::Malformed("noise key pair is not 32 bytes"));
        }
        private.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Ok(Self::from_parts(&seed, private, public))
    }

    fn from_parts(seed: &[u8; 32], noise_private: Zeroizing<[u8; 32]>, noise_public: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let binding = signing.sign(&binding_message(&noise_public)).to_bytes();
        Self { signing, noise_private, noise_public, binding }
    }

    /// Test-only: `victim`'s id and binding paired with `attacker`'s Noise key (a MITM model).
    #[cfg(test)]
    pub(crate) fn forged(victim: &Identity, attacker: &Identity) -> Identity {
        Identity {
            signing: victim.signing.clone(),
            noise_private: attacker.noise_private.clone(),
            noise_public: attacker.noise_public,
            binding: victim.binding,
        }
    }

    /// This node's public id (Ed25519 verifying key).
    pub fn id(&self) -> PeerId {
        PeerId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `msg` for `domain` (what it is, e.g. `"referee-worknode/deltas"`), so a signature
    /// made for one purpose is never valid for another, nor for the handshake's key binding.
    /// Checked with [`PeerId::verify`].
    pub fn sign(&self, domain: &str, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(&signed_message(domain, msg)).to_bytes()
    }

    /// The Noise static public key (X25519).
    pub fn noise_public(&self) -> &[u8; 32] {
        &self.noise_public
    }

    pub(crate) fn noise_private(&self) -> &[u8; 32] {
        &self.noise_private
    }

    /// The Ed25519 secret seed (for deriving the QUIC TLS certificate).
    pub(crate) fn ed25519_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The handshake payload announcing this identity and the versions we speak.
    pub(crate) fn hello(&self, versions: (u8, u8)) -> [u8; HELLO_LEN] {
        Hello { version_min: versions.0, version_max: versions.1, id: self.id(), binding: self.binding }.encode()
    }

    /// Text form (secret!): header line + hex of ed25519 seed, noise private, noise public.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(96));
        raw.extend_from_slice(&self.signing.to_bytes());
        raw.extend_from_slice(self.noise_private.as_slice());
        raw.extend_from_slice(&self.noise_public);
        Zeroizing::new(format!("{FILE_HEADER}\n{}\n", hex::encode(raw.as_slice())))
    }

    /// Parses [`Identity::to_text`] output.
    pub fn from_text(text: &str) -> Result<Self, IdentityError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(FILE_HEADER) {
            return Err(IdentityError::Malformed("missing `referee-comm-identity-v1` header"));
        }
        let body = lines.next().ok_or(IdentityError::Malformed("missing key line"))?.trim();
        let mut raw = Zeroizing::new([0u8; 96]);
        hex::decode_to_slice(body, raw.as_mut_slice())
            .map_err(|_| IdentityError::Malformed("key line is not 192 hex digits"))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut private = Zeroizing::new([0u8; 32]);
        let mut public = [0u8; 32];
        seed.copy_from_slice(raw.get(..32).ok_or(IdentityError::Malformed("short"))?);
        private.copy_from_slice(raw.get(32..64).ok_or(IdentityError::Malformed("short"))?);
        public.copy_from_slice(raw.get(64..96).ok_or(IdentityError::Malformed("short"))?);
        Ok(Self::from_parts(&seed, private, public))
    }

    /// Loads an identity file, refusing group/world-readable files.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let err = |source| IdentityError::Io { path: path.display().to_string(), source };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(err)?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(IdentityError::Permissions(path.display().to_string()));
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(err)?);
        Self::from_text(&text)
    }

    /// Writes a new identity file with owner-only permissions; never overwrites.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        use std::io::Write;
        let err = |source| IdentityError::Io { path: path.display().to_string(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(err)?;
        f.write_all(self.to_text().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }
}

/// Prefix of what [`Identity::sign`] signs: never a prefix of [`BINDING_LABEL`], so no signed
/// message can pass for a key binding.
const SIGN_LABEL: &[u8] = b"referee-comm/v1 signed message\0";

/// What [`Identity::sign`] signs for `domain` and `msg`: the label, the domain's length and the
/// domain, then the message.
fn signed_message(domain: &str, msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_LABEL.len() + 2 + domain.len() + msg.len());
    m.extend_from_slice(SIGN_LABEL);
    m.extend_from_slice(&u16::try_from(domain.len()).unwrap_or(u16::MAX).to_be_bytes());
    m.extend_from_slice(domain.as_bytes());
    m.extend_from_slice(msg);
    m
}

fn binding_message(noise_public: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BINDING_LABEL.len() + 32);
    m.extend_from_slice(BINDING_LABEL);
    m.extend_from_slice(noise_public);
    m
}

/// The identity payload carried inside the Noise handshake (102 bytes, see `docs/comm.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version_min: u8,
    pub(crate) version_max: u8,
    pub(crate) id: PeerId,
    pub(crate) binding: [u8; 64],
}

impl Hello {
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        let (magic, rest) = out.split_at_mut(4);
        magic.copy_from_slice(HELLO_MAGIC);
        let (v, rest) = rest.split_at_mut(2);
        v.copy_from_slice(&[self.version_min, self.version_max]);
        let (id, sig) = rest.split_at_mut(32);
        id.copy_from_slice(&self.id.0);
        sig.copy_from_slice(&self.binding);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        if bytes.len() != HELLO_LEN {
            return Err(HandshakeError::BadHello("wrong length (expected 102 bytes)"));
        }
        let (magic, rest) = bytes.split_at(4);
        if magic != HELLO_MAGIC {
            return Err(HandshakeError::BadHello("bad magic (expected `RCH1`)"));
        }
        let (v, rest) = rest.split_at(2);
        let (id, sig) = rest.split_at(32);
        let mut idb = [0u8; 32];
        idb.copy_from_slice(id);
        let mut binding = [0u8; 64];
        binding.copy_from_slice(sig);
        let (version_min, version_max) = match v {
            [a, b] => (*a, *b),
            _ => return Err(HandshakeError::BadHello("truncated versions")),
        };
        if version_min > version_max || version_min == 0 {
            return Err(HandshakeError::BadHello("version range is empty"));
        }
        Ok(Self { version_min, version_max, id: PeerId(idb), binding })
    }

    /// Checks the allow-list and that `id` signed `noise_static`.
    pub(crate) fn verify(&self, noise_static: &[u8], allow: &AllowList) -> Result<PeerId, HandshakeError> {
        if !allow.allows(&self.id) {
            return Err(HandshakeError::UnknownPeer(self.id));
        }
        let key = VerifyingKey::from_bytes(&self.id.0).map_err(|_| HandshakeError::BadBinding(self.id))?;
        let stat: [u8; 32] = noise_static.try_into().map_err(|_| HandshakeError::BadHello("static key length"))?;
        key.verify_strict(&binding_message(&stat), &Signature::from_bytes(&self.binding))
            .map_err(|_| HandshakeError::BadBinding(self.id))?;
        Ok(self.id)
    }
}

/// Which peers may complete a handshake with us.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    ids: HashSet<PeerId>,
    any: bool,
}

impl AllowList {
    /// Allows exactly these identities.
    pub fn new(ids: impl IntoIterator<Item = PeerId>) -> Self {
        Self { ids: ids.into_iter().collect(), any: false }
    }
    /// Allows every identity that proves ownership of its static key (testing, open brokers).
    /// Connections are still encrypted and the peer's id is still verified and reported.
    pub fn allow_any() -> Self {
        Self { ids: HashSet::new(), any: true }
    }
    /// Adds one identity.
    pub fn insert(&mut self, id: PeerId) {
        self.ids.insert(id);
    }
    /// Whether `id` may connect.
    pub fn allows(&self, id: &PeerId) -> bool {
        self.any || self.ids.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_hold_only_for_their_key_domain_and_message() -> Result<(), IdentityError> {
        let (a, b) = (Identity::generate()?, Identity::generate()?);
        let sig = a.sign("d", b"msg");
        assert!(a.id().verify("d", b"msg", &sig));
        assert!(!b.id().verify("d", b"msg", &sig));
        assert!(!a.id().verify("e", b"msg", &sig));
        assert!(!a.id().verify("d", b"msh", &sig));
        // The domain's length is signed: moving bytes between domain and message changes it.
        assert!(!a.id().verify("", b"dmsg", &sig));
        assert!(!a.id().verify("d", b"msg", &a.binding));
        assert!(!PeerId::from_bytes([0xff; 32]).verify("d", b"msg", &sig));
        Ok(())
    }

    #[test]
    fn text_round_trip_keeps_keys() -> Result<(), IdentityError> {
        let a = Identity::generate()?;
        let b = Identity::from_text(&a.to_text())?;
        assert_eq!(a.id(), b.id());
        assert_eq!(a.noise_public(), b.noise_public());
        assert_eq!(a.binding, b.binding);
        Ok(())
    }

    #[test]
    fn hello_verifies_only_for_its_static_key() -> Result<(), Box<dyn std::error::Error>> {
        let a = Identity::generate()?;
        let other = Identity::generate()?;
        let hello = Hello::decode(&a.hello((1, 1)))?;
        let allow = AllowList::new([a.id()]);
        assert_eq!(hello.verify(a.noise_public(), &allow)?, a.id());
        assert!(matches!(hello.verify(other.noise_public(), &allow), Err(HandshakeError::BadBinding(_))));
        assert!(matches!(hello.verify(a.noise_public(), &AllowList::default()), Err(HandshakeError::UnknownPeer(_))));
        Ok(())
    }

    #[test]
    fn peer_id_parses_its_display() -> Result<(), IdentityError> {
        let a = Identity::generate()?;
        assert_eq!(a.id().to_string().parse::<PeerId>()?, a.id());
        assert!("zz".parse::<PeerId>().is_err());
        Ok(())
    }
}
