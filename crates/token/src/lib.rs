//! Referee's capability tokens: biscuits minted with the gateway's root key and attenuated
//! offline by their holders; [`read`] verifies one and says what it allows. The gateway caches
//! what [`read`] finds and tracks revocations (`referee_gateway::auth::Authority`).
//!
//! Vocabulary (the only statements a token may hold):
//!
//! - authority block (minted here): `token_id(ID)`, `label(L)`, `right("tool", NAME|"*")`,
//!   `right("muscle", NAME|"*")`, `right("path", PREFIX/|"*")`, `right("node", SUBTREE/|"*")`,
//!   `right("admin", "*")`, `expires(T)` with `check if time($t), $t <= T`.
//! - attenuation blocks (appended by a holder, no key needed): `reject if tool($x), !LIST.contains($x)`,
//!   the same for `muscle`, `reject if path($p), !$p.starts_with(P1), ...` with hint facts
//!   `narrow_path(P)` (the same prefixes), `reject if node($n), !$n.starts_with(S1), ...` with
//!   `narrow_node(S)` for worknode subtrees, and `expires(T)` with `check if time($t), $t <= T`.
//!
//! No Datalog runs when a token is verified. Each block's printed source is read statement by
//! statement in Rust; a statement outside the vocabulary refuses the whole token with the reason
//! (never ignored, never evaluated), so a holder's block costs what its bytes cost, bounded by
//! [`MAX_TOKEN_CHARS`] and [`MAX_BLOCKS`] before any signature is checked. The effective rights
//! are then the intersection of every block's: the authority's names and prefixes, cut down by
//! each holder's lists and prefixes, expiring at the earliest expiry. Admin rights are never kept
//! by an attenuation (an admin mints anything, so keeping them would widen every narrowing).
//!
//! Paths in a token have one form ([`prefix_form`]): absolute, no `.`, `..` or empty
//! components, ending in `/`. In that form a string prefix test is a component prefix test
//! (`/a/` never matches `/ab/`, and `/a/../b/` cannot exist to pass as a child of `/a/`). Minting
//! and attenuating refuse anything else, and verification refuses a token that carries anything
//! else (a block can be written by hand).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use biscuit_auth::PublicKey;
use biscuit_auth::builder::{Algorithm, BlockBuilder};
use biscuit_auth::{Biscuit, KeyPair, PrivateKey, UnverifiedBiscuit};

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
    /// The verifier is saturated; retry in a second.
    #[error("busy: {0}; retry in a second")]
    Busy(String),
    /// A refusal remembered from an earlier verification of the same token.
    #[error("{0}")]
    Cached(Arc<AuthError>),
    /// Building a token failed (bad name, bad prefix).
    #[error("cannot build token: {0}")]
    Build(String),
    /// The token store failed.
    #[error("{0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
}

