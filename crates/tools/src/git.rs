//! Git tools: `git_status`, `git_log`, `git_diff`, all through gix (never the `git` binary).
//!
//! The repository directory passes the reality check. gix opens repositories by path, so the
//! repository is also required to be self-contained: `.git` is a real directory (not a symlink
//! or a `gitdir:` file), no object alternates, no `core.worktree` elsewhere; configuration is
//! the repository's own only (no system/global files, no includes) and filter drivers are
//! dropped, so reading a status never runs a configured command.
//!
//! Revision arguments are validated before gix sees them: nothing starting with `-` (no option
//! injection such as `--output=...`), only a ref name that gix's validation accepts or a hex
//! object id, optionally followed by `~N` / `^N`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gix::bstr::{BStr, ByteSlice};
use rustix::fs::{AtFlags, FileType};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Limits;
use crate::reality::{Access, Reality, violation};
use crate::util::{NATIVE, READ_ONLY, check_deadline, output, params, spec, to_value};
use crate::{CallScope, SharedTool, Tool, ToolError, ToolOutput, ToolSpec};

/// The three git tools over one set of roots.
pub fn tools(reality: &Arc<Reality>, limits: &Limits) -> Vec<SharedTool> {
    vec![
        Arc::new(GitStatus::new(reality.clone(), limits)),
        Arc::new(GitLog::new(reality.clone(), limits)),
        Arc::new(GitDiff::new(reality.clone(), limits)),
    ]
}

fn git_failed(what: &str, e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(format!("git {what}: {e}"))
}

/// Checks a user-supplied revision: `<ref name or hex id>[~N|^N]*`, never an option.
pub fn validate_rev(rev: &str) -> Result<(), ToolError> {
    let refuse = |why: &str| Err(ToolError::InvalidParams(format!("revision {rev:?} refused: {why}")));
    if rev.is_empty() {
        return refuse("empty");
    }
    if rev.starts_with('-') {
        return refuse("starts with '-' (looks like an option)");
    }
    let base = strip_ancestry(rev);
    if base.is_empty() {
        return refuse("expected a ref name or object id, optionally followed by ~N or ^N");
    }
    let is_hex = base.len() >= 4 && base.len() <= 40 && base.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hex || base == "HEAD" {
        return Ok(());
    }
    match gix::validate::reference::name_partial(base.as_bytes().as_bstr()) {
        Ok(_) => Ok(()),
        Err(e) => refuse(&format!("not a valid ref name: {e}")),
    }
}

/// `rev` without its trailing `~N` / `^N` ancestry steps.
fn strip_ancestry(rev: &str) -> &str {
    let mut base = rev;
    loop {
        let digits_gone = base.trim_end_matches(|c: char| c.is_ascii_digit());
        match digits_gone.strip_suffix(['~', '^']) {
            Some(shorter) => base = shorter,
            None => return base,
        }
    }
}

/// Opens the repository whose work tree is `path`, after the reality check and the
/// self-containment checks described in the module documentation.
fn open_repo(reality: &Reality, scope: &CallScope, path: &str) -> Result<(gix::Repository, PathBuf), ToolError> {
    let dir = reality.open(scope, Path::new(path), Access::Dir)?;
    let shown = dir.path.join(".git");
    let must_be_dir = |rel: &str| -> Result<(), ToolError> {
        match rustix::fs::statat(&dir.fd, rel, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(()),
            Ok(_) => Err(violation(
                &dir.path.join(rel),
                "is not a plain directory (a symlink or gitfile could lead outside the root)",
            )),
            Err(_) => Err(ToolError::InvalidParams(format!(
                "{} is not a git work tree (no {rel} directory)",
                dir.path.display()
            ))),
        }
    };
    for rel in [".git", ".git/objects", ".git/refs"] {
        must_be_dir(rel)?;
    }
    refuse_symlinks_in_git_dir(&dir.fd, &dir.path)?;
    for rel in [".git/objects/info/alternates", ".git/commondir"] {
        if rustix::fs::statat(&dir.fd, rel, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            return Err(violation(
                &dir.path.join(rel),
                "exists; repositories that borrow objects from elsewhere are refused",
            ));
        }
    }
    let options = gix::open::Options::isolated().open_path_as_is(true);
    let mut repo =
        gix::open_opts(&shown, options).map_err(|e| git_failed(&format!("opening {}", dir.path.display()), e))?;
    match repo.workdir().map(std::fs::canonicalize) {
        Some(Ok(workdir)) if workdir == dir.path => {}
        _ => return Err(violation(&dir.path, "its configured work tree (core.worktree) is elsewhere")),
    }
    drop_filter_drivers(&mut repo)?;
    Ok((repo, dir.path))
}

