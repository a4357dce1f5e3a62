//! The operator's policy (TOML): what each publisher's and muscle's cells may use.
//!
//! Rules are layered: `[muscles.NAME]` over `[publishers.KEY_ID]` over `[defaults]` over the
//! built-in defaults. Granted capabilities are the header's requests ∩ the policy's list;
//! limits are the header's requests capped by the policy.
//!
//! ```toml
//! [defaults]
//! capabilities = ["log", "clock_now", "random_fill"]
//! memory_bytes = 67108864
//! time_ms = 1000
//!
//! [publishers."9f2c…64 hex digits…"]
//! capabilities = ["log", "clock_now", "random_fill", "kv_get", "kv_put", "kv_delete"]
//!
//! [muscles.feanor]
//! concurrency = 4
//! ```

use std::collections::BTreeMap;

use referee_muscle::Header;
use serde::Deserialize;

use crate::error::RuntimeError;

/// Every capability this referee implements (import names in module `referee`).
pub const CAPABILITIES: &[&str] = &["clock_now", "kv_delete", "kv_get", "kv_put", "log", "random_fill"];

/// One layer of policy; unset fields fall through to the layer below.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Capabilities that may be granted.
    pub capabilities: Option<Vec<String>>,
    /// Maximum linear memory per cell, bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum wall-clock time per call, ms.
    pub time_ms: Option<u32>,
    /// Fuel per call (0: no metering unless the muscle declares a budget).
    pub fuel: Option<u64>,
    /// Cells (concurrent calls) per stateless muscle.
    pub concurrency: Option<usize>,
    /// Calls that may wait per muscle before callers get "busy".
    pub queue: Option<usize>,
    /// Bytes of kv storage per muscle (keys + values).
    pub kv_quota_bytes: Option<u64>,
    /// `log` calls per second per cell before messages are dropped.
    pub log_per_second: Option<u32>,
    /// `clock_now` granularity in microseconds.
    pub clock_granularity_us: Option<u64>,
    /// Faults within `fault_window_secs` that quarantine a muscle.
    pub faults_before_quarantine: Option<u32>,
    /// Window for counting faults.
    pub fault_window_secs: Option<u64>,
    /// Give every call of a stateless muscle a new cell (discarded afterwards), so nothing a
    /// call leaves in memory or globals can reach the next caller; costs an instantiation
    /// (a few µs) per call. Default false (warm cells are reused).
    pub fresh_cells: Option<bool>,
    /// Canonicalise the NaN of every float instruction even for muscles that declare
    /// themselves `nan-blind` (docs/muscle-abi.md, "Determinism"); default false.
    pub canonicalize_every_nan: Option<bool>,
}

/// The policy file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Applies to every muscle.
    #[serde(default)]
    pub defaults: PolicyRule,
    /// Per publisher key id (64 hex digits).
    #[serde(default)]
    pub publishers: BTreeMap<String, PolicyRule>,
    /// Per muscle name.
    #[serde(default)]
    pub muscles: BTreeMap<String, PolicyRule>,
    /// Deterministic mode: `random_fill` is seeded from the muscle's code hash and
    /// `clock_now` counts calls instead of reading the clock.
    #[serde(default)]
    pub deterministic: bool,
}

/// The effective, fully resolved settings for one muscle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Granted capabilities (sorted).
    pub capabilities: Vec<String>,
    /// Memory limit per cell, bytes.
    pub memory_bytes: u64,
    /// Time limit per call, ms.
    pub time_ms: u32,
    /// Fuel per call; `None`: not metered.
    pub fuel: Option<u64>,
    /// Concurrent cells.
    pub concurrency: usize,
    /// Queue bound.
    pub queue: usize,
    /// kv quota, bytes.
    pub kv_quota_bytes: u64,
    /// log rate, per second.
    pub log_per_second: u32,
    /// Clock granularity, µs.
    pub clock_granularity_us: u64,
    /// Quarantine threshold.
    pub faults_before_quarantine: u32,
    /// Fault window, seconds.
    pub fault_window_secs: u64,
    /// Deterministic mode.
    pub deterministic: bool,
    /// Whether every call of a stateless muscle gets a new cell.
    pub fresh_cells: bool,
    /// Whether the engine canonicalises the NaN of every float instruction; when false (a
    /// `nan-blind` muscle, not overridden by policy) the outputs and the loss are canonicalised
    /// at the host boundary instead.
    pub canonicalize_every_nan: bool,
}

