//! The gateway's side of capability tokens ([`referee_token`], re-exported here): the root key,
//! the token store, revocations, and caches of what a token allows and why one was refused.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub use referee_token::*;

use crate::store::{GatewayStore, StoreError, TokenRecord};

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        Self::Store(Box::new(e))
    }
}

/// A verified scope and how long the cache may hand it out.
#[derive(Debug)]
struct Known {
    scope: Arc<Scope>,
    verified_at: Instant,
    valid_until: Instant,
}

/// Verifies tokens against the root key, caches what they allow (and why they were refused),
/// tracks revocations.
pub struct Authority {
    root: RootKey,
    store: Arc<GatewayStore>,
    revoked: RwLock<HashSet<String>>,
    cache: RwLock<HashMap<String, Known>>,
    refusals: RwLock<HashMap<u64, (Instant, Arc<AuthError>)>>,
    hasher: RandomState,
    cache_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("public", &self.root.public().to_bytes_hex()).finish_non_exhaustive()
    }
}

/// Most tokens (and refusals) cached at once; past it the cache is cleared (verification is
/// cheap and bounded).
const MAX_CACHED: usize = 10_000;

impl Authority {
    /// Loads (creating if missing) the root key in `keys_dir` and the revocations from `store`.
    pub fn open(keys_dir: &Path, store: Arc<GatewayStore>, cache_ttl: Duration) -> Result<Self, AuthError> {
        let root = RootKey::load_or_create(keys_dir)?;
        let revoked = store.revoked()?.into_iter().collect();
        Ok(Self {
            root,
            store,
            revoked: RwLock::new(revoked),
            cache: RwLock::new(HashMap::new()),
            refusals: RwLock::new(HashMap::new()),
            hasher: RandomState::new(),
            cache_ttl,
        })
    }

    /// The public root key (hex), what verifiers elsewhere need.
    pub fn public_key(&self) -> PublicKey {
        self.root.public()
    }

    /// The token store.
    pub fn store(&self) -> &GatewayStore {
        &self.store
    }

    /// Mints a token for `grant` and records it (without the secret token) in the store.
    pub fn mint(&self, grant: &Grant) -> Result<(String, TokenRecord), AuthError> {
        let token = self.root.mint(grant)?;
        let record = TokenRecord {
            id: token_id(&token)?,
            label: grant.label.clone(),
            tools: grant.tools.clone(),
            muscles: grant.muscles.clone(),
            paths: grant.paths.clone(),
            nodes: grant.nodes.clone(),
            admin: grant.admin,
            created_at: now_unix(),
            expires_at: grant.expires_at,
            revoked: false,
        };
        self.store.record(&record)?;
        Ok((token, record))
    }

