//! `referee trust …`.

use anyhow::{Context, Result};
use referee_muscle::{KeyId, MuscleId};
use referee_trust::{AddOutcome, Home, Revocation, read_publisher_public};
use serde_json::json;

use crate::cli::TrustCommand;

fn revocation_text(what: &Revocation) -> (String, String) {
    match what {
        Revocation::Publisher(id) => ("publisher".into(), id.to_string()),
        Revocation::Muscle(id) => ("muscle".into(), id.to_string()),
        Revocation::MuscleVersion(id, v) => ("muscle-version".into(), format!("{id} v{v}")),
    }
}

pub(crate) fn run(home: &Home, cmd: TrustCommand, json: bool) -> Result<()> {
    let store = home.trust_store()?;
    match cmd {
        TrustCommand::Add { file, label, require_pq } => {
            let key = read_publisher_public(&file)?;
            let outcome = store.add_publisher(&key, &label, require_pq)?;
            let id = key.key_id();
            let verb = match outcome {
                AddOutcome::Added => "trusted",
                AddOutcome::Updated => "updated",
            };
            let value = json!({ "publisher": id.to_string(), "outcome": verb, "require_pq": require_pq });
            super::print(json, &value, || format!("{verb} publisher {id}"));
        }
        TrustCommand::Remove { publisher } => {
            let id = KeyId::from_hex(&publisher).context("publisher")?;
            let removed = store.remove_publisher(&id)?;
            if !removed {
                return Err(referee_trust::TrustError::UnknownPublisher(id).into());
            }
            super::print(json, &json!({ "publisher": id.to_string(), "outcome": "removed" }), || {
                format!("removed publisher {id}")
            });
        }
        TrustCommand::List => {
            let publishers = store.publishers()?;
            let revocations = store.revocations()?;
            let accepted = store.accepted()?;
            let value = json!({
                "publishers": publishers.iter().map(|p| json!({
                    "id": p.key.key_id().to_string(),
                    "label": p.label,
                    "require_pq": p.require_post_quantum,
                    "added_at": p.added_at,
                })).collect::<Vec<_>>(),
                "revocations": revocations.iter().map(|r| {
                    let (kind, id) = revocation_text(&r.what);
                    json!({ "kind": kind, "id": id, "revoked_at": r.revoked_at, "reason": r.reason })
                }).collect::<Vec<_>>(),
                "accepted": accepted.iter().map(|a| json!({
                    "publisher": a.publisher.to_string(), "name": a.name, "version": a.version,
                })).collect::<Vec<_>>(),
            });
            super::print(json, &value, || {
                let mut lines = vec![format!("trusted publishers ({})", publishers.len())];
                lines.extend(publishers.iter().map(|p| {
                    let pq = if p.require_post_quantum { "  [requires ML-DSA-65]" } else { "" };
                    format!("  {}  {}{pq}", p.key.key_id(), p.label)
                }));
                lines.push(format!("revocations ({})", revocations.len()));
                lines.extend(revocations.iter().map(|r| {
                    let (kind, id) = revocation_text(&r.what);
                    format!("  {kind:<15} {id}  {}", r.reason)
                }));
                lines.push(format!("accepted versions ({})", accepted.len()));
                lines.extend(accepted.iter().map(|a| format!("  {} {} v{}", a.publisher.short(), a.name, a.version)));
                lines.join("\n")
            });
        }
        TrustCommand::Revoke { publisher, muscle, version, reason } => {
            let what = match (publisher, muscle, version) {
                (Some(p), _, _) => Revocation::Publisher(KeyId::from_hex(&p).context("--publisher")?),
                (None, Some(m), None) => Revocation::Muscle(MuscleId::from_hex(&m).context("--muscle")?),
                (None, Some(m), Some(v)) => Revocation::MuscleVersion(MuscleId::from_hex(&m).context("--muscle")?, v),
                (None, None, _) => anyhow::bail!("name what to revoke: --publisher ID or --muscle ID [--version V]"),
            };
            store.revoke(what, &reason)?;
            let (kind, id) = revocation_text(&what);
            super::print(json, &json!({ "revoked": kind, "id": id }), || format!("revoked {kind} {id}"));
        }
        TrustCommand::AllowRollback { publisher, name, to } => {
            let id = KeyId::from_hex(&publisher).context("--publisher")?;
            let previous = store.allow_rollback(&id, &name, to)?;
            let value = json!({ "publisher": id.to_string(), "name": name, "previous": previous, "now": to });
            super::print(json, &value, || {
                let was = previous.map_or_else(|| "none".to_owned(), |v| format!("v{v}"));
                format!("{name} from {}: lowest accepted version is now v{to} (was {was})", id.short())
            });
        }
    }
    Ok(())
}
