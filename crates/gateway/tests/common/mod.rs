//! What the attenuation property tests share: the model's reading of a prefix text, and a
//! block written by hand.

#![allow(clippy::unwrap_used, reason = "test code")]

use biscuit_auth::UnverifiedBiscuit;
use biscuit_auth::builder::BlockBuilder;

/// The model's own reading of a prefix text: its components, or `None` when it must be
/// refused (not absolute, or a `.`, `..` or empty component other than one trailing slash).
pub(crate) fn model_components(text: &str) -> Option<Vec<&str>> {
    let mut parts: Vec<&str> = text.split('/').collect();
    if parts.first() != Some(&"") || parts.len() < 2 {
        return None;
    }
    parts.remove(0);
    if parts.last() == Some(&"") {
        parts.pop();
    }
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return None;
    }
    Some(parts)
}

/// `token` with a holder block narrowing `fact` (`path` or `node`) to `text`, written by hand
/// (no normalisation on the way): the check and its hints, as `attenuate` would write them.
pub(crate) fn forge(token: &str, fact: &str, text: &str) -> String {
    let p = if text.ends_with('/') { text.to_owned() } else { format!("{text}/") };
    let var = &fact[..1];
    let code = format!("reject if {fact}(${var}), !${var}.starts_with(\"{p}\");\nnarrow_{fact}(\"{p}\");\n");
    let parsed = UnverifiedBiscuit::from_base64(token).unwrap();
    parsed.append(BlockBuilder::new().code(&code).unwrap()).unwrap().to_base64().unwrap()
}

/// `start` followed by `/NAME` for each index into `names`, and a trailing `/` when `slash` or
/// when nothing else would be there: a random prefix text, `.`, `..` and empty names included.
pub(crate) fn prefix_text(start: String, parts: &[usize], names: &[&str], slash: bool) -> String {
    let mut text = start;
    for &i in parts {
        text.push('/');
        text.push_str(names.get(i).copied().unwrap_or_default());
    }
    if slash || text.is_empty() {
        text.push('/');
    }
    text
}