    /// Revokes the block with revocation id `id` (and so every token derived from it).
    pub fn revoke(&self, id: &str) -> Result<(), AuthError> {
        let id = id.trim().to_ascii_lowercase();
        if id.is_empty() || hex::decode(&id).is_err() {
            return Err(AuthError::Build(format!("revocation id {id:?} must be hex (see `referee token list`)")));
        }
        self.store.revoke(&id)?;
        if let Ok(mut set) = self.revoked.write() {
            set.insert(id);
        }
        // Cached scopes may contain the revoked block: verify everything again.
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
        }
        Ok(())
    }

    /// What the caches know about `token`: its scope, or why it was refused (both for the
    /// configured time, a scope never past its expiry). `None`: it must be verified.
    pub fn cached(&self, token: &str) -> Option<Result<Arc<Scope>, AuthError>> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.read()
            && let Some(known) = cache.get(token)
            && now < known.valid_until
            && now.duration_since(known.verified_at) < self.cache_ttl
        {
            return Some(Ok(known.scope.clone()));
        }
        let key = self.hasher.hash_one(token);
        if let Ok(refusals) = self.refusals.read()
            && let Some((at, why)) = refusals.get(&key)
            && now.duration_since(*at) < self.cache_ttl
        {
            return Some(Err(AuthError::Cached(why.clone())));
        }
        None
    }

    /// Verifies a bearer token: from the caches when they know it, else [`Self::inspect`] and
    /// [`Self::finish`]; the outcome is cached either way (a refusal costs no more to repeat
    /// than a success).
    pub fn verify(&self, token: &str) -> Result<Arc<Scope>, AuthError> {
        if let Some(known) = self.cached(token) {
            return known;
        }
        match self.inspect(token) {
            Ok(inspected) => self.finish(token, inspected),
            Err(e) => Err(self.remember_refusal(token, e)),
        }
    }

    /// Everything that can refuse `token` without checking a signature (cheap, bounded by its
    /// size). A refusal is not cached here: pass it to [`Self::remember_refusal`].
    pub fn inspect(&self, token: &str) -> Result<Inspected, AuthError> {
        let revoked = self.revoked.read().map_err(|_| AuthError::Invalid("revocation list unavailable".into()))?;
        inspect(token, |id| revoked.contains(id), now_unix())
    }

    /// A key for what `inspected` claims to derive from (its authority block), keyed with this
    /// process's random hasher: for counting pending verifications per token.
    pub fn principal_key(&self, inspected: &Inspected) -> u64 {
        self.hasher.hash_one(inspected.principal())
    }

    /// Checks the signatures of an inspected `token` and caches the outcome.
    pub fn finish(&self, token: &str, inspected: Inspected) -> Result<Arc<Scope>, AuthError> {
        let scope = match inspected.verify(&self.root.public()) {
            Ok(scope) => Arc::new(scope),
            Err(e) => return Err(self.remember_refusal(token, e)),
        };
        let verified_at = Instant::now();
        let left = scope.expires_at.map_or(self.cache_ttl, |t| Duration::from_secs(t.saturating_sub(now_unix())));
        let known = Known { scope: scope.clone(), verified_at, valid_until: verified_at + left.min(self.cache_ttl) };
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() >= MAX_CACHED {
                // Stale entries first; only a cache full of live tokens starts over.
                cache.retain(|_, k| verified_at < k.valid_until);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), known);
        }
        Ok(scope)
    }

    /// Caches why `token` was refused (for the cache time) and returns the refusal.
    pub fn remember_refusal(&self, token: &str, e: AuthError) -> AuthError {
        let why = Arc::new(e);
        let now = Instant::now();
        if let Ok(mut refusals) = self.refusals.write() {
            if refusals.len() >= MAX_CACHED {
                refusals.retain(|_, (at, _)| now.duration_since(*at) < self.cache_ttl);
                if refusals.len() >= MAX_CACHED {
                    refusals.clear();
                }
            }
            refusals.insert(self.hasher.hash_one(token), (now, why.clone()));
        }
        AuthError::Cached(why)
    }
}
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use biscuit_auth::builder::BlockBuilder;
    use biscuit_auth::{Biscuit, KeyPair, UnverifiedBiscuit};

    use super::*;

    fn authority(dir: &Path) -> Authority {
        let store = Arc::new(GatewayStore::open(&dir.join("gateway.redb")).unwrap());
        Authority::open(dir, store, Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn grants_tools_muscles_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let grant = Grant {
            tools: vec!["fs_read".into()],
            muscles: vec!["feanor".into()],
            paths: vec!["/data".into()],
            ..Grant::default()
        };
        let (token, record) = auth.mint(&grant).unwrap();
        let scope = auth.verify(&token).unwrap();
        assert_eq!(scope.id, record.id);
        assert!(scope.allows_tool("fs_read"));
        assert!(!scope.allows_tool("fs_write"));
        assert!(scope.allows_muscle("feanor"));
        assert!(!scope.allows_muscle("mlp"));
        assert!(!scope.admin);
        assert_eq!(scope.path_prefixes, Some(vec![PathBuf::from("/data")]));
    }

    #[test]
    fn attenuation_narrows_and_never_widens() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let grant = Grant { tools: vec!["fs_read".into()], paths: vec!["/data".into()], ..Grant::default() };
        let (token, _) = auth.mint(&grant).unwrap();
        let narrowed = attenuate(
            &token,
            &Narrowing {
                tools: vec!["fs_read".into(), "fs_write".into()],
                paths: vec!["/data/sub".into(), "/etc".into()],
                ..Narrowing::default()
            },
        )
        .unwrap();
        let scope = auth.verify(&narrowed).unwrap();
        assert!(scope.allows_tool("fs_read"));
        assert!(!scope.allows_tool("fs_write"), "attenuation must not add a tool");
        assert_eq!(scope.path_prefixes, Some(vec![PathBuf::from("/data/sub")]));
        // `/data/` must not be confused with `/database/`.
        let sibling =
            attenuate(&token, &Narrowing { paths: vec!["/database".into()], ..Narrowing::default() }).unwrap();
        assert_eq!(auth.verify(&sibling).unwrap().path_prefixes, Some(vec![]));
    }

    /// A hand-written block (no key needed) with its own path text, bypassing [`attenuate`].
    fn forge(token: &str, code: &str) -> String {
        let parsed = UnverifiedBiscuit::from_base64(token).unwrap();
        parsed.append(BlockBuilder::new().code(code).unwrap()).unwrap().to_base64().unwrap()
    }

    #[test]
    fn dot_dot_never_widens_an_attenuation() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let grant = Grant { tools: vec!["fs_read".into()], paths: vec!["/r/public".into()], ..Grant::default() };
        let (token, _) = auth.mint(&grant).unwrap();
        // The finding: `--path R/public/../private` and `--path R/public/..`.
        for path in ["/r/public/../private", "/r/public/..", "/r/public/./../private", "/r/public//../private"] {
            let narrowing = Narrowing { paths: vec![path.into()], ..Narrowing::default() };
            let err = attenuate(&token, &narrowing).unwrap_err().to_string();
            assert!(err.contains(path), "{err}");
            // The same text in a hand-written block: the token is refused, with the reason.
            let forged = forge(
                &token,
                &format!("reject if path($p), !$p.starts_with(\"{path}/\");\nnarrow_path(\"{path}/\");\n"),
            );
            let refused = auth.verify(&forged).unwrap_err();
            assert!(matches!(refused.cause(), AuthError::Refused(why) if why.contains("component")), "{refused}");
        }
        // A hint with no check of its own, or a check with `..` in it, refuses the token.
        for code in [
            "narrow_path(\"/r/private/\");\n",
            "reject if path($p), !$p.starts_with(\"/r/public/../private/\");\nnarrow_path(\"/r/private/\");\n",
        ] {
            assert!(matches!(auth.verify(&forge(&token, code)).unwrap_err().cause(), AuthError::Refused(_)), "{code}");
        }
        // Minting refuses the same forms.
        let bad = Grant { paths: vec!["/r/public/../private".into()], ..grant };
        assert!(matches!(auth.mint(&bad), Err(AuthError::Build(_))));
    }

    #[test]
    fn tools_muscles_admin_and_expiry_never_widen_either() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let expires = now_unix() + 3600;
        let grant = Grant {
            tools: vec!["fs_read".into()],
            muscles: vec!["feanor".into()],
            paths: vec!["/r/public".into()],
            expires_at: Some(expires),
            ..Grant::default()
        };
        let (token, _) = auth.mint(&grant).unwrap();
        // `*` in an attenuation is a name like any other: it matches only a tool called `*`.
        let star = Narrowing { tools: vec!["*".into()], muscles: vec!["*".into()], ..Narrowing::default() };
        let scope = auth.verify(&attenuate(&token, &star).unwrap()).unwrap();
        assert!(!scope.allows_tool("fs_read") && !scope.allows_tool("fs_write"));
        assert!(!scope.allows_muscle("feanor") && !scope.allows_muscle("mlp"));
        // Rights written into a holder's block are not rights: the token is refused.
        for code in [
            "right(\"tool\", \"*\");\n",
            "right(\"muscle\", \"*\");\n",
            "right(\"admin\", \"*\");\n",
            "right(\"path\", \"*\");\n",
            "expires(99999999999);\n",
            "token_id(\"00\");\n",
        ] {
            let refused = auth.verify(&forge(&token, code)).unwrap_err();
            assert!(matches!(refused.cause(), AuthError::Refused(_)), "{code}: {refused}");
        }
        // Admin rights do not survive an attenuation (they would mint anything).
        let (admin, _) = auth.mint(&Grant::admin("ops", None)).unwrap();
        assert!(auth.verify(&admin).unwrap().admin);
        let narrowed = attenuate(&admin, &Narrowing { tools: vec!["fs_read".into()], ..Narrowing::default() });
        let scope = auth.verify(&narrowed.unwrap()).unwrap();
        assert!(!scope.admin && scope.allows_tool("fs_read") && !scope.allows_tool("fs_write"));
        let dated = attenuate(&admin, &Narrowing { expires_at: Some(expires), ..Narrowing::default() }).unwrap();
        assert!(!auth.verify(&dated).unwrap().admin);
        // A later expiry in a holder's block does not extend the token's life in the cache.
        let later = attenuate(&token, &Narrowing { expires_at: Some(expires + 86_400), ..Narrowing::default() });
        let scope = auth.verify(&later.unwrap()).unwrap();
        assert_eq!(scope.expires_at, Some(expires));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (old, _) = auth.mint(&Grant::admin("old", Some(now_unix() - 10))).unwrap();
        assert!(matches!(auth.verify(&old).unwrap_err().cause(), AuthError::Refused(_)));
        let (token, record) = auth.mint(&Grant::admin("t", None)).unwrap();
        let child = attenuate(&token, &Narrowing { expires_at: Some(now_unix() - 1), ..Narrowing::default() }).unwrap();
        assert!(matches!(auth.verify(&child).unwrap_err().cause(), AuthError::Refused(_)));
        assert!(auth.verify(&token).is_ok());
        auth.revoke(&record.id).unwrap();
        assert!(matches!(auth.verify(&token).unwrap_err().cause(), AuthError::Revoked(_)));
        // Revocations survive a restart.
        drop(auth);
        let again = authority(dir.path());
        assert!(matches!(again.verify(&token).unwrap_err().cause(), AuthError::Revoked(_)));
    }

    #[test]
    fn foreign_and_garbage_tokens_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (foreign, _) = authority(other.path()).mint(&Grant::admin("x", None)).unwrap();
        assert!(matches!(auth.verify(&foreign).unwrap_err().cause(), AuthError::Invalid(_)));
        assert!(matches!(auth.verify("not a token").unwrap_err().cause(), AuthError::Invalid(_)));
    }

    #[test]
    fn blocks_outside_the_vocabulary_are_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let grant =
            Grant { tools: vec!["fs_read".into(), "fs_write".into()], paths: vec!["/r".into()], ..Grant::default() };
        let (token, _) = auth.mint(&grant).unwrap();
        let join = "f(1);f(2);f(3);f(4);f(5);f(6);f(7);f(8);\n\
                    g($a, $b, $c, $d, $e) <- f($a), f($b), f($c), f($d), f($e);\n\
                    check if g($a, $b, $c, $d, $e), $a + $b + $c + $d + $e > 0;\n";
        for code in [
            // The helper's findings: exclusions, mixed tool and path checks, a bare time check.
            "reject if path($p), $p.starts_with(\"/r/private/\");\n",
            "reject if path($p), $p == \"/r/secret.txt\";\n",
            "reject if tool(\"fs_write\"), path($p), !$p.starts_with(\"/r/tmp/\");\n",
            "check if time($t), $t <= 2030-01-01T00:00:00Z;\n",
            "expires(1900000000);\n",
            // The CPU attack: facts and a five-way join.
            join,
            // Two narrowings of one kind, hints that differ from the check, a rule, a policy-like check.
            "reject if tool($x), ![\"fs_read\"].contains($x);\nreject if tool($x), ![\"fs_write\"].contains($x);\n",
            "reject if path($p), !$p.starts_with(\"/r/a/\");\nnarrow_path(\"/r/b/\");\n",
            "tool($x) <- path($x);\n",
            "check if true;\n",
            "check all tool($x), $x == \"fs_read\";\n",
        ] {
            let refused = auth.verify(&forge(&token, code)).unwrap_err();
            assert!(matches!(refused.cause(), AuthError::Refused(why) if why.contains("block 1")), "{code}: {refused}");
        }
        // What attenuate writes is read back exactly, in any combination and any number of blocks.
        let mut chained = token.clone();
        for (i, narrowing) in [
            Narrowing { tools: vec!["fs_write".into(), "fs_read".into(), "fs_read".into()], ..Narrowing::default() },
            Narrowing { paths: vec!["/r/b".into(), "/r/a/".into(), "/r/a".into()], ..Narrowing::default() },
            Narrowing { muscles: vec!["m".into()], expires_at: Some(now_unix() + 60), ..Narrowing::default() },
            Narrowing::default(),
            Narrowing { tools: vec!["fs_read".into()], paths: vec!["/r/a/x".into()], ..Narrowing::default() },
        ]
        .iter()
        .enumerate()
        {
            chained = attenuate(&chained, narrowing).unwrap();
            assert!(auth.verify(&chained).is_ok(), "after narrowing {i}");
        }
        let scope = auth.verify(&chained).unwrap();
        assert!(scope.allows_tool("fs_read") && !scope.allows_tool("fs_write"));
        assert!(!scope.allows_muscle("m"), "the authority grants no muscle");
        assert_eq!(scope.path_prefixes, Some(vec![PathBuf::from("/r/a/x")]));
    }

    #[test]
    fn verification_cost_is_bounded_by_size_and_a_refusal_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (token, _) = auth.mint(&Grant { tools: vec!["fs_read".into()], ..Grant::default() }).unwrap();
        let mut long = token.clone();
        for _ in 0..MAX_BLOCKS {
            long = attenuate(&long, &Narrowing::default()).unwrap();
        }
        let refused = auth.verify(&long).unwrap_err();
        assert!(matches!(refused.cause(), AuthError::Invalid(why) if why.contains("blocks")), "{refused}");
        let padded = format!("{token}{}", "A".repeat(MAX_TOKEN_CHARS));
        assert!(matches!(auth.verify(&padded).unwrap_err().cause(), AuthError::Invalid(why) if why.contains("longer")));
        // The second time, the refusal comes from the cache.
        assert!(matches!(auth.cached(&long), Some(Err(AuthError::Cached(_)))));
        assert!(auth.cached(&token).is_none());
        auth.verify(&token).unwrap();
        assert!(matches!(auth.cached(&token), Some(Ok(_))));
    }

    #[test]
    fn third_party_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (token, _) = auth.mint(&Grant { tools: vec!["fs_read".into()], ..Grant::default() }).unwrap();
        let parsed = Biscuit::from_base64(&token, auth.public_key()).unwrap();
        let request = parsed.third_party_request().unwrap();
        let outsider = KeyPair::new();
        let block = request.create_block(&outsider.private(), BlockBuilder::new()).unwrap();
        let appended = parsed.append_third_party(outsider.public(), block).unwrap().to_base64().unwrap();
        let refused = auth.verify(&appended).unwrap_err();
        assert!(matches!(refused.cause(), AuthError::Refused(why) if why.contains("third-party")), "{refused}");
    }
}
