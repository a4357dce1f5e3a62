//! The reality check: every path a tool touches is resolved against the configured roots and
//! opened race-free beneath one of them.
//!
//! Rules (see docs/tools.md):
//! - a request path is absolute, or relative to the first root; it must not contain NUL nor
//!   exceed the length limits (total and per component);
//! - it must lie inside a root (or, when the caller is scoped, inside one of its prefixes),
//!   compared by path components so `/data_evil` is not inside `/data`;
//! - it is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to an
//!   `O_PATH` descriptor of that root, so neither `..` nor a symlink (absolute, relative, or a
//!   chain, even one swapped in concurrently) can lead outside: the kernel refuses with
//!   `EXDEV`. The first attempt adds `RESOLVE_NO_SYMLINKS`: when it succeeds (most paths) the
//!   opened file is the lexical path and needs no `readlink`; only a path through a symlink is
//!   opened again following it, and named by `/proc/self/fd`. Without `openat2` (`ENOSYS`) a
//!   component-by-component walk with `O_NOFOLLOW` refuses every symlink;
//! - devices, fifos and sockets are refused: the path is opened `O_PATH` first (never blocks,
//!   no driver side effects), `fstat`ed, and only then reopened for reading, `O_NONBLOCK`, and
//!   checked again to be the same inode (through `/proc/self/fd` when the path has a symlink,
//!   so the path is never resolved a second time).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::config::{ConfigError, Limits};
use crate::{CallScope, ToolError};

/// Retries of `openat2` when the kernel reports a concurrent rename (`EAGAIN`).
const OPENAT2_RETRIES: usize = 16;

/// A directory the tools may use: its canonical path and an `O_PATH` descriptor of it.
#[derive(Debug, Clone)]
pub(crate) struct Anchor {
    path: PathBuf,
    fd: Arc<OwnedFd>,
}

/// How a resolved path is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `O_PATH`: for `fstat` and as a base for `*at` calls; a file or a directory.
    Path,
    /// Readable regular file.
    ReadFile,
    /// Readable directory (listing, `fsync`, creating entries).
    Dir,
}

/// A path that passed the reality check, with its open descriptor.
#[derive(Debug)]
pub struct Resolved {
    /// The open descriptor (kind per [`Access`]).
    pub fd: OwnedFd,
    /// `fstat` of `fd`; a regular file or a directory.
    pub stat: Stat,
    /// The absolute name of the opened file at open time, for display: the physical path
    /// (symlinks inside the root resolved). A later rename does not change what was opened.
    pub path: PathBuf,
}

/// A parent directory opened for creating an entry in it.
#[derive(Debug)]
pub struct CreateTarget {
    /// The parent directory, opened readable (so it can be `fsync`ed).
    pub dir: Resolved,
    /// The single, plain final component to create or replace.
    pub name: OsString,
}

/// The configured roots, opened once, and the path rules.
#[derive(Debug)]
pub struct Reality {
    roots: Vec<Anchor>,
    max_path_bytes: usize,
    max_component_bytes: usize,
    use_openat2: bool,
}

impl Reality {
    /// Validates and opens the roots: each must exist, be a directory and not be a symlink
    /// itself. Stored canonical (absolute, no symlinked ancestors).
    pub fn new(roots: &[PathBuf], limits: &Limits) -> Result<Self, ConfigError> {
        if roots.is_empty() {
            return Err(ConfigError::NoRoots);
        }
        let roots = roots.iter().map(|r| open_root(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            roots,
            max_path_bytes: limits.max_path_bytes,
            max_component_bytes: limits.max_component_bytes,
            use_openat2: true,
        })
    }

    /// Uses the `O_NOFOLLOW` component walk instead of `openat2` (what happens automatically
    /// when the kernel lacks `openat2`); lets tests exercise that path on any kernel.
    #[must_use]
    pub fn with_component_walk(mut self) -> Self {
        self.use_openat2 = false;
        self
    }

