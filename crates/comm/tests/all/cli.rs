//! The `referee comm` command layer (grammar, keygen/id, listen + request end to end) and a
//! smoke run of the benchmark code.

use clap::Parser;
use referee_comm::Identity;
use referee_comm::bench::{self, BenchOptions};
use referee_comm::cli::{self, CommCommand};

use crate::helpers::*;

#[derive(Debug, Parser)]
struct Grammar {
    #[command(subcommand)]
    cmd: CommCommand,
}

#[test]
fn grammar_parses_every_subcommand() -> TestResult {
    for args in [
        &["t", "keygen", "--out", "/tmp/x"][..],
        &["t", "id", "--identity", "/tmp/x"],
        &["t", "listen", "tcp://127.0.0.1:0", "unix:///tmp/s", "--allow-any", "--max-messages", "3"],
        &["t", "send", "tcp://127.0.0.1:1", "hi", "--to", "00", "--count", "2"],
        &["t", "request", "tcp://127.0.0.1:1", "hi", "--to", "00", "--timeout-ms", "10"],
        &["t", "bench", "--transports", "unix,tcp", "--messages", "10", "--current-thread"],
    ] {
        Grammar::try_parse_from(args)?;
    }
    assert!(Grammar::try_parse_from(["t", "listen"]).is_err(), "an address is required");
    Ok(())
}

#[test]
fn listen_and_request_round_trip_through_the_command_layer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("server.key");
    cli::run(CommCommand::Keygen { out: key.clone() }, true)?;
    let server_id = Identity::load(&key)?.id();
    cli::run(CommCommand::Id { identity: key.clone() }, false)?;
    let sock = format!("unix://{}", dir.path().join("cli.sock").display());
    let listen = {
        let (sock, key) = (sock.clone(), key.clone());
        std::thread::spawn(move || {
            cli::run(
                CommCommand::Listen {
                    addrs: vec![sock],
                    identity: Some(key),
                    allow: vec![],
                    allow_any: true,
                    max_messages: Some(1),
                },
                true,
            )
        })
    };
    // `request` retries with backoff until the listener is up.
    cli::run(
        CommCommand::Request {
            target: cli::Outgoing { addr: sock, message: "ping".into(), to: server_id.to_string(), identity: None },
            timeout_ms: 5000,
        },
        true,
    )?;
    listen.join().map_err(|_| "listener thread panicked")??;
    Ok(())
}

#[test]
fn listen_without_an_allow_list_is_refused() {
    let err = cli::run(
        CommCommand::Listen {
            addrs: vec!["tcp://127.0.0.1:0".into()],
            identity: None,
            allow: vec![],
            allow_any: false,
            max_messages: Some(1),
        },
        false,
    );
    assert!(err.is_err_and(|e| e.to_string().contains("--allow")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_code_runs_on_every_transport() -> TestResult {
    let opts = BenchOptions {
        rtt_samples: 200,
        messages: 20_000,
        idle_connections: 20,
        transports: vec!["unix".into(), "tcp".into(), "quic".into()],
    };
    let rows = bench::run_all(&opts).await.map_err(|e| e.to_string())?;
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.value.is_finite() && r.value >= 0.0));
    assert!(bench::table(&rows).contains("rtt p50"));
    Ok(())
}

#[test]
fn bench_subcommand_runs_on_a_single_threaded_runtime() -> TestResult {
    cli::run(
        CommCommand::Bench {
            rtt_samples: 50,
            messages: 1000,
            idle_connections: 5,
            transports: vec!["unix".into()],
            current_thread: true,
        },
        true,
    )?;
    Ok(())
}
