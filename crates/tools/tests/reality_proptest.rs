//! Property: whatever the path string, the reality check never panics and never resolves
//! outside the root; writes through random paths never change anything outside.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{Fixture, call};
use proptest::prelude::*;
use referee_tools::CallScope;
use referee_tools::reality::Access;
use serde_json::json;

/// A fixture with symlinks of every kind to walk through.
fn fixture() -> Fixture {
    let fx = Fixture::new();
    symlink("../outside", fx.root.join("out_dir")).unwrap();
    symlink("/", fx.root.join("slash")).unwrap();
    symlink("sub", fx.root.join("in_dir")).unwrap();
    symlink("loop", fx.root.join("loop")).unwrap();
    symlink("../../outside/secret.txt", fx.root.join("sub/up2")).unwrap();
    fx
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("".to_owned()),
        Just("sub".to_owned()),
        Just("out_dir".to_owned()),
        Just("slash".to_owned()),
        Just("in_dir".to_owned()),
        Just("loop".to_owned()),
        Just("up2".to_owned()),
        Just("file.txt".to_owned()),
        Just("secret.txt".to_owned()),
        Just("outside".to_owned()),
        Just("data_evil".to_owned()),
        Just("data".to_owned()),
        Just("\0".to_owned()),
        "[a-z.]{0,3}",
        any::<String>(),
    ]
}

fn path_strategy(root: PathBuf) -> impl Strategy<Value = String> {
    (any::<u8>(), prop::collection::vec(component(), 0..8)).prop_map(move |(start, parts)| {
        let joined = parts.join("/");
        match start % 3 {
            0 => joined,
            1 => format!("{}/{joined}", root.display()),
            _ => format!("/{joined}"),
        }
    })
}

#[test]
fn random_paths_never_escape() {
    let fx = fixture();
    let root = fx.root.clone();
    for walk in [false, true] {
        let reality = fx.reality(walk);
        let scope = CallScope::default();
        proptest!(ProptestConfig::with_cases(512), |(path in path_strategy(root.clone()))| {
            for access in [Access::Path, Access::ReadFile, Access::Dir] {
                if let Ok(resolved) = reality.open(&scope, Path::new(&path), access) {
                    // The kernel's own name for what was opened, not the name the check reports.
                    let opened = std::fs::read_link(format!("/proc/self/fd/{}", resolved.fd.as_raw_fd())).unwrap();
                    prop_assert!(opened.starts_with(&root), "{path:?} opened {opened:?}");
                    prop_assert_eq!(&resolved.path, &opened, "{:?} is reported under another name", path);
                }
            }
        });
    }
}

#[test]
fn random_writes_never_change_anything_outside() {
    let fx = fixture();
    let before = fx.outside_snapshot();
    let tools = fx.tools(false);
    proptest!(ProptestConfig::with_cases(128), |(path in path_strategy(fx.root.clone()))| {
        let result = call(&tools, "fs_write", json!({ "path": path, "content": "pwned", "mode": "overwrite" }));
        if let Ok(out) = result {
            let written = PathBuf::from(out.data["path"].as_str().unwrap());
            prop_assert!(written.starts_with(&fx.root), "{path:?} wrote {written:?}");
        }
    });
    assert_eq!(fx.outside_snapshot(), before);
}
