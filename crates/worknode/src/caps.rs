//! Capabilities: biscuit tokens scoped to a subtree of worknodes.
//!
//! A token's authority block states `scope("/acme/research")` and its rights (`right("read")`,
//! `right("write")`, `right("create")`). A request for operation `op` on path `/acme/research/x`
//! is authorized with the facts `operation(op)` and `within(p)` for every ancestor-or-self `p` of
//! the target, and the policy `allow if scope($s), within($s), operation($op), right($op)`. Paths
//! are compared segment by segment, so `/acme/research2` is not within `/acme/research`.
//!
//! Attenuation ([`attenuate`]) appends a block of checks (`check if within(...)`,
//! `check if operation($op), [...].contains($op)`) without any key. A block's facts are invisible to
//! the authority's policy (biscuit scoping), so a block can only narrow: it cannot widen a scope or
//! add a right. Revocation is by revocation id; [`Capabilities::revoke`] refuses every token that
//! contains the id, including ones already verified and cached.
//!
//! Tokens are verified once (signature, revocation) and cached by the SHA-256 of their bytes; each
//! cached grant also caches its authorization decisions per (path, right).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use biscuit_auth::builder::Algorithm;
use biscuit_auth::{AuthorizerBuilder, Biscuit, BlockBuilder, KeyPair, PrivateKey, PublicKey, UnverifiedBiscuit};
use sha2::{Digest, Sha256};

use crate::error::CapError;
use crate::id::WnPath;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Query state and list trees.
    Read,
    /// Send messages and update state.
    Write,
    /// Create worknodes.
    Create,
}

impl Right {
    /// Every right.
    pub const ALL: [Right; 3] = [Right::Read, Right::Write, Right::Create];

    /// The datalog name.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Create => "create",
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> CapError {
    CapError::Invalid(e.to_string())
}

/// Cached decisions per grant; cleared when it grows past this many.
const MAX_DECISIONS: usize = 4096;
/// Cached grants; cleared when it grows past this many.
const MAX_GRANTS: usize = 65536;

/// The holder of the root key: issues tokens.
pub struct Issuer {
    root: KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("public", &self.public_key().to_bytes_hex()).finish_non_exhaustive()
    }
}

impl Issuer {
    /// A fresh Ed25519 root key.
    pub fn generate() -> Self {
        Self { root: KeyPair::new() }
    }

    /// From the 32 secret bytes of [`Issuer::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, CapError> {
        let key = PrivateKey::from_bytes(bytes, Algorithm::Ed25519).map_err(invalid)?;
        Ok(Self { root: KeyPair::from(&key) })
    }

    /// The secret key bytes (keep them owner-only).
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        self.root.private().to_bytes()
    }

    /// The root public key, which verifiers need.
    pub fn public_key(&self) -> PublicKey {
        self.root.public()
    }

    /// A token granting `rights` on `scope` and everything below it.
    pub fn issue(&self, scope: &WnPath, rights: &[Right]) -> Result<Vec<u8>, CapError> {
        let mut code = format!("scope(\"{scope}\");\n");
        for r in rights {
            code.push_str(&format!("right(\"{}\");\n", r.as_str()));
        }
        let token = Biscuit::builder().code(code).map_err(invalid)?.build(&self.root).map_err(invalid)?;
        token.to_vec().map_err(invalid)
    }
}

/// Narrows a token offline (no key needed): to `scope` (must be inside the token's scope to be
/// useful; anything else only makes the token useless) and/or to `rights`.
pub fn attenuate(token: &[u8], scope: Option<&WnPath>, rights: Option<&[Right]>) -> Result<Vec<u8>, CapError> {
    if scope.is_none() && rights.is_none() {
        return Err(CapError::BadAttenuation("give a narrower scope, a set of rights, or both".into()));
    }
    let mut code = String::new();
    if let Some(scope) = scope {
        code.push_str(&format!("check if within(\"{scope}\");\n"));
    }
    if let Some(rights) = rights {
        let list: Vec<String> = rights.iter().map(|r| format!("\"{}\"", r.as_str())).collect();
        code.push_str(&format!("check if operation($op), [{}].contains($op);\n", list.join(", ")));
    }
    let block = BlockBuilder::new().code(code).map_err(invalid)?;
    let parsed = UnverifiedBiscuit::from(token).map_err(invalid)?;
    parsed.append(block).map_err(invalid)?.to_vec().map_err(invalid)
}

/// The revocation ids of a token (hex), one per block; revoking any of them refuses the token
/// and every token attenuated from it (when it is the id of a shared block).
pub fn revocation_ids(token: &[u8]) -> Result<Vec<String>, CapError> {
    let parsed = UnverifiedBiscuit::from(token).map_err(invalid)?;
    Ok(parsed.revocation_identifiers().iter().map(hex::encode).collect())
}

