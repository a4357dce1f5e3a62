//! Worknode identities (UUID v7) and hierarchical paths (`/acme/research`) used for capability scoping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::PathError;

/// A worknode's identity: a UUID v7 (time-ordered, so ids sort by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorknodeId(Uuid);

impl WorknodeId {
    /// A fresh UUID v7.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The nil UUID (the root worknode's id on every node).
    pub const fn nil() -> Self {
        Self(Uuid::nil())
    }

    /// The 16 bytes (big-endian UUID layout), as stored in the event store.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// From 16 bytes as produced by [`WorknodeId::to_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl Default for WorknodeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for WorknodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for WorknodeId {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self).map_err(|_| PathError::BadId(s.to_owned()))
    }
}

/// A position in the worknode tree: `/` or `/seg/seg/...`. Segments are 1..=64 bytes of
/// `[A-Za-z0-9._-]` (never `.` or `..`), so a path can be embedded in datalog without escaping.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WnPath(String);

/// Longest accepted segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 64;

impl WnPath {
    /// The root `/`.
    pub fn root() -> Self {
        Self("/".to_owned())
    }

    /// Checks one path segment.
    pub fn check_segment(seg: &str) -> Result<(), PathError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if seg.is_empty() || seg.len() > MAX_SEGMENT_LEN || seg == "." || seg == ".." || !seg.chars().all(ok_char) {
            return Err(PathError::BadSegment(seg.to_owned()));
        }
        Ok(())
    }

    /// This path with one more segment.
    pub fn child(&self, seg: &str) -> Result<Self, PathError> {
        Self::check_segment(seg)?;
        Ok(if self.is_root() { Self(format!("/{seg}")) } else { Self(format!("{}/{seg}", self.0)) })
    }

    /// Whether this is `/`.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, root first (empty for `/`).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Number of segments (`/` is 0).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The parent path and last segment (`None` for `/`).
    pub fn split_last(&self) -> Option<(WnPath, &str)> {
        let idx = self.0.rfind('/')?;
        let last = self.0.get(idx + 1..)?;
        if last.is_empty() {
            return None;
        }
        let parent = if idx == 0 { Self::root() } else { Self(self.0.get(..idx)?.to_owned()) };
        Some((parent, last))
    }

    /// Whether `self` is `scope` or lies below it, compared segment by segment
    /// (so `/acme/research2` is *not* within `/acme/research`).
    pub fn is_within(&self, scope: &WnPath) -> bool {
        let mut mine = self.segments();
        scope.segments().all(|s| mine.next() == Some(s))
    }

    /// This path and every ancestor, `/` first.
    pub fn ancestors_and_self(&self) -> Vec<WnPath> {
        let mut out = vec![Self::root()];
        let mut cur = Self::root();
        for seg in self.segments() {
            cur = Self(if cur.is_root() { format!("/{seg}") } else { format!("{}/{seg}", cur.0) });
            out.push(cur.clone());
        }
        out
    }
}

impl FromStr for WnPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with('/') {
            return Err(PathError::NotAbsolute(s.to_owned()));
        }
        if s == "/" {
            return Ok(Self::root());
        }
        // One trailing slash is tolerated; any other empty segment is not.
        let body = s.strip_suffix('/').unwrap_or(s);
        let mut path = Self::root();
        for seg in body.split('/').skip(1) {
            path = path.child(seg)?;
        }
        Ok(path)
    }
}

impl TryFrom<String> for WnPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WnPath> for String {
    fn from(p: WnPath) -> String {
        p.0
    }
}

impl fmt::Display for WnPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> WnPath {
        s.parse().unwrap()
    }

    #[test]
    fn within_compares_whole_segments() {
        assert!(p("/acme/research").is_within(&p("/acme/research")));
        assert!(p("/acme/research/x").is_within(&p("/acme/research")));
        assert!(!p("/acme/research2").is_within(&p("/acme/research")));
        assert!(!p("/acme/sales").is_within(&p("/acme/research")));
        assert!(!p("/acme").is_within(&p("/acme/research")));
        assert!(p("/anything").is_within(&WnPath::root()));
    }

    #[test]
    fn parse_rejects_bad_paths() {
        for bad in ["", "acme", "//", "/a//b", "/a/../b", "/a b", "/./x"] {
            assert!(bad.parse::<WnPath>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(p("/a/b/").as_str(), "/a/b");
        assert_eq!(p("/").depth(), 0);
        assert_eq!(p("/a/b").split_last().unwrap(), (p("/a"), "b"));
        assert_eq!(p("/a").split_last().unwrap(), (WnPath::root(), "a"));
        assert_eq!(p("/a/b").ancestors_and_self(), vec![p("/"), p("/a"), p("/a/b")]);
    }
}
