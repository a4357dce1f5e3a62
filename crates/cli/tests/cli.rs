//! End-to-end tests: the real `referee` binary, real key files and trust stores in temp dirs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FEANOR_WAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/feanor.wat");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-v1");

fn referee(home: &Path, args: &[&str]) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_referee")).arg("--home").arg(home).args(args).env_remove("REFEREE_HOME").output()
}

/// Runs a command that must succeed; returns stdout.
fn ok(home: &Path, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = referee(home, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("referee {args:?} failed: {stderr}").into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs a command that must fail with exit code 1 and exactly one line on stderr; returns it.
fn refused(home: &Path, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = referee(home, args)?;
    assert_eq!(out.status.code(), Some(1), "referee {args:?} should be refused");
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "expected one line on stderr, got {stderr:?}");
    assert!(stderr.starts_with("referee: error: "), "{stderr}");
    Ok(stderr)
}

fn json(home: &Path, args: &[&str]) -> Result<Value, Box<dyn std::error::Error>> {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    Ok(serde_json::from_str(&ok(home, &with_json)?)?)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

struct Homes {
    _dir: tempfile::TempDir,
    publisher: PathBuf,
    referee: PathBuf,
    out: PathBuf,
}

/// A publisher home and a referee home that trusts the publisher.
fn homes() -> Result<Homes, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let publisher = dir.path().join("publisher");
    let referee = dir.path().join("referee");
    ok(&publisher, &["keygen"])?;
    ok(&referee, &["keygen"])?;
    ok(&referee, &["trust", "add", s(&publisher.join("keys/publisher.pub")), "--label", "acme"])?;
    let out = dir.path().to_owned();
    Ok(Homes { _dir: dir, publisher, referee, out })
}

#[test]
fn publisher_seals_for_a_referee_which_verifies_and_no_one_else_can() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("feanor.muscle");
    let recipient = h.referee.join("keys/referee.pub");
    ok(&h.publisher, &["compile", FEANOR_WAT, "-o", s(&blob), "--mode", "recipient", "--recipient", s(&recipient)])?;

    let verified = json(&h.referee, &["verify", s(&blob)])?;
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["name"], "feanor");

    // The publisher's own home is neither bound nor a recipient.
    let err = refused(&h.publisher, &["verify", s(&blob)])?;
    assert!(err.contains("bound to other referees"), "{err}");
    Ok(())
}

#[test]
fn inspect_shows_exactly_what_compile_was_told() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("m.muscle");
    let referee_id = json(&h.referee, &["keygen"])?["referee"].as_str().unwrap_or_default().to_owned();
    ok(
        &h.publisher,
        &[
            "compile",
            FEANOR_WAT,
            "-o",
            s(&blob),
            "--name",
            "feanor-x",
            "--version",
            "7",
            "--cap",
            "log",
            "--cap",
            "kv",
            "--memory",
            "2MiB",
            "--time-ms",
            "25",
            "--fuel",
            "1000000",
            "--bind",
            &referee_id,
            "--suite",
            "chacha20-poly1305",
            "--pq",
            "--input-shape",
            "1,4",
            "--output-shape",
            "1,1",
        ],
    )?;
    let header = json(&h.referee, &["inspect", s(&blob)])?["header"].clone();
    assert_eq!(header["name"], "feanor-x");
    assert_eq!(header["version"], 7);
    assert_eq!(header["capabilities"], serde_json::json!(["kv", "log"]));
    assert_eq!(header["limits"]["memory_bytes"], 2 * 1024 * 1024);
    assert_eq!(header["limits"]["time_ms"], 25);
    assert_eq!(header["limits"]["fuel"], 1_000_000);
    assert_eq!(header["binding"], serde_json::json!([referee_id]));
    assert_eq!(header["suite"], "chacha20-poly1305");
    assert_eq!(header["signature_scheme"], "ed25519+ml-dsa-65");
    assert_eq!(header["inputs"][0]["dims"], serde_json::json!([1, 4]));
    // The text form needs no keys either.
    let text = ok(Path::new("/nonexistent-home"), &["inspect", s(&blob)])?;
    assert!(text.contains("feanor-x v7"), "{text}");
    Ok(())
}

