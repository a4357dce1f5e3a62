//! Fuzzes token verification ([`referee_token::read`]): arbitrary token text, arbitrary bytes
//! as a token, and arbitrary Datalog appended as a holder's block (signed, as any holder can).
//! It must never panic, never take long (no Datalog runs; the size bounds hold), and whatever
//! it accepts must allow no more than the token it was derived from.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use biscuit_auth::builder::BlockBuilder;
use biscuit_auth::UnverifiedBiscuit;
use libfuzzer_sys::fuzz_target;
use referee_token::{Grant, Narrowing, RootKey, Scope, attenuate, read};

struct Fixture {
    root: RootKey,
    /// A restricted token and a narrowed child of it.
    tokens: [String; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("referee-fuzz-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the key directory");
        let root = RootKey::load_or_create(&dir).expect("a root key");
        let grant = Grant {
            tools: vec!["fs_read".into(), "fs_write".into()],
            muscles: vec!["feanor".into()],
            paths: vec!["/r/public".into(), "/r/shared".into()],
            expires_at: Some(4_000_000_000),
            ..Grant::default()
        };
        let token = root.mint(&grant).expect("mint");
        let narrowing = Narrowing { tools: vec!["fs_read".into()], paths: vec!["/r/public/a".into()], ..Narrowing::default() };
        let child = attenuate(&token, &narrowing).expect("attenuate");
        Fixture { root, tokens: [token, child] }
    })
}

/// What `child` allows must be allowed by the minted grant.
fn within_grant(scope: &Scope) {
    assert!(!scope.admin, "an attenuated restricted token became admin");
    for tool in ["fs_list", "exec", "*", "git_commit"] {
        assert!(!scope.allows_tool(tool), "{tool} appeared");
    }
    assert!(!scope.allows_muscle("mlp") && !scope.allows_muscle("*"), "a muscle appeared");
    let prefixes = scope.path_prefixes.as_ref().expect("a path-restricted token covers every root");
    for p in prefixes {
        assert!(p.starts_with("/r/public") || p.starts_with("/r/shared"), "{} appeared", p.display());
    }
    assert!(scope.expires_at.is_some_and(|t| t <= 4_000_000_000), "the expiry moved out");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let f = fixture();
    let public = f.root.public();
    let now = 1_800_000_000;
    let started = Instant::now();
    match mode % 4 {
        // Token text as sent in a header.
        0 => {
            let _ = read(&String::from_utf8_lossy(rest), &public, |_| false, now);
        }
        // Arbitrary bytes as a token's serialized form.
        1 => {
            let text = base64::engine::general_purpose::URL_SAFE.encode(rest);
            let _ = read(&text, &public, |_| false, now);
        }
        // Arbitrary Datalog in a holder's block, appended to either token.
        _ => {
            let Ok(code) = std::str::from_utf8(rest) else { return };
            // biscuit's Datalog parser recurses on nesting (a holder's tool, not the server's:
            // verification never parses Datalog text); deep nesting overflows its stack.
            if code.chars().filter(|c| matches!(c, '(' | '[' | '{')).count() > 64 {
                return;
            }
            let Ok(block) = BlockBuilder::new().code(code) else { return };
            let base = &f.tokens[usize::from(mode % 4 == 3)];
            let Ok(parent) = UnverifiedBiscuit::from_base64(base) else { return };
            let Ok(appended) = parent.append(block).and_then(|t| t.to_base64()) else { return };
            if let Ok(scope) = read(&appended, &public, |_| false, now) {
                within_grant(&scope);
            }
        }
    }
    // The old Datalog evaluation took seconds on one crafted block; reading takes microseconds.
    assert!(started.elapsed() < Duration::from_millis(250), "verification took {:?}", started.elapsed());
});