    /// The canonical roots, in configuration order.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|a| a.path.as_path())
    }

    /// Resolves `path` and opens it for `access`. Refuses (with [`ToolError::RealityViolation`])
    /// anything outside the roots, through an escaping symlink, a device/fifo/socket, NUL or
    /// overlong; [`ToolError::Forbidden`] when it is inside a root but outside the caller's
    /// prefixes.
    pub fn open(&self, scope: &CallScope, path: &Path, access: Access) -> Result<Resolved, ToolError> {
        let (anchor, rel) = self.locate(scope, path)?;
        open_beneath(&anchor, &rel, path, access, self.use_openat2)
    }

    /// Resolves the parent of `path` (which must end in a plain name) for creating an entry in
    /// it. The parent passes the same check as [`Reality::open`].
    pub fn open_parent(&self, scope: &CallScope, path: &Path) -> Result<CreateTarget, ToolError> {
        self.check_text(path)?;
        let absolute = self.absolute(path);
        let name = match absolute.components().next_back() {
            Some(Component::Normal(name)) => name.to_os_string(),
            _ => {
                return Err(violation(path, "does not end in a file name (`.`, `..` or a root)"));
            }
        };
        let parent = absolute.parent().unwrap_or(Path::new("/"));
        let dir = self.open(scope, parent, Access::Dir)?;
        Ok(CreateTarget { dir, name })
    }

    /// Checks the text of a path: not empty, no NUL, within the length limits.
    pub fn check_text(&self, path: &Path) -> Result<(), ToolError> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(ToolError::InvalidParams("empty path".into()));
        }
        if bytes.contains(&0) {
            return Err(violation(path, "contains a NUL byte"));
        }
        if bytes.len() > self.max_path_bytes {
            return Err(violation(
                path,
                &format!("is {} bytes long; the limit is {}", bytes.len(), self.max_path_bytes),
            ));
        }
        if let Some(long) = bytes.split(|b| *b == b'/').find(|c| c.len() > self.max_component_bytes) {
            return Err(violation(
                path,
                &format!("has a {}-byte component; the limit is {}", long.len(), self.max_component_bytes),
            ));
        }
        Ok(())
    }

    fn absolute(&self, path: &Path) -> PathBuf {
        match self.roots.first() {
            Some(first) if !path.is_absolute() => first.path.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// Finds the anchor (root, or caller prefix) containing `path`, by components, and the
    /// path relative to it (still possibly containing `..`: the kernel resolves those).
    fn locate(&self, scope: &CallScope, path: &Path) -> Result<(Anchor, PathBuf), ToolError> {
        self.check_text(path)?;
        let absolute = self.absolute(path);
        let in_root = outermost(&self.roots, &absolute);
        let Some((root, _)) = in_root else {
            let roots: Vec<String> = self.roots.iter().map(|a| a.path.display().to_string()).collect();
            return Err(violation(path, &format!("is outside every configured root ({})", roots.join(", "))));
        };
        let Some(prefixes) = &scope.path_prefixes else {
            let rel = relative(&absolute, &root.path);
            return Ok((root.clone(), rel));
        };
        let anchors = self.scope_anchors(prefixes);
        match outermost(&anchors, &absolute) {
            Some((anchor, rel)) => Ok((anchor.clone(), rel)),
            None => {
                Err(ToolError::Forbidden(format!("{}: outside the path prefixes this caller may use", path.display())))
            }
        }
    }

    /// Opens each caller prefix beneath its root, refusing symlinks in it, so that later
    /// opens are beneath the prefix itself. A prefix that holds whole roots (`/`, a root's
    /// parent) grants those roots: what a caller may use is its prefixes intersected with the
    /// roots. Prefixes that are missing, not directories, reached through a symlink, or
    /// outside every root grant nothing.
    fn scope_anchors(&self, prefixes: &[PathBuf]) -> Vec<Anchor> {
        let mut anchors = Vec::new();
        for prefix in prefixes.iter().filter(|p| p.is_absolute() && self.check_text(p).is_ok()) {
            let Some(normal) = lexical_normal(prefix) else { continue };
            match outermost(&self.roots, &normal) {
                Some((root, rel)) => {
                    if let Ok(fd) = walk_no_symlinks(root.fd.as_fd(), &rel, OFlags::PATH | OFlags::DIRECTORY) {
                        anchors.push(Anchor { path: normal, fd: Arc::new(fd) });
                    }
                }
                None => anchors.extend(self.roots.iter().filter(|r| r.path.starts_with(&normal)).cloned()),
            }
        }
        anchors
    }
}

/// Validates one configured root and opens it `O_PATH`.
pub(crate) fn open_root(path: &Path) -> Result<Anchor, ConfigError> {
    let unreadable = |source| ConfigError::RootUnreadable { path: path.to_path_buf(), source };
    let meta = std::fs::symlink_metadata(path).map_err(unreadable)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(path).or_else(|_| std::fs::read_link(path)).map_err(unreadable)?;
        return Err(ConfigError::RootIsSymlink { path: path.to_path_buf(), target });
    }
    if !meta.is_dir() {
        return Err(ConfigError::RootNotDirectory { path: path.to_path_buf() });
    }
    let canonical = std::fs::canonicalize(path).map_err(unreadable)?;
    let fd = rustix::fs::open(
        &canonical,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| unreadable(e.into()))?;
    Ok(Anchor { path: canonical, fd: Arc::new(fd) })
}