/// gix reads `HEAD`, `config`, `index`, `packed-refs` and friends by path: refuse a `.git`
/// whose top-level entries include a symlink, which could make it read a file outside the root.
fn refuse_symlinks_in_git_dir(work: &std::os::fd::OwnedFd, work_path: &Path) -> Result<(), ToolError> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let git_dir = rustix::fs::openat(work, ".git", flags, Mode::empty()).map_err(|e| git_failed("opening .git", e))?;
    let entries = rustix::fs::Dir::read_from(&git_dir).map_err(|e| git_failed("listing .git", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| git_failed("listing .git", e))?;
        let kind = match entry.file_type() {
            // Some file systems do not fill d_type.
            FileType::Unknown => rustix::fs::statat(&git_dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode)),
            known => known,
        };
        if kind == FileType::Symlink {
            let name = entry.file_name().to_string_lossy().into_owned();
            return Err(violation(
                &work_path.join(".git").join(name),
                "is a symlink inside .git (it could lead outside the root)",
            ));
        }
    }
    Ok(())
}

/// Removes every `[filter "..."]` section from the in-memory configuration so that comparing
/// the work tree never runs a clean/smudge/process command.
fn drop_filter_drivers(repo: &mut gix::Repository) -> Result<(), ToolError> {
    let mut config = repo.config_snapshot_mut();
    let ids: Vec<_> = config.sections_and_ids_by_name("filter").into_iter().flatten().map(|(_, id)| id).collect();
    for id in ids {
        config.remove_section_by_id(id);
    }
    config.commit().map_err(|e| git_failed("configuring", e))?;
    Ok(())
}

fn resolve_rev<'r>(repo: &'r gix::Repository, rev: &str) -> Result<gix::Id<'r>, ToolError> {
    validate_rev(rev)?;
    repo.rev_parse_single(rev.as_bytes().as_bstr()).map_err(|e| ToolError::NotFound(format!("revision {rev:?}: {e}")))
}

fn repo_schema() -> Value {
    json!({ "type": "string", "minLength": 1, "description": "Work tree directory of the repository, inside the roots (absolute or relative to the first root)." })
}

fn rev_schema(description: &str) -> Value {
    json!({ "type": "string", "minLength": 1, "pattern": "^[^-]", "description": description })
}

/// `git_status`: branch, HEAD and changed paths (staged, unstaged, untracked).
pub struct GitStatus {
    reality: Arc<Reality>,
    max_entries: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoParams {
    path: String,
}

#[derive(Serialize)]
struct StatusEntry {
    path: String,
    /// `staged` (HEAD vs index) or `worktree` (index vs files).
    area: &'static str,
    change: String,
}

#[derive(Serialize)]
struct StatusResult {
    path: PathBuf,
    branch: Option<String>,
    head: Option<String>,
    entries: Vec<StatusEntry>,
    truncated: bool,
}

impl GitStatus {
    /// `git_status` over `reality`, returning at most `limits.max_list_entries` entries.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_list_entries;
        let spec = spec(
            "git_status",
            &format!(
                "Shows a repository's branch, HEAD commit and changed paths: staged (HEAD vs index), work tree (index vs files) and untracked; at most {max} entries."
            ),
            json!({
                "type": "object",
                "properties": { "path": repo_schema() },
                "required": ["path"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "branch": { "type": ["string", "null"] },
                    "head": { "type": ["string", "null"] },
                    "entries": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "path": { "type": "string" },
                                "area": { "enum": ["staged", "worktree"] },
                                "change": { "type": "string", "description": "added, removed, modified, renamed, copied, typechange, conflict, intenttoadd" }
                            },
                            "required": ["path", "area", "change"]
                        }
                    },
                    "truncated": { "type": "boolean" }
                },
                "required": ["path", "branch", "head", "entries", "truncated"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_entries: max, spec }
    }
}

