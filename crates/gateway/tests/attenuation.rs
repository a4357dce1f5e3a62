//! Property: attenuation only narrows. For random chains of attenuations over random path
//! texts (`.`, `..`, `//`, trailing slashes, symlinks inside the root, prefix look-alikes), the
//! files a child token can read through the real file tools and the reality check are a subset
//! of its parent's, and of what an independent model of the chain allows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test code")]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use referee_gateway::auth::{AuthError, Authority, Grant, Narrowing, attenuate};
use referee_gateway::store::GatewayStore;
use referee_tools::config::Limits;
use referee_tools::reality::Reality;
use referee_tools::{CallScope, SharedTool};
use serde_json::json;

/// Files under the root (relative), each holding its own canonical path as content.
const FILES: [&str; 8] = [
    "top.txt",
    "public/a.txt",
    "public/sub/b.txt",
    "public/sub/deep/c.txt",
    "private/secret.txt",
    "private/sub/s.txt",
    "pub/x.txt",
    "publicity/y.txt",
];

/// Symlinks inside the root: (link, target).
const LINKS: [(&str, &str); 4] = [
    ("public/to_private", "../private"),
    ("public/sub/up", ".."),
    ("link_pub", "public"),
    ("public/secret_link", "../private/secret.txt"),
];

/// Requests that go through symlinks or `..` (relative to the root), besides every file.
const DETOURS: [&str; 8] = [
    "public/to_private/secret.txt",
    "public/sub/up/a.txt",
    "public/sub/up/to_private/sub/s.txt",
    "link_pub/sub/b.txt",
    "public/secret_link",
    "public/../private/secret.txt",
    "public/sub/../../private/secret.txt",
    "public/sub/deep/../../../top.txt",
];

/// Components a random path text is made of.
const PARTS: [&str; 14] = [
    "public",
    "private",
    "sub",
    "deep",
    "pub",
    "publicity",
    "to_private",
    "link_pub",
    "up",
    ".",
    "..",
    "",
    "a.txt",
    "x",
];

struct World {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    read: SharedTool,
    authority: Authority,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("root");
        for f in FILES {
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, path.display().to_string()).unwrap();
        }
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/o.txt"), "outside").unwrap();
        for (link, target) in LINKS {
            symlink(target, root.join(link)).unwrap();
        }
        let reality = Arc::new(Reality::new(std::slice::from_ref(&root), &Limits::default()).unwrap());
        let read = referee_tools::fs::tools(&reality, &Limits::default())
            .into_iter()
            .find(|t| t.spec().name == "fs_read")
            .unwrap();
        let keys = base.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let store = Arc::new(GatewayStore::open(&keys.join("gateway.redb")).unwrap());
        let authority = Authority::open(&keys, store, Duration::from_secs(60)).unwrap();
        Self { _dir: dir, base, root, read, authority }
    }

    /// Every request the test makes: each file by its canonical path, each detour, and a file
    /// outside the root.
    fn requests(&self) -> Vec<PathBuf> {
        FILES
            .iter()
            .chain(DETOURS.iter())
            .map(|f| self.root.join(f))
            .chain([self.base.join("outside/o.txt"), self.root.join("../outside/o.txt")])
            .collect()
    }

    /// The files (their canonical paths, read back from their content) a token can read, and
    /// which requests succeeded.
    fn opened(&self, token: &str) -> (BTreeSet<String>, BTreeSet<PathBuf>) {
        let scope = self.authority.verify(token).unwrap();
        let call = CallScope { path_prefixes: scope.path_prefixes.clone(), ..CallScope::default() };
        let mut files = BTreeSet::new();
        let mut requests = BTreeSet::new();
        for request in self.requests() {
            if let Ok(out) = self.read.call(json!({ "path": request }), &call) {
                files.insert(out.data["content"].as_str().unwrap().to_owned());
                requests.insert(request);
            }
        }
        (files, requests)
    }
}

/// The model's own reading of a prefix text (`None`: refused).
fn model_prefix(text: &str) -> Option<PathBuf> {
    common::model_components(text).map(|parts| parts.iter().fold(PathBuf::from("/"), |acc, p| acc.join(p)))
}