/// A root-like directory (e.g. the exec work root) validated like a root: its canonical path.
pub(crate) fn validate_dir(path: &Path) -> Result<PathBuf, ConfigError> {
    open_root(path).map(|a| a.path)
}

/// The anchor with the shortest path containing `absolute` (by components), and the rest.
fn outermost<'a>(anchors: &'a [Anchor], absolute: &Path) -> Option<(&'a Anchor, PathBuf)> {
    anchors
        .iter()
        .filter(|a| absolute.starts_with(&a.path))
        .min_by_key(|a| a.path.components().count())
        .map(|a| (a, relative(absolute, &a.path)))
}

fn relative(absolute: &Path, base: &Path) -> PathBuf {
    absolute.strip_prefix(base).map(Path::to_path_buf).unwrap_or_default()
}

/// Removes `.` and folds `..`; `None` if `..` would climb above `/`. Only valid where no
/// symlink is followed (the component walk, and scope prefixes opened without symlinks).
fn lexical_normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

pub(crate) fn violation(path: &Path, reason: &str) -> ToolError {
    ToolError::RealityViolation(format!("{}: {reason}", path.display()))
}

/// How a path is resolved beneath its anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// `openat2` refusing every symlink: what opens is the lexical path, no `readlink` needed.
    /// Tried first, since most paths have no symlink.
    NoSymlinks,
    /// `openat2` following symlinks while they stay beneath the anchor. The readable open goes
    /// through `/proc/self/fd` of the `O_PATH` descriptor (the inode already checked, never the
    /// path again, which a swapped symlink could retarget), and so does the name.
    FollowBeneath,
    /// No `openat2`: the `O_NOFOLLOW` component walk (no symlink is ever followed).
    Walk,
}

fn open_beneath(
    anchor: &Anchor,
    rel: &Path,
    shown: &Path,
    access: Access,
    openat2: bool,
) -> Result<Resolved, ToolError> {
    let base = anchor.fd.as_fd();
    let open = |flags: OFlags, resolve: Resolve| match resolve {
        Resolve::Walk => walk(base, rel, flags),
        Resolve::NoSymlinks | Resolve::FollowBeneath => {
            match open2(base, rel, flags, resolve == Resolve::NoSymlinks) {
                // No openat2: the walk follows no symlink either, so the path stays the lexical one.
                Err(Errno::NOSYS) => walk(base, rel, flags),
                other => other,
            }
        }
    };
    let first = if openat2 { Resolve::NoSymlinks } else { Resolve::Walk };
    let (path_fd, resolve) = match open(OFlags::PATH, first) {
        Err(Errno::LOOP) if first == Resolve::NoSymlinks => {
            (open(OFlags::PATH, Resolve::FollowBeneath), Resolve::FollowBeneath)
        }
        other => (other, first),
    };
    let path_fd = path_fd.map_err(|e| errno_to_error(e, shown))?;
    let stat = check_kind(&path_fd, shown, access)?;
    let (fd, stat) = match access {
        Access::Path => (path_fd, stat),
        Access::ReadFile | Access::Dir => {
            let extra = if access == Access::Dir { OFlags::DIRECTORY } else { OFlags::empty() };
            let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | extra;
            let fd = match resolve {
                Resolve::FollowBeneath => reopen(&path_fd, flags).map_err(|e| match e {
                    // The descriptor is open, so a missing entry means a missing /proc.
                    Errno::NOENT => no_proc(shown, e),
                    other => errno_to_error(other, shown),
                })?,
                Resolve::NoSymlinks | Resolve::Walk => match open(flags, resolve) {
                    // Symlink-free a moment ago: one was swapped in.
                    Err(Errno::LOOP) if resolve == Resolve::NoSymlinks => Err(changed(shown)),
                    other => other.map_err(|e| errno_to_error(e, shown)),
                }?,
            };
            let again = check_kind(&fd, shown, access)?;
            if (again.st_dev, again.st_ino) != (stat.st_dev, stat.st_ino) {
                return Err(changed(shown));
            }
            (fd, again)
        }
    };
    let path = match resolve {
        Resolve::NoSymlinks | Resolve::Walk => lexical_beneath(&anchor.path, rel),
        Resolve::FollowBeneath => {
            let path = physical_path(&fd).map_err(|e| no_proc(shown, e))?;
            if !path.starts_with(&anchor.path) {
                return Err(violation(shown, &format!("resolves to {} outside its root", path.display())));
            }
            path
        }
    };
    Ok(Resolved { fd, stat, path })
}