impl Tool for GitStatus {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: RepoParams = params(params_json)?;
        let (repo, path) = open_repo(&self.reality, scope, &p.path)?;
        let branch = repo
            .head_name()
            .map_err(|e| git_failed("reading HEAD", e))?
            .map(|name| name.shorten().to_str_lossy().into_owned());
        let head = repo.head_id().ok().map(|id| id.to_string());
        let items = repo
            .status(gix::progress::Discard)
            .map_err(|e| git_failed("status", e))?
            .untracked_files(gix::status::UntrackedFiles::Files)
            .into_iter(Vec::<gix::bstr::BString>::new())
            .map_err(|e| git_failed("status", e))?;
        let mut entries = Vec::new();
        let mut truncated = false;
        for item in items {
            check_deadline(scope, "git_status")?;
            let item = item.map_err(|e| git_failed("status", e))?;
            let (area, change) = match &item {
                gix::status::Item::IndexWorktree(change) => match change.summary() {
                    Some(summary) => ("worktree", format!("{summary:?}").to_lowercase()),
                    None => continue,
                },
                gix::status::Item::TreeIndex(change) => ("staged", index_change_kind(change).to_owned()),
            };
            if entries.len() == self.max_entries {
                truncated = true;
                break;
            }
            entries.push(StatusEntry { path: item.location().to_str_lossy().into_owned(), area, change });
        }
        entries.sort_by(|a, b| (a.area, &a.path).cmp(&(b.area, &b.path)));
        let result = StatusResult { path, branch, head, entries, truncated };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

fn index_change_kind(change: &gix::diff::index::Change) -> &'static str {
    use gix::diff::index::ChangeRef;
    match change {
        ChangeRef::Addition { .. } => "added",
        ChangeRef::Deletion { .. } => "removed",
        ChangeRef::Modification { .. } => "modified",
        ChangeRef::Rewrite { copy: true, .. } => "copied",
        ChangeRef::Rewrite { .. } => "renamed",
    }
}

/// `git_log`: the most recent commits reachable from a revision.
pub struct GitLog {
    reality: Arc<Reality>,
    max_entries: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    path: String,
    #[serde(default = "head")]
    rev: String,
    max_count: Option<usize>,
}

fn head() -> String {
    "HEAD".to_owned()
}

#[derive(Serialize)]
struct Commit {
    id: String,
    summary: String,
    author_name: String,
    author_email: String,
    time_secs: i64,
    parents: Vec<String>,
}

#[derive(Serialize)]
struct LogResult {
    path: PathBuf,
    commits: Vec<Commit>,
    truncated: bool,
}

impl GitLog {
    /// `git_log` over `reality`, returning at most `limits.max_log_entries` commits.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_log_entries;
        let spec = spec(
            "git_log",
            &format!("Lists commits reachable from a revision (default HEAD), newest first; at most {max}."),
            json!({
                "type": "object",
                "properties": {
                    "path": repo_schema(),
                    "rev": rev_schema("ref name or object id, optionally with ~N/^N; default HEAD"),
                    "max_count": { "type": "integer", "minimum": 1, "maximum": max }
                },
                "required": ["path"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "commits": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": { "type": "string" },
                                "summary": { "type": "string" },
                                "author_name": { "type": "string" },
                                "author_email": { "type": "string" },
                                "time_secs": { "type": "integer" },
                                "parents": { "type": "array", "items": { "type": "string" } }
                            },
                            "required": ["id", "summary", "author_name", "author_email", "time_secs", "parents"]
                        }
                    },
                    "truncated": { "type": "boolean" }
                },
                "required": ["path", "commits", "truncated"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_entries: max, spec }
    }
}

