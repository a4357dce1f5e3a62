//! Happy paths and limits of the file tools, and the specs of every built-in tool.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{Fixture, call};
use referee_tools::config::Limits;
use referee_tools::{CallScope, Tool, ToolError, ToolsConfig, builtin_tools};
use serde_json::json;

#[test]
fn fs_read_returns_text_or_base64_with_offset_and_length() {
    let fx = Fixture::new();
    let binary: Vec<u8> = vec![0xff, 0x00, 0xfe, b'a', 0x80];
    std::fs::write(fx.root.join("bin"), &binary).unwrap();
    let tools = fx.tools(false);

    let text = call(&tools, "fs_read", json!({ "path": "file.txt" })).unwrap();
    assert_eq!(text.data["encoding"], "utf8");
    assert_eq!(text.data["content"], "inside");
    assert_eq!(text.data["size"], 6);
    assert_eq!(text.data["eof"], true);
    assert_eq!((text.reality_index, text.torsion), (1.0, 0.0));

    let bin = call(&tools, "fs_read", json!({ "path": fx.root.join("bin") })).unwrap();
    assert_eq!(bin.data["encoding"], "base64");
    let decoded = STANDARD.decode(bin.data["content"].as_str().unwrap()).unwrap();
    assert_eq!(decoded, binary);

    let part = call(&tools, "fs_read", json!({ "path": "file.txt", "offset": 1, "length": 3 })).unwrap();
    assert_eq!(part.data["content"], "nsi");
    assert_eq!(part.data["eof"], false);
    let past = call(&tools, "fs_read", json!({ "path": "file.txt", "offset": 100 })).unwrap();
    assert_eq!(past.data["content"], "");

    assert!(matches!(call(&tools, "fs_read", json!({ "path": "sub" })), Err(ToolError::InvalidParams(_))));
    assert!(matches!(call(&tools, "fs_read", json!({ "path": "nope" })), Err(ToolError::NotFound(_))));
    assert!(matches!(call(&tools, "fs_read", json!({ "paht": "x" })), Err(ToolError::InvalidParams(_))));
}

#[test]
fn fs_read_enforces_its_size_limit() {
    let fx = Fixture::new();
    std::fs::write(fx.root.join("big"), vec![b'a'; 100]).unwrap();
    let limits = Limits { max_read_bytes: 10, ..Limits::default() };
    let read = referee_tools::fs::FsRead::new(fx.reality(false), &limits);
    let scope = CallScope::default();
    assert!(matches!(read.call(json!({ "path": "big" }), &scope), Err(ToolError::TooLarge(_))));
    assert!(matches!(read.call(json!({ "path": "big", "length": 11 }), &scope), Err(ToolError::TooLarge(_))));
    let piece = read.call(json!({ "path": "big", "offset": 95, "length": 10 }), &scope).unwrap();
    assert_eq!(piece.data["content"], "aaaaa");
    assert_eq!(piece.data["eof"], true);
}

