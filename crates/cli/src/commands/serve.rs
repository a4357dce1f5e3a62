//! `referee serve` (alias `up`) and `referee mcp`: configuration from file, environment and
//! flags; the bundled example muscles; the ready line and example calls.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use referee_compiler::SourceKind;
use referee_gateway::GatewayConfig;
use referee_gateway::launch::{self, Ready};
use referee_muscle::MuscleSpec;
use referee_tools::{SharedTool, ToolsConfig};
use referee_trust::Home;

use crate::cli::{GatewayArgs, McpArgs, ServeArgs};

/// The bundled examples, embedded so the binary works from any directory.
const EXAMPLES: [(&str, &str); 2] =
    [("feanor", include_str!("../../../../examples/feanor.py")), ("mlp", include_str!("../../../../examples/mlp.py"))];

/// Compiles and seals the bundled examples with this home's own keys.
fn examples(home: &Home) -> Result<Vec<Vec<u8>>> {
    home.keygen().context("create keys")?;
    EXAMPLES
        .iter()
        .map(|(name, source)| {
            let module = referee_compiler::compile(SourceKind::Python, source.as_bytes())
                .with_context(|| format!("compile bundled example {name}"))?;
            let dims =
                |s: &Option<Vec<u32>>| s.clone().with_context(|| format!("example {name} has no inferred shape"));
            let mut spec = MuscleSpec::new(*name, &dims(&module.input_shape)?, &dims(&module.output_shape)?);
            spec.capabilities = module.capabilities();
            spec.declare_nan_blind(module.nan_blind);
            home.seal_for_self(&spec, &module.bytes).with_context(|| format!("seal bundled example {name}"))
        })
        .collect()
}

/// File, then flags and environment (clap already merged those two).
fn config(args: &GatewayArgs) -> Result<GatewayConfig> {
    let mut config = match &args.config {
        Some(path) => GatewayConfig::from_file(path)?,
        None => GatewayConfig::default(),
    };
    let l = &mut config.limits;
    l.rate_per_second = args.rate.unwrap_or(l.rate_per_second);
    l.burst = args.burst.unwrap_or(l.burst);
    l.concurrency = args.concurrency.unwrap_or(l.concurrency);
    l.body_bytes = args.body_limit.unwrap_or(l.body_bytes);
    l.tool_timeout_ms = args.tool_timeout_ms.unwrap_or(l.tool_timeout_ms);
    l.batch_max = args.batch_max.unwrap_or(l.batch_max);
    if args.no_examples {
        config.examples = false;
    }
    Ok(config)
}

/// The native tools (`[tools]` from the file, `--root` on top; with no root at all, the home's
/// own `files/` directory, created 0700, so nothing outside it is reachable by default) and the
/// worknode tools.
fn native_tools(home: &Home, config: &GatewayConfig, roots: &[PathBuf]) -> Result<Vec<SharedTool>> {
    let mut tools: ToolsConfig = toml::Value::Table(config.tools.clone()).try_into().context("config [tools]")?;
    if !roots.is_empty() {
        tools.roots = roots.to_vec();
    }
    if tools.roots.is_empty() {
        let files = home.root().join("files");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&files)
            .with_context(|| format!("create {}", files.display()))?;
        tools.roots = vec![files];
    }
    let mut all = referee_tools::builtin_tools(&tools).context("configure the native tools")?;
    all.extend(worknode_tools(home)?);
    Ok(all)
}

/// The worknode tree of this home (`HOME/worknodes`, event store + replica id) as the tools
/// `node_create`, `node_update`, `node_get`, `node_tree`.
fn worknode_tools(home: &Home) -> Result<Vec<SharedTool>> {
    let dir = home.root().join("worknodes");
    let system =
        referee_worknode::cli::open(&dir).with_context(|| format!("open the worknodes in {}", dir.display()))?;
    Ok(referee_worknode::tools::worknode_tools(std::sync::Arc::new(system)))
}

fn preload(home: &Home, config: &GatewayConfig) -> Result<Vec<Vec<u8>>> {
    if config.examples { examples(home) } else { Ok(Vec::new()) }
}

fn print_ready(ready: &Ready, home: &Path, json: bool) {
    // The ready line is always first and always JSON: scripts and tests read it.
    println!("{}", serde_json::to_string(ready).unwrap_or_default());
    if json {
        return;
    }
    let token = &ready.admin_token;
    let base = ready.tcp.map(|a| format!("http://{a}"));
    let mut text = String::from("\nreferee gateway ready\n");
    if let Some(base) = &base {
        text.push_str(&format!("  REST + MCP  {base}  (MCP: {base}/mcp)\n"));
    }
    if let Some(sock) = &ready.unix {
        text.push_str(&format!("  Unix socket {}\n", sock.display()));
    }
    text.push_str(&format!("  muscles     {}\n  home        {}\n", ready.muscles.join(", "), home.display()));
    text.push_str(&format!(
        "\nadmin token (7 days; revoke with `referee token revoke {}`):\n  {token}\n",
        ready.admin_token_id
    ));
    if let Some(base) = &base {
        text.push_str(&format!(
            "\ntry:\n  export TOKEN={token}\n  curl -s {base}/health\n  curl -s -H \"Authorization: Bearer $TOKEN\" {base}/v1/tools\n  \
             curl -s -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    \
             -d '{{\"input\": [1, 2, 3, 4]}}' {base}/v1/muscles/feanor/invoke\n  \
             curl -s -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    \
             -d '{{\"tool\": \"muscle.feanor\", \"params\": {{\"input\": [1, 2, 3, 4]}}}}' {base}/tool\n"
        ));
    }
    if let Some(sock) = &ready.unix {
        text.push_str(&format!(
            "  curl -s --unix-socket {} -H \"Authorization: Bearer $TOKEN\" http://localhost/v1/muscles\n",
            sock.display()
        ));
    }
    println!("{text}");
}

pub(crate) fn serve(home: &Home, args: &ServeArgs, json: bool) -> Result<()> {
    let mut config = config(&args.common)?;
    if let Some(addr) = args.listen {
        config.listen.tcp = Some(addr);
    }
    if args.no_tcp {
        config.listen.tcp = None;
    }
    if let Some(path) = &args.unix {
        config.listen.unix = Some(path.clone());
    }
    config.listen.no_unix |= args.no_unix;
    referee_gateway::telemetry::init_json_logs();
    let native = native_tools(home, &config, &args.common.roots)?;
    let preload = preload(home, &config)?;
    launch::serve(home, config, native, &preload, |ready| print_ready(ready, home.root(), json))?;
    Ok(())
}

pub(crate) fn mcp(home: &Home, args: &McpArgs) -> Result<()> {
    let config = config(&args.common)?;
    // stdout carries the protocol: logs go to stderr only.
    referee_gateway::telemetry::init_json_logs();
    let native = native_tools(home, &config, &args.common.roots)?;
    let preload = preload(home, &config)?;
    launch::mcp_stdio(home, config, native, &preload)?;
    Ok(())
}
