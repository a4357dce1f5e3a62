//! `referee inspect` and `referee verify`.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use referee_muscle::{SealedMuscle, limits::MAX_MUSCLE_LEN, open};
use referee_trust::Home;
use serde_json::json;

/// Reads a muscle file, refusing anything larger than the format allows before reading it all.
pub(crate) fn read_muscle(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MUSCLE_LEN as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("read {}", path.display()))?;
    if bytes.len() > MAX_MUSCLE_LEN {
        bail!("{} is larger than the {MAX_MUSCLE_LEN}-byte limit for muscles", path.display());
    }
    Ok(bytes)
}

pub(crate) fn inspect(path: &Path, json: bool) -> Result<()> {
    let bytes = read_muscle(path)?;
    let sealed = SealedMuscle::parse(&bytes).with_context(|| format!("inspect {}", path.display()))?;
    let value = json!({
        "file": path,
        "bytes": bytes.len(),
        "header": crate::output::header(&sealed.header),
        "key_delivery": crate::output::delivery(&sealed.delivery),
    });
    super::print(json, &value, || crate::output::inspect_text(&sealed, bytes.len()));
    Ok(())
}

pub(crate) fn verify(home: &Home, path: &Path, accept: bool, json: bool) -> Result<()> {
    let bytes = read_muscle(path)?;
    let keys = home.referee_keys()?;
    let store = home.trust_store()?;
    let opened = open(&bytes, &keys, &store).with_context(|| format!("verify {}", path.display()))?;
    let mark =
        if accept { Some(store.record_accepted(&opened.header).context("record accepted version")?) } else { None };
    let h = &opened.header;
    let value = json!({
        "file": path,
        "ok": true,
        "name": h.name,
        "version": h.version,
        "publisher": h.publisher.to_string(),
        "code_hash": hex::encode(h.code_hash),
        "payload_len": opened.payload.len(),
        "accepted_mark": mark,
    });
    super::print(json, &value, || {
        let mut line = format!(
            "ok: {} v{} from publisher {} opens on this referee (sha256:{})",
            h.name,
            h.version,
            h.publisher.short(),
            hex::encode(h.code_hash)
        );
        if let Some(mark) = mark {
            line.push_str(&format!("; accepted, versions below {mark} are now refused"));
        }
        line
    });
    Ok(())
}
