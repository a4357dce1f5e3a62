//! Capability tokens: biscuits minted with the gateway's root key, attenuated offline by their
//! holders, verified once and cached, revocable by id.
//!
//! Vocabulary (datalog):
//!
//! - authority block (minted here): `token_id(ID)`, `label(L)`, `right("tool", NAME|"*")`,
//!   `right("muscle", NAME|"*")`, `right("path", PREFIX/|"*")`, `right("admin", "*")`,
//!   `expires(T)` with `check if time($t), $t <= T`.
//! - attenuation blocks (appended by a holder, no key needed): `reject if tool($t), !LIST.contains($t)`,
//!   the same for `muscle`, `reject if path($p), !$p.starts_with(P1), ...` with hint facts
//!   `narrow_path(P)`, and `check if time($t), $t <= T` with `expires(T)`.
//!
//! A request is allowed when some `allow` policy matches an authority right and no block's
//! checks fail.
//!
//! Paths in a token have one form ([`prefix_form`]): absolute, no `.`, `..` or empty
//! components, ending in `/`. In that form a string prefix test is a component prefix test
//! (`/a/` never matches `/ab/`, and `/a/../b/` cannot exist to pass as a child of `/a/`). Minting
//! and attenuating refuse anything else, and verification refuses a token that carries anything
//! else (a block can be written by hand). The effective path prefixes are then those candidate
//! prefixes that lie inside an authority right (checked here, in Rust, by components) and pass
//! every block's checks: the intersection of every block's rights, so a child never holds more
//! than its parent.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use biscuit_auth::builder::{Algorithm, AuthorizerBuilder, BlockBuilder};
use biscuit_auth::{AuthorizerLimits, Biscuit, KeyPair, PrivateKey, PublicKey, UnverifiedBiscuit};

use crate::store::{GatewayStore, StoreError, TokenRecord};

/// File name of the root key in the home's keys directory.
pub const ROOT_KEY_FILE: &str = "gateway.key";
const KEY_MAGIC: &str = "referee-gateway-root-v1";

/// Why a token was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token; send `Authorization: Bearer <token>` (create one with `referee token create`)")]
    Missing,
    /// The token does not parse or its signature is not from this gateway's root key.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's checks failed (expired, or attenuated away from this request).
    #[error("token refused: {0}")]
    Refused(String),
    /// One of the token's blocks was revoked.
    #[error("token revoked (id {0})")]
    Revoked(String),
    /// The request needs a right the token does not carry.
    #[error("not permitted: {0}")]
    Forbidden(String),
    /// The root key file could not be read or written.
    #[error("root key {path}: {why}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong and what to do.
        why: String,
    },
    /// Building a token failed (bad name, bad prefix).
    #[error("cannot build token: {0}")]
    Build(String),
    /// The token store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn build_err(e: impl std::fmt::Display) -> AuthError {
    AuthError::Build(e.to_string())
}

/// What a new token may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Tool names, or `*` for all.
    pub tools: Vec<String>,
    /// Muscle names, or `*` for all.
    pub muscles: Vec<String>,
    /// Absolute path prefixes, or `*` for every configured root.
    pub paths: Vec<String>,
    /// May manage muscles and tokens.
    pub admin: bool,
    /// Unix seconds after which the token is refused; `None` never expires.
    pub expires_at: Option<u64>,
    /// A label for listings.
    pub label: String,
}

impl Grant {
    /// Everything, for the operator.
    pub fn admin(label: &str, expires_at: Option<u64>) -> Self {
        let all = vec!["*".to_owned()];
        Self { tools: all.clone(), muscles: all.clone(), paths: all, admin: true, expires_at, label: label.into() }
    }
}

/// A narrowing a holder appends to a token (each list empty means "no change").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// Keep only these tools.
    pub tools: Vec<String>,
    /// Keep only these muscles.
    pub muscles: Vec<String>,
    /// Keep only paths under these prefixes.
    pub paths: Vec<String>,
    /// Expire at this unix second at the latest.
    pub expires_at: Option<u64>,
}