impl AuthError {
    /// The error itself, or the one a cached refusal remembers.
    pub fn cause(&self) -> &Self {
        match self {
            Self::Cached(inner) => inner.cause(),
            other => other,
        }
    }
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
    /// Worknode subtrees (`/acme/research`), or `*` for the whole tree; none means no
    /// worknode rights.
    pub nodes: Vec<String>,
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
        Self {
            tools: all.clone(),
            muscles: all.clone(),
            paths: all.clone(),
            nodes: all,
            admin: true,
            expires_at,
            label: label.into(),
        }
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
    /// Keep only worknodes in these subtrees.
    pub nodes: Vec<String>,
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
    for (area, list) in [(Area::Path, &narrowing.paths), (Area::Node, &narrowing.nodes)] {
        if !list.is_empty() {
            let prefixes = list.iter().map(|p| dir_form(p)).collect::<Result<Vec<_>, _>>()?;
            code.push_str(&Statement::Within(area, prefixes.clone()).render());
            code.push_str(";\n");
            for p in prefixes {
                code.push_str(&Statement::Hint(area, p).render());
                code.push_str(";\n");
            }
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
    /// Revocation id of the last block (the first's when the token is not attenuated).
    pub leaf_id: String,
    /// Number of blocks: 1 for a minted token, one more per attenuation.
    pub blocks: usize,
    /// May manage muscles and tokens (an authority right no attenuation keeps).
    pub admin: bool,
    /// Effective path prefixes (`None`: every configured root).
    pub path_prefixes: Option<Vec<PathBuf>>,
    /// Effective worknode subtrees in [`prefix_form`] (`/acme/research/`; `None`: the whole
    /// tree, for admin tokens and `*` grants; empty: no worknode at all).
    pub node_prefixes: Option<Vec<String>>,
    /// The earliest expiry of any block (unix seconds), `None` if none expires.
    pub expires_at: Option<u64>,
    tools: Names,
    muscles: Names,
}

/// Names of one kind (tools or muscles): what the authority grants (`*`: all), and what each
/// holder's block keeps (a literal list, where `*` is only a name).
#[derive(Debug, Default)]
struct Names {
    granted: Vec<String>,
    kept: Vec<Vec<String>>,
}

impl Names {
    fn allows(&self, name: &str) -> bool {
        self.granted.iter().any(|g| g == name || g == "*") && self.kept.iter().all(|k| k.iter().any(|n| n == name))
    }
}

impl Scope {
    /// Whether the token allows calling tool `name`.
    pub fn allows_tool(&self, name: &str) -> bool {
        self.tools.allows(name)
    }

    /// Whether the token allows invoking or training muscle `name`.
    pub fn allows_muscle(&self, name: &str) -> bool {
        self.muscles.allows(name)
    }

    /// Refuses unless the token is an admin token.
    pub fn require_admin(&self) -> Result<(), AuthError> {
        if self.admin { Ok(()) } else { Err(AuthError::Forbidden("this needs an admin token".into())) }
    }
}

/// Longest bearer token read, in characters: a token with a dozen attenuations is under 4 KiB.
pub const MAX_TOKEN_CHARS: usize = 8 << 10;
/// Most blocks in a token (the authority block and seven attenuations).
pub const MAX_BLOCKS: usize = 8;
/// Largest holder block, in serialized bytes: a narrowing to a dozen long paths fits.
pub const MAX_BLOCK_BYTES: usize = 2 << 10;

/// One statement of the token vocabulary, read from a block's printed source. Every statement
/// [`attenuate`] and [`mint_with`] write is one of these, printed by biscuit exactly as
/// [`Statement::render`] prints it; a block holding anything else is refused, never evaluated.
#[derive(Debug, PartialEq, Eq)]
enum Statement {
    /// `token_id("HEX")` (authority).
    TokenId(String),
    /// `label("TEXT")` (authority).
    Label(String),
    /// `right("KIND", "VALUE")` (authority).
    Right(String, String),
    /// `expires(UNIX)`, always with [`Statement::Before`] of the same time.
    Expires(u64),
    /// `check if time($t), $t <= DATE`.
    Before(String),
    /// `narrow_path("P/")` or `narrow_node("S/")`, the hints of a [`Statement::Within`] (holder).
    Hint(Area, String),
    /// `reject if tool($x), !["a", "b"].contains($x)` (holder; the same for `muscle`).
    Keep(Kind, Vec<String>),
    /// `reject if path($p), !$p.starts_with("P1/"), ...` or `reject if node($n),
    /// !$n.starts_with("S1/"), ...` (holder).
    Within(Area, Vec<String>),
}

/// What a prefix narrows: filesystem paths or worknode subtrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    Path,
    Node,
}

/// One `T` per [`Area`].
#[derive(Debug, Default)]
struct PerArea<T> {
    path: T,
    node: T,
}

impl<T> PerArea<T> {
    fn get(&self, area: Area) -> &T {
        match area {
            Area::Path => &self.path,
            Area::Node => &self.node,
        }
    }

    fn get_mut(&mut self, area: Area) -> &mut T {
        match area {
            Area::Path => &mut self.path,
            Area::Node => &mut self.node,
        }
    }
}

impl Area {
    const ALL: [Self; 2] = [Self::Path, Self::Node];

