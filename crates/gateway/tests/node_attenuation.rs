//! Property: attenuation only narrows worknode rights too. For random chains of `--node`
//! narrowings over random subtree texts (`.`, `..`, `//`, trailing slashes, look-alike names
//! such as `/acme/research2`), the worknodes a child token can read through the real node tools
//! are a subset of its parent's, and exactly what an independent model of the chain allows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test code")]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use referee_gateway::auth::{AuthError, Authority, Grant, Narrowing, attenuate};
use referee_gateway::store::GatewayStore;
use referee_tools::{CallScope, SharedTool};
use referee_worknode::{Authority as NodeAuthority, Consistency, System, SystemConfig, WnPath};
use serde_json::json;

/// The worknodes of the tree (the root `/` exists too).
const NODES: [&str; 8] = [
    "/acme",
    "/acme/research",
    "/acme/research/deep",
    "/acme/research2",
    "/acme/sales",
    "/beta",
    "/beta/x",
    "/betamax",
];

/// Components a random subtree text is made of.
const PARTS: [&str; 11] = ["acme", "research", "research2", "deep", "sales", "beta", "x", "betamax", ".", "..", ""];

struct World {
    _dir: tempfile::TempDir,
    get: SharedTool,
    authority: Authority,
    _system: Arc<System>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let system = Arc::new(System::start(SystemConfig::default(), None, None).unwrap());
        for node in NODES {
            let path: WnPath = node.parse().unwrap();
            let (parent, name) = path.split_last().unwrap();
            system.create(&NodeAuthority::System, &parent, name, "data", Consistency::Local).unwrap();
        }
        let get = referee_worknode::tools::worknode_tools(system.clone())
            .into_iter()
            .find(|t| t.spec().name == "node_get")
            .unwrap();
        let store = Arc::new(GatewayStore::open(&dir.path().join("gateway.redb")).unwrap());
        let authority = Authority::open(dir.path(), store, Duration::from_secs(60)).unwrap();
        Self { _dir: dir, get, authority, _system: system }
    }

    /// The worknodes (and `/`) the token can read.
    fn readable(&self, token: &str) -> BTreeSet<String> {
        let scope = self.authority.verify(token).unwrap();
        let call = CallScope { node_prefixes: scope.node_prefixes.clone(), ..CallScope::default() };
        std::iter::once("/")
            .chain(NODES)
            .filter(|node| self.get.call(json!({ "path": node }), &call).is_ok())
            .map(str::to_owned)
            .collect()
    }
}

/// The model's reading of a subtree text: its segments (`None`: refused).
fn model_subtree(text: &str) -> Option<Vec<String>> {
    common::model_components(text).map(|parts| parts.iter().map(|p| (*p).to_owned()).collect())
}

/// The model: a worknode may be read when, for every block that names subtrees, its segments
/// begin with one of them (a subtree holds its own root).
fn model_allows(blocks: &[Vec<Vec<String>>], node: &str) -> bool {
    let segments: Vec<&str> = node.split('/').filter(|s| !s.is_empty()).collect();
    blocks.iter().all(|list| {
        list.iter().any(|subtree| subtree.len() <= segments.len() && subtree.iter().zip(&segments).all(|(a, b)| a == b))
    })
}

fn subtree_text() -> impl Strategy<Value = (Vec<usize>, bool)> {
    (proptest::collection::vec(0usize..PARTS.len(), 0..4), any::<bool>())
}

fn render((parts, slash): &(Vec<usize>, bool)) -> String {
    common::prefix_text(String::new(), parts, &PARTS, *slash)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn a_child_never_reads_more_worknodes_than_its_parent(
        granted in proptest::collection::vec(subtree_text(), 0..3),
        everywhere in any::<bool>(),
        chain in proptest::collection::vec(proptest::collection::vec(subtree_text(), 0..3), 1..5),
    ) {
        let world = World::new();
        let mut grant = Grant { tools: vec!["node_get".into()], ..Grant::default() };
        let mut blocks: Vec<Vec<Vec<String>>> = Vec::new();
        if everywhere {
            grant.nodes = vec!["*".into()];
        } else {
            let texts: Vec<String> = granted.iter().map(render).collect();
            let model: Option<Vec<Vec<String>>> = texts.iter().map(|t| model_subtree(t)).collect();
            grant.nodes = texts;
            match (world.authority.mint(&grant), model) {
                // No subtree granted: no worknode at all.
                (Ok(_), Some(list)) => blocks.push(list),
                (Err(AuthError::Build(_)), None) => {
                    grant.nodes = vec!["/acme".into()];
                    blocks.push(vec![vec!["acme".into()]]);
                }
                (got, model) => panic!("mint of {:?}: {got:?}, model {model:?}", grant.nodes),
            }
        }
        let (mut token, _) = world.authority.mint(&grant).unwrap();
        let mut readable = world.readable(&token);
        for node in std::iter::once("/").chain(NODES) {
            prop_assert_eq!(readable.contains(node), model_allows(&blocks, node), "{} with {:?}", node, blocks);
        }

        for step in &chain {
            let texts: Vec<String> = step.iter().map(render).collect();
            let model: Option<Vec<Vec<String>>> = texts.iter().map(|t| model_subtree(t)).collect();
            let narrowing = Narrowing { nodes: texts.clone(), ..Narrowing::default() };
            let child = match (attenuate(&token, &narrowing), model) {
                (Ok(child), Some(list)) => {
                    if !list.is_empty() {
                        blocks.push(list);
                    }
                    child
                }
                (Err(AuthError::Build(_)), None) => {
                    // The same text written into a block by hand: the token is refused.
                    let bad = texts.iter().find(|t| model_subtree(t).is_none()).unwrap();
                    let refused = world.authority.verify(&common::forge(&token, "node", bad)).err();
                    prop_assert!(matches!(refused.as_ref().map(AuthError::cause), Some(AuthError::Refused(_))), "{bad}");
                    continue;
                }
                (got, model) => panic!("attenuate to {texts:?}: {got:?}, model {model:?}"),
            };
            let child_readable = world.readable(&child);
            prop_assert!(child_readable.is_subset(&readable), "{child_readable:?} ⊄ {readable:?} after {texts:?}");
            for node in std::iter::once("/").chain(NODES) {
                prop_assert_eq!(child_readable.contains(node), model_allows(&blocks, node), "{} with {:?}", node, blocks);
            }
            token = child;
            readable = child_readable;
        }
    }
}