/// The one form a path prefix takes inside a token: absolute, no `.`, `..` or empty components,
/// no quote, backslash or control character, ending in `/`. One trailing `/` in `p` is accepted
/// (`/a/b/` and `/a/b` give the same prefix); anything else is refused with the reason, never
/// folded: `..` cannot be folded without knowing the symlinks on the way, and a folded
/// `/a/../b` would be checked as a child of `/a`.
pub fn prefix_form(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err("is not absolute (it must start with `/`)".into());
    }
    if let Some(c) = p.chars().find(|c| c.is_control() || matches!(c, '"' | '\\')) {
        return Err(format!("contains {c:?}; quotes, backslashes and control characters are not allowed"));
    }
    let body = p.strip_suffix('/').unwrap_or(p);
    let mut form = String::with_capacity(p.len() + 1);
    for component in body.split('/').skip(1) {
        match component {
            "" => return Err("has an empty component (`//`)".into()),
            "." => return Err("has a `.` component".into()),
            ".." => return Err("has a `..` component; name the directory itself".into()),
            _ => {}
        }
        form.push('/');
        form.push_str(component);
    }
    form.push('/');
    Ok(form)
}

/// [`prefix_form`] for minting and attenuating.
fn dir_form(p: &str) -> Result<String, AuthError> {
    prefix_form(p).map_err(|why| AuthError::Build(format!("path prefix {p:?} {why}")))
}

/// Refuses a token whose path `value` (as found in one of its blocks) is not in [`prefix_form`].
fn require_prefix_form(what: &str, value: &str) -> Result<(), AuthError> {
    match prefix_form(value) {
        Ok(form) if form == value => Ok(()),
        Ok(_) => Err(AuthError::Refused(format!("the token's {what} {value:?} does not end in `/`"))),
        Err(why) => Err(AuthError::Refused(format!("the token's {what} {value:?} {why}"))),
    }
}

fn quoted(name: &str) -> Result<String, AuthError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '*')) {
        return Err(AuthError::Build(format!("name {name:?} may only contain letters, digits, _ - . or be *")));
    }
    Ok(format!("\"{name}\""))
}

fn rfc3339(unix: u64) -> Result<String, AuthError> {
    // Datalog dates are RFC 3339; civil-from-days (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(1970..=9999).contains(&year) {
        return Err(AuthError::Build(format!("expiry {unix} is out of range")));
    }
    Ok(format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60))
}

fn expiry_code(expires_at: Option<u64>) -> Result<String, AuthError> {
    match expires_at {
        Some(t) => {
            let date = rfc3339(t)?;
            Ok(format!("expires({t});\ncheck if time($t), $t <= {date};\n"))
        }
        None => Ok(String::new()),
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_id() -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Build(format!("no randomness: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Appends a narrowing block to `token` (base64). Needs no key: any holder can do it offline.
pub fn attenuate(token: &str, narrowing: &Narrowing) -> Result<String, AuthError> {
    let parsed = UnverifiedBiscuit::from_base64(token.trim()).map_err(|e| AuthError::Invalid(e.to_string()))?;
    let mut code = String::new();
    for (kind, list) in [("tool", &narrowing.tools), ("muscle", &narrowing.muscles)] {
        if !list.is_empty() {
            let items = list.iter().map(|n| quoted(n)).collect::<Result<Vec<_>, _>>()?.join(", ");
            code.push_str(&format!("reject if {kind}($x), ![{items}].contains($x);\n"));
        }
    }
    if !narrowing.paths.is_empty() {
        let prefixes = narrowing.paths.iter().map(|p| dir_form(p)).collect::<Result<Vec<_>, _>>()?;
        let conds = prefixes.iter().map(|p| format!("!$p.starts_with(\"{p}\")")).collect::<Vec<_>>().join(", ");
        code.push_str(&format!("reject if path($p), {conds};\n"));
        for p in &prefixes {
            code.push_str(&format!("narrow_path(\"{p}\");\n"));
        }
    }
    code.push_str(&expiry_code(narrowing.expires_at)?);
    let block = BlockBuilder::new().code(&code).map_err(build_err)?;
    parsed.append(block).map_err(build_err)?.to_base64().map_err(build_err)
}

/// The revocation id of a token's first block (revoking it revokes every attenuation).
pub fn token_id(token: &str) -> Result<String, AuthError> {
    let parsed = UnverifiedBiscuit::from_base64(token.trim()).map_err(|e| AuthError::Invalid(e.to_string()))?;
    parsed
        .revocation_identifiers()
        .first()
        .map(hex::encode)
        .ok_or_else(|| AuthError::Invalid("token has no blocks".into()))
}

/// What a verified token allows, cached per token.
#[derive(Debug)]
pub struct Scope {
    /// Revocation id of the first block.
    pub id: String,
    /// May manage muscles and tokens.
    pub admin: bool,
    /// Effective path prefixes (`None`: every configured root).
    pub path_prefixes: Option<Vec<PathBuf>>,
    token: Biscuit,
    verified_at: Instant,
    valid_until: Instant,
    /// Memoised decisions, one map per kind (looked up by `&str`: no allocation on a hit).
    decisions: [Mutex<HashMap<String, bool>>; 2],
}

/// What a request touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tool,
    Muscle,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Self::Tool => 0,
            Self::Muscle => 1,
        }
    }

    fn fact(self) -> &'static str {
        match self {
            Self::Tool => "tool",
            Self::Muscle => "muscle",
        }
    }
}