    /// The fact a request states, the variable the check binds, and the hint fact.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Path => ("path", "$p", "narrow_path"),
            Self::Node => ("node", "$n", "narrow_node"),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Path => "path narrowing",
            Self::Node => "worknode narrowing",
        }
    }
}

fn quoted_in(s: &str, prefix: &str, suffix: &str) -> Option<String> {
    s.strip_prefix(prefix)?.strip_suffix(suffix).map(str::to_owned)
}

fn string_list(items: &str, open: &str, close: &str) -> Option<Vec<String>> {
    if items.is_empty() {
        return Some(Vec::new());
    }
    items.split(", ").map(|item| quoted_in(item, open, close)).collect()
}

impl Statement {
    fn parse(s: &str) -> Option<Self> {
        if let Some(v) = quoted_in(s, "token_id(\"", "\")") {
            return Some(Self::TokenId(v));
        }
        if let Some(v) = quoted_in(s, "label(\"", "\")") {
            return Some(Self::Label(v));
        }
        if let Some(v) = quoted_in(s, "right(\"", "\")") {
            let (kind, value) = v.split_once("\", \"")?;
            return Some(Self::Right(kind.to_owned(), value.to_owned()));
        }
        if let Some(v) = quoted_in(s, "expires(", ")") {
            return v.parse().ok().map(Self::Expires);
        }
        if let Some(v) = s.strip_prefix("check if time($t), $t <= ") {
            return Some(Self::Before(v.to_owned()));
        }
        for area in Area::ALL {
            let (_, _, hint) = area.names();
            if let Some(v) = quoted_in(s, &format!("{hint}(\""), "\")") {
                return Some(Self::Hint(area, v));
            }
        }
        for kind in [Kind::Tool, Kind::Muscle] {
            let prefix = format!("reject if {}($x), ![", kind.fact());
            if let Some(items) = quoted_in(s, &prefix, "].contains($x)") {
                return string_list(&items, "\"", "\"").map(|names| Self::Keep(kind, names));
            }
        }
        for area in Area::ALL {
            let (fact, var, _) = area.names();
            if let Some(conds) = s.strip_prefix(&format!("reject if {fact}({var}), ")) {
                return string_list(conds, &format!("!{var}.starts_with(\""), "\")").map(|p| Self::Within(area, p));
            }
        }
        None
    }

    fn render(&self) -> String {
        let list = |items: &[String], open: &str, close: &str| {
            items.iter().map(|i| format!("{open}{i}{close}")).collect::<Vec<_>>().join(", ")
        };
        match self {
            Self::TokenId(v) => format!("token_id(\"{v}\")"),
            Self::Label(v) => format!("label(\"{v}\")"),
            Self::Right(k, v) => format!("right(\"{k}\", \"{v}\")"),
            Self::Expires(t) => format!("expires({t})"),
            Self::Before(date) => format!("check if time($t), $t <= {date}"),
            Self::Hint(area, p) => format!("{}(\"{p}\")", area.names().2),
            Self::Keep(kind, names) => {
                format!("reject if {}($x), ![{}].contains($x)", kind.fact(), list(names, "\"", "\""))
            }
            Self::Within(area, prefixes) => {
                let (fact, var, _) = area.names();
                format!("reject if {fact}({var}), {}", list(prefixes, &format!("!{var}.starts_with(\""), "\")"))
            }
        }
    }
}

/// What one block says, once read.
#[derive(Debug, Default)]
struct BlockRights {
    token_id: Option<String>,
    rights: Vec<(String, String)>,
    expires: Option<u64>,
    tools: Option<Vec<String>>,
    muscles: Option<Vec<String>>,
    /// The path narrowing, then the worknode narrowing.
    within: PerArea<Option<Vec<String>>>,
}