#[test]
fn keygen_never_overwrites_and_keys_are_owner_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("h");
    let first = json(&home, &["keygen"])?;
    let master_before = std::fs::read(home.join("keys/master.key"))?;
    let second = json(&home, &["keygen"])?;
    assert_eq!(first["master_key"], second["master_key"]);
    assert!(second["files"].as_array().into_iter().flatten().all(|f| f["outcome"] == "kept"));
    assert_eq!(std::fs::read(home.join("keys/master.key"))?, master_before);
    for key in ["publisher.key", "referee.key", "master.key"] {
        assert_eq!(std::fs::metadata(home.join("keys").join(key))?.permissions().mode() & 0o777, 0o600);
    }
    Ok(())
}

#[test]
fn rollback_is_refused_until_the_operator_allows_it() -> TestResult {
    let h = homes()?;
    let v2 = h.out.join("v2.muscle");
    let v3 = h.out.join("v3.muscle");
    let recipient = h.referee.join("keys/referee.pub");
    for (path, version) in [(&v2, "2"), (&v3, "3")] {
        ok(
            &h.publisher,
            &[
                "compile",
                FEANOR_WAT,
                "-o",
                s(path),
                "--version",
                version,
                "--mode",
                "recipient",
                "--recipient",
                s(&recipient),
            ],
        )?;
    }
    ok(&h.referee, &["verify", s(&v3), "--accept"])?;
    let err = refused(&h.referee, &["verify", s(&v2)])?;
    assert!(err.contains("older than v3") && err.contains("allow-rollback"), "{err}");

    let publisher = json(&h.publisher, &["keygen"])?["publisher"].as_str().unwrap_or_default().to_owned();
    ok(&h.referee, &["trust", "allow-rollback", "--publisher", &publisher, "--name", "feanor", "--to", "2"])?;
    ok(&h.referee, &["verify", s(&v2)])?;
    Ok(())
}

#[test]
fn revoked_versions_and_untrusted_publishers_are_refused() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("m.muscle");
    let recipient = h.referee.join("keys/referee.pub");
    ok(&h.publisher, &["compile", FEANOR_WAT, "-o", s(&blob), "--mode", "recipient", "--recipient", s(&recipient)])?;
    let muscle_id =
        json(&h.referee, &["inspect", s(&blob)])?["header"]["muscle_id"].as_str().unwrap_or_default().to_owned();
    ok(&h.referee, &["trust", "revoke", "--muscle", &muscle_id, "--version", "1", "--reason", "bad weights"])?;
    let err = refused(&h.referee, &["verify", s(&blob)])?;
    assert!(err.contains("revoked"), "{err}");
    let list = json(&h.referee, &["trust", "list"])?;
    assert_eq!(list["revocations"][0]["reason"], "bad weights");

    let publisher = list["publishers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["label"] == "acme")
        .and_then(|p| p["id"].as_str())
        .ok_or("acme not listed")?
        .to_owned();
    ok(&h.referee, &["trust", "remove", &publisher])?;
    let err = refused(&h.referee, &["verify", s(&blob)])?;
    assert!(err.contains("not trusted") && err.contains("trust add"), "{err}");
    Ok(())
}

#[test]
fn tampered_and_foreign_files_are_refused_with_one_line() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("m.muscle");
    ok(&h.referee, &["compile", FEANOR_WAT, "-o", s(&blob)])?;
    let mut bytes = std::fs::read(&blob)?;
    let middle = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(middle) {
        *b ^= 0x40;
    }
    let tampered = h.out.join("tampered.muscle");
    std::fs::write(&tampered, &bytes)?;
    let err = refused(&h.referee, &["verify", s(&tampered)])?;
    assert!(err.contains("signature does not verify"), "{err}");

    let garbage = h.out.join("garbage.muscle");
    std::fs::write(&garbage, b"definitely not a muscle")?;
    refused(&h.referee, &["inspect", s(&garbage)])?;
    refused(&h.referee, &["verify", s(&garbage)])?;
    refused(&h.referee, &["verify", s(&h.out.join("missing.muscle"))])?;
    let bad_wat = h.out.join("bad.wat");
    std::fs::write(&bad_wat, "(module (func (export \"forward\") i32.add))")?;
    let err = refused(&h.referee, &["compile", s(&bad_wat), "-o", s(&h.out.join("bad.muscle"))])?;
    assert!(err.contains("invalid WebAssembly"), "{err}");
    assert!(!h.out.join("bad.muscle").exists(), "a failed compile must not leave an output");
    Ok(())
}