const POLICIES: &str = r#"
allow if tool($t), right("tool", $t);
allow if tool($t), right("tool", "*");
allow if muscle($m), right("muscle", $m);
allow if muscle($m), right("muscle", "*");
allow if path($p), right("path", "*");
allow if path($p), right("path", $r), $p.starts_with($r);
allow if admin(true), right("admin", "*");
"#;

/// The default 1 ms Datalog budget is too tight on a loaded machine; tokens are small, so a
/// larger time budget costs nothing in the normal case (facts and iterations stay bounded).
fn authorizer() -> AuthorizerBuilder {
    AuthorizerBuilder::new()
        .set_limits(AuthorizerLimits { max_time: Duration::from_millis(100), ..AuthorizerLimits::default() })
}

fn probe(token: &Biscuit, fact: &str) -> Result<(), AuthError> {
    let mut authorizer = authorizer()
        .code(format!("{fact};\n{POLICIES}"))
        .map_err(build_err)?
        .time()
        .build(token)
        .map_err(|e| AuthError::Refused(e.to_string()))?;
    authorizer.authorize().map(|_| ()).map_err(|e| AuthError::Refused(format!("{e}")))
}

impl Scope {
    /// Whether the token allows calling tool `name`.
    pub fn allows_tool(&self, name: &str) -> bool {
        self.decide(Kind::Tool, name)
    }

    /// Whether the token allows invoking or training muscle `name`.
    pub fn allows_muscle(&self, name: &str) -> bool {
        self.decide(Kind::Muscle, name)
    }

    fn decide(&self, kind: Kind, name: &str) -> bool {
        let Some(map) = self.decisions.get(kind.index()) else { return false };
        if let Ok(cache) = map.lock()
            && let Some(d) = cache.get(name)
        {
            return *d;
        }
        let allowed = quoted(name).is_ok_and(|q| probe(&self.token, &format!("{}({q})", kind.fact())).is_ok());
        if let Ok(mut cache) = map.lock()
            && cache.len() < MAX_CACHED
        {
            cache.insert(name.to_owned(), allowed);
        }
        allowed
    }

    /// Refuses unless the token is an admin token.
    pub fn require_admin(&self) -> Result<(), AuthError> {
        if self.admin { Ok(()) } else { Err(AuthError::Forbidden("this needs an admin token".into())) }
    }
}

/// The gateway's root key: mints tokens. Lives in `keys/gateway.key` (0600).
pub struct RootKey(KeyPair);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RootKey({})", self.0.public().to_bytes_hex())
    }
}

impl RootKey {
    /// Loads the root key from `keys_dir`, creating it (mode 0600, never overwriting) if missing.
    pub fn load_or_create(keys_dir: &Path) -> Result<Self, AuthError> {
        load_or_create_root(keys_dir).map(Self)
    }

    /// Mints a token for `grant` (not recorded anywhere).
    pub fn mint(&self, grant: &Grant) -> Result<String, AuthError> {
        mint_with(&self.0, grant)
    }

    /// A short-lived admin token (the CLI uses one to talk to a running server).
    pub fn ephemeral_admin(&self, seconds: u64) -> Result<String, AuthError> {
        self.mint(&Grant::admin("cli", Some(now_unix() + seconds)))
    }
}