/// Reads block `index` of `source` (its printed form) into what it grants or keeps; refuses a
/// statement outside the vocabulary, a statement in the wrong kind of block, a repeated
/// narrowing, hints that differ from their check, and an expiry without its check.
fn read_block(index: usize, source: &str, expected: usize) -> Result<BlockRights, AuthError> {
    let authority = index == 0;
    let which = if authority { "authority block".to_owned() } else { format!("block {index}") };
    let refuse = |why: String| AuthError::Refused(format!("the token's {which} {why}"));
    let mut block = BlockRights::default();
    let (mut hints, mut before) = (PerArea::<Vec<String>>::default(), None);
    let texts: Vec<&str> = source.split_terminator(";\n").collect();
    // A string holding `;\n` would print as more statements than the block has: refused.
    if texts.len() != expected {
        return Err(refuse(format!("prints as {} statements but holds {expected}", texts.len())));
    }
    for text in texts {
        let statement = Statement::parse(text).filter(|s| s.render() == text).ok_or_else(|| {
            let shown: String = text.chars().take(120).collect();
            refuse(format!(
                "holds `{shown}`, which is not a statement referee writes (tool, muscle and path \
                 narrowings and an expiry); the token is refused rather than the statement ignored"
            ))
        })?;
        let once =
            |slot: bool, what: &str| if slot { Err(refuse(format!("has more than one {what}"))) } else { Ok(()) };
        match statement {
            Statement::TokenId(id) if authority => {
                once(block.token_id.is_some(), "token id")?;
                block.token_id = Some(id);
            }
            Statement::Label(_) if authority => {}
            Statement::Right(kind, value) if authority => {
                let valid = match kind.as_str() {
                    "tool" | "muscle" => quoted(&value).is_ok(),
                    "path" | "node" => value == "*" || require_prefix_form("prefix right", &value).is_ok(),
                    "admin" => value == "*",
                    _ => false,
                };
                if !valid {
                    return Err(refuse(format!("grants an unknown right ({kind:?}, {value:?})")));
                }
                block.rights.push((kind, value));
            }
            Statement::Expires(t) => {
                once(block.expires.is_some(), "expiry")?;
                block.expires = Some(t);
            }
            Statement::Before(date) => {
                once(before.is_some(), "time check")?;
                before = Some(date);
            }
            Statement::Hint(area, p) if !authority => {
                require_prefix_form(area.what(), &p)?;
                hints.get_mut(area).push(p);
            }
            Statement::Keep(kind, names) if !authority => {
                if let Some(bad) = names.iter().find(|n| quoted(n).is_err()) {
                    return Err(refuse(format!("keeps the {} name {bad:?}, which no name can be", kind.fact())));
                }
                let slot = match kind {
                    Kind::Tool => &mut block.tools,
                    Kind::Muscle => &mut block.muscles,
                };
                once(slot.is_some(), &format!("{} narrowing", kind.fact()))?;
                *slot = Some(names);
            }
            Statement::Within(area, prefixes) if !authority => {
                let slot = block.within.get_mut(area);
                once(slot.is_some(), area.what())?;
                for p in &prefixes {
                    require_prefix_form(area.what(), p)?;
                }
                *slot = Some(prefixes);
            }
            other => return Err(refuse(format!("holds `{}`, which does not belong in it", other.render()))),
        }
    }
    if authority && block.token_id.is_none() {
        return Err(refuse("has no token id".into()));
    }
    let expected = block.expires.map(rfc3339).transpose().map_err(|e| refuse(e.to_string()))?;
    if before != expected {
        return Err(refuse("has an expiry without its time check, or a time check without its expiry".into()));
    }
    for area in Area::ALL {
        let mut sorted = std::mem::take(hints.get_mut(area));
        sorted.sort_unstable();
        sorted.dedup();
        let mut checked = block.within.get(area).clone().unwrap_or_default();
        checked.sort_unstable();
        checked.dedup();
        if sorted != checked {
            return Err(refuse(format!("has {} hints that differ from its check", area.what())));
        }
    }
    Ok(block)
}

/// What a request touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tool,
    Muscle,
}

impl Kind {
    fn fact(self) -> &'static str {
        match self {
            Self::Tool => "tool",
            Self::Muscle => "muscle",
        }
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

    /// The public half, what verifies the tokens this key mints.
    pub fn public(&self) -> PublicKey {
        self.0.public()
    }