impl Tool for GitLog {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: LogParams = params(params_json)?;
        validate_rev(&p.rev)?;
        let max = p.max_count.unwrap_or(self.max_entries).min(self.max_entries);
        let (repo, path) = open_repo(&self.reality, scope, &p.path)?;
        let tip = resolve_rev(&repo, &p.rev)?;
        let walk = repo.rev_walk([tip.detach()]).all().map_err(|e| git_failed("log", e))?;
        let mut commits = Vec::new();
        let mut truncated = false;
        for info in walk {
            check_deadline(scope, "git_log")?;
            let info = info.map_err(|e| git_failed("log", e))?;
            if commits.len() == max {
                truncated = true;
                break;
            }
            let commit = info.object().map_err(|e| git_failed("reading a commit", e))?;
            let author = commit.author().map_err(|e| git_failed("reading an author", e))?;
            let summary = commit.message().map(|m| m.summary().to_str_lossy().into_owned()).unwrap_or_default();
            commits.push(Commit {
                id: info.id.to_string(),
                summary,
                author_name: author.name.to_str_lossy().into_owned(),
                author_email: author.email.to_str_lossy().into_owned(),
                time_secs: author.time().map(|t| t.seconds).unwrap_or(0),
                parents: info.parent_ids.iter().map(ToString::to_string).collect(),
            });
        }
        Ok(output(to_value(&LogResult { path, commits, truncated })?, NATIVE))
    }
}

/// `git_diff`: the changes between two commits' trees, with a bounded unified patch.
pub struct GitDiff {
    reality: Arc<Reality>,
    max_patch_bytes: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffParams {
    path: String,
    from: Option<String>,
    #[serde(default = "head")]
    to: String,
}

#[derive(Serialize)]
struct FileChange {
    path: String,
    change: &'static str,
    old_path: Option<String>,
    old_id: Option<String>,
    new_id: Option<String>,
}

#[derive(Serialize)]
struct DiffResult {
    path: PathBuf,
    from: Option<String>,
    to: String,
    changes: Vec<FileChange>,
    patch: String,
    truncated: bool,
}

impl GitDiff {
    /// `git_diff` over `reality`, returning at most `limits.max_diff_bytes` of patch text.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_diff_bytes;
        let spec = spec(
            "git_diff",
            &format!(
                "Compares two commits' trees: `from` (default: the first parent of `to`, or nothing for a root commit) to `to` (default HEAD). Returns the changed paths and a unified patch of at most {max} bytes."
            ),
            json!({
                "type": "object",
                "properties": {
                    "path": repo_schema(),
                    "from": rev_schema("older revision; default: first parent of `to`"),
                    "to": rev_schema("newer revision; default HEAD")
                },
                "required": ["path"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "from": { "type": ["string", "null"], "description": "resolved object id" },
                    "to": { "type": "string", "description": "resolved object id" },
                    "changes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "path": { "type": "string" },
                                "change": { "enum": ["added", "removed", "modified", "renamed", "copied"] },
                                "old_path": { "type": ["string", "null"] },
                                "old_id": { "type": ["string", "null"] },
                                "new_id": { "type": ["string", "null"] }
                            },
                            "required": ["path", "change", "old_path", "old_id", "new_id"]
                        }
                    },
                    "patch": { "type": "string" },
                    "truncated": { "type": "boolean" }
                },
                "required": ["path", "from", "to", "changes", "patch", "truncated"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_patch_bytes: max, spec }
    }
}

