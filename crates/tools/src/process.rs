//! `process_list`: the host's processes, read natively from `/proc`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Limits;
use crate::util::{NATIVE, check_deadline, output, params, spec, to_value};
use crate::{CallScope, SharedTool, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};

/// Longest command line returned per process, in bytes.
const MAX_CMDLINE_BYTES: usize = 1024;

/// The process tools.
pub fn tools(limits: &Limits) -> Vec<SharedTool> {
    vec![Arc::new(ProcessList::new(limits))]
}

/// `process_list`: pid, parent, name, state, owner, resident memory and command line.
pub struct ProcessList {
    max_entries: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    max: Option<usize>,
}

#[derive(Serialize)]
struct ProcessInfo {
    pid: i32,
    ppid: i32,
    name: String,
    state: String,
    uid: Option<u32>,
    rss_bytes: u64,
    cmdline: String,
}

#[derive(Serialize)]
struct ListResult {
    processes: Vec<ProcessInfo>,
    truncated: bool,
}

impl ProcessList {
    /// `process_list`, returning at most `limits.max_list_entries` processes.
    pub fn new(limits: &Limits) -> Self {
        let max = limits.max_list_entries;
        let spec = spec(
            "process_list",
            &format!(
                "Lists the host's processes (at most {max}, by pid): pid, parent pid, name, state, uid, resident memory and command line (cut at {MAX_CMDLINE_BYTES} bytes)."
            ),
            json!({
                "type": "object",
                "properties": { "max": { "type": "integer", "minimum": 1, "maximum": max } },
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "processes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "pid": { "type": "integer" },
                                "ppid": { "type": "integer" },
                                "name": { "type": "string" },
                                "state": { "type": "string" },
                                "uid": { "type": ["integer", "null"] },
                                "rss_bytes": { "type": "integer" },
                                "cmdline": { "type": "string" }
                            },
                            "required": ["pid", "ppid", "name", "state", "uid", "rss_bytes", "cmdline"]
                        }
                    },
                    "truncated": { "type": "boolean" }
                },
                "required": ["processes", "truncated"]
            }),
            // Reads other processes' state: outside the referee's own world.
            ToolAnnotations { read_only: true, destructive: false, idempotent: true, open_world: true },
            NATIVE,
        );
        Self { max_entries: max, spec }
    }
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Tool for ProcessList {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: ListParams = params(params_json)?;
        let max = p.max.unwrap_or(self.max_entries).min(self.max_entries);
        let page = procfs::page_size();
        let all =
            procfs::process::all_processes().map_err(|e| ToolError::Unavailable(format!("reading /proc: {e}")))?;
        let mut processes = Vec::new();
        let mut truncated = false;
        // Processes that exit while being read are skipped.
        for process in all.flatten() {
            check_deadline(scope, "process_list")?;
            let Ok(stat) = process.stat() else { continue };
            if processes.len() == max {
                truncated = true;
                break;
            }
            let cmdline = process.cmdline().map(|args| args.join(" ")).unwrap_or_default();
            processes.push(ProcessInfo {
                pid: stat.pid,
                ppid: stat.ppid,
                name: stat.comm,
                state: stat.state.to_string(),
                uid: process.uid().ok(),
                rss_bytes: stat.rss.saturating_mul(page),
                cmdline: cut(cmdline, MAX_CMDLINE_BYTES),
            });
        }
        Ok(output(to_value(&ListResult { processes, truncated })?, NATIVE))
    }
}