    /// A short-lived admin token (the CLI uses one to talk to a running server).
    pub fn ephemeral_admin(&self, seconds: u64) -> Result<String, AuthError> {
        self.mint(&Grant::admin("cli", Some(now_unix() + seconds)))
    }
}

/// A token parsed but not yet verified: everything that can refuse it without checking a
/// signature has been checked ([`inspect`]); [`Inspected::verify`] checks the signatures.
#[derive(Debug)]
pub struct Inspected {
    token: UnverifiedBiscuit,
    id: String,
    principal: Vec<u8>,
    scope: Scope,
}

impl Inspected {
    /// The revocation id of the first block, as the token claims it (not yet verified).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The authority block's bytes and signature, as the token carries them (not yet verified).
    /// Unlike the revocation id, which is public (`token list`, revocation lists), only a
    /// holder of the token (or of a token derived from it) can present these bytes.
    pub fn principal(&self) -> &[u8] {
        &self.principal
    }

    /// Checks every block's signature against `root`: the costly step, bounded by
    /// [`MAX_BLOCKS`] Ed25519 signatures.
    pub fn verify(self, root: &PublicKey) -> Result<Scope, AuthError> {
        self.token.verify(*root).map_err(|e| AuthError::Invalid(format!("{e}")))?;
        Ok(self.scope)
    }
}

/// The statements of a token, and their shape, checked without any signature: size, block
/// count, key algorithms (Ed25519 only: referee writes nothing else, and P-256 costs several
/// times as much to check), no third-party block, each holder block's size, revocation, the
/// vocabulary and expiry. Its cost is linear in the token's bytes ([`MAX_TOKEN_CHARS`]).
pub fn inspect(token: &str, revoked: impl Fn(&str) -> bool, now: u64) -> Result<Inspected, AuthError> {
    use biscuit_auth::format::schema;
    use prost::Message as _;

    if token.len() > MAX_TOKEN_CHARS {
        return Err(AuthError::Invalid(format!("token is longer than {MAX_TOKEN_CHARS} characters")));
    }
    let unverified = UnverifiedBiscuit::from_base64(token).map_err(|e| AuthError::Invalid(format!("{e}")))?;
    let blocks = unverified.block_count();
    if blocks > MAX_BLOCKS {
        return Err(AuthError::Invalid(format!("token has {blocks} blocks; at most {MAX_BLOCKS} are read")));
    }
    let invalid = |e: biscuit_auth::error::Token| AuthError::Invalid(e.to_string());
    let bytes = unverified.to_vec().map_err(invalid)?;
    let wire = schema::Biscuit::decode(bytes.as_slice()).map_err(|e| AuthError::Invalid(format!("{e}")))?;
    let ed25519 = schema::public_key::Algorithm::Ed25519 as i32;
    let mut statements = Vec::with_capacity(blocks);
    for (index, block) in std::iter::once(&wire.authority).chain(&wire.blocks).enumerate() {
        let which = if index == 0 { "authority block".to_owned() } else { format!("block {index}") };
        if block.next_key.algorithm != ed25519 {
            return Err(AuthError::Refused(format!("the token's {which} uses a key that is not Ed25519")));
        }
        if block.external_signature.is_some() {
            return Err(AuthError::Refused(format!("the token's {which} is a third-party block")));
        }
        if index > 0 && block.block.len() > MAX_BLOCK_BYTES {
            return Err(AuthError::Refused(format!(
                "the token's {which} is {} bytes; a narrowing takes at most {MAX_BLOCK_BYTES}",
                block.block.len()
            )));
        }
        let inner = schema::Block::decode(block.block.as_slice()).map_err(|e| AuthError::Invalid(format!("{e}")))?;
        if !inner.rules.is_empty() || !inner.scope.is_empty() || !inner.public_keys.is_empty() {
            return Err(AuthError::Refused(format!(
                "the token's {which} holds rules, scopes or public keys, which referee never writes"
            )));
        }
        statements.push(inner.facts.len() + inner.checks.len());
    }
    let principal = [wire.authority.block.as_slice(), wire.authority.signature.as_slice()].concat();
    let ids: Vec<String> = unverified.revocation_identifiers().iter().map(hex::encode).collect();
    if let Some(id) = ids.iter().find(|id| revoked(id)) {
        return Err(AuthError::Revoked(id.clone()));
    }
    let id = ids.first().cloned().ok_or_else(|| AuthError::Invalid("token has no blocks".into()))?;
    let mut read = Vec::with_capacity(blocks);
    for index in 0..blocks {
        let expected = statements.get(index).copied().unwrap_or_default();
        read.push(read_block(index, &unverified.print_block_source(index).map_err(invalid)?, expected)?);
    }
    let Some((authority, holders)) = read.split_first() else {
        return Err(AuthError::Invalid("token has no blocks".into()));
    };

    let earliest = read.iter().filter_map(|b| b.expires).min();
    if let Some(t) = earliest
        && now > t
    {
        return Err(AuthError::Refused(format!("expired at {} (unix {t})", rfc3339(t).unwrap_or_default())));
    }
    let names = |kind: &str, kept: fn(&BlockRights) -> &Option<Vec<String>>| Names {
        granted: authority.rights.iter().filter(|(k, _)| k == kind).map(|(_, v)| v.clone()).collect(),
        kept: holders.iter().filter_map(|b| kept(b).clone()).collect(),
    };
    let prefixes = |area: Area| {
        let kind = area.names().0;
        let granted: Vec<&str> = authority.rights.iter().filter(|(k, _)| k == kind).map(|(_, v)| v.as_str()).collect();
        let narrowings: Vec<&[String]> = holders.iter().filter_map(|b| b.within.get(area).as_deref()).collect();
        effective_prefixes(&granted, &narrowings)
    };
    // Admin rights mint any token, so no attenuation keeps them: mint a narrower admin.
    let admin = holders.is_empty() && authority.rights.iter().any(|(k, v)| k == "admin" && v == "*");
    let scope = Scope {
        id: id.clone(),
        leaf_id: ids.last().cloned().unwrap_or_default(),
        blocks,
        admin,
        path_prefixes: prefixes(Area::Path)
            .map(|list| list.iter().map(|p| PathBuf::from(p).components().collect()).collect()),
        // An admin acts on the whole tree even when minted before worknode rights existed.
        node_prefixes: if admin { None } else { prefixes(Area::Node) },
        tools: names("tool", |b| &b.tools),
        muscles: names("muscle", |b| &b.muscles),
        expires_at: earliest,
    };
    Ok(Inspected { token: unverified, id, principal, scope })
}