#[test]
fn master_key_mode_opens_only_with_the_same_master_key() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("m.muscle");
    ok(&h.publisher, &["compile", FEANOR_WAT, "-o", s(&blob)])?;
    // The referee trusts the publisher but holds a different master key.
    let err = refused(&h.referee, &["verify", s(&blob)])?;
    assert!(err.contains("master key"), "{err}");
    ok(&h.publisher, &["verify", s(&blob)])?;
    Ok(())
}

#[test]
fn every_command_has_help() -> TestResult {
    let home = Path::new("/nonexistent-home");
    for cmd in [
        vec!["--help"],
        vec!["keygen", "--help"],
        vec!["compile", "--help"],
        vec!["inspect", "--help"],
        vec!["verify", "--help"],
        vec!["trust", "--help"],
        vec!["trust", "add", "--help"],
        vec!["trust", "list", "--help"],
        vec!["trust", "revoke", "--help"],
        vec!["trust", "remove", "--help"],
        vec!["trust", "allow-rollback", "--help"],
        vec!["run", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["audit", "tail", "--help"],
        vec!["attest", "--help"],
        vec!["attest", "verify", "--help"],
    ] {
        let out = ok(home, &cmd)?;
        assert!(out.contains("Usage:"), "{cmd:?}: {out}");
    }
    Ok(())
}

/// Blobs sealed by the first release of format v1 must keep opening.
#[test]
fn format_v1_fixtures_still_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("keys"))?;
    for entry in std::fs::read_dir(Path::new(FIXTURES).join("home"))? {
        let entry = entry?;
        let dest = home.join("keys").join(entry.file_name());
        std::fs::copy(entry.path(), &dest)?;
        // Git does not keep the owner-only mode the key loader insists on.
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
    }
    ok(&home, &["trust", "add", s(&home.join("keys/publisher.pub"))])?;
    for name in ["feanor-master-aes.muscle", "feanor-recipient-chacha-pq.muscle"] {
        let path = Path::new(FIXTURES).join(name);
        let verified = json(&home, &["verify", s(&path)])?;
        let inspected = json(&home, &["inspect", s(&path)])?;
        assert_eq!(verified["code_hash"], inspected["header"]["code_hash"], "{name}");
        assert_eq!(verified["name"], "feanor");
    }
    Ok(())
}

#[test]
fn run_prints_the_output_and_train_the_loss() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("f.muscle");
    ok(&h.referee, &["compile", FEANOR_WAT, "-o", s(&blob), "--input-shape", "1,4", "--output-shape", "1,1"])?;
    // relu(0.5*1 - 0.25*2 + 0.125*3 + 1.0*4 + 0.1), computed in f32 like the muscle.
    let expected = (0.5f32 * 1.0 + -0.25 * 2.0 + (0.125 * 3.0 + (1.0 * 4.0 + 0.1))).max(0.0);
    let out: Value = serde_json::from_str(&ok(&h.referee, &["run", s(&blob), "--input", "[1, 2, 3, 4]"])?)?;
    assert_eq!(out, serde_json::json!([[expected]]));
    let err = refused(&h.referee, &["run", s(&blob), "--input", "[1, 2]"])?;
    assert!(err.contains("2 values") && err.contains("[1, 4]"), "{err}");

    let linear = h.out.join("l.muscle");
    let wat = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/linear-trainable.wat");
    ok(&h.referee, &["compile", wat, "-o", s(&linear), "--input-shape", "1,4", "--output-shape", "1,1"])?;
    // Fresh parameters are zero, so the first loss is the target squared.
    let trained = json(
        &h.referee,
        &["run", s(&linear), "--entry", "train", "--input", "[1,0,0,0]", "--target", "[3]", "--lr", "0.1"],
    )?;
    assert_eq!(trained["output"]["loss"], 9.0);
    Ok(())
}

