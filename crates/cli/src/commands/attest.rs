//! `referee audit …` and `referee attest …`.

use std::io::Read;

use anyhow::{Context, Result, bail};
use referee_runtime::{AuditLog, Runtime, RuntimeOptions, attest as sign_report, state_db_path, verify_attestation};
use referee_trust::{Home, read_referee_public};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::cli::{AttestArgs, AttestVerify, AuditCommand};

fn open_audit(home: &Home) -> Result<AuditLog> {
    let path = state_db_path(home);
    if !path.exists() {
        bail!("{} does not exist: this referee has not run yet (nothing audited)", path.display());
    }
    Ok(AuditLog::open_existing(&path)?)
}

pub(crate) fn audit(home: &Home, cmd: &AuditCommand, json: bool) -> Result<()> {
    let log = open_audit(home)?;
    match cmd {
        AuditCommand::Verify => match log.verify()? {
            Ok(head) => {
                let value = json!({ "ok": true, "records": head.records, "head_sha256": hex::encode(head.hash) });
                super::print(json, &value, || {
                    format!("ok: {} records, chain intact, head sha256:{}", head.records, hex::encode(head.hash))
                });
                Ok(())
            }
            Err(violation) => bail!("audit log is not intact: {violation}"),
        },
        AuditCommand::Tail { count } => {
            let records = log.tail(*count)?;
            let value = json!(records
                .iter()
                .map(|r| json!({ "seq": r.seq, "time_ms": r.time_ms, "event": r.event, "sha256": hex::encode(r.hash) }))
                .collect::<Vec<_>>());
            super::print(json, &value, || {
                records
                    .iter()
                    .map(|r| format!("{:>6}  {}  {}", r.seq, r.time_ms, super::inert(&r.event.to_string())))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
    }
}

/// SHA-256 of the running executable, for the report.
fn executable_digest() -> Result<[u8; 32]> {
    let exe = std::env::current_exe().context("locate the running executable")?;
    let mut file = std::fs::File::open(&exe).with_context(|| format!("open {}", exe.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("read {}", exe.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher.finalize().into())
}

pub(crate) fn attest(home: &Home, args: &AttestArgs, json_out: bool) -> Result<()> {
    let nonce = args.nonce.as_deref().context("--nonce HEX is required (the verifier's fresh challenge)")?;
    match &args.verify {
        Some(AttestVerify::Verify { report, referee_key, max_age }) => {
            let text = std::fs::read_to_string(report).with_context(|| format!("read {}", report.display()))?;
            let signed: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", report.display()))?;
            let key = read_referee_public(referee_key)?;
            let verified = verify_attestation(&signed, &key, nonce, *max_age)
                .with_context(|| format!("verify {}", report.display()))?;
            let value = json!({ "ok": true, "report": verified });
            super::print(json_out, &value, || {
                format!(
                    "ok: report from referee {} for nonce {}, {} muscle(s) loaded",
                    key.key_id().short(),
                    nonce,
                    verified.get("muscles").and_then(|m| m.as_array()).map_or(0, Vec::len)
                )
            });
            Ok(())
        }
        None => {
            let runtime = Runtime::open(home, RuntimeOptions::default()).context("open the referee")?;
            for path in &args.load {
                let bytes = super::muscle::read_muscle(path)?;
                runtime.load(&bytes).with_context(|| format!("load {}", path.display()))?;
            }
            let signed = sign_report(&runtime, nonce, executable_digest()?, json!([]))?;
            // The report is always JSON: it is meant to be handed to a verifier.
            println!("{signed:#}");
            Ok(())
        }
    }
}
