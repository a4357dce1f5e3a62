//! `referee node …`: worknodes. The grammar and logic live in `referee_worknode::cli`.

use anyhow::Result;
use referee_worknode::cli::NodeCommand;

/// Runs one `referee node` subcommand.
pub(crate) fn run(cmd: NodeCommand, json: bool) -> Result<()> {
    referee_worknode::cli::run(cmd, json)
}