#[test]
fn audit_verify_passes_then_detects_tampering() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("f.muscle");
    ok(&h.referee, &["compile", FEANOR_WAT, "-o", s(&blob), "--input-shape", "1,4", "--output-shape", "1,1"])?;
    ok(&h.referee, &["run", s(&blob), "--input", "[1, 2, 3, 4]"])?;
    let verified = json(&h.referee, &["audit", "verify"])?;
    assert_eq!(verified["ok"], true);
    assert!(verified["records"].as_u64().unwrap_or(0) >= 2);
    let tail = json(&h.referee, &["audit", "tail", "-n", "1"])?;
    assert_eq!(tail[0]["event"]["kind"], "load");

    // Flip one byte inside a stored event: the JSON `"kind":"load"` becomes `"kind":"loaf"`.
    let db = h.referee.join("state.redb");
    let mut bytes = std::fs::read(&db)?;
    let pos = bytes.windows(13).position(|w| w == b"\"kind\":\"load\"").ok_or("event not found in the store")?;
    if let Some(b) = bytes.get_mut(pos + 11) {
        *b = b'f';
    }
    std::fs::write(&db, &bytes)?;
    let err = refused(&h.referee, &["audit", "verify"])?;
    assert!(err.contains("not intact"), "{err}");
    Ok(())
}

#[test]
fn attestation_round_trip_and_replay_refusal() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("f.muscle");
    ok(&h.referee, &["compile", FEANOR_WAT, "-o", s(&blob), "--input-shape", "1,4", "--output-shape", "1,1"])?;
    let nonce = "0123456789abcdef0123456789abcdef";
    let report = h.out.join("report.json");
    std::fs::write(&report, ok(&h.referee, &["attest", "--nonce", nonce, "--load", s(&blob)])?)?;
    let key = h.referee.join("keys/referee.pub");
    let verified = json(&h.publisher, &["attest", "verify", s(&report), "--referee-key", s(&key), "--nonce", nonce])?;
    assert_eq!(verified["report"]["muscles"][0]["name"], "feanor");
    let err = refused(
        &h.publisher,
        &["attest", "verify", s(&report), "--referee-key", s(&key), "--nonce", "ffffffffffffffffffffffffffffffff"],
    )?;
    assert!(err.contains("nonce mismatch"), "{err}");
    let other_key = h.publisher.join("keys/referee.pub");
    refused(&h.publisher, &["attest", "verify", s(&report), "--referee-key", s(&other_key), "--nonce", nonce])?;
    Ok(())
}

#[test]
fn python_models_compile_with_inferred_shapes_and_run() -> TestResult {
    let h = homes()?;
    let blob = h.out.join("feanor-py.muscle");
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/feanor.py");
    let compiled = json(&h.referee, &["compile", py, "-o", s(&blob)])?;
    assert_eq!(compiled["header"]["inputs"][0]["dims"], serde_json::json!([1, 4]));
    assert_eq!(compiled["header"]["outputs"][0]["dims"], serde_json::json!([1, 1]));
    assert!(compiled["summary"]["parameters"].as_u64().unwrap_or(0) >= 4);
    // The Python Fëanor and the hand-written WAT one compute the same thing.
    let wat = h.out.join("feanor-wat.muscle");
    ok(&h.referee, &["compile", FEANOR_WAT, "-o", s(&wat), "--input-shape", "1,4", "--output-shape", "1,1"])?;
    let input = "[0.5, -1.25, 3.0, 2.0]";
    let from_py = ok(&h.referee, &["run", s(&blob), "--input", input])?;
    let from_wat = ok(&h.referee, &["run", s(&wat), "--input", input])?;
    assert_eq!(from_py, from_wat);
    let err = refused(&h.referee, &["compile", s(&h.out.join("missing.py")), "-o", s(&h.out.join("x.muscle"))])?;
    assert!(err.contains("missing.py"), "{err}");
    Ok(())
}