const BUILTIN: Grant = Grant {
    capabilities: Vec::new(),
    memory_bytes: 64 << 20,
    time_ms: 1000,
    fuel: None,
    concurrency: 2,
    queue: 64,
    kv_quota_bytes: 1 << 20,
    log_per_second: 100,
    clock_granularity_us: 1000,
    faults_before_quarantine: 5,
    fault_window_secs: 60,
    deterministic: false,
    fresh_cells: false,
    canonicalize_every_nan: true,
};

impl Policy {
    /// Parses a policy file and checks it.
    pub fn from_toml(text: &str) -> Result<Self, RuntimeError> {
        let policy: Self = toml::from_str(text).map_err(|e| RuntimeError::Policy(e.to_string()))?;
        let rules = std::iter::once(&policy.defaults).chain(policy.publishers.values()).chain(policy.muscles.values());
        for rule in rules {
            for cap in rule.capabilities.iter().flatten() {
                if !CAPABILITIES.contains(&cap.as_str()) {
                    return Err(RuntimeError::Policy(format!(
                        "unknown capability {cap:?}; known: {}",
                        CAPABILITIES.join(", ")
                    )));
                }
            }
            if rule.concurrency == Some(0) || rule.queue == Some(0) {
                return Err(RuntimeError::Policy("concurrency and queue must be at least 1".into()));
            }
        }
        for key in policy.publishers.keys() {
            referee_muscle::KeyId::from_hex(key)
                .map_err(|e| RuntimeError::Policy(format!("[publishers.{key}]: {e}")))?;
        }
        Ok(policy)
    }