/// Verifies tokens against the root key, caches what they allow, tracks revocations.
pub struct Authority {
    root: KeyPair,
    store: Arc<GatewayStore>,
    revoked: RwLock<HashSet<String>>,
    cache: RwLock<HashMap<String, Arc<Scope>>>,
    cache_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("public", &self.root.public().to_bytes_hex()).finish_non_exhaustive()
    }
}

/// Most tokens cached at once; past it the cache is cleared (verification is cheap enough).
const MAX_CACHED: usize = 10_000;

impl Authority {
    /// Loads (creating if missing) the root key in `keys_dir` and the revocations from `store`.
    pub fn open(keys_dir: &Path, store: Arc<GatewayStore>, cache_ttl: Duration) -> Result<Self, AuthError> {
        let root = load_or_create_root(keys_dir)?;
        let revoked = store.revoked()?.into_iter().collect();
        Ok(Self { root, store, revoked: RwLock::new(revoked), cache: RwLock::new(HashMap::new()), cache_ttl })
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
        let token = mint_with(&self.root, grant)?;
        let record = TokenRecord {
            id: token_id(&token)?,
            label: grant.label.clone(),
            tools: grant.tools.clone(),
            muscles: grant.muscles.clone(),
            paths: grant.paths.clone(),
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

    /// Verifies a bearer token (cached for the configured time, never past its expiry).
    pub fn verify(&self, token: &str) -> Result<Arc<Scope>, AuthError> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.read()
            && let Some(scope) = cache.get(token)
            && now < scope.valid_until
            && now.duration_since(scope.verified_at) < self.cache_ttl
        {
            return Ok(scope.clone());
        }
        let scope = Arc::new(self.verify_uncached(token)?);
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(token.to_owned(), scope.clone());
        }
        Ok(scope)
    }

    fn verify_uncached(&self, token: &str) -> Result<Scope, AuthError> {
        let parsed = Biscuit::from_base64(token, self.root.public()).map_err(|e| AuthError::Invalid(format!("{e}")))?;
        let ids: Vec<String> = parsed.revocation_identifiers().iter().map(hex::encode).collect();
        if let Ok(set) = self.revoked.read()
            && let Some(id) = ids.iter().find(|id| set.contains(*id))
        {
            return Err(AuthError::Revoked(id.clone()));
        }
        let id = ids.first().cloned().ok_or_else(|| AuthError::Invalid("token has no blocks".into()))?;
        // Expiry and any holder checks are evaluated by a neutral probe first.
        let mut authorizer = authorizer()
            .code("allow if true;")
            .map_err(build_err)?
            .time()
            .build(&parsed)
            .map_err(|e| AuthError::Refused(e.to_string()))?;
        authorizer.authorize().map_err(|e| AuthError::Refused(format!("{e} (expired or malformed)")))?;
        let refused = |e: biscuit_auth::error::Token| AuthError::Refused(e.to_string());
        let expiries: Vec<(i64,)> = authorizer.query_all("e($t) <- expires($t)").map_err(refused)?;
        let rights: Vec<(String, String)> = authorizer.query("r($k, $v) <- right($k, $v)").map_err(refused)?;
        let hints: Vec<(String,)> = authorizer.query_all("h($p) <- narrow_path($p)").map_err(refused)?;

        let admin = rights.iter().any(|(k, _)| k == "admin") && probe(&parsed, "admin(true)").is_ok();
        let path_prefixes = effective_paths(&parsed, &rights, &hints)?;

        let now = now_unix();
        let earliest = expiries.iter().filter_map(|(t,)| u64::try_from(*t).ok()).min();
        let left = earliest.map_or(Duration::MAX, |t| Duration::from_secs(t.saturating_sub(now)));
        let verified_at = Instant::now();
        Ok(Scope {
            id,
            admin,
            path_prefixes,
            token: parsed,
            verified_at,
            valid_until: verified_at.checked_add(left).unwrap_or(verified_at + self.cache_ttl),
            decisions: [Mutex::new(HashMap::new()), Mutex::new(HashMap::new())],
        })
    }
}

