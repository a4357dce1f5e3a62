//! `referee`: compile models into sealed muscles and manage the keys and trust that run them.
//!
//! Thin by design: argument parsing and output formatting live here, all logic lives in the
//! library crates. Exit codes are decided in one place: 0 success, 1 refused or failed
//! (one line on stderr saying why), 2 usage error (from clap).

mod cli;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` joins the context chain on one line: "verify x.muscle: publisher … not trusted".
            eprintln!("referee: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