impl Tool for GitDiff {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: DiffParams = params(params_json)?;
        validate_rev(&p.to)?;
        if let Some(from) = &p.from {
            validate_rev(from)?;
        }
        let (repo, path) = open_repo(&self.reality, scope, &p.path)?;
        let to = resolve_rev(&repo, &p.to)?
            .object()
            .map_err(|e| git_failed("reading", e))?
            .peel_to_commit()
            .map_err(|e| git_failed("peeling to a commit", e))?;
        let from = match &p.from {
            Some(rev) => Some(resolve_rev(&repo, rev)?.detach()),
            None => to.parent_ids().next().map(|id| id.detach()),
        };
        let from_tree = match from {
            Some(id) => Some(
                repo.find_commit(id)
                    .map_err(|e| git_failed("reading `from`", e))?
                    .tree()
                    .map_err(|e| git_failed("reading `from`'s tree", e))?,
            ),
            None => None,
        };
        let to_tree = to.tree().map_err(|e| git_failed("reading `to`'s tree", e))?;
        let changes =
            repo.diff_tree_to_tree(from_tree.as_ref(), Some(&to_tree), None).map_err(|e| git_failed("diff", e))?;
        let mut patch = Patch { text: String::new(), max: self.max_patch_bytes, truncated: false };
        let mut files = Vec::new();
        for change in &changes {
            check_deadline(scope, "git_diff")?;
            let file = describe(change);
            if !patch.truncated {
                let old = file.old_id.as_deref().map(|id| blob(&repo, id)).transpose()?;
                let new = file.new_id.as_deref().map(|id| blob(&repo, id)).transpose()?;
                let old_path = file.old_path.as_deref().unwrap_or(&file.path);
                patch.file(
                    old_path,
                    &file.path,
                    old.as_deref().unwrap_or_default(),
                    new.as_deref().unwrap_or_default(),
                );
            }
            files.push(file);
        }
        let result = DiffResult {
            path,
            from: from.map(|id| id.to_string()),
            to: to.id.to_string(),
            changes: files,
            truncated: patch.truncated,
            patch: patch.text,
        };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

fn describe(change: &gix::object::tree::diff::ChangeDetached) -> FileChange {
    use gix::object::tree::diff::ChangeDetached as C;
    let text = |b: &BStr| b.to_str_lossy().into_owned();
    match change {
        C::Addition { location, id, .. } => FileChange {
            path: text(location.as_ref()),
            change: "added",
            old_path: None,
            old_id: None,
            new_id: Some(id.to_string()),
        },
        C::Deletion { location, id, .. } => FileChange {
            path: text(location.as_ref()),
            change: "removed",
            old_path: None,
            old_id: Some(id.to_string()),
            new_id: None,
        },
        C::Modification { location, previous_id, id, .. } => FileChange {
            path: text(location.as_ref()),
            change: "modified",
            old_path: None,
            old_id: Some(previous_id.to_string()),
            new_id: Some(id.to_string()),
        },
        C::Rewrite { source_location, source_id, location, id, copy, .. } => FileChange {
            path: text(location.as_ref()),
            change: if *copy { "copied" } else { "renamed" },
            old_path: Some(text(source_location.as_ref())),
            old_id: Some(source_id.to_string()),
            new_id: Some(id.to_string()),
        },
    }
}

fn blob(repo: &gix::Repository, id: &str) -> Result<Vec<u8>, ToolError> {
    let id = gix::ObjectId::from_hex(id.as_bytes()).map_err(|e| git_failed("parsing an object id", e))?;
    let object = repo.find_object(id).map_err(|e| git_failed("reading a blob", e))?;
    // Trees (directories added or removed as a whole) have no line content.
    Ok(if object.kind == gix::object::Kind::Blob { object.detach().data } else { Vec::new() })
}

/// A unified patch accumulated up to a byte limit.
struct Patch {
    text: String,
    max: usize,
    truncated: bool,
}

impl Patch {
    fn file(&mut self, old_path: &str, new_path: &str, old: &[u8], new: &[u8]) {
        let mut section = format!("--- a/{old_path}\n+++ b/{new_path}\n");
        if old.contains(&0) || new.contains(&0) {
            section.push_str("Binary files differ\n");
        } else {
            use gix::diff::blob::{Algorithm, Diff, InternedInput, UnifiedDiff, unified_diff};
            let input = InternedInput::new(old, new);
            let diff = Diff::compute(Algorithm::Histogram, &input);
            let sink = unified_diff::ConsumeBinaryHunk::new(String::new(), "\n");
            match UnifiedDiff::new(&diff, &input, sink, unified_diff::ContextSize::symmetrical(3)).consume() {
                Ok(hunks) => section.push_str(&hunks),
                Err(_) => section.push_str("Binary files differ\n"),
            }
        }
        if self.text.len() + section.len() > self.max {
            self.truncated = true;
        } else {
            self.text.push_str(&section);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::validate_rev;

    #[test]
    fn revisions_are_refs_or_ids_with_ancestry_suffixes() {
        for ok in [
            "HEAD",
            "main",
            "HEAD~2",
            "main^",
            "v1.0^2~3",
            "refs/heads/feature/x",
            "deadbeef",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_rev(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-",
            "-p",
            "--output=/tmp/x",
            "--all",
            "a..b",
            "HEAD@{1}",
            "HEAD:path",
            "a b",
            "a\u{0}",
            "HEAD~x",
            "~1",
            "x.lock",
            "/abs",
        ] {
            assert!(validate_rev(bad).is_err(), "{bad}");
        }
    }
}
