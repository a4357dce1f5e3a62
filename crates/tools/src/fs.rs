//! File tools: `fs_read`, `fs_write`, `fs_list`, `fs_stat`, `fs_search`.
//!
//! Every path goes through [`Reality`]; every descriptor used afterwards is one it returned,
//! and new names are created with `*at` calls relative to a directory it opened, so nothing
//! is looked up by path string twice.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, Stat};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Limits;
use crate::reality::{Access, Reality};
use crate::util::{NATIVE, READ_ONLY, check_deadline, output, params, spec, to_value};
use crate::{CallScope, SharedTool, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};

/// The five file tools over one set of roots.
pub fn tools(reality: &Arc<Reality>, limits: &Limits) -> Vec<SharedTool> {
    vec![
        Arc::new(FsRead::new(reality.clone(), limits)),
        Arc::new(FsWrite::new(reality.clone(), limits)),
        Arc::new(FsList::new(reality.clone(), limits)),
        Arc::new(FsStat::new(reality.clone())),
        Arc::new(FsSearch::new(reality.clone(), limits)),
    ]
}

fn path_schema(description: &str) -> Value {
    json!({ "type": "string", "minLength": 1, "description": description })
}

const PATH_DOC: &str = "Absolute path inside a configured root, or relative to the first root.";

/// `"file"` or `"dir"` etc. for a `stat` mode.
fn kind_name(mode: u32) -> &'static str {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        _ => "other",
    }
}

fn size_of(stat: &Stat) -> u64 {
    u64::try_from(stat.st_size).unwrap_or(0)
}

fn io_failed(what: &str, path: &Path, e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(format!("{what} {}: {e}", path.display()))
}

/// How file content travels in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    /// The bytes are valid UTF-8 and sent as is.
    #[default]
    Utf8,
    /// Standard base64 with padding.
    Base64,
}

/// `fs_read`: a file's content, as text when it is UTF-8, else base64.
pub struct FsRead {
    reality: Arc<Reality>,
    max_bytes: u64,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    path: String,
    #[serde(default)]
    offset: u64,
    length: Option<u64>,
}

#[derive(Serialize)]
struct ReadResult {
    path: PathBuf,
    size: u64,
    offset: u64,
    length: u64,
    encoding: Encoding,
    content: String,
    eof: bool,
}