#[test]
fn fs_write_creates_atomically_and_overwrites_only_when_asked() {
    let fx = Fixture::new();
    let tools = fx.tools(false);
    let out = call(&tools, "fs_write", json!({ "path": "sub/new.txt", "content": "hello" })).unwrap();
    assert_eq!(out.data["created"], true);
    assert_eq!(out.data["bytes_written"], 5);
    assert_eq!(std::fs::read_to_string(fx.root.join("sub/new.txt")).unwrap(), "hello");

    let again = call(&tools, "fs_write", json!({ "path": "sub/new.txt", "content": "other" }));
    assert!(matches!(again, Err(ToolError::AlreadyExists(_))), "{again:?}");
    assert_eq!(std::fs::read_to_string(fx.root.join("sub/new.txt")).unwrap(), "hello");

    std::fs::set_permissions(fx.root.join("sub/new.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let bytes = [0u8, 1, 2, 255];
    let replaced = call(
        &tools,
        "fs_write",
        json!({ "path": "sub/new.txt", "content": STANDARD.encode(bytes), "encoding": "base64", "mode": "overwrite" }),
    )
    .unwrap();
    assert_eq!(replaced.data["created"], false);
    assert_eq!(std::fs::read(fx.root.join("sub/new.txt")).unwrap(), bytes);
    let mode = std::fs::metadata(fx.root.join("sub/new.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "overwrite keeps the file's permissions");

    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(fx.root.join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    assert!(matches!(
        call(&tools, "fs_write", json!({ "path": "sub", "content": "x", "mode": "overwrite" })),
        Err(ToolError::InvalidParams(_))
    ));
    assert!(matches!(
        call(&tools, "fs_write", json!({ "path": "missing/dir/x", "content": "x" })),
        Err(ToolError::NotFound(_))
    ));
    assert!(matches!(
        call(&tools, "fs_write", json!({ "path": "b64", "content": "!!", "encoding": "base64" })),
        Err(ToolError::InvalidParams(_))
    ));
}

#[test]
fn fs_write_enforces_its_size_limit() {
    let fx = Fixture::new();
    let limits = Limits { max_write_bytes: 4, ..Limits::default() };
    let write = referee_tools::fs::FsWrite::new(fx.reality(false), &limits);
    let result = write.call(json!({ "path": "w.txt", "content": "12345" }), &CallScope::default());
    assert!(matches!(result, Err(ToolError::TooLarge(_))));
    assert!(!fx.root.join("w.txt").exists());
}

#[test]
fn fs_list_and_fs_stat_describe_entries() {
    let fx = Fixture::new();
    symlink("../outside", fx.root.join("link")).unwrap();
    let tools = fx.tools(false);
    let list = call(&tools, "fs_list", json!({})).unwrap();
    assert_eq!(list.data["path"], fx.root.display().to_string());
    let entries: Vec<(String, String)> = list.data["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["type"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [("file.txt", "file"), ("link", "symlink"), ("sub", "dir")];
    assert_eq!(entries, expected.map(|(n, t)| (n.to_owned(), t.to_owned())));
    assert_eq!(list.data["truncated"], false);

    let limits = Limits { max_list_entries: 2, ..Limits::default() };
    let short = referee_tools::fs::FsList::new(fx.reality(false), &limits);
    let out = short.call(json!({ "path": "." }), &CallScope::default()).unwrap();
    assert_eq!(out.data["entries"].as_array().unwrap().len(), 2);
    assert_eq!(out.data["truncated"], true);

    let stat = call(&tools, "fs_stat", json!({ "path": "file.txt" })).unwrap();
    let meta = std::fs::metadata(fx.root.join("file.txt")).unwrap();
    assert_eq!(stat.data["type"], "file");
    assert_eq!(stat.data["size"], meta.len());
    assert_eq!(stat.data["mode"], meta.permissions().mode() & 0o7777);
    assert_eq!(stat.data["modified_secs"], std::os::unix::fs::MetadataExt::mtime(&meta));
    assert_eq!(call(&tools, "fs_stat", json!({ "path": "sub" })).unwrap().data["type"], "dir");
}

#[test]
fn fs_search_globs_without_following_symlinks_and_is_bounded() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.root.join("sub/deep/er")).unwrap();
    std::fs::write(fx.root.join("sub/deep/er/x.txt"), "x").unwrap();
    std::fs::write(fx.root.join("sub/deep/y.rs"), "y").unwrap();
    std::fs::write(fx.outside.join("leak.txt"), "no").unwrap();
    symlink("../outside", fx.root.join("sub/out_link")).unwrap();
    symlink("/", fx.root.join("root_link")).unwrap();
    let tools = fx.tools(false);
    let names = |pattern: &str, extra: serde_json::Value| -> Vec<String> {
        let mut params = json!({ "pattern": pattern });
        params.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let out = call(&tools, "fs_search", params).unwrap();
        out.data["matches"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names("**/*.txt", json!({})), ["file.txt", "sub/deep/er/x.txt", "sub/inner.txt"]);
    assert_eq!(names("*.txt", json!({})), ["file.txt"]);
    assert_eq!(names("*.txt", json!({ "path": "sub" })), ["inner.txt"]);
    assert_eq!(names("sub/*", json!({ "include_dirs": true })), ["sub/deep", "sub/inner.txt"]);
    assert!(names("**/leak.txt", json!({})).is_empty());

    let limited = call(&tools, "fs_search", json!({ "pattern": "**", "max_results": 1 })).unwrap();
    assert_eq!(limited.data["matches"].as_array().unwrap().len(), 1);
    assert_eq!(limited.data["truncated"], true);
    let limits = Limits { max_search_visited: 2, ..Limits::default() };
    let search = referee_tools::fs::FsSearch::new(fx.reality(false), &limits);
    let out = search.call(json!({ "pattern": "**" }), &CallScope::default()).unwrap();
    assert_eq!(out.data["truncated"], true);
    assert!(matches!(call(&tools, "fs_search", json!({ "pattern": "a[" })), Err(ToolError::InvalidParams(_))));
    let past = CallScope { deadline: Some(std::time::Instant::now()), ..CallScope::default() };
    assert!(matches!(tools["fs_search"].call(json!({ "pattern": "**" }), &past), Err(ToolError::Timeout(_))));
}

#[test]
fn every_builtin_tool_has_a_sound_spec() {
    let fx = Fixture::new();
    let config = ToolsConfig { roots: vec![fx.root.clone()], ..ToolsConfig::default() };
    let tools = builtin_tools(&config).unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.spec().name.as_str()).collect();
    names.sort_unstable();
    let mut expected = vec!["exec", "fs_list", "fs_read", "fs_search", "fs_stat", "fs_write", "process_list"];
    if cfg!(feature = "git") {
        expected.extend(["git_diff", "git_log", "git_status"]);
    }
    expected.sort_unstable();
    assert_eq!(names, expected);
    for tool in &tools {
        let spec = tool.spec();
        assert_eq!(spec.input_schema["type"], "object", "{}", spec.name);
        assert_eq!(spec.output_schema["type"], "object", "{}", spec.name);
        assert!(!spec.description.is_empty());
        let sandboxed = spec.name == "exec";
        assert_eq!(spec.torsion, if sandboxed { 0.1 } else { 0.0 }, "{}", spec.name);
        let writes = matches!(spec.name.as_str(), "fs_write" | "exec");
        assert_eq!(spec.annotations.read_only, !writes, "{}", spec.name);
    }
    // exec without a work root is listed but unavailable.
    let exec: Arc<dyn Tool> = tools.iter().find(|t| t.spec().name == "exec").unwrap().clone();
    let result = exec.call(json!({ "command": "x" }), &CallScope::default());
    assert!(matches!(result, Err(ToolError::Unavailable(_))), "{result:?}");
}

#[test]
fn config_deserializes_from_toml_with_defaults() {
    let config: ToolsConfig = toml::from_str(
        r#"
        roots = ["/srv/data"]
        [limits]
        max_read_bytes = 5
        [exec]
        work_root = "/srv/work"
        [exec.commands.ls]
        program = "/bin/ls"
        args = ["-1"]
        "#,
    )
    .unwrap();
    assert_eq!(config.roots, [std::path::PathBuf::from("/srv/data")]);
    assert_eq!(config.limits.max_read_bytes, 5);
    assert_eq!(config.limits.max_list_entries, Limits::default().max_list_entries);
    assert_eq!(config.exec.commands["ls"].args, ["-1"]);
    assert_eq!(config.exec.timeout_ms, 10_000);
    assert!(toml::from_str::<ToolsConfig>("rots = []").is_err(), "unknown keys are refused");
}
