//! Path attacks against the reality check, through the file tools, with `openat2` and with the
//! `O_NOFOLLOW` component walk. Every attack must be refused and nothing outside the root may be
//! read or changed.

mod common;

use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Fixture, assert_no_secret, assert_violation, call};
use referee_tools::config::ToolsConfig;
use referee_tools::{CallScope, ConfigError, ToolError, builtin_tools};
use rustix::fs::{CWD, FileType, Mode, RenameFlags};
use serde_json::json;

const MODES: [bool; 2] = [false, true];

#[test]
fn prefix_collision_is_refused() {
    let fx = Fixture::new();
    for walk in MODES {
        let tools = fx.tools(walk);
        let evil = fx.evil.join("secret.txt");
        for path in [evil.display().to_string(), "../data_evil/secret.txt".to_owned()] {
            let result = call(&tools, "fs_read", json!({ "path": path }));
            assert_no_secret(&result);
            assert_violation(result);
        }
        assert_violation(call(&tools, "fs_list", json!({ "path": fx.evil.display().to_string() })));
    }
}

#[test]
fn symlinks_leading_outside_are_refused() {
    let fx = Fixture::new();
    symlink(fx.outside.join("secret.txt"), fx.root.join("abs_link")).unwrap();
    symlink("../outside/secret.txt", fx.root.join("rel_link")).unwrap();
    symlink("../outside", fx.root.join("dir_link")).unwrap();
    // A chain: each hop stays inside until the last one.
    symlink("chain2", fx.root.join("chain1")).unwrap();
    symlink("sub/../chain3", fx.root.join("chain2")).unwrap();
    symlink("../outside/secret.txt", fx.root.join("chain3")).unwrap();
    for walk in MODES {
        let tools = fx.tools(walk);
        for path in ["abs_link", "rel_link", "dir_link/secret.txt", "chain1", "chain2"] {
            for tool in ["fs_read", "fs_stat"] {
                let result = call(&tools, tool, json!({ "path": path }));
                assert_no_secret(&result);
                assert_violation(result);
            }
        }
        assert_violation(call(&tools, "fs_list", json!({ "path": "dir_link" })));
    }
}

#[test]
fn symlinks_staying_inside_follow_with_openat2_only() {
    let fx = Fixture::new();
    symlink("sub/inner.txt", fx.root.join("in_link")).unwrap();
    symlink("in_link", fx.root.join("in_chain")).unwrap();
    let tools = fx.tools(false);
    for path in ["in_link", "in_chain"] {
        let out = call(&tools, "fs_read", json!({ "path": path })).unwrap();
        assert_eq!(out.data["content"], "inner");
        assert_eq!(out.data["path"], fx.root.join("sub/inner.txt").display().to_string());
    }
    // `..` after a symlink climbs from its target: the reported path is the physical one,
    // not the lexical fold of `in_dir/..`.
    std::fs::create_dir(fx.root.join("sub/deep")).unwrap();
    symlink("sub/deep", fx.root.join("in_dir")).unwrap();
    let out = call(&tools, "fs_read", json!({ "path": "in_dir/../inner.txt" })).unwrap();
    assert_eq!(out.data["content"], "inner");
    assert_eq!(out.data["path"], fx.root.join("sub/inner.txt").display().to_string());
    // The fallback walk refuses every symlink.
    assert_violation(call(&fx.tools(true), "fs_read", json!({ "path": "in_link" })));
}

#[test]
fn dot_dot_escapes_are_refused_and_inner_dot_dot_works() {
    let fx = Fixture::new();
    for walk in MODES {
        let tools = fx.tools(walk);
        for path in [
            "../outside/secret.txt".to_owned(),
            "sub/../../outside/secret.txt".to_owned(),
            format!("{}/../outside/secret.txt", fx.root.display()),
            format!("{}/sub/../../outside/secret.txt", fx.root.display()),
        ] {
            let result = call(&tools, "fs_read", json!({ "path": path }));
            assert_no_secret(&result);
            assert_violation(result);
        }
        let out = call(&tools, "fs_read", json!({ "path": "sub/./../file.txt" })).unwrap();
        assert_eq!(out.data["content"], "inside");
        // No symlink on the way: the reported path is the folded one.
        assert_eq!(out.data["path"], fx.root.join("file.txt").display().to_string());
    }
}

#[test]
fn absolute_paths_outside_are_refused() {
    let fx = Fixture::new();
    for walk in MODES {
        let tools = fx.tools(walk);
        for path in ["/etc/passwd", "/", fx.outside.join("secret.txt").to_str().unwrap()] {
            let result = call(&tools, "fs_read", json!({ "path": path }));
            assert_no_secret(&result);
            assert_violation(result);
        }
    }
}

