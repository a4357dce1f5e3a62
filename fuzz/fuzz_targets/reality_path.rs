//! Fuzzes the reality check: arbitrary bytes as a path against a temporary root full of
//! escaping and inner symlinks. It must never panic, and whatever it opens must lie inside the
//! root.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use referee_tools::CallScope;
use referee_tools::config::Limits;
use referee_tools::reality::{Access, Reality};

struct Fixture {
    root: PathBuf,
    reality: Reality,
}

/// `<tmp>/referee-fuzz-reality-<pid>/{root,outside}`; `root` holds a file, a directory and
/// symlinks that stay inside, climb out, jump to `/`, and loop.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("referee-fuzz-reality-{}", std::process::id()));
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(root.join("sub")).expect("create the fuzz root");
        std::fs::create_dir_all(&outside).expect("create the outside directory");
        std::fs::write(outside.join("secret"), "secret").expect("write the secret");
        std::fs::write(root.join("file"), "inside").expect("write a file");
        for (target, link) in
            [("../outside", "out"), ("sub", "in"), ("/", "abs"), ("loop", "loop"), ("../../outside/secret", "sub/up")]
        {
            // Left over from an earlier run with the same pid: keep it.
            let _ = symlink(target, root.join(link));
        }
        let root = std::fs::canonicalize(&root).expect("canonicalize the fuzz root");
        let reality = Reality::new(std::slice::from_ref(&root), &Limits::default()).expect("the fuzz root is valid");
        Fixture { root, reality }
    })
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let path = Path::new(OsStr::from_bytes(data));
    let scope = CallScope::default();
    for access in [Access::Path, Access::ReadFile, Access::Dir] {
        if let Ok(resolved) = fx.reality.open(&scope, path, access) {
            assert!(resolved.path.starts_with(&fx.root), "{path:?} resolved to {:?}", resolved.path);
        }
    }
});