/// A verified token, shared by every message it authorizes.
pub struct Grant {
    token: Biscuit,
    revocation_ids: Vec<Vec<u8>>,
    revoked: AtomicBool,
    decisions: Mutex<HashMap<(WnPath, Right), bool>>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant").field("revoked", &self.revoked.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Grant {
    fn decide(&self, path: &WnPath, right: Right) -> Result<bool, CapError> {
        let cached = self
            .decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(path.clone(), right))
            .copied();
        if let Some(d) = cached {
            return Ok(d);
        }
        let mut code = format!("operation(\"{}\");\n", right.as_str());
        for p in path.ancestors_and_self() {
            code.push_str(&format!("within(\"{p}\");\n"));
        }
        code.push_str("allow if scope($s), within($s), operation($op), right($op);\n");
        let mut authorizer =
            AuthorizerBuilder::new().code(code).map_err(invalid)?.build(&self.token).map_err(invalid)?;
        let allowed = authorizer.authorize().is_ok();
        let mut cache = self.decisions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_DECISIONS {
            cache.clear();
        }
        cache.insert((path.clone(), right), allowed);
        Ok(allowed)
    }
}

/// Who sends a message or makes a request. Carried by every message.
#[derive(Debug, Clone)]
pub enum Authority {
    /// The system itself (supervision, replication, a local operator).
    System,
    /// A verified capability token.
    Token(Arc<Grant>),
    /// Every right on these subtrees and nothing outside them: what the gateway hands the node
    /// tools for a caller whose gateway token names worknode subtrees (`referee token create
    /// --node /acme`). Checked segment by segment, like a token's scope; no Datalog runs.
    Subtrees(Arc<[WnPath]>),
}

impl Authority {
    /// Whether this authority's subtrees, if it has any, hold `path`.
    pub(crate) fn subtrees_hold(&self, path: &WnPath) -> bool {
        match self {
            Self::Subtrees(scopes) => scopes.iter().any(|s| path.is_within(s)),
            Self::System | Self::Token(_) => true,
        }
    }
}

/// Verifies, caches and revokes tokens for one root key.
pub struct Capabilities {
    root: PublicKey,
    grants: Mutex<HashMap<[u8; 32], Arc<Grant>>>,
    revoked: RwLock<HashSet<Vec<u8>>>,
}

impl std::fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capabilities").field("root", &self.root.to_bytes_hex()).finish_non_exhaustive()
    }
}

impl Capabilities {
    /// Verifier for tokens issued by `root`, refusing the given revocation ids.
    pub fn new(root: PublicKey, revoked: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self { root, grants: Mutex::new(HashMap::new()), revoked: RwLock::new(revoked.into_iter().collect()) }
    }

    fn is_revoked(&self, ids: &[Vec<u8>]) -> Option<String> {
        let revoked = self.revoked.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.iter().find(|id| revoked.contains(*id)).map(hex::encode)
    }