impl FsRead {
    /// `fs_read` over `reality`, returning at most `limits.max_read_bytes` per call.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_read_bytes;
        let spec = spec(
            "fs_read",
            &format!(
                "Reads a regular file inside the roots (at most {max} bytes per call; use offset/length for more). UTF-8 content is returned as text, anything else as base64."
            ),
            json!({
                "type": "object",
                "properties": {
                    "path": path_schema(PATH_DOC),
                    "offset": { "type": "integer", "minimum": 0, "default": 0 },
                    "length": { "type": "integer", "minimum": 0, "maximum": max }
                },
                "required": ["path"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "size": { "type": "integer", "description": "whole file size" },
                    "offset": { "type": "integer" },
                    "length": { "type": "integer", "description": "bytes returned" },
                    "encoding": { "enum": ["utf8", "base64"] },
                    "content": { "type": "string" },
                    "eof": { "type": "boolean" }
                },
                "required": ["path", "size", "offset", "length", "encoding", "content", "eof"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_bytes: max, spec }
    }
}

impl Tool for FsRead {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: ReadParams = params(params_json)?;
        let resolved = self.reality.open(scope, Path::new(&p.path), Access::ReadFile)?;
        let size = size_of(&resolved.stat);
        let available = size.saturating_sub(p.offset);
        let want = match p.length {
            Some(length) if length > self.max_bytes => {
                return Err(ToolError::TooLarge(format!(
                    "length {length} exceeds the {} byte read limit; read in smaller pieces",
                    self.max_bytes
                )));
            }
            Some(length) => length.min(available),
            None if available > self.max_bytes => {
                return Err(ToolError::TooLarge(format!(
                    "{} has {available} bytes from offset {}; the read limit is {}: pass offset and length",
                    resolved.path.display(),
                    p.offset,
                    self.max_bytes
                )));
            }
            None => available,
        };
        let file = File::from(resolved.fd);
        let mut buf = vec![0u8; usize::try_from(want).unwrap_or(0)];
        let mut got = 0usize;
        while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
            let n = file
                .read_at(rest, p.offset.saturating_add(got as u64))
                .map_err(|e| io_failed("reading", &resolved.path, e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        let (encoding, content) = match String::from_utf8(buf) {
            Ok(text) => (Encoding::Utf8, text),
            Err(e) => (Encoding::Base64, BASE64.encode(e.into_bytes())),
        };
        let result = ReadResult {
            path: resolved.path,
            size,
            offset: p.offset,
            length: got as u64,
            encoding,
            content,
            eof: p.offset.saturating_add(got as u64) >= size,
        };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

/// `fs_write`: atomic create-only or overwrite of a regular file.
pub struct FsWrite {
    reality: Arc<Reality>,
    max_bytes: u64,
    spec: ToolSpec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WriteMode {
    #[default]
    Create,
    Overwrite,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    path: String,
    content: String,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default)]
    mode: WriteMode,
}

#[derive(Serialize)]
struct WriteResult {
    path: PathBuf,
    bytes_written: u64,
    created: bool,
}

/// Distinguishes temporary files of concurrent writes in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FsWrite {
    /// `fs_write` over `reality`, writing at most `limits.max_write_bytes` per call.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_write_bytes;
        let spec = spec(
            "fs_write",
            &format!(
                "Writes a file inside the roots atomically (temporary file, fsync, rename). mode \"create\" (default) never replaces an existing file; \"overwrite\" replaces it. At most {max} bytes."
            ),
            json!({
                "type": "object",
                "properties": {
                    "path": path_schema(PATH_DOC),
                    "content": { "type": "string" },
                    "encoding": { "enum": ["utf8", "base64"], "default": "utf8" },
                    "mode": { "enum": ["create", "overwrite"], "default": "create" }
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "bytes_written": { "type": "integer" },
                    "created": { "type": "boolean", "description": "false when an existing file was replaced" }
                },
                "required": ["path", "bytes_written", "created"]
            }),
            ToolAnnotations { read_only: false, destructive: true, idempotent: true, open_world: false },
            NATIVE,
        );
        Self { reality, max_bytes: max, spec }
    }
}

impl Tool for FsWrite {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: WriteParams = params(params_json)?;
        let bytes = match p.encoding {
            Encoding::Utf8 => p.content.into_bytes(),
            Encoding::Base64 => BASE64
                .decode(p.content.as_bytes())
                .map_err(|e| ToolError::InvalidParams(format!("content is not valid base64: {e}")))?,
        };
        if bytes.len() as u64 > self.max_bytes {
            return Err(ToolError::TooLarge(format!(
                "{} bytes exceed the {} byte write limit",
                bytes.len(),
                self.max_bytes
            )));
        }
        let target = self.reality.open_parent(scope, Path::new(&p.path))?;
        let dir = target.dir.fd.as_fd();
        let shown = target.dir.path.join(&target.name);
        let existing = match rustix::fs::statat(dir, &target.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Some(stat),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(io_failed("inspecting", &shown, e)),
        };
        let mode = match existing {
            Some(_) if p.mode == WriteMode::Create => {
                return Err(ToolError::AlreadyExists(format!(
                    "{} exists; pass mode \"overwrite\" to replace it",
                    shown.display()
                )));
            }
            Some(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
                return Err(ToolError::InvalidParams(format!("{} is a directory", shown.display())));
            }
            Some(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile => {
                Mode::from_raw_mode(stat.st_mode & 0o777)
            }
            _ => Mode::from_raw_mode(0o644),
        };
        let (temp_name, temp) = create_temp(&target.dir.fd, mode, &shown)?;
        let committed = write_and_sync(temp, &bytes, &shown)
            .and_then(|()| commit(&target.dir.fd, &temp_name, &target.name, p.mode, &shown));
        if committed.is_err() {
            // Best effort: the temporary name is ours alone; a failure leaves nothing else behind.
            let _ = rustix::fs::unlinkat(dir, &temp_name, AtFlags::empty());
        }
        committed?;
        rustix::fs::fsync(dir).map_err(|e| io_failed("syncing the directory of", &shown, e))?;
        let result = WriteResult { path: shown, bytes_written: bytes.len() as u64, created: existing.is_none() };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

/// Creates a fresh temporary file in `dir` (`O_EXCL`, so never an existing name or symlink).
fn create_temp(dir: &OwnedFd, mode: Mode, shown: &Path) -> Result<(String, File), ToolError> {
    let mut last = Errno::EXIST;
    for _ in 0..16 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(".referee-write-{}-{n}.tmp", std::process::id());
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(dir, name.as_str(), flags, mode) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(Errno::EXIST) => last = Errno::EXIST,
            Err(e) => return Err(io_failed("creating a temporary file next to", shown, e)),
        }
    }
    Err(io_failed("creating a temporary file next to", shown, last))
}

fn write_and_sync(mut file: File, bytes: &[u8], shown: &Path) -> Result<(), ToolError> {
    file.write_all(bytes).map_err(|e| io_failed("writing", shown, e))?;
    file.sync_all().map_err(|e| io_failed("syncing", shown, e))
}

/// Moves the temporary file into place: `renameat2(RENAME_NOREPLACE)` for create-only (or
/// `linkat`, which never replaces, where the file system lacks it), plain `renameat` otherwise.
fn commit(dir: &OwnedFd, temp: &str, name: &OsStr, mode: WriteMode, shown: &Path) -> Result<(), ToolError> {
    let exists = || ToolError::AlreadyExists(format!("{} was created concurrently", shown.display()));
    match mode {
        WriteMode::Overwrite => {
            rustix::fs::renameat(dir, temp, dir, name).map_err(|e| io_failed("renaming into", shown, e))
        }
        WriteMode::Create => match rustix::fs::renameat_with(dir, temp, dir, name, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => Err(exists()),
            Err(Errno::INVAL | Errno::NOSYS) => match rustix::fs::linkat(dir, temp, dir, name, AtFlags::empty()) {
                Ok(()) => rustix::fs::unlinkat(dir, temp, AtFlags::empty())
                    .map_err(|e| io_failed("removing the temporary file of", shown, e)),
                Err(Errno::EXIST) => Err(exists()),
                Err(e) => Err(io_failed("linking into", shown, e)),
            },
            Err(e) => Err(io_failed("renaming into", shown, e)),
        },
    }
}

/// `fs_list`: the entries of a directory, bounded.
pub struct FsList {
    reality: Arc<Reality>,
    max_entries: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default = "dot")]
    path: String,
}

