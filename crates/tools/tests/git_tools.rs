//! git_status, git_log and git_diff against repositories built with the `git` CLI (the test
//! setup may shell out to git; the tools never do), plus argument-injection and containment
//! attacks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Fixture, assert_violation};
use referee_tools::config::Limits;
use referee_tools::{CallScope, SharedTool, ToolError, ToolOutput};
use serde_json::{Value, json};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("the git CLI is needed to set up these tests (apt-get install -y git)");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A repository at `<root>/repo` with two commits; returns the tools.
fn setup(fx: &Fixture) -> Vec<SharedTool> {
    let repo = fx.root.join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(repo.join("gone.txt"), "bye\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first commit"]);
    std::fs::write(repo.join("a.txt"), "one\nTWO\nthree\n").unwrap();
    std::fs::remove_file(repo.join("gone.txt")).unwrap();
    std::fs::write(repo.join("b.txt"), "new\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "second commit", "-m", "body"]);
    referee_tools::git::tools(&fx.reality(false), &Limits::default())
}

fn call(tools: &[SharedTool], name: &str, params: Value) -> Result<ToolOutput, ToolError> {
    let tool = tools.iter().find(|t| t.spec().name == name).unwrap();
    tool.call(params, &CallScope::default())
}

#[test]
fn git_log_lists_commits_newest_first_and_is_bounded() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    let repo = fx.root.join("repo");
    let out = call(&tools, "git_log", json!({ "path": "repo" })).unwrap();
    let commits = out.data["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 2);
    assert_eq!(commits[0]["id"], git(&repo, &["rev-parse", "HEAD"]));
    assert_eq!(commits[0]["summary"], "second commit");
    assert_eq!(commits[1]["id"], git(&repo, &["rev-parse", "HEAD~1"]));
    assert_eq!(commits[0]["parents"][0], commits[1]["id"]);
    assert_eq!(commits[0]["author_email"], "test@example.invalid");
    let time: i64 = git(&repo, &["log", "-1", "--format=%at"]).parse().unwrap();
    assert_eq!(commits[0]["time_secs"], time);
    assert_eq!(out.data["truncated"], false);

    let one = call(&tools, "git_log", json!({ "path": "repo", "max_count": 1 })).unwrap();
    assert_eq!(one.data["commits"].as_array().unwrap().len(), 1);
    assert_eq!(one.data["truncated"], true);
    let older = call(&tools, "git_log", json!({ "path": "repo", "rev": "main~1" })).unwrap();
    assert_eq!(older.data["commits"][0]["summary"], "first commit");
}

#[test]
fn git_diff_compares_trees_with_a_unified_patch() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    let out = call(&tools, "git_diff", json!({ "path": "repo" })).unwrap();
    let mut changes: Vec<(String, String)> = out.data["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap().to_owned(), c["change"].as_str().unwrap().to_owned()))
        .collect();
    changes.sort();
    let expected = [("a.txt", "modified"), ("b.txt", "added"), ("gone.txt", "removed")];
    assert_eq!(changes, expected.map(|(p, c)| (p.to_owned(), c.to_owned())));
    let patch = out.data["patch"].as_str().unwrap();
    assert!(patch.contains("--- a/a.txt\n+++ b/a.txt\n"), "{patch}");
    assert!(patch.contains("-two\n+TWO\n"), "{patch}");
    assert!(patch.contains("+new\n"), "{patch}");
    let repo = fx.root.join("repo");
    assert_eq!(out.data["from"], git(&repo, &["rev-parse", "HEAD~1"]));

    let explicit = call(&tools, "git_diff", json!({ "path": "repo", "from": "HEAD~1", "to": "HEAD" })).unwrap();
    assert_eq!(explicit.data["changes"], out.data["changes"]);
    // The root commit is compared with the empty tree.
    let root = call(&tools, "git_diff", json!({ "path": "repo", "to": "HEAD~1" })).unwrap();
    assert_eq!(root.data["from"], Value::Null);
    assert_eq!(root.data["changes"].as_array().unwrap().len(), 2);

    let limits = Limits { max_diff_bytes: 10, ..Limits::default() };
    let small = referee_tools::git::tools(&fx.reality(false), &limits);
    let cut = call(&small, "git_diff", json!({ "path": "repo" })).unwrap();
    assert_eq!(cut.data["truncated"], true);
    assert_eq!(cut.data["patch"], "");
}