    /// Verifies `token` (signature and revocation) once; later calls with the same bytes hit the cache.
    pub fn verify(&self, token: &[u8]) -> Result<Authority, CapError> {
        let hash: [u8; 32] = Sha256::digest(token).into();
        let cached = self.grants.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&hash).cloned();
        if let Some(g) = cached {
            if g.revoked.load(Ordering::Acquire) {
                return Err(CapError::Revoked(self.is_revoked(&g.revocation_ids).unwrap_or_default()));
            }
            return Ok(Authority::Token(g));
        }
        let parsed = Biscuit::from(token, self.root).map_err(invalid)?;
        let revocation_ids = parsed.revocation_identifiers();
        if let Some(id) = self.is_revoked(&revocation_ids) {
            return Err(CapError::Revoked(id));
        }
        let grant = Arc::new(Grant {
            token: parsed,
            revocation_ids,
            revoked: AtomicBool::new(false),
            decisions: Mutex::new(HashMap::new()),
        });
        let mut grants = self.grants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if grants.len() >= MAX_GRANTS {
            grants.clear();
        }
        grants.insert(hash, grant.clone());
        Ok(Authority::Token(grant))
    }

    /// Refuses every token containing `revocation_id` from now on, including cached ones and
    /// authorities already handed out.
    pub fn revoke(&self, revocation_id: &[u8]) {
        self.revoked.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(revocation_id.to_vec());
        let mut grants = self.grants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        grants.retain(|_, g| {
            let hit = g.revocation_ids.iter().any(|id| id == revocation_id);
            if hit {
                g.revoked.store(true, Ordering::Release);
            }
            !hit
        });
    }

    /// Whether `auth` may do `right` on `path`.
    pub fn check(&self, auth: &Authority, path: &WnPath, right: Right) -> Result<(), CapError> {
        if !auth.subtrees_hold(path) {
            return Err(CapError::Denied { path: path.clone(), op: right.as_str() });
        }
        let Authority::Token(g) = auth else { return Ok(()) };
        if g.revoked.load(Ordering::Acquire) {
            return Err(CapError::Revoked(self.is_revoked(&g.revocation_ids).unwrap_or_default()));
        }
        if g.decide(path, right)? { Ok(()) } else { Err(CapError::Denied { path: path.clone(), op: right.as_str() }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> WnPath {
        s.parse().unwrap()
    }

    fn setup() -> (Issuer, Capabilities) {
        let issuer = Issuer::generate();
        let caps = Capabilities::new(issuer.public_key(), []);
        (issuer, caps)
    }

    #[test]
    fn token_acts_on_its_subtree_only() {
        let (issuer, caps) = setup();
        let auth = caps.verify(&issuer.issue(&p("/acme/research"), &Right::ALL).unwrap()).unwrap();
        for ok in ["/acme/research", "/acme/research/a", "/acme/research/a/b"] {
            caps.check(&auth, &p(ok), Right::Write).unwrap();
        }
        for refused in ["/acme/sales", "/acme/research2", "/acme", "/", "/other/acme/research"] {
            let err = caps.check(&auth, &p(refused), Right::Write).unwrap_err();
            assert!(matches!(err, CapError::Denied { .. }), "{refused}: {err}");
        }
    }

    #[test]
    fn rights_are_enforced() {
        let (issuer, caps) = setup();
        let auth = caps.verify(&issuer.issue(&p("/a"), &[Right::Read]).unwrap()).unwrap();
        caps.check(&auth, &p("/a/x"), Right::Read).unwrap();
        assert!(caps.check(&auth, &p("/a/x"), Right::Write).is_err());
        assert!(caps.check(&auth, &p("/a/x"), Right::Create).is_err());
    }

    #[test]
    fn attenuated_token_narrows_and_cannot_widen() {
        let (issuer, caps) = setup();
        let token = issuer.issue(&p("/acme/research"), &Right::ALL).unwrap();
        let narrow = attenuate(&token, Some(&p("/acme/research/deep")), Some(&[Right::Read])).unwrap();
        let auth = caps.verify(&narrow).unwrap();
        caps.check(&auth, &p("/acme/research/deep/x"), Right::Read).unwrap();
        assert!(caps.check(&auth, &p("/acme/research/other"), Right::Read).is_err());
        assert!(caps.check(&auth, &p("/acme/research/deep/x"), Right::Write).is_err());

        // Trying to widen (to the parent, to a sibling, with more rights) grants nothing new.
        let wider = attenuate(&narrow, Some(&p("/acme")), Some(&Right::ALL)).unwrap();
        let auth = caps.verify(&wider).unwrap();
        assert!(caps.check(&auth, &p("/acme/sales"), Right::Read).is_err());
        assert!(caps.check(&auth, &p("/acme/research/other"), Right::Read).is_err());
        assert!(caps.check(&auth, &p("/acme/research/deep/x"), Right::Write).is_err());
    }

    #[test]
    fn appended_facts_cannot_forge_a_scope() {
        let (issuer, caps) = setup();
        let token = issuer.issue(&p("/acme/research"), &Right::ALL).unwrap();
        let block = BlockBuilder::new().code("scope(\"/\"); right(\"write\");").unwrap();
        let forged = UnverifiedBiscuit::from(&token).unwrap().append(block).unwrap().to_vec().unwrap();
        let auth = caps.verify(&forged).unwrap();
        assert!(caps.check(&auth, &p("/acme/sales"), Right::Write).is_err());
    }

    #[test]
    fn revoked_token_is_refused_even_when_cached() {
        let (issuer, caps) = setup();
        let token = issuer.issue(&p("/acme"), &Right::ALL).unwrap();
        let child = attenuate(&token, Some(&p("/acme/x")), None).unwrap();
        let auth = caps.verify(&token).unwrap();
        let child_auth = caps.verify(&child).unwrap();
        caps.check(&auth, &p("/acme/x"), Right::Write).unwrap();
        let ids = revocation_ids(&token).unwrap();
        caps.revoke(&hex::decode(&ids[0]).unwrap());
        assert!(matches!(caps.check(&auth, &p("/acme/x"), Right::Write), Err(CapError::Revoked(_))));
        assert!(matches!(caps.check(&child_auth, &p("/acme/x"), Right::Write), Err(CapError::Revoked(_))));
        assert!(matches!(caps.verify(&token), Err(CapError::Revoked(_))));
        assert!(matches!(caps.verify(&child), Err(CapError::Revoked(_))));
    }

    #[test]
    fn foreign_or_garbage_tokens_are_invalid() {
        let (_, caps) = setup();
        let other = Issuer::generate().issue(&p("/"), &Right::ALL).unwrap();
        assert!(matches!(caps.verify(&other), Err(CapError::Invalid(_))));
        assert!(matches!(caps.verify(b"junk"), Err(CapError::Invalid(_))));
    }

    #[test]
    fn issuer_key_round_trips() {
        let issuer = Issuer::generate();
        let again = Issuer::from_secret_bytes(&issuer.secret_bytes()).unwrap();
        assert_eq!(issuer.public_key(), again.public_key());
    }
}
