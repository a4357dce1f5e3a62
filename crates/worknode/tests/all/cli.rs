//! `referee node` commands against a local store (the same functions the binary calls).

use referee_worknode::cli::{self, NodeCommand};

#[test]
fn create_send_get_tree_against_a_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = || dir.path().to_path_buf();
    cli::run(
        NodeCommand::Create { dir: d(), path: "/acme".into(), kind: "data".into(), consistency: "local".into() },
        true,
    )
    .unwrap();
    cli::run(
        NodeCommand::Create { dir: d(), path: "/acme/t".into(), kind: "data".into(), consistency: "eventual".into() },
        true,
    )
    .unwrap();
    for n in ["4", "-1"] {
        cli::run(
            NodeCommand::Send {
                dir: d(),
                path: "/acme/t".into(),
                op: "add".into(),
                field: "n".into(),
                args: vec![n.into()],
                idempotency_key: None,
            },
            true,
        )
        .unwrap();
    }
    cli::run(
        NodeCommand::Send {
            dir: d(),
            path: "/acme/t".into(),
            op: "put".into(),
            field: "m".into(),
            args: vec!["k".into(), "v".into()],
            idempotency_key: Some("put-k".into()),
        },
        true,
    )
    .unwrap();
    cli::run(NodeCommand::Get { dir: d(), path: "/acme/t".into() }, true).unwrap();
    cli::run(NodeCommand::Tree { dir: d(), path: "/".into() }, true).unwrap();
    let sys = cli::open(&d()).unwrap();
    let id = sys.resolve(&"/acme/t".parse().unwrap()).unwrap();
    let view = sys.query(&referee_worknode::Authority::System, id, referee_worknode::Consistency::Local).unwrap();
    assert_eq!(view.state.to_json(), serde_json::json!({"n": 3, "m": {"k": "v"}}));
    assert_eq!(view.version, 3);
    drop(sys); // the store is single-process: release it for the commands below
    // Errors say what to do.
    let err = cli::run(
        NodeCommand::Send {
            dir: d(),
            path: "/acme/t".into(),
            op: "add".into(),
            field: "n".into(),
            args: vec!["x".into()],
            idempotency_key: None,
        },
        true,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("add takes an integer"), "{err:#}");
    let err = cli::run(
        NodeCommand::Create { dir: d(), path: "/acme/s".into(), kind: "data".into(), consistency: "strong".into() },
        true,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("reserved for the cluster issue"), "{err:#}");
}