/// The token's effective path prefixes: the intersection of every block's path rights.
///
/// Candidates are the authority's prefixes and the holders' hints (`narrow_path`), all of
/// which must be in [`prefix_form`] (else the token is refused). A candidate counts when it lies
/// inside an authority prefix, by components (decided here, not by the token's Datalog), and
/// passes every block's checks; of those, the ones inside another are dropped. `None` when the
/// token covers every root and nothing narrows it.
fn effective_paths(
    token: &Biscuit,
    rights: &[(String, String)],
    hints: &[(String,)],
) -> Result<Option<Vec<PathBuf>>, AuthError> {
    let granted: Vec<&str> = rights.iter().filter(|(k, _)| k == "path").map(|(_, v)| v.as_str()).collect();
    let everywhere = granted.contains(&"*");
    let granted: Vec<&str> = granted.into_iter().filter(|p| *p != "*").collect();
    for p in &granted {
        require_prefix_form("path right", p)?;
    }
    for (h,) in hints {
        require_prefix_form("path narrowing", h)?;
    }
    if everywhere && hints.is_empty() {
        return Ok(None);
    }
    let mut allowed: Vec<&str> = granted
        .iter()
        .copied()
        .chain(hints.iter().map(|(h,)| h.as_str()))
        .filter(|c| everywhere || granted.iter().any(|g| within(c, g)))
        .filter(|c| probe(token, &format!("path(\"{c}\")")).is_ok())
        .collect();
    allowed.sort_unstable();
    allowed.dedup();
    let minimal: Vec<PathBuf> = allowed
        .iter()
        .filter(|p| !allowed.iter().any(|q| q != *p && within(p, q)))
        .map(|p| PathBuf::from(p).components().collect())
        .collect();
    Ok(Some(minimal))
}

/// Whether prefix `inner` lies inside prefix `outer` (or is it). Both are in [`prefix_form`],
/// where a string prefix is a whole-component prefix.
fn within(inner: &str, outer: &str) -> bool {
    inner.starts_with(outer)
}

fn mint_with(root: &KeyPair, grant: &Grant) -> Result<String, AuthError> {
    let mut code = format!("token_id(\"{}\");\nlabel({});\n", random_id()?, json_string(&grant.label));
    for (kind, list) in [("tool", &grant.tools), ("muscle", &grant.muscles)] {
        for name in list {
            code.push_str(&format!("right(\"{kind}\", {});\n", quoted(name)?));
        }
    }
    for p in &grant.paths {
        let value = if p == "*" { "*".to_owned() } else { dir_form(p)? };
        code.push_str(&format!("right(\"path\", \"{value}\");\n"));
    }
    if grant.admin {
        code.push_str("right(\"admin\", \"*\");\n");
    }
    code.push_str(&expiry_code(grant.expires_at)?);
    Biscuit::builder().code(&code).map_err(build_err)?.build(root).map_err(build_err)?.to_base64().map_err(build_err)
}

/// A datalog string literal (JSON escaping is a subset datalog accepts for printable text).
fn json_string(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control() && *c != '\\' && *c != '"').take(64).collect();
    format!("\"{clean}\"")
}

fn key_err(path: &Path, why: impl std::fmt::Display) -> AuthError {
    AuthError::Key { path: path.to_owned(), why: why.to_string() }
}