/// `rel` with `.` and `..` folded, still relative; `None` if `..` climbs above its base.
fn fold_relative(rel: &Path) -> Option<PathBuf> {
    let normal = lexical_normal(&Path::new("/").join(rel))?;
    normal.strip_prefix("/").map(Path::to_path_buf).ok()
}

/// The path a resolution that followed no symlink opened: `anchor` and the folded `rel` (the
/// kernel has already refused any `..` above the anchor).
fn lexical_beneath(anchor: &Path, rel: &Path) -> PathBuf {
    match fold_relative(rel) {
        Some(rest) if !rest.as_os_str().is_empty() => anchor.join(rest),
        _ => anchor.to_path_buf(),
    }
}

fn changed(shown: &Path) -> ToolError {
    violation(shown, "changed while being opened (concurrent rename or symlink swap)")
}

/// `/proc/self/fd/N`: the kernel's handle on an open descriptor.
fn proc_fd(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens the very inode `path_fd` holds (no path resolution) with `flags`.
fn reopen(path_fd: &OwnedFd, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::open(proc_fd(path_fd), flags | OFlags::CLOEXEC, Mode::empty())
}

/// The kernel's name for an open descriptor (physical path).
fn physical_path(fd: &OwnedFd) -> Result<PathBuf, std::io::Error> {
    let path = std::fs::read_link(proc_fd(fd))?;
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(std::io::Error::other(format!("the kernel names it {}", path.display())))
    }
}

/// A path through a symlink needs `/proc/self/fd` to be opened and named safely.
fn no_proc(shown: &Path, e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(format!(
        "{}: goes through a symlink, and following it safely needs /proc/self/fd ({e}); mount /proc or use the symlink's target",
        shown.display()
    ))
}

/// `fstat` and refuse anything but a regular file or directory (and the kind `access` needs).
fn check_kind(fd: &OwnedFd, shown: &Path, access: Access) -> Result<Stat, ToolError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| ToolError::Failed(format!("fstat {}: {e}", shown.display())))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    let refused = match kind {
        FileType::RegularFile | FileType::Directory => None,
        FileType::Fifo => Some("is a fifo"),
        FileType::Socket => Some("is a socket"),
        FileType::CharacterDevice | FileType::BlockDevice => Some("is a device"),
        FileType::Symlink => Some("is a symlink (refused when symlinks cannot be followed safely)"),
        FileType::Unknown => Some("is of an unknown file type"),
    };
    if let Some(reason) = refused {
        return Err(violation(shown, reason));
    }
    match (access, kind) {
        (Access::ReadFile, FileType::Directory) => {
            Err(ToolError::InvalidParams(format!("{} is a directory, not a file", shown.display())))
        }
        (Access::Dir, FileType::RegularFile) => {
            Err(ToolError::InvalidParams(format!("{} is a file, not a directory", shown.display())))
        }
        _ => Ok(stat),
    }
}

