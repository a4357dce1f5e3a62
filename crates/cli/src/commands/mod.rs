//! One module per subcommand; each takes parsed arguments and prints its result.

mod attest;
mod bench;
mod compile;
mod keys;
mod muscle;
mod node;
mod run;
mod serve;
mod token;
mod trust;

use std::path::PathBuf;

use anyhow::{Context, Result};
use referee_trust::Home;

use crate::cli::{Cli, Command};

/// Where keys and the trust store live: `--home`, `$REFEREE_HOME`, or `~/.referee`.
fn home(dir: Option<PathBuf>) -> Result<Home> {
    match dir {
        Some(dir) => Ok(Home::new(dir)),
        None => {
            let base = std::env::var_os("HOME").context("neither --home, REFEREE_HOME nor HOME is set")?;
            Ok(Home::new(PathBuf::from(base).join(".referee")))
        }
    }
}

/// Prints `value` as pretty JSON or `text` as is.
fn print(json: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    use std::io::Write as _;
    let out = if json { format!("{value:#}\n") } else { format!("{}\n", text()) };
    // A closed pipe (`referee audit tail | head`) ends the output quietly instead of panicking.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

/// `text` with the characters that can make a terminal show something other than what is
/// there (bidirectional overrides and isolates, zero-width and other format characters, and
/// any control character) written as `\u{…}` escapes: for text that came from a client.
pub(crate) fn inert(text: &str) -> String {
    text.chars()
        .map(|c| {
            let format =
                matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}');
            if format || c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }
        })
        .collect()
}

/// Runs one parsed command line.
pub(crate) fn run(cli: Cli) -> Result<()> {
    let home = home(cli.home)?;
    match cli.command {
        Command::Keygen => keys::keygen(&home, cli.json),
        Command::Compile(args) => compile::compile(&home, &args, cli.json),
        Command::Inspect { file } => muscle::inspect(&file, cli.json),
        Command::Verify { file, accept } => muscle::verify(&home, &file, accept, cli.json),
        Command::Trust(cmd) => trust::run(&home, cmd, cli.json),
        Command::Run(args) => run::run(&home, &args, cli.json),
        Command::Audit(cmd) => attest::audit(&home, &cmd, cli.json),
        Command::Attest(args) => attest::attest(&home, &args, cli.json),
        Command::Serve(args) => serve::serve(&home, &args, cli.json),
        Command::Mcp(args) => serve::mcp(&home, &args),
        Command::Token(cmd) => token::run(&home, cmd, cli.json),
        Command::Bench { calls } => bench::bench(calls, cli.json),
        Command::Comm(cmd) => referee_comm::cli::run(cmd, cli.json),
        Command::Node(cmd) => node::run(cmd, cli.json),
    }
}
