//! Attestation: a signed report of what this referee is and which muscles it runs.
//!
//! The report is a JSON object; its signature is Ed25519 by the referee identity over the
//! report's canonical serialisation (`serde_json` with sorted keys, no whitespace). The
//! verifier checks the key, the signature, that the nonce is the one it asked for (so a
//! recorded report cannot be replayed) and that the report is fresh.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer};
use referee_muscle::RefereePublicKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::RuntimeError;
use crate::runtime::Runtime;

/// Report format version.
pub const REPORT_VERSION: u64 = 1;

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The document is not a signed report.
    #[error("not a signed attestation report: {0}")]
    Malformed(String),
    /// The report names a different referee key than the one expected.
    #[error("report is from referee {found}, expected {expected}")]
    WrongReferee {
        /// Key id in the report.
        found: String,
        /// Key id of the key given to the verifier.
        expected: String,
    },
    /// The signature does not verify: the report was changed or signed by another key.
    #[error("signature does not verify: the report was modified or not signed by this referee")]
    BadSignature,
    /// The nonce is not the one the verifier issued (replay).
    #[error("nonce mismatch: the report answers nonce {found}, not {expected} (replayed report?)")]
    NonceMismatch {
        /// Nonce in the report.
        found: String,
        /// Nonce expected.
        expected: String,
    },
    /// The report is older (or newer) than the freshness window allows.
    #[error("report time {time} is {age} s away from now, beyond the {max_age} s freshness window")]
    Stale {
        /// Report time.
        time: u64,
        /// Distance from now.
        age: u64,
        /// Allowed distance.
        max_age: u64,
    },
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn canonical(report: &Value) -> Vec<u8> {
    // serde_json's Map is a BTreeMap (no `preserve_order`), so keys serialise sorted.
    serde_json::to_vec(report).unwrap_or_default()
}

/// Builds and signs a report answering `nonce` (hex). `executable_sha256` is the digest of the
/// running binary, computed by the caller that knows which file it is.
pub fn attest(
    runtime: &Runtime,
    nonce: &str,
    executable_sha256: [u8; 32],
    evidence: Value,
) -> Result<Value, RuntimeError> {
    let nonce_bytes = hex::decode(nonce).map_err(|_| RuntimeError::Policy("the nonce must be hex".into()))?;
    if nonce_bytes.len() < 16 {
        return Err(RuntimeError::Policy("the nonce must be at least 16 bytes (32 hex digits)".into()));
    }
    let identity = &runtime.keys().identity;
    let muscles: Vec<Value> = runtime
        .list()
        .iter()
        .map(|m| {
            json!({
                "name": m.header.name,
                "version": m.header.version,
                "publisher": m.header.publisher.to_string(),
                "code_hash": hex::encode(m.header.code_hash),
            })
        })
        .collect();
    let trust = runtime.trust();
    let trust_digest = {
        let mut h = Sha256::new();
        h.update(b"referee/trust-store/v1");
        for p in trust.publishers().map_err(|e| RuntimeError::Store(e.to_string()))? {
            h.update(p.key.key_id().0);
            h.update([u8::from(p.require_post_quantum)]);
        }
        for r in trust.revocations().map_err(|e| RuntimeError::Store(e.to_string()))? {
            h.update(format!("{:?}", r.what).as_bytes());
        }
        for a in trust.accepted().map_err(|e| RuntimeError::Store(e.to_string()))? {
            h.update(a.publisher.0);
            h.update(a.name.as_bytes());
            h.update(a.version.to_le_bytes());
        }
        h.finalize()
    };
    let head = runtime.audit().head()?;
    let report = json!({
        "report_version": REPORT_VERSION,
        "referee_version": env!("CARGO_PKG_VERSION"),
        "referee": identity.key_id().to_string(),
        "executable_sha256": hex::encode(executable_sha256),
        "policy_sha256": hex::encode(runtime.policy().digest()),
        "trust_store_sha256": hex::encode(trust_digest),
        "muscles": muscles,
        "audit_head": { "records": head.records, "sha256": hex::encode(head.hash) },
        "nonce": nonce.to_ascii_lowercase(),
        "time": now(),
        "evidence": evidence,
    });
    let signature = identity.signing_key().sign(&canonical(&report));
    runtime.audit().append(&json!({ "kind": "attest", "nonce": nonce.to_ascii_lowercase() }))?;
    Ok(json!({ "report": report, "signature": hex::encode(signature.to_bytes()) }))
}

/// Checks a signed report against the referee's public key, the expected nonce and a
/// freshness window. Returns the report on success.
pub fn verify(
    signed: &Value,
    referee: &RefereePublicKey,
    nonce: &str,
    max_age_secs: u64,
) -> Result<Value, AttestError> {
    let report = signed.get("report").ok_or_else(|| AttestError::Malformed("missing `report`".into()))?;
    let sig_hex = signed
        .get("signature")
        .and_then(Value::as_str)
        .ok_or_else(|| AttestError::Malformed("missing `signature`".into()))?;
    let sig_bytes: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| AttestError::Malformed("signature is not 64 hex-encoded bytes".into()))?;
    let expected = referee.key_id().to_string();
    let found = report.get("referee").and_then(Value::as_str).unwrap_or_default();
    if found != expected {
        return Err(AttestError::WrongReferee { found: found.into(), expected });
    }
    referee
        .signing_public_key()
        .verify_strict(&canonical(report), &Signature::from_bytes(&sig_bytes))
        .map_err(|_| AttestError::BadSignature)?;
    let found_nonce = report.get("nonce").and_then(Value::as_str).unwrap_or_default();
    if found_nonce != nonce.to_ascii_lowercase() {
        return Err(AttestError::NonceMismatch { found: found_nonce.into(), expected: nonce.to_ascii_lowercase() });
    }
    let time =
        report.get("time").and_then(Value::as_u64).ok_or_else(|| AttestError::Malformed("missing `time`".into()))?;
    let age = now().abs_diff(time);
    if age > max_age_secs {
        return Err(AttestError::Stale { time, age, max_age: max_age_secs });
    }
    Ok(report.clone())
}
