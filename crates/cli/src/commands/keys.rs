//! `referee keygen`.

use anyhow::{Context, Result};
use referee_trust::{Home, KeyFileOutcome};
use serde_json::json;

pub(crate) fn keygen(home: &Home, json: bool) -> Result<()> {
    let report = home.keygen().with_context(|| format!("keygen in {}", home.root().display()))?;
    let files: Vec<_> = report
        .files
        .iter()
        .map(|f| match f {
            KeyFileOutcome::Created(p) => json!({ "path": p, "outcome": "created" }),
            KeyFileOutcome::Kept(p) => json!({ "path": p, "outcome": "kept" }),
        })
        .collect();
    let value = json!({
        "home": home.root(),
        "files": files,
        "publisher": report.publisher.to_string(),
        "referee": report.referee.to_string(),
        "master_key": report.master.to_string(),
        "publisher_pub": home.publisher_pub_path(),
        "referee_pub": home.referee_pub_path(),
    });
    super::print(json, &value, || {
        let mut lines: Vec<String> = report
            .files
            .iter()
            .map(|f| match f {
                KeyFileOutcome::Created(p) => format!("created {}", p.display()),
                KeyFileOutcome::Kept(p) => format!("kept    {} (existing key, not overwritten)", p.display()),
            })
            .collect();
        lines.push(format!("publisher key id  {}", report.publisher));
        lines.push(format!("referee key id    {}", report.referee));
        lines.push(format!("master key id     {}", report.master));
        lines.push(format!(
            "share {} with referees (`referee trust add`) and {} with publishers (`--recipient`)",
            home.publisher_pub_path().display(),
            home.referee_pub_path().display()
        ));
        lines.join("\n")
    });
    Ok(())
}