/// The model: a file may be read when it is inside the root and, for every block that names
/// paths, lies strictly under one of them (by whole components of its canonical path; a prefix
/// is a directory, so naming a file grants nothing).
fn model_allows(blocks: &[Vec<PathBuf>], root: &Path, file: &Path) -> bool {
    file.starts_with(root) && blocks.iter().all(|list| list.iter().any(|p| file.starts_with(p) && file != p))
}

fn path_text() -> impl Strategy<Value = (usize, Vec<usize>, bool)> {
    // (anchor: 0 root, 1 base, 2 "/"), component indices, trailing slash
    (0usize..3, proptest::collection::vec(0usize..PARTS.len(), 0..4), any::<bool>())
}

fn render(world: &World, (anchor, parts, slash): &(usize, Vec<usize>, bool)) -> String {
    let start = match anchor {
        0 => world.root.display().to_string(),
        1 => world.base.display().to_string(),
        _ => String::new(),
    };
    common::prefix_text(start, parts, &PARTS, *slash)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn a_child_never_reads_more_than_its_parent(
        granted in proptest::collection::vec(path_text(), 0..3),
        everywhere in any::<bool>(),
        chain in proptest::collection::vec(proptest::collection::vec(path_text(), 0..3), 1..5),
    ) {
        let world = World::new();
        let mut grant = Grant { tools: vec!["fs_read".into()], ..Grant::default() };
        let mut blocks: Vec<Vec<PathBuf>> = Vec::new();
        if everywhere {
            grant.paths = vec!["*".into()];
        } else {
            let texts: Vec<String> = granted.iter().map(|g| render(&world, g)).collect();
            let model: Option<Vec<PathBuf>> = texts.iter().map(|t| model_prefix(t)).collect();
            grant.paths = texts;
            match (world.authority.mint(&grant), model) {
                (Ok(_), Some(list)) => blocks.push(list),
                (Err(AuthError::Build(_)), None) => {
                    grant.paths = vec![world.root.join("public").display().to_string()];
                    blocks.push(vec![world.root.join("public")]);
                }
                (got, model) => panic!("mint of {:?}: {got:?}, model {model:?}", grant.paths),
            }
        }
        let (mut token, _) = world.authority.mint(&grant).unwrap();
        let (mut files, mut requests) = world.opened(&token);

        for step in &chain {
            let texts: Vec<String> = step.iter().map(|g| render(&world, g)).collect();
            let model: Option<Vec<PathBuf>> = texts.iter().map(|t| model_prefix(t)).collect();
            let narrowing = Narrowing { paths: texts.clone(), ..Narrowing::default() };
            let child = match (attenuate(&token, &narrowing), model) {
                (Ok(child), Some(list)) => {
                    if !list.is_empty() {
                        blocks.push(list);
                    }
                    child
                }
                (Err(AuthError::Build(_)), None) => {
                    // The same text written into a block by hand: the token is refused.
                    let bad = texts.iter().find(|t| model_prefix(t).is_none()).unwrap();
                    let forged = common::forge(&token, "path", bad);
                    let refused = world.authority.verify(&forged).err();
                    prop_assert!(matches!(refused.as_ref().map(AuthError::cause), Some(AuthError::Refused(_))), "{bad}");
                    continue;
                }
                (got, model) => panic!("attenuate to {texts:?}: {got:?}, model {model:?}"),
            };
            let (child_files, child_requests) = world.opened(&child);
            prop_assert!(child_files.is_subset(&files), "child {child_files:?} ⊄ parent {files:?} after {texts:?}");
            prop_assert!(child_requests.is_subset(&requests), "{child_requests:?} ⊄ {requests:?}");
            for f in &child_files {
                prop_assert!(model_allows(&blocks, &world.root, Path::new(f)), "{f} read, model refuses; {blocks:?}");
            }
            // Exact for symlink-free requests: each file by its canonical path is readable
            // exactly when the model allows it.
            for f in FILES {
                let path = world.root.join(f);
                prop_assert_eq!(
                    child_requests.contains(&path),
                    model_allows(&blocks, &world.root, &path),
                    "{} with blocks {:?}", path.display(), blocks
                );
            }
            token = child;
            files = child_files;
            requests = child_requests;
        }
    }
}