#[test]
fn nul_and_overlong_paths_are_refused() {
    let fx = Fixture::new();
    for walk in MODES {
        let tools = fx.tools(walk);
        assert_violation(call(&tools, "fs_read", json!({ "path": "file.txt\u{0}../../outside/secret.txt" })));
        assert_violation(call(&tools, "fs_stat", json!({ "path": "a/".repeat(3000) })));
        assert_violation(call(&tools, "fs_stat", json!({ "path": "x".repeat(300) })));
        assert_violation(call(&tools, "fs_write", json!({ "path": "y".repeat(256), "content": "z" })));
    }
}

#[test]
fn fifos_sockets_and_devices_are_refused_without_blocking() {
    let fx = Fixture::new();
    rustix::fs::mknodat(CWD, fx.root.join("fifo"), FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(fx.root.join("sock")).unwrap();
    symlink("/dev/null", fx.root.join("null_link")).unwrap();
    let mut refused = vec!["fifo", "sock", "null_link"];
    // Creating a device node needs CAP_MKNOD; containers often lack it.
    let makedev = rustix::fs::makedev(1, 3);
    match rustix::fs::mknodat(CWD, fx.root.join("null"), FileType::CharacterDevice, Mode::from_raw_mode(0o666), makedev)
    {
        Ok(()) => refused.push("null"),
        Err(e) => eprintln!("mknod of a character device not permitted here ({e}); covered by the /dev/null symlink"),
    }
    for walk in MODES {
        let tools = fx.tools(walk);
        for path in &refused {
            for tool in ["fs_read", "fs_stat"] {
                assert_violation(call(&tools, tool, json!({ "path": path })));
            }
        }
    }
}

#[test]
fn a_root_that_is_a_symlink_is_refused_naming_its_target() {
    let fx = Fixture::new();
    let link = fx.outside.join("root_link");
    symlink(&fx.root, &link).unwrap();
    let config = ToolsConfig { roots: vec![link.clone()], ..ToolsConfig::default() };
    match builtin_tools(&config) {
        Err(e @ ConfigError::RootIsSymlink { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&fx.root.display().to_string()), "{message}");
            assert!(message.contains(&link.display().to_string()), "{message}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a symlinked root was accepted"),
    }
    let missing = ToolsConfig { roots: vec![fx.root.join("nope")], ..ToolsConfig::default() };
    assert!(matches!(builtin_tools(&missing), Err(ConfigError::RootUnreadable { .. })));
    let file = ToolsConfig { roots: vec![fx.root.join("file.txt")], ..ToolsConfig::default() };
    assert!(matches!(builtin_tools(&file), Err(ConfigError::RootNotDirectory { .. })));
    assert!(matches!(builtin_tools(&ToolsConfig::default()), Err(ConfigError::NoRoots)));
}

#[test]
fn writes_through_escaping_symlinks_are_refused_and_outside_is_unchanged() {
    let fx = Fixture::new();
    symlink("../outside", fx.root.join("dir_link")).unwrap();
    symlink("../outside/secret.txt", fx.root.join("file_link")).unwrap();
    let before = fx.outside_snapshot();
    for walk in MODES {
        let tools = fx.tools(walk);
        for mode in ["create", "overwrite"] {
            for path in ["dir_link/new.txt", "dir_link/secret.txt", "../outside/new.txt", "../data_evil/secret.txt"] {
                assert_violation(call(&tools, "fs_write", json!({ "path": path, "content": "pwned", "mode": mode })));
            }
        }
        // Create-only never replaces, not even a symlink.
        let exists = call(&tools, "fs_write", json!({ "path": "file_link", "content": "pwned" }));
        assert!(matches!(exists, Err(ToolError::AlreadyExists(_))), "{exists:?}");
    }
    assert_eq!(fx.outside_snapshot(), before);
    // Overwriting replaces the link itself, never the file it points to.
    let tools = fx.tools(false);
    call(&tools, "fs_write", json!({ "path": "file_link", "content": "replaced", "mode": "overwrite" })).unwrap();
    assert!(std::fs::symlink_metadata(fx.root.join("file_link")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(fx.root.join("file_link")).unwrap(), "replaced");
    assert_eq!(fx.outside_snapshot(), before);
}

#[test]
fn scope_prefixes_restrict_further() {
    let fx = Fixture::new();
    symlink("../file.txt", fx.root.join("sub/up_link")).unwrap();
    let tools = fx.tools(false);
    let scope = CallScope { path_prefixes: Some(vec![fx.root.join("sub")]), ..CallScope::default() };
    let read = |path: &str| tools["fs_read"].call(json!({ "path": path }), &scope);
    assert_eq!(read("sub/inner.txt").unwrap().data["content"], "inner");
    assert!(matches!(read("file.txt"), Err(ToolError::Forbidden(_))));
    // Inside the root, but the symlink climbs out of the caller's prefix.
    assert_violation(read("sub/up_link"));
    assert_violation(read("sub/../file.txt"));
    let none = CallScope { path_prefixes: Some(vec![fx.outside.clone()]), ..CallScope::default() };
    assert!(matches!(tools["fs_read"].call(json!({ "path": "file.txt" }), &none), Err(ToolError::Forbidden(_))));
    // A prefix holding the whole root (its parent, `/`) stands for the root, and no more.
    for wide in [fx.root.parent().unwrap().to_path_buf(), std::path::PathBuf::from("/")] {
        let scope = CallScope { path_prefixes: Some(vec![wide]), ..CallScope::default() };
        assert_eq!(tools["fs_read"].call(json!({ "path": "file.txt" }), &scope).unwrap().data["content"], "inside");
        let secret = fx.outside.join("secret.txt").display().to_string();
        let result = tools["fs_read"].call(json!({ "path": secret }), &scope);
        assert_no_secret(&result);
        assert_violation(result);
    }
    // A prefix naming a file or a symlinked directory grants nothing.
    symlink("sub", fx.root.join("sub_link")).unwrap();
    for narrow in [fx.root.join("file.txt"), fx.root.join("sub_link")] {
        let scope = CallScope { path_prefixes: Some(vec![narrow]), ..CallScope::default() };
        let read = |path: &str| tools["fs_read"].call(json!({ "path": path }), &scope);
        assert!(matches!(read("file.txt"), Err(ToolError::Forbidden(_))));
        assert!(matches!(read("sub_link/inner.txt"), Err(ToolError::Forbidden(_))));
    }
}

/// One thread keeps exchanging a real directory and a symlink to the outside under the same
/// name while others read, list and write through that name. Nothing outside may ever be read
/// or changed.
#[test]
fn symlink_swapped_in_under_concurrent_load_never_escapes() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.root.join("swap")).unwrap();
    std::fs::write(fx.root.join("swap/secret.txt"), "inside-copy").unwrap();
    symlink("../outside", fx.root.join("alt")).unwrap();
    let before = fx.outside_snapshot();
    for walk in MODES {
        let tools = fx.tools(walk);
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (stop, root) = (stop.clone(), fx.root.clone());
            std::thread::spawn(move || {
                let mut flips = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(CWD, root.join("swap"), CWD, root.join("alt"), RenameFlags::EXCHANGE)
                        .unwrap();
                    flips += 1;
                }
                flips
            })
        };
        let (mut reads_ok, mut writes_ok) = (0, 0);
        for i in 0..1500 {
            let read = call(&tools, "fs_read", json!({ "path": "swap/secret.txt" }));
            assert_no_secret(&read);
            if let Ok(out) = &read {
                assert_eq!(out.data["content"], "inside-copy");
                reads_ok += 1;
            }
            let list = call(&tools, "fs_list", json!({ "path": "swap" }));
            assert_no_secret(&list);
            if i % 3 == 0 {
                let write =
                    call(&tools, "fs_write", json!({ "path": "swap/w.txt", "content": "x", "mode": "overwrite" }));
                writes_ok += usize::from(write.is_ok());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        assert!(flips > 0);
        eprintln!("walk={walk}: {flips} flips, {reads_ok} reads and {writes_ok} writes succeeded inside");
        assert_eq!(fx.outside_snapshot(), before, "something outside the root changed");
        // Put the directory back under its name for the next mode.
        if std::fs::symlink_metadata(fx.root.join("swap")).unwrap().file_type().is_symlink() {
            rustix::fs::renameat_with(CWD, fx.root.join("swap"), CWD, fx.root.join("alt"), RenameFlags::EXCHANGE)
                .unwrap();
        }
    }
    assert!(!fx.outside.join("w.txt").exists());
}

#[test]
fn overwriting_a_hard_link_never_changes_the_other_name() {
    let fx = Fixture::new();
    std::fs::hard_link(fx.outside.join("secret.txt"), fx.root.join("hard")).unwrap();
    let before = fx.outside_snapshot();
    for walk in MODES {
        let tools = fx.tools(walk);
        call(&tools, "fs_write", json!({ "path": "hard", "content": "replaced", "mode": "overwrite" })).unwrap();
        assert_eq!(std::fs::read_to_string(fx.root.join("hard")).unwrap(), "replaced");
    }
    assert_eq!(fx.outside_snapshot(), before);
}
