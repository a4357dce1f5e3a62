//! `referee token`: create, attenuate, revoke, list.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use referee_gateway::auth::{self, Grant, Narrowing, now_unix};
use referee_gateway::launch;
use referee_gateway::store::TokenRecord;
use referee_trust::Home;
use serde_json::json;

use crate::cli::{TokenCommand, TokenScopeArgs};

/// Parses "90", "30s", "15m", "2h", "7d" into seconds.
fn parse_ttl(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().with_context(|| format!("--ttl {text:?}: expected e.g. 3600, 30s, 15m, 2h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => bail!("--ttl {text:?}: unknown unit {other:?}; use s, m, h or d"),
    };
    n.checked_mul(scale).with_context(|| format!("--ttl {text:?} is too long"))
}

fn expiry(scope: &TokenScopeArgs) -> Result<Option<u64>> {
    scope.ttl.as_deref().map(|t| Ok(now_unix().saturating_add(parse_ttl(t)?))).transpose()
}

/// The worknode subtrees of `--node`, checked as worknode paths (`*` stays `*`).
fn subtrees(scope: &TokenScopeArgs) -> Result<Vec<String>> {
    scope
        .nodes
        .iter()
        .map(|n| {
            if n == "*" {
                return Ok(n.clone());
            }
            let path: referee_worknode::WnPath =
                n.parse().with_context(|| format!("--node {n:?}: expected a worknode path such as /acme/research"))?;
            Ok(path.to_string())
        })
        .collect()
}

fn socket(home: &Home, unix: Option<PathBuf>) -> PathBuf {
    unix.unwrap_or_else(|| home.root().join(referee_gateway::SOCKET_FILE))
}

fn record_json(r: &TokenRecord) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or_default()
}

pub(crate) fn run(home: &Home, cmd: TokenCommand, json_out: bool) -> Result<()> {
    match cmd {
        TokenCommand::Create { scope, admin, label, unix } => {
            let grant = if admin {
                Grant::admin(&label, expiry(&scope)?)
            } else {
                if scope.tools.is_empty() && scope.muscles.is_empty() {
                    bail!("a token needs at least one --tool or --muscle (or --admin)");
                }
                Grant {
                    tools: scope.tools.clone(),
                    muscles: scope.muscles.clone(),
                    paths: if scope.paths.is_empty() { vec!["*".into()] } else { scope.paths.clone() },
                    nodes: subtrees(&scope)?,
                    admin: false,
                    expires_at: expiry(&scope)?,
                    label,
                }
            };
            let (token, record) = launch::token_create(home, &socket(home, unix), &grant)?;
            super::print(json_out, &json!({ "token": token, "record": record_json(&record) }), || {
                format!("{token}\n(id {}; revoke with `referee token revoke {}`)", record.id, record.id)
            });
        }
        TokenCommand::Attenuate { token, scope } => {
            let narrowing = Narrowing {
                tools: scope.tools.clone(),
                muscles: scope.muscles.clone(),
                paths: scope.paths.clone(),
                nodes: subtrees(&scope)?,
                expires_at: expiry(&scope)?,
            };
            let narrowed = auth::attenuate(&token, &narrowing)?;
            super::print(json_out, &json!({ "token": narrowed }), || narrowed.clone());
        }
        TokenCommand::Revoke { id, unix } => {
            launch::token_revoke(home, &socket(home, unix), &id)?;
            super::print(json_out, &json!({ "revoked": id }), || format!("revoked {id}"));
        }
        TokenCommand::List { unix } => {
            let tokens = launch::token_list(home, &socket(home, unix))?;
            let value = json!({ "tokens": tokens.iter().map(record_json).collect::<Vec<_>>() });
            super::print(json_out, &value, || {
                tokens
                    .iter()
                    .map(|t| {
                        let state = if t.revoked { "revoked" } else { "active" };
                        let rights = if t.admin {
                            "admin".to_owned()
                        } else {
                            format!(
                                "tools {:?} muscles {:?} paths {:?} nodes {:?}",
                                t.tools, t.muscles, t.paths, t.nodes
                            )
                        };
                        let exp = t.expires_at.map_or_else(|| "never".to_owned(), |e| e.to_string());
                        format!("{}  {state:7}  {:12}  expires {exp}  {rights}", t.id, t.label)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() -> Result<()> {
        assert_eq!(parse_ttl("90")?, 90);
        assert_eq!(parse_ttl("15m")?, 900);
        assert_eq!(parse_ttl("2h")?, 7200);
        assert_eq!(parse_ttl("7d")?, 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        Ok(())
    }
}