    /// The built-in policy used when no file is given: every capability may be granted.
    pub fn permissive_default() -> Self {
        Self {
            defaults: PolicyRule {
                capabilities: Some(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
                ..PolicyRule::default()
            },
            ..Self::default()
        }
    }

    /// Resolves the settings for a muscle.
    pub fn grant(&self, header: &Header) -> Grant {
        let layers =
            [Some(&self.defaults), self.publishers.get(&header.publisher.to_string()), self.muscles.get(&header.name)];
        let mut g = BUILTIN;
        let mut allowed: Vec<String> = Vec::new();
        let mut every_nan = false;
        for rule in layers.into_iter().flatten() {
            if let Some(caps) = &rule.capabilities {
                allowed.clone_from(caps);
            }
            g.memory_bytes = rule.memory_bytes.unwrap_or(g.memory_bytes);
            g.time_ms = rule.time_ms.unwrap_or(g.time_ms);
            g.fuel = rule.fuel.map_or(g.fuel, |f| (f > 0).then_some(f));
            g.concurrency = rule.concurrency.unwrap_or(g.concurrency);
            g.queue = rule.queue.unwrap_or(g.queue);
            g.kv_quota_bytes = rule.kv_quota_bytes.unwrap_or(g.kv_quota_bytes);
            g.log_per_second = rule.log_per_second.unwrap_or(g.log_per_second);
            g.clock_granularity_us = rule.clock_granularity_us.unwrap_or(g.clock_granularity_us);
            g.faults_before_quarantine = rule.faults_before_quarantine.unwrap_or(g.faults_before_quarantine);
            g.fault_window_secs = rule.fault_window_secs.unwrap_or(g.fault_window_secs);
            g.fresh_cells = rule.fresh_cells.unwrap_or(g.fresh_cells);
            every_nan = rule.canonicalize_every_nan.unwrap_or(every_nan);
        }
        g.canonicalize_every_nan = every_nan || !header.declares_nan_blind();
        g.capabilities = header.capabilities.iter().filter(|c| allowed.contains(c)).cloned().collect();
        let limits = header.limits;
        if limits.memory_bytes > 0 {
            g.memory_bytes = g.memory_bytes.min(limits.memory_bytes);
        }
        if limits.time_ms > 0 {
            g.time_ms = g.time_ms.min(limits.time_ms);
        }
        if limits.fuel > 0 {
            g.fuel = Some(g.fuel.map_or(limits.fuel, |f| f.min(limits.fuel)));
        }
        g.deterministic = self.deterministic;
        g
    }

    /// SHA-256 of the policy's canonical debug form, for attestation.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(format!("{self:?}").as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use referee_muscle::{Binding, KeyId, KeyMode, Limits, MuscleId, SignatureScheme, Suite};

    use super::*;

    fn header(caps: &[&str], limits: Limits) -> Header {
        Header {
            suite: Suite::Aes256Gcm,
            key_mode: KeyMode::MasterKey,
            signature_scheme: SignatureScheme::Ed25519,
            publisher: KeyId([7; 32]),
            muscle_id: MuscleId([1; 16]),
            name: "feanor".into(),
            version: 1,
            created_at: 0,
            binding: Binding::Any,
            abi: referee_muscle::ABI_V1.into(),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
            limits,
            inputs: vec![],
            outputs: vec![],
            code_hash: [0; 32],
            payload_len: 0,
            extensions: vec![],
        }
    }

    #[test]
    fn granted_is_requested_intersect_policy_and_limits_are_capped() -> Result<(), RuntimeError> {
        let text = format!(
            "[defaults]\ncapabilities = [\"log\"]\nmemory_bytes = 1048576\n\n[publishers.\"{}\"]\ncapabilities = [\"log\", \"kv_get\"]\n\n[muscles.feanor]\ntime_ms = 5\n",
            KeyId([7; 32])
        );
        let policy = Policy::from_toml(&text)?;
        let g = policy
            .grant(&header(&["clock_now", "kv_get", "log"], Limits { memory_bytes: 1 << 30, time_ms: 50, fuel: 9 }));
        assert_eq!(g.capabilities, vec!["kv_get".to_owned(), "log".to_owned()]);
        assert_eq!(g.memory_bytes, 1 << 20, "policy caps the header's request");
        assert_eq!(g.time_ms, 5);
        assert_eq!(g.fuel, Some(9));
        Ok(())
    }

    #[test]
    fn only_a_nan_blind_declaration_skips_per_instruction_canonicalisation() -> Result<(), RuntimeError> {
        let plain = header(&[], Limits::default());
        let mut blind = plain.clone();
        blind.extensions = vec![referee_muscle::Extension::nan_blind()];
        let default = Policy::default();
        assert!(default.grant(&plain).canonicalize_every_nan, "undeclared code is canonicalised everywhere");
        assert!(!default.grant(&blind).canonicalize_every_nan, "a declared muscle is canonicalised at the boundary");
        let strict = Policy::from_toml("[muscles.feanor]\ncanonicalize_every_nan = true\n")?;
        assert!(strict.grant(&blind).canonicalize_every_nan, "the operator may refuse the declaration");
        let relaxed_default = Policy::from_toml(
            "[defaults]\ncanonicalize_every_nan = true\n[muscles.feanor]\ncanonicalize_every_nan = false\n",
        )?;
        assert!(!relaxed_default.grant(&blind).canonicalize_every_nan, "a narrower layer overrides a wider one");
        assert!(relaxed_default.grant(&plain).canonicalize_every_nan, "no policy turns it off for undeclared code");
        Ok(())
    }

    #[test]
    fn unknown_capabilities_and_fields_are_refused() {
        assert!(Policy::from_toml("[defaults]\ncapabilities = [\"net\"]\n").is_err());
        assert!(Policy::from_toml("[defaults]\nmemroy_bytes = 1\n").is_err());
        assert!(Policy::from_toml("[publishers.nothex]\n").is_err());
    }
}
