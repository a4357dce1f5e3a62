//! Shared fixture: a temporary tree with a root, a secret outside it and a prefix-collision
//! sibling.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use referee_tools::config::Limits;
use referee_tools::reality::Reality;
use referee_tools::{CallScope, SharedTool, ToolError, ToolOutput};
use serde_json::Value;

pub const SECRET: &str = "TOP-SECRET-do-not-leak-7f3a";

pub struct Fixture {
    _dir: tempfile::TempDir,
    /// Canonical root.
    pub root: PathBuf,
    /// A directory outside the root holding `secret.txt`.
    pub outside: PathBuf,
    /// `<root>_evil`, a sibling whose name starts with the root's.
    pub evil: PathBuf,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("data");
        let outside = base.join("outside");
        let evil = base.join("data_evil");
        for d in [&root, &outside, &evil, &root.join("sub")] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
        std::fs::write(evil.join("secret.txt"), SECRET).unwrap();
        std::fs::write(root.join("file.txt"), "inside").unwrap();
        std::fs::write(root.join("sub/inner.txt"), "inner").unwrap();
        Self { _dir: dir, root, outside, evil }
    }

    pub fn reality(&self, walk: bool) -> Arc<Reality> {
        let reality = Reality::new(std::slice::from_ref(&self.root), &Limits::default()).unwrap();
        Arc::new(if walk { reality.with_component_walk() } else { reality })
    }

    /// The file tools, by name, with `openat2` or the component walk.
    pub fn tools(&self, walk: bool) -> HashMap<String, SharedTool> {
        referee_tools::fs::tools(&self.reality(walk), &Limits::default())
            .into_iter()
            .map(|t| (t.spec().name.clone(), t))
            .collect()
    }

    /// Every file below `outside` and `evil` with its content, to prove nothing changed.
    pub fn outside_snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut all = Vec::new();
        for dir in [&self.outside, &self.evil] {
            snapshot(dir, &mut all);
        }
        all.sort();
        all
    }
}

fn snapshot(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            snapshot(&path, out);
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
        }
    }
}

pub fn call(tools: &HashMap<String, SharedTool>, name: &str, params: Value) -> Result<ToolOutput, ToolError> {
    tools[name].call(params, &CallScope::default())
}

/// Asserts a refusal by the reality check whose message names the path.
#[track_caller]
pub fn assert_violation(result: Result<ToolOutput, ToolError>) {
    match result {
        Err(ToolError::RealityViolation(message)) => assert!(!message.is_empty()),
        other => panic!("expected a reality violation, got {other:?}"),
    }
}

/// Asserts the output never contains the secret.
#[track_caller]
pub fn assert_no_secret(result: &Result<ToolOutput, ToolError>) {
    let text = match result {
        Ok(out) => out.data.to_string(),
        Err(e) => e.to_string(),
    };
    assert!(!text.contains(SECRET), "secret leaked: {text}");
}