fn open2(base: BorrowedFd<'_>, rel: &Path, flags: OFlags, no_symlinks: bool) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    if no_symlinks {
        resolve |= ResolveFlags::NO_SYMLINKS;
    }
    let mut last = Errno::AGAIN;
    for _ in 0..OPENAT2_RETRIES {
        match rustix::fs::openat2(base, rel, flags | OFlags::CLOEXEC, Mode::empty(), resolve) {
            Err(e @ (Errno::AGAIN | Errno::INTR)) => last = e,
            other => return other,
        }
    }
    Err(last)
}

/// The fallback without `openat2`: `..` folded lexically (refused above the base), then one
/// `openat(O_NOFOLLOW)` per component, so no symlink is ever followed.
fn walk(base: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    walk_no_symlinks(base, &fold_relative(rel).ok_or(Errno::XDEV)?, flags)
}

/// Opens a `..`-free relative path one component at a time with `O_NOFOLLOW`; `ELOOP` on a
/// symlink anywhere, including the last component.
fn walk_no_symlinks(base: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let names: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(Errno::XDEV)),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, dirs)) = names.split_last() else {
        return rustix::fs::openat(base, ".", flags | OFlags::CLOEXEC, Mode::empty());
    };
    let mut current: Option<OwnedFd> = None;
    for name in dirs {
        let at = current.as_ref().map_or(base, |fd| fd.as_fd());
        let next = match rustix::fs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            // O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR: report it as the symlink it is.
            Err(Errno::NOTDIR) if is_symlink(at, name) => return Err(Errno::LOOP),
            other => other?,
        };
        // O_PATH|O_NOFOLLOW opens a symlink itself instead of failing: refuse it here.
        if FileType::from_raw_mode(rustix::fs::fstat(&next)?.st_mode) != FileType::Directory {
            return Err(Errno::LOOP);
        }
        current = Some(next);
    }
    let at = current.as_ref().map_or(base, |fd| fd.as_fd());
    let fd = rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
        return Err(Errno::LOOP);
    }
    Ok(fd)
}

fn is_symlink(at: BorrowedFd<'_>, name: &OsStr) -> bool {
    rustix::fs::statat(at, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

fn errno_to_error(e: Errno, shown: &Path) -> ToolError {
    match e {
        Errno::XDEV => violation(
            shown,
            "resolves outside its root (through `..` or a symlink; absolute symlinks are never followed)",
        ),
        Errno::LOOP => violation(
            shown,
            "passes through a symlink that cannot be followed safely (a loop, a /proc magic link, or any symlink without openat2)",
        ),
        Errno::NAMETOOLONG => violation(shown, "is too long for the file system"),
        Errno::NXIO => violation(shown, "is a socket or a device without a driver"),
        Errno::NOENT => ToolError::NotFound(format!("{}: no such file or directory", shown.display())),
        Errno::NOTDIR => ToolError::NotFound(format!("{}: a component is not a directory", shown.display())),
        other => ToolError::Failed(format!("opening {}: {other}", shown.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_normal_folds_and_refuses_climbing_out() {
        assert_eq!(lexical_normal(Path::new("/a/./b/../c")), Some(PathBuf::from("/a/c")));
        assert_eq!(lexical_normal(Path::new("/a/../..")), None);
        assert_eq!(lexical_normal(Path::new("/..")), None);
    }

    #[test]
    fn lexical_beneath_folds_below_the_anchor_and_never_appends_a_slash() {
        let anchor = Path::new("/data");
        assert_eq!(lexical_beneath(anchor, Path::new("")), PathBuf::from("/data"));
        assert_eq!(lexical_beneath(anchor, Path::new("a/..")), PathBuf::from("/data"));
        assert_eq!(lexical_beneath(anchor, Path::new("a/../b/./c")), PathBuf::from("/data/b/c"));
        assert_eq!(fold_relative(Path::new("a/../../b")), None);
    }

    #[test]
    fn prefix_match_is_by_component() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir(&root).unwrap();
        let anchors = vec![open_root(&root).unwrap()];
        let canonical = std::fs::canonicalize(&root).unwrap();
        let evil = PathBuf::from(format!("{}_evil/x", canonical.display()));
        assert!(outermost(&anchors, &evil).is_none());
        assert!(outermost(&anchors, &canonical.join("x")).is_some());
    }
}