#[test]
fn git_status_reports_staged_worktree_and_untracked_changes() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    let repo = fx.root.join("repo");
    std::fs::write(repo.join("a.txt"), "changed\n").unwrap();
    std::fs::write(repo.join("untracked.txt"), "u\n").unwrap();
    std::fs::write(repo.join("staged.txt"), "s\n").unwrap();
    git(&repo, &["add", "staged.txt"]);
    let out = call(&tools, "git_status", json!({ "path": repo })).unwrap();
    assert_eq!(out.data["branch"], "main");
    assert_eq!(out.data["head"], git(&repo, &["rev-parse", "HEAD"]));
    let entries: Vec<(String, String, String)> = out.data["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("area"), s("path"), s("change"))
        })
        .collect();
    let expected =
        [("staged", "staged.txt", "added"), ("worktree", "a.txt", "modified"), ("worktree", "untracked.txt", "added")];
    assert_eq!(entries, expected.map(|(a, p, c)| (a.to_owned(), p.to_owned(), c.to_owned())));
}

#[test]
fn git_argument_injection_is_refused() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    let marker = fx.outside.join("x");
    let output_flag = format!("--output={}", marker.display());
    for rev in [
        output_flag.as_str(),
        "-p",
        "--all",
        "-",
        "HEAD:../../etc/passwd",
        "@{-1}",
        "main..HEAD",
        "HEAD ",
        "a\u{0}b",
        "",
    ] {
        for (tool, key) in [("git_log", "rev"), ("git_diff", "from"), ("git_diff", "to")] {
            let result = call(&tools, tool, json!({ "path": "repo", key: rev }));
            assert!(matches!(result, Err(ToolError::InvalidParams(_))), "{tool} {key}={rev:?}: {result:?}");
        }
    }
    assert!(!marker.exists());
    assert!(matches!(
        call(&tools, "git_log", json!({ "path": "repo", "rev": "nosuchbranch" })),
        Err(ToolError::NotFound(_))
    ));
}

#[test]
fn repositories_reaching_outside_the_root_are_refused() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    // A repository outside the root.
    git(&fx.outside, &["init", "-q"]);
    assert_violation(call(&tools, "git_status", json!({ "path": fx.outside })));
    // A work tree whose .git is a symlink to the outside repository.
    std::fs::create_dir(fx.root.join("fake")).unwrap();
    std::os::unix::fs::symlink(fx.outside.join(".git"), fx.root.join("fake/.git")).unwrap();
    assert_violation(call(&tools, "git_log", json!({ "path": "fake" })));
    // A symlink inside .git (here its config) pointing outside.
    std::fs::create_dir(fx.root.join("linked")).unwrap();
    git(&fx.root.join("linked"), &["init", "-q"]);
    std::fs::remove_file(fx.root.join("linked/.git/config")).unwrap();
    std::os::unix::fs::symlink(fx.outside.join(".git/config"), fx.root.join("linked/.git/config")).unwrap();
    assert_violation(call(&tools, "git_status", json!({ "path": "linked" })));
    // A repository whose configured work tree is outside.
    let repo = fx.root.join("repo");
    git(&repo, &["config", "core.worktree", fx.outside.to_str().unwrap()]);
    assert_violation(call(&tools, "git_status", json!({ "path": "repo" })));
    assert!(matches!(call(&tools, "git_status", json!({ "path": "sub" })), Err(ToolError::InvalidParams(_))));
}

#[test]
fn git_status_never_runs_configured_filter_commands() {
    let fx = Fixture::new();
    let tools = setup(&fx);
    let repo = fx.root.join("repo");
    let marker = fx.outside.join("filter-ran");
    git(&repo, &["config", "filter.evil.clean", &format!("touch {}", marker.display())]);
    git(&repo, &["config", "filter.evil.process", &format!("touch {}", marker.display())]);
    std::fs::write(repo.join(".gitattributes"), "* filter=evil\n").unwrap();
    std::fs::write(repo.join("a.txt"), "modified again\n").unwrap();
    call(&tools, "git_status", json!({ "path": "repo" })).unwrap();
    assert!(!marker.exists(), "a filter command ran");
}