/// Verifies `token` against `root` at unix time `now`: what it allows, or why it is refused
/// (`revoked` says whether a block's revocation id is revoked). [`inspect`], then
/// [`Inspected::verify`]: no Datalog runs, and no signature is checked before everything else
/// that can refuse the token has been.
pub fn read(token: &str, root: &PublicKey, revoked: impl Fn(&str) -> bool, now: u64) -> Result<Scope, AuthError> {
    inspect(token, revoked, now)?.verify(root)
}

/// The token's effective prefixes of one area: the intersection of every block's rights.
///
/// `granted` are the authority's prefixes (`*`: everything), `narrowings` each holder block's
/// prefixes, all in [`prefix_form`] (checked when read). A path is allowed when it lies inside a
/// granted prefix and inside a prefix of every narrowing; since the prefixes are component
/// prefixes, that set is the union of the candidates (every prefix named anywhere) that satisfy
/// the same, and the ones inside another are dropped. `None` when the token covers everything
/// and nothing narrows it.
fn effective_prefixes(granted: &[&str], narrowings: &[&[String]]) -> Option<Vec<String>> {
    let everywhere = granted.contains(&"*");
    let granted: Vec<&str> = granted.iter().copied().filter(|p| *p != "*").collect();
    if everywhere && narrowings.is_empty() {
        return None;
    }
    let mut allowed: Vec<&str> = granted
        .iter()
        .copied()
        .chain(narrowings.iter().flat_map(|n| n.iter().map(String::as_str)))
        .filter(|c| everywhere || granted.iter().any(|g| within(c, g)))
        .filter(|c| narrowings.iter().all(|n| n.iter().any(|p| within(c, p))))
        .collect();
    allowed.sort_unstable();
    allowed.dedup();
    let minimal: Vec<String> =
        allowed.iter().filter(|p| !allowed.iter().any(|q| q != *p && within(p, q))).map(|p| (*p).to_owned()).collect();
    Some(minimal)
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
    for (kind, list) in [("path", &grant.paths), ("node", &grant.nodes)] {
        for p in list {
            let value = if p == "*" { "*".to_owned() } else { dir_form(p)? };
            code.push_str(&format!("right(\"{kind}\", \"{value}\");\n"));
        }
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
        // The directory too: the key's name must survive a power loss along with its bytes.
        let linked = written
            .and_then(|()| fs::hard_link(&tmp, &path))
            .and_then(|()| fs::File::open(keys_dir).and_then(|d| d.sync_all()));
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

    #[test]
    fn every_statement_renders_back_to_its_source() {
        for text in [
            "token_id(\"00ff\")",
            "label(\"ops\")",
            "right(\"path\", \"/a/\")",
            "expires(1900000000)",
            "check if time($t), $t <= 2030-03-17T17:46:40Z",
            "narrow_path(\"/a/b/\")",
            "reject if tool($x), ![\"a\", \"b\"].contains($x)",
            "reject if muscle($x), ![].contains($x)",
            "reject if path($p), !$p.starts_with(\"/a/\"), !$p.starts_with(\"/b/\")",
        ] {
            let statement = Statement::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(statement.render(), text);
        }
        for text in ["reject if path($p), $p.starts_with(\"/a/\")", "f(1)", "check if true", "right(\"a\")"] {
            assert!(Statement::parse(text).is_none_or(|s| s.render() != text), "{text}");
        }
    }

    fn minted() -> (tempfile::TempDir, RootKey, String) {
        let dir = tempfile::tempdir().unwrap();
        let root = RootKey::load_or_create(dir.path()).unwrap();
        let grant = Grant { tools: vec!["fs_read".into(), "fs_write".into()], ..Grant::default() };
        let token = root.mint(&grant).unwrap();
        (dir, root, token)
    }

    fn refusal(token: &str) -> String {
        match inspect(token, |_| false, now_unix()) {
            Ok(_) => panic!("inspected without a refusal"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn costly_or_foreign_shapes_are_refused_before_any_signature() {
        let (_dir, root, token) = minted();
        let parsed = UnverifiedBiscuit::from_base64(&token).unwrap();
        // A P-256 next key: several times an Ed25519 check, and nothing referee writes.
        let p256 = KeyPair::new_with_algorithm(Algorithm::Secp256r1);
        let appended = parsed.append_with_keypair(&p256, BlockBuilder::new()).unwrap().to_base64().unwrap();
        assert!(refusal(&appended).contains("not Ed25519"), "{}", refusal(&appended));
        // A narrowing larger than any referee writes.
        let names: Vec<String> = (0..300).map(|i| format!("tool_{i}")).collect();
        let wide = attenuate(&token, &Narrowing { tools: names, ..Narrowing::default() }).unwrap();
        assert!(refusal(&wide).contains("bytes"), "{}", refusal(&wide));
        // A rule, even one the vocabulary's printer would hide.
        let rule = parsed.append(BlockBuilder::new().code("tool($x) <- path($x);").unwrap()).unwrap();
        assert!(refusal(&rule.to_base64().unwrap()).contains("rules"));
        // A revoked token is refused from its claimed ids, with no signature checked.
        let id = token_id(&token).unwrap();
        assert!(matches!(inspect(&token, |r| r == id, now_unix()), Err(AuthError::Revoked(_))));
        // What attenuate writes passes, and its signatures check out.
        let fine = attenuate(&token, &Narrowing { tools: vec!["fs_read".into()], ..Narrowing::default() }).unwrap();
        let scope = read(&fine, &root.public(), |_| false, now_unix()).unwrap();
        assert!(scope.allows_tool("fs_read") && !scope.allows_tool("fs_write"));
    }

    #[test]
    fn a_string_that_prints_as_several_statements_is_refused() {
        let (_dir, _root, token) = minted();
        let parsed = UnverifiedBiscuit::from_base64(&token).unwrap();
        // One check whose one name holds `"].contains($x);\n…`: printed, it reads as four
        // statements of the vocabulary; the block holds one.
        let code = "reject if tool($x), ![\"fs_read\\\"].contains($x);\\nexpires(1900000000);\\n\
                    check if time($t), $t <= 2030-03-17T17:46:40Z;\\nreject if muscle($x), ![\\\"m\"].contains($x);";
        let injected = parsed.append(BlockBuilder::new().code(code).unwrap()).unwrap().to_base64().unwrap();
        let why = refusal(&injected);
        assert!(why.contains("prints as 4 statements but holds 1"), "{why}");
        // A name outside the name alphabet, in a well-formed list.
        let odd = parsed.append(BlockBuilder::new().code("reject if tool($x), ![\"fs read\"].contains($x);").unwrap());
        let why = refusal(&odd.unwrap().to_base64().unwrap());
        assert!(why.contains("no name can be"), "{why}");
    }

    #[test]
    fn worknode_subtrees_narrow_like_paths_and_none_means_no_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootKey::load_or_create(dir.path()).unwrap();
        let at = |token: &str| read(token, &root.public(), |_| false, now_unix()).unwrap().node_prefixes;
        let plain = root.mint(&Grant { tools: vec!["node_get".into()], ..Grant::default() }).unwrap();
        assert_eq!(at(&plain), Some(vec![]), "no --node, no worknode");
        let grant = Grant {
            tools: vec!["node_get".into()],
            nodes: vec!["/acme/research".into(), "/beta/".into()],
            ..Grant::default()
        };
        let token = root.mint(&grant).unwrap();
        assert_eq!(at(&token), Some(vec!["/acme/research/".to_owned(), "/beta/".to_owned()]));
        let narrow = |t: &str, nodes: &[&str]| {
            let nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
            attenuate(t, &Narrowing { nodes, ..Narrowing::default() })
        };
        let deeper = narrow(&token, &["/acme/research/deep"]).unwrap();
        assert_eq!(at(&deeper), Some(vec!["/acme/research/deep/".to_owned()]));
        // Widening to a parent, a sibling or a look-alike keeps nothing new.
        for wider in [&["/acme"][..], &["/acme/research2"], &["/"]] {
            let got = at(&narrow(&deeper, wider).unwrap()).unwrap();
            assert!(got.iter().all(|g| g.starts_with("/acme/research/deep/")), "{wider:?}: {got:?}");
        }
        assert_eq!(at(&narrow(&token, &["/gamma"]).unwrap()), Some(vec![]));
        // The path and node narrowings are separate: one never touches the other.
        let paths = attenuate(&token, &Narrowing { paths: vec!["/data".into()], ..Narrowing::default() }).unwrap();
        assert_eq!(at(&paths), Some(vec!["/acme/research/".to_owned(), "/beta/".to_owned()]));
        // Dot segments are refused when narrowing, and in a hand-written block.
        assert!(narrow(&token, &["/acme/research/../sales"]).is_err());
        let parsed = UnverifiedBiscuit::from_base64(&token).unwrap();
        let code = "reject if node($n), !$n.starts_with(\"/acme/research/../\");\nnarrow_node(\"/acme/research/../\");";
        let forged = parsed.append(BlockBuilder::new().code(code).unwrap()).unwrap().to_base64().unwrap();
        assert!(refusal(&forged).contains(".."), "{}", refusal(&forged));
        // An admin acts on the whole tree; an attenuated admin only where it is narrowed.
        let admin = root.mint(&Grant::admin("ops", None)).unwrap();
        assert_eq!(at(&admin), None);
        assert_eq!(at(&narrow(&admin, &["/acme"]).unwrap()), Some(vec!["/acme/".to_owned()]));
    }
}