/// Reads the root key, creating it (mode 0600, never overwriting) if missing.
fn load_or_create_root(keys_dir: &Path) -> Result<KeyPair, AuthError> {
    let path = keys_dir.join(ROOT_KEY_FILE);
    if !path.exists() {
        let pair = KeyPair::new();
        let text = format!("{KEY_MAGIC}\n{}\n", pair.private().to_bytes_hex());
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| key_err(&tmp, e))?;
        let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
        let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process won the race: use its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(key_err(&path, e)),
        }
    }
    let meta = fs::metadata(&path).map_err(|e| key_err(&path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_err(&path, format!("mode {mode:o} is readable by other users; run `chmod 600` on it")));
    }
    if meta.len() > 4096 {
        return Err(key_err(&path, "too large to be a root key"));
    }
    let text = fs::read_to_string(&path).map_err(|e| key_err(&path, e))?;
    let mut lines = text.lines();
    if lines.next() != Some(KEY_MAGIC) {
        return Err(key_err(&path, format!("not a gateway root key (first line must be {KEY_MAGIC})")));
    }
    let hex_key = lines.next().unwrap_or_default().trim();
    let private = PrivateKey::from_bytes_hex(hex_key, Algorithm::Ed25519).map_err(|e| key_err(&path, e))?;
    Ok(KeyPair::from(&private))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &Path) -> Authority {
        let store = Arc::new(GatewayStore::open(&dir.join("gateway.redb")).unwrap());
        Authority::open(dir, store, Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn dates_are_rfc3339() {
        // Reference values from `date -u -d @N +%FT%TZ`.
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000).unwrap(), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn root_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_root(dir.path()).unwrap();
        let b = load_or_create_root(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::set_permissions(dir.path().join(ROOT_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_root(dir.path()).is_err());
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

    #[test]
    fn prefixes_have_one_form_and_anything_else_is_refused() {
        assert_eq!(prefix_form("/").unwrap(), "/");
        assert_eq!(prefix_form("/a/b").unwrap(), "/a/b/");
        assert_eq!(prefix_form("/a/b/").unwrap(), "/a/b/");
        assert_eq!(prefix_form("/a/..b/.c").unwrap(), "/a/..b/.c/");
        for bad in [
            "", "a/b", "./a", "/a/../b", "/a/..", "/a/.", "/./a", "/a//b", "//a", "/a//", "/a\\b", "/a\"b", "/a\nb",
            "/a\0b",
        ] {
            assert!(prefix_form(bad).is_err(), "{bad:?} must be refused");
        }
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
            assert!(matches!(refused, AuthError::Refused(ref why) if why.contains("component")), "{refused}");
        }
        // A hint outside the authority with no check of its own grants nothing.
        let stray = forge(&token, "narrow_path(\"/r/private/\");\n");
        assert_eq!(auth.verify(&stray).unwrap().path_prefixes, Some(vec![PathBuf::from("/r/public")]));
        // A check with `..` in it cannot bring a sibling in either.
        let sneaky = forge(
            &token,
            "reject if path($p), !$p.starts_with(\"/r/public/../private/\");\nnarrow_path(\"/r/private/\");\n",
        );
        assert_eq!(auth.verify(&sneaky).unwrap().path_prefixes, Some(vec![]));
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
        // Rights written into a holder's block are not rights: only the authority grants.
        let forged = forge(
            &token,
            "right(\"tool\", \"*\");\nright(\"muscle\", \"*\");\nright(\"admin\", \"*\");\n\
             right(\"path\", \"*\");\nexpires(99999999999);\n",
        );
        let scope = auth.verify(&forged).unwrap();
        assert!(scope.allows_tool("fs_read") && !scope.allows_tool("fs_write") && !scope.allows_tool("exec"));
        assert!(scope.allows_muscle("feanor") && !scope.allows_muscle("mlp"));
        assert!(!scope.admin);
        assert_eq!(scope.path_prefixes, Some(vec![PathBuf::from("/r/public")]));
        // A later expiry in a holder's block does not extend the token's life in the cache.
        let later = attenuate(&token, &Narrowing { expires_at: Some(expires + 86_400), ..Narrowing::default() });
        let scope = auth.verify(&later.unwrap()).unwrap();
        assert!(scope.valid_until <= scope.verified_at + Duration::from_secs(3600));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (old, _) = auth.mint(&Grant::admin("old", Some(now_unix() - 10))).unwrap();
        assert!(matches!(auth.verify(&old), Err(AuthError::Refused(_))));
        let (token, record) = auth.mint(&Grant::admin("t", None)).unwrap();
        let child = attenuate(&token, &Narrowing { expires_at: Some(now_unix() - 1), ..Narrowing::default() }).unwrap();
        assert!(matches!(auth.verify(&child), Err(AuthError::Refused(_))));
        assert!(auth.verify(&token).is_ok());
        auth.revoke(&record.id).unwrap();
        assert!(matches!(auth.verify(&token), Err(AuthError::Revoked(_))));
        // Revocations survive a restart.
        drop(auth);
        let again = authority(dir.path());
        assert!(matches!(again.verify(&token), Err(AuthError::Revoked(_))));
    }

    #[test]
    fn foreign_and_garbage_tokens_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let (foreign, _) = authority(other.path()).mint(&Grant::admin("x", None)).unwrap();
        assert!(matches!(auth.verify(&foreign), Err(AuthError::Invalid(_))));
        assert!(matches!(auth.verify("not a token"), Err(AuthError::Invalid(_))));
    }
}