fn dot() -> String {
    ".".to_owned()
}

#[derive(Serialize)]
struct Entry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
}

#[derive(Serialize)]
struct ListResult {
    path: PathBuf,
    entries: Vec<Entry>,
    truncated: bool,
}

fn entry_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string" },
            "type": { "enum": ["file", "dir", "symlink", "other"] },
            "size": { "type": "integer" }
        },
        "required": ["name", "type", "size"]
    })
}

impl FsList {
    /// `fs_list` over `reality`, returning at most `limits.max_list_entries` entries.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let max = limits.max_list_entries;
        let spec = spec(
            "fs_list",
            &format!(
                "Lists a directory inside the roots (at most {max} entries, sorted by name; symlinks are reported, not followed)."
            ),
            json!({
                "type": "object",
                "properties": { "path": path_schema(&format!("{PATH_DOC} Default: the first root.")) },
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "entries": { "type": "array", "items": entry_schema() },
                    "truncated": { "type": "boolean" }
                },
                "required": ["path", "entries", "truncated"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_entries: max, spec }
    }
}

/// The names in a directory (without `.` and `..`) with their `d_type`, at most `limit` of
/// them so a huge directory costs bounded memory.
fn read_dir(fd: &OwnedFd, shown: &Path, limit: usize) -> Result<Vec<(Vec<u8>, FileType)>, ToolError> {
    let dir = Dir::read_from(fd).map_err(|e| io_failed("listing", shown, e))?;
    let mut names = Vec::new();
    for entry in dir {
        if names.len() >= limit {
            break;
        }
        let entry = entry.map_err(|e| io_failed("listing", shown, e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push((name.to_vec(), entry.file_type()));
        }
    }
    Ok(names)
}

impl Tool for FsList {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: ListParams = params(params_json)?;
        let dir = self.reality.open(scope, Path::new(&p.path), Access::Dir)?;
        // One more than the limit tells whether the listing was cut.
        let names = read_dir(&dir.fd, &dir.path, self.max_entries.saturating_add(1))?;
        let truncated = names.len() > self.max_entries;
        let mut entries: Vec<Entry> = names
            .into_iter()
            .take(self.max_entries)
            .filter_map(|(name, _)| {
                // Entries removed since the listing are skipped.
                let stat = rustix::fs::statat(&dir.fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
                Some(Entry {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    kind: kind_name(stat.st_mode),
                    size: size_of(&stat),
                })
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let result = ListResult { path: dir.path, entries, truncated };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

/// `fs_stat`: type, size, permissions and modification time.
pub struct FsStat {
    reality: Arc<Reality>,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatParams {
    path: String,
}

#[derive(Serialize)]
struct StatResult {
    path: PathBuf,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    mode: u32,
    modified_secs: i64,
    modified_nanos: u32,
}

impl FsStat {
    /// `fs_stat` over `reality`.
    pub fn new(reality: Arc<Reality>) -> Self {
        let spec = spec(
            "fs_stat",
            "Describes a file or directory inside the roots: type, size, permission bits, modification time.",
            json!({
                "type": "object",
                "properties": { "path": path_schema(PATH_DOC) },
                "required": ["path"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "type": { "enum": ["file", "dir"] },
                    "size": { "type": "integer" },
                    "mode": { "type": "integer", "description": "permission bits, e.g. 420 = 0o644" },
                    "modified_secs": { "type": "integer", "description": "Unix time" },
                    "modified_nanos": { "type": "integer" }
                },
                "required": ["path", "type", "size", "mode", "modified_secs", "modified_nanos"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, spec }
    }
}

impl Tool for FsStat {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: StatParams = params(params_json)?;
        let r = self.reality.open(scope, Path::new(&p.path), Access::Path)?;
        let result = StatResult {
            kind: kind_name(r.stat.st_mode),
            size: size_of(&r.stat),
            mode: r.stat.st_mode & 0o7777,
            modified_secs: r.stat.st_mtime,
            modified_nanos: u32::try_from(r.stat.st_mtime_nsec).unwrap_or(0),
            path: r.path,
        };
        Ok(output(to_value(&result)?, NATIVE))
    }
}

/// `fs_search`: files whose path (relative to the base) matches a glob; a bounded walk that
/// opens every directory `O_NOFOLLOW` relative to its parent, so it never leaves the base.
pub struct FsSearch {
    reality: Arc<Reality>,
    max_results: usize,
    max_visited: usize,
    spec: ToolSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    #[serde(default = "dot")]
    path: String,
    pattern: String,
    max_results: Option<usize>,
    #[serde(default)]
    include_dirs: bool,
}

#[derive(Serialize)]
struct SearchResult {
    path: PathBuf,
    matches: Vec<Entry>,
    truncated: bool,
    visited: usize,
}

impl FsSearch {
    /// `fs_search` over `reality`, bounded by `limits.max_search_results` and
    /// `limits.max_search_visited`.
    pub fn new(reality: Arc<Reality>, limits: &Limits) -> Self {
        let (max_results, max_visited) = (limits.max_search_results, limits.max_search_visited);
        let spec = spec(
            "fs_search",
            &format!(
                "Finds files under a directory whose path relative to it matches a glob (`*` stays within a path segment, `**` crosses them). Never follows symlinks; stops after {max_results} matches or {max_visited} visited entries."
            ),
            json!({
                "type": "object",
                "properties": {
                    "path": path_schema(&format!("Directory to search. {PATH_DOC} Default: the first root.")),
                    "pattern": { "type": "string", "minLength": 1, "description": "glob, e.g. \"**/*.rs\"" },
                    "max_results": { "type": "integer", "minimum": 1, "maximum": max_results },
                    "include_dirs": { "type": "boolean", "default": false }
                },
                "required": ["pattern"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "matches": { "type": "array", "items": entry_schema() },
                    "truncated": { "type": "boolean" },
                    "visited": { "type": "integer" }
                },
                "required": ["path", "matches", "truncated", "visited"]
            }),
            READ_ONLY,
            NATIVE,
        );
        Self { reality, max_results, max_visited, spec }
    }
}

impl Tool for FsSearch {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let p: SearchParams = params(params_json)?;
        let glob = globset::GlobBuilder::new(&p.pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| ToolError::InvalidParams(format!("pattern: {e}")))?
            .compile_matcher();
        let max_results = p.max_results.unwrap_or(self.max_results).min(self.max_results);
        let base = self.reality.open(scope, Path::new(&p.path), Access::Dir)?;
        // Pending directories: (parent descriptor, path relative to the base, name). Opening
        // lazily keeps the number of open descriptors near the depth, not the width.
        let mut pending: Vec<(Arc<OwnedFd>, PathBuf, Option<Vec<u8>>)> =
            vec![(Arc::new(base.fd), PathBuf::new(), None)];
        let mut matches = Vec::new();
        let mut visited = 0usize;
        let mut truncated = false;
        'walk: while let Some((parent, rel, name)) = pending.pop() {
            check_deadline(scope, "fs_search")?;
            let dir = match name {
                None => parent,
                Some(name) => {
                    let flags =
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
                    match rustix::fs::openat(&*parent, name.as_slice(), flags, Mode::empty()) {
                        Ok(fd) => Arc::new(fd),
                        // Replaced, removed or unreadable since it was listed: skip it.
                        Err(_) => continue,
                    }
                }
            };
            let budget = self.max_visited.saturating_sub(visited).saturating_add(1);
            let entries = match read_dir(&dir, &base.path.join(&rel), budget) {
                Ok(entries) => entries,
                // Only the base directory must be readable; an unreadable subdirectory is skipped.
                Err(e) if rel.as_os_str().is_empty() => return Err(e),
                Err(_) => continue,
            };
            for (name, d_type) in entries {
                visited += 1;
                if visited > self.max_visited || matches.len() >= max_results {
                    truncated = true;
                    break 'walk;
                }
                let child = rel.join(OsStr::from_bytes(&name));
                let kind = match d_type {
                    FileType::Unknown => rustix::fs::statat(&*dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_or(FileType::Unknown, |s| FileType::from_raw_mode(s.st_mode)),
                    known => known,
                };
                let wanted = kind == FileType::RegularFile || (p.include_dirs && kind == FileType::Directory);
                if wanted && glob.is_match(&child) {
                    let size = rustix::fs::statat(&*dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_or(0, |s| size_of(&s));
                    let kind = if kind == FileType::Directory { "dir" } else { "file" };
                    matches.push(Entry { name: child.to_string_lossy().into_owned(), kind, size });
                }
                if kind == FileType::Directory {
                    pending.push((dir.clone(), child, Some(name)));
                }
            }
        }
        matches.sort_by(|a, b| a.name.cmp(&b.name));
        let result = SearchResult { path: base.path, matches, truncated, visited };
        Ok(output(to_value(&result)?, NATIVE))
    }
}
