//! A worknode's state: named CRDT fields. Operations ([`Op`]) turn into deltas ([`Delta`]); a delta
//! is exactly what an event records and what replication ships.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::crdt::{Admitted, Authored, GCounter, Lattice, LwwRegister, MvRegister, OrMap, OrSet, PnCounter, ReplicaId};
use crate::error::StateError;

/// One CRDT value of a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Crdt {
    /// Grow-only counter.
    GCounter(GCounter),
    /// Increment/decrement counter.
    PnCounter(PnCounter),
    /// Last-writer-wins register of text.
    Lww(LwwRegister<String>),
    /// Multi-value register of text.
    Mv(MvRegister<String>),
    /// Observed-remove set of text.
    Set(OrSet<String>),
    /// Observed-remove map from text to last-writer-wins text.
    Map(OrMap<String, LwwRegister<String>>),
}

impl Crdt {
    fn kind(&self) -> &'static str {
        match self {
            Crdt::GCounter(_) => "gcounter",
            Crdt::PnCounter(_) => "pncounter",
            Crdt::Lww(_) => "lww",
            Crdt::Mv(_) => "mv",
            Crdt::Set(_) => "set",
            Crdt::Map(_) => "map",
        }
    }

    /// Joins `other` (same kind) into `self`; returns whether `self` changed.
    fn merge(&mut self, other: &Crdt) -> Result<bool, StateError> {
        Ok(match (self, other) {
            (Crdt::GCounter(a), Crdt::GCounter(b)) => a.merge_changed(b),
            (Crdt::PnCounter(a), Crdt::PnCounter(b)) => a.merge_changed(b),
            (Crdt::Lww(a), Crdt::Lww(b)) => a.merge_changed(b),
            (Crdt::Mv(a), Crdt::Mv(b)) => a.merge_changed(b),
            (Crdt::Set(a), Crdt::Set(b)) => a.merge_changed(b),
            (Crdt::Map(a), Crdt::Map(b)) => a.merge_changed(b),
            (a, b) => return Err(StateError::TypeMismatch { have: a.kind(), got: b.kind() }),
        })
    }

    /// Whether `other` gives an update this value holds another value (see
    /// [`Lattice::equivocates`]).
    fn equivocates(&self, other: &Crdt) -> bool {
        match (self, other) {
            (Crdt::Lww(a), Crdt::Lww(b)) => a.equivocates(b),
            (Crdt::Mv(a), Crdt::Mv(b)) => a.equivocates(b),
            (Crdt::Set(a), Crdt::Set(b)) => a.equivocates(b),
            (Crdt::Map(a), Crdt::Map(b)) => a.equivocates(b),
            _ => false,
        }
    }

    /// Whether this is the empty value of its kind (nothing written).
    fn is_bottom(&self) -> bool {
        match self {
            Crdt::GCounter(c) => *c == GCounter::default(),
            Crdt::PnCounter(c) => *c == PnCounter::default(),
            Crdt::Lww(r) => *r == LwwRegister::default(),
            Crdt::Mv(r) => *r == MvRegister::default(),
            Crdt::Set(r) => *r == OrSet::default(),
            Crdt::Map(r) => *r == OrMap::default(),
        }
    }

    /// The part of `self` (sent by replica `author`) a replica holding `local` merges: see
    /// [`Authored::admit`]. `local` of another kind counts as empty (the merge refuses it).
    fn admit(&self, author: ReplicaId, local: Option<&Crdt>) -> Admitted<Crdt> {
        fn lift<T: Authored>(mine: &T, author: ReplicaId, local: Option<&T>, wrap: fn(T) -> Crdt) -> Admitted<Crdt> {
            let a = mine.admit(author, local.unwrap_or(&T::default()));
            Admitted { value: wrap(a.value), foreign: a.foreign, unseen: a.unseen }
        }
        match self {
            Crdt::GCounter(c) => lift(
                c,
                author,
                local.and_then(|l| if let Crdt::GCounter(l) = l { Some(l) } else { None }),
                Crdt::GCounter,
            ),
            Crdt::PnCounter(c) => lift(
                c,
                author,
                local.and_then(|l| if let Crdt::PnCounter(l) = l { Some(l) } else { None }),
                Crdt::PnCounter,
            ),
            Crdt::Lww(r) => {
                lift(r, author, local.and_then(|l| if let Crdt::Lww(l) = l { Some(l) } else { None }), Crdt::Lww)
            }
            Crdt::Mv(r) => {
                lift(r, author, local.and_then(|l| if let Crdt::Mv(l) = l { Some(l) } else { None }), Crdt::Mv)
            }
            Crdt::Set(r) => {
                lift(r, author, local.and_then(|l| if let Crdt::Set(l) = l { Some(l) } else { None }), Crdt::Set)
            }
            Crdt::Map(r) => {
                lift(r, author, local.and_then(|l| if let Crdt::Map(l) = l { Some(l) } else { None }), Crdt::Map)
            }
        }
    }

    /// `author`'s dots held out of order: now, and with `other` (same kind) merged.
    fn gaps_of(&self, author: ReplicaId, other: &Crdt) -> (usize, usize) {
        match (self, other) {
            (Crdt::Mv(a), Crdt::Mv(b)) => a.gaps_of(author, b),
            (Crdt::Set(a), Crdt::Set(b)) => a.gaps_of(author, b),
            (Crdt::Map(a), Crdt::Map(b)) => a.gaps_of(author, b),
            _ => (0, 0),
        }
    }

    /// The latest write timestamp held (see [`Authored::latest`]).
    fn latest(&self) -> u64 {
        match self {
            Crdt::Lww(r) => r.latest(),
            Crdt::Map(m) => m.latest(),
            Crdt::GCounter(_) | Crdt::PnCounter(_) | Crdt::Mv(_) | Crdt::Set(_) => 0,
        }
    }

    /// Dots held out of order (see [`OrSet::gaps`]); 0 for kinds without dots.
    fn gaps(&self) -> usize {
        match self {
            Crdt::Mv(r) => r.gaps(),
            Crdt::Set(r) => r.gaps(),
            Crdt::Map(r) => r.gaps(),
            Crdt::GCounter(_) | Crdt::PnCounter(_) | Crdt::Lww(_) => 0,
        }
    }

    /// The empty value of this kind.
    fn bottom(&self) -> Crdt {
        match self {
            Crdt::GCounter(_) => Crdt::GCounter(GCounter::default()),
            Crdt::PnCounter(_) => Crdt::PnCounter(PnCounter::default()),
            Crdt::Lww(_) => Crdt::Lww(LwwRegister::default()),
            Crdt::Mv(_) => Crdt::Mv(MvRegister::default()),
            Crdt::Set(_) => Crdt::Set(OrSet::default()),
            Crdt::Map(_) => Crdt::Map(OrMap::default()),
        }
    }

    /// The value as JSON (for queries, the CLI and the gateway).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Crdt::GCounter(c) => json!(c.value()),
            Crdt::PnCounter(c) => json!(c.value()),
            Crdt::Lww(r) => json!(r.get()),
            Crdt::Mv(r) => json!(r.values()),
            Crdt::Set(s) => json!(s.elements()),
            Crdt::Map(m) => {
                serde_json::Value::Object(m.entries().into_iter().map(|(k, v)| (k.clone(), json!(v.get()))).collect())
            }
        }
    }
}

/// An operation on one field. The field is created with the operation's CRDT kind on first use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// Grow-only counter: add `n`.
    Grow(u64),
    /// PN counter: add `n` (negative decrements).
    Add(i64),
    /// LWW register: set.
    Set(String),
    /// MV register: write.
    Write(String),
    /// OR-set: add an element.
    Insert(String),
    /// OR-set: remove an element.
    Remove(String),
    /// OR-map: put `key -> value`.
    Put(String, String),
    /// OR-map: delete a key.
    Delete(String),
}

impl Op {
    fn empty(&self) -> Crdt {
        match self {
            Op::Grow(_) => Crdt::GCounter(GCounter::default()),
            Op::Add(_) => Crdt::PnCounter(PnCounter::default()),
            Op::Set(_) => Crdt::Lww(LwwRegister::default()),
            Op::Write(_) => Crdt::Mv(MvRegister::default()),
            Op::Insert(_) | Op::Remove(_) => Crdt::Set(OrSet::default()),
            Op::Put(..) | Op::Delete(_) => Crdt::Map(OrMap::default()),
        }
    }
}

/// A change to one field: a CRDT delta. The unit of events and of replication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Field name.
    pub field: String,
    /// The delta, merged into the field.
    pub delta: Crdt,
}

/// All fields of one worknode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    fields: BTreeMap<String, Crdt>,
    /// Upper bounds of fields' encoded sizes, kept by [`State::apply_within`] (not stored: a
    /// missing one is measured when needed).
    #[serde(skip)]
    sizes: BTreeMap<String, usize>,
    /// Digests of fields, kept by [`State::digest`] until the field changes (not stored).
    #[serde(skip)]
    digests: BTreeMap<String, [u8; 16]>,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.fields == other.fields
    }
}

/// Bytes a merge may add to an encoding beyond the delta's own (map and integer headers that
/// grow): [`State::apply_within`]'s bound stays an upper bound.
const MERGE_SLACK: usize = 64;

/// The MessagePack encoding's size of `v`, without building it.
fn encoded_len<T: Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Encoding into a counter cannot fail for these types; a failure counts what was written.
    drop(rmp_serde::encode::write(&mut c, v));
    c.0
}

impl State {
    /// No fields.
    pub(crate) const EMPTY: State = State { fields: BTreeMap::new(), sizes: BTreeMap::new(), digests: BTreeMap::new() };

    /// Computes the delta of `op` on `field` without changing `self` (a behaviour's changes are
    /// applied only once its turn commits).
    pub fn prepare(&self, replica: ReplicaId, now_ms: u64, field: &str, op: &Op) -> Result<Delta, StateError> {
        let mut scratch = match self.fields.get(field) {
            Some(c) => c.clone(),
            None => op.empty(),
        };
        let delta = match (&mut scratch, op) {
            (Crdt::GCounter(c), Op::Grow(n)) if !c.can_inc(*n) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::PnCounter(c), Op::Add(n)) if !c.can_add(replica, *n) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::Mv(r), Op::Write(_)) if r.exhausted(replica) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::Set(s), Op::Insert(_) | Op::Remove(_)) if s.exhausted(replica) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::Map(m), Op::Put(..) | Op::Delete(_)) if m.exhausted(replica) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            // A write stamped `u64::MAX` (a peer's, from before timestamps were bounded) cannot
            // be superseded: refused, never answered ok and lost.
            (Crdt::Lww(r), Op::Set(_)) if r.stuck() => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::Map(m), Op::Put(k, _)) if m.value(k).is_some_and(LwwRegister::stuck) => {
                return Err(StateError::Overflow { field: field.to_owned() });
            }
            (Crdt::GCounter(c), Op::Grow(n)) => Crdt::GCounter(c.inc(replica, *n)),
            (Crdt::PnCounter(c), Op::Add(n)) => Crdt::PnCounter(c.add(replica, *n)),
            (Crdt::Lww(r), Op::Set(v)) => Crdt::Lww(r.set(replica, now_ms, v.clone())),
            (Crdt::Mv(r), Op::Write(v)) => Crdt::Mv(r.set(replica, v.clone())),
            (Crdt::Set(s), Op::Insert(v)) => Crdt::Set(s.add(replica, v.clone())),
            (Crdt::Set(s), Op::Remove(v)) => Crdt::Set(s.remove(replica, v)),
            (Crdt::Map(m), Op::Put(k, v)) => {
                Crdt::Map(m.update(replica, k.clone(), |reg| reg.set(replica, now_ms, v.clone())))
            }
            (Crdt::Map(m), Op::Delete(k)) => Crdt::Map(m.remove(replica, k)),
            (have, _) => return Err(StateError::TypeMismatch { have: have.kind(), got: op.empty().kind() }),
        };
        Ok(Delta { field: field.to_owned(), delta })
    }

    /// Merges a delta (or a whole field state) in; returns whether anything changed. A delta
    /// that changes nothing (an empty one, or one already merged) creates no field.
    pub fn apply(&mut self, d: &Delta) -> Result<bool, StateError> {
        self.sizes.remove(&d.field);
        self.digests.remove(&d.field);
        match self.fields.get_mut(&d.field) {
            Some(c) => c.merge(&d.delta),
            None if d.delta == d.delta.bottom() => Ok(false),
            None => {
                self.fields.insert(d.field.clone(), d.delta.clone());
                Ok(true)
            }
        }
    }

    /// [`State::apply`], unless the field's encoding would grow past `max` bytes: then
    /// [`StateError::FieldFull`] and the field is unchanged. A change that leaves the field no
    /// larger (a removal) always goes. Costs the delta while the field is well below `max` (an
    /// upper bound of its size is kept); near it, the field is measured.
    pub fn apply_within(&mut self, d: &Delta, max: usize) -> Result<bool, StateError> {
        let known = match self.sizes.get(&d.field) {
            Some(n) => *n,
            None => self.fields.get(&d.field).map_or(0, encoded_len),
        };
        let bound = known.saturating_add(encoded_len(&d.delta)).saturating_add(MERGE_SLACK);
        if bound <= max {
            let changed = self.apply(d)?;
            if self.fields.contains_key(&d.field) {
                self.sizes.insert(d.field.clone(), bound);
            }
            return Ok(changed);
        }
        // Near the limit: the exact sizes, before and after, on a copy of the field.
        let current = self.fields.get(&d.field);
        let before = current.map_or(0, encoded_len);
        let mut merged = current.cloned().unwrap_or_else(|| d.delta.bottom());
        if !merged.merge(&d.delta)? {
            self.sizes.insert(d.field.clone(), before);
            return Ok(false);
        }
        let bytes = encoded_len(&merged);
        if bytes > max && bytes > before {
            self.sizes.insert(d.field.clone(), before);
            return Err(StateError::FieldFull { field: d.field.clone(), bytes, max });
        }
        self.fields.insert(d.field.clone(), merged);
        self.digests.remove(&d.field);
        self.sizes.insert(d.field.clone(), bytes);
        Ok(true)
    }

    /// Merges a delta from another replica: of the field's CRDT kind ([`StateError::TypeMismatch`]
    /// otherwise). Never refused for its values, so replicas stay convergent whatever order they
    /// merge in: a counter pushed past its range by concurrent changes reads as its limit (and
    /// takes no further local change in that direction). Returns whether anything changed.
    pub fn absorb(&mut self, d: &Delta) -> Result<bool, StateError> {
        self.apply(d)
    }

    /// [`State::absorb`] within a size limit (see [`State::apply_within`]).
    pub fn absorb_within(&mut self, d: &Delta, max: usize) -> Result<bool, StateError> {
        self.apply_within(d, max)
    }

    /// The part of `d`, a change replica `author` sent, that this replica merges: what `author`
    /// made, and its claims to have seen other replicas' updates as far as they were seen here
    /// (see [`Authored::admit`]). `foreign` and `unseen` say what was left out.
    pub fn admit(&self, author: ReplicaId, d: &Delta) -> Admitted<Delta> {
        let a = d.delta.admit(author, self.fields.get(&d.field));
        Admitted { value: Delta { field: d.field.clone(), delta: a.value }, foreign: a.foreign, unseen: a.unseen }
    }

    /// Dots of field `d.field` held out of order (every merge and local change walks them), and
    /// of those, replica `author`'s: now, and with `d` merged. Only an author's own dots can
    /// add gaps (see [`State::admit`]), so this bounds what one peer's gapped dots cost.
    pub fn gaps(&self, author: ReplicaId, d: &Delta) -> (usize, usize, usize) {
        let Some(field) = self.fields.get(&d.field) else {
            let bottom = d.delta.bottom();
            let (_, after) = bottom.gaps_of(author, &d.delta);
            return (0, 0, after);
        };
        let (before, after) = field.gaps_of(author, &d.delta);
        (field.gaps(), before, after)
    }

    /// The latest write timestamp `d` holds (milliseconds; 0 if none).
    pub fn latest(d: &Delta) -> u64 {
        d.delta.latest()
    }

    /// Whether merging `d` would resolve an equivocation: an update (a dot, an LWW timestamp and
    /// replica) that `d` and this state give different values.
    pub fn equivocates(&self, d: &Delta) -> bool {
        self.fields.get(&d.field).is_some_and(|c| c.equivocates(&d.delta))
    }

    /// Merges a whole state in (anti-entropy).
    pub fn merge(&mut self, other: &State) -> Result<(), StateError> {
        for (field, c) in &other.fields {
            self.apply(&Delta { field: field.clone(), delta: c.clone() })?;
        }
        Ok(())
    }

    /// One field.
    pub fn get(&self, field: &str) -> Option<&Crdt> {
        self.fields.get(field)
    }

    /// All fields as a JSON object of values.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.fields.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
    }

    /// Every field as a delta carrying its whole state (anti-entropy).
    pub fn into_deltas(self) -> Vec<Delta> {
        self.fields.into_iter().map(|(field, delta)| Delta { field, delta }).collect()
    }

    /// What replica `me` made of this state (its own counts, writes and dots, and what it has
    /// seen removed): what a peer takes from it as `me`'s ([`Authored::admit`]). Fields it has
    /// no part in are left out.
    pub fn own(&self, me: ReplicaId) -> State {
        let fields = self
            .fields
            .iter()
            .map(|(f, c)| (f.clone(), c.admit(me, Some(c)).value))
            .filter(|(_, c)| !c.is_bottom())
            .collect();
        State { fields, ..State::default() }
    }

    /// Whether no field was ever written.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// A digest of the whole state, for anti-entropy: of each field's name and the digest of
    /// its encoding (canonical: equal states, equal digests). A field's digest is kept until the
    /// field changes, so this costs the fields changed since the last call.
    pub fn digest(&mut self) -> [u8; 16] {
        let mut all = Sha256::new().chain_update(b"referee-worknode-state\0");
        for (field, value) in &self.fields {
            let d = *self.digests.entry(field.clone()).or_insert_with(|| {
                crate::system::digest_id(&[b"referee-worknode-field\0", &rmp_serde::to_vec(value).unwrap_or_default()])
            });
            all.update((field.len() as u64).to_le_bytes());
            all.update(field.as_bytes());
            all.update(d);
        }
        let all: [u8; 32] = all.finalize().into();
        all.first_chunk::<16>().copied().unwrap_or_default()
    }

    /// The fields after `after` (all of them for `None`), in order, whose encodings add up to
    /// about `chunk` bytes at most (one field at least), as a state; and the last field taken
    /// when more follow (the `after` of the next part). Costs the part, not the state: a
    /// large state goes one part at a time. An empty state is one empty part.
    pub fn part_after(&self, after: Option<&str>, chunk: usize) -> (State, Option<String>) {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut part = BTreeMap::new();
        let mut size = 0usize;
        for (field, value) in self.fields.range::<str, _>((from, Bound::Unbounded)) {
            let bytes = encoded_len(value).saturating_add(field.len());
            if !part.is_empty() && size.saturating_add(bytes) > chunk {
                let last = part.keys().next_back().cloned();
                return (State { fields: part, ..State::default() }, last);
            }
            size = size.saturating_add(bytes);
            part.insert(field.clone(), value.clone());
        }
        (State { fields: part, ..State::default() }, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_stops_growing_at_its_limit_and_shrinks_below_it() {
        let mut s = State::default();
        let max = 20_000;
        let mut taken = 0;
        for i in 0..100 {
            let d = s.prepare(1, 0, "s", &Op::Insert(format!("{i:03}{}", "x".repeat(500)))).unwrap();
            let before = s.clone();
            match s.apply_within(&d, max) {
                Ok(changed) => {
                    assert!(changed);
                    taken += 1;
                }
                Err(StateError::FieldFull { bytes, max: m, .. }) => {
                    assert!(bytes > m);
                    assert_eq!(s, before, "a refused change leaves the field as it was");
                }
                Err(e) => panic!("{e}"),
            }
            assert!(encoded_len(s.get("s").unwrap()) <= max);
        }
        assert!((30..40).contains(&taken), "{taken}");
        // A removal goes at the limit, then an insert fits again; another field is not held back.
        let d = s.prepare(1, 0, "s", &Op::Remove(format!("000{}", "x".repeat(500)))).unwrap();
        assert_eq!(s.apply_within(&d, max), Ok(true));
        let d = s.prepare(1, 0, "s", &Op::Insert("y".repeat(400))).unwrap();
        assert_eq!(s.apply_within(&d, max), Ok(true));
        let d = s.prepare(1, 0, "t", &Op::Insert("z".repeat(400))).unwrap();
        assert_eq!(s.apply_within(&d, max), Ok(true));
        // The kept bound is an upper bound: a plain apply in between is measured again.
        let d = s.prepare(1, 0, "t", &Op::Insert("w".repeat(15_000))).unwrap();
        s.apply(&d).unwrap();
        let d = s.prepare(1, 0, "t", &Op::Insert("v".repeat(6_000))).unwrap();
        assert!(matches!(s.apply_within(&d, max), Err(StateError::FieldFull { .. })));
    }

    /// The kept field digests follow every kind of change: the digest is always the one a
    /// fresh copy (no kept digests) computes.
    #[test]
    fn kept_field_digests_follow_every_change() {
        let mut s = State::default();
        let fresh = |s: &State| -> [u8; 16] {
            let mut copy: State = rmp_serde::from_slice(&rmp_serde::to_vec(s).unwrap()).unwrap();
            copy.digest()
        };
        let ops = [
            ("a", Op::Grow(1)),
            ("b", Op::Insert("x".into())),
            ("a", Op::Grow(2)),
            ("b", Op::Remove("x".into())),
            ("c", Op::Put("k".into(), "v".into())),
            ("d", Op::Set("v".into())),
        ];
        let mut seen = std::collections::HashSet::new();
        for (i, (field, op)) in ops.iter().enumerate() {
            let d = s.prepare(1, i as u64, field, op).unwrap();
            if i % 2 == 0 {
                s.apply(&d).unwrap();
            } else {
                s.apply_within(&d, 1 << 20).unwrap();
            }
            let got = s.digest();
            assert_eq!(got, fresh(&s), "after {field} {op:?}");
            assert!(seen.insert(got), "every change makes another digest");
        }
        // A merged peer state too.
        let mut other = State::default();
        other.apply(&other.prepare(2, 0, "a", &Op::Grow(5)).unwrap()).unwrap();
        s.merge(&other).unwrap();
        assert_eq!(s.digest(), fresh(&s));
    }

    #[test]
    fn parts_of_a_state_merge_back_into_it_and_digests_tell_states_apart() {
        let mut s = State::default();
        for i in 0..50 {
            let d = s.prepare(1, 0, &format!("f{i:02}"), &Op::Set("x".repeat(1000))).unwrap();
            s.apply(&d).unwrap();
        }
        // Read one part at a time.
        let parts = |s: &State, chunk: usize| {
            let (mut after, mut read) = (None, Vec::new());
            loop {
                let (part, next) = s.part_after(after.as_deref(), chunk);
                read.push(part);
                match next {
                    Some(f) => after = Some(f),
                    None => return read,
                }
            }
        };
        let read = parts(&s, 10_000);
        assert!(read.len() >= 5, "{}", read.len());
        let mut back = State::default();
        for p in &read {
            assert!(rmp_serde::to_vec(p).unwrap().len() <= 10_000 + 100);
            back.merge(p).unwrap();
        }
        assert_eq!(back, s);
        assert_eq!(back.digest(), s.digest());
        let d = back.prepare(1, 0, "f00", &Op::Set("y".into())).unwrap();
        back.apply(&d).unwrap();
        assert_ne!(back.digest(), s.digest());
        // A field larger than a part goes alone; an empty state is one empty part.
        assert_eq!(parts(&s, 10).len(), 50);
        assert_eq!(State::default().part_after(None, 10), (State::default(), None));
    }

    #[test]
    fn ops_build_fields_and_refuse_kind_changes() {
        let mut s = State::default();
        let d = s.prepare(1, 0, "n", &Op::Add(5)).unwrap();
        s.apply(&d).unwrap();
        let d = s.prepare(1, 0, "n", &Op::Add(-2)).unwrap();
        s.apply(&d).unwrap();
        assert_eq!(s.to_json()["n"], 3);
        assert!(matches!(s.prepare(1, 0, "n", &Op::Set("x".into())), Err(StateError::TypeMismatch { .. })));
        // Counters refuse what they could only clamp.
        let mut c = State::default();
        for n in [1, i64::MIN] {
            c.apply(&c.prepare(1, 0, "c", &Op::Add(n)).unwrap()).unwrap();
        }
        assert!(matches!(c.prepare(1, 0, "c", &Op::Add(i64::MIN)), Err(StateError::Overflow { .. })));
        assert!(matches!(c.prepare(2, 0, "c", &Op::Add(-2)), Err(StateError::Overflow { .. })));
        assert!(c.prepare(2, 0, "c", &Op::Add(-1)).is_ok(), "i64::MIN itself fits");
        c.apply(&c.prepare(2, 0, "c", &Op::Add(i64::MAX)).unwrap()).unwrap();
        assert_eq!(c.to_json()["c"], 0);
        let mut g = State::default();
        g.apply(&g.prepare(1, 0, "g", &Op::Grow(u64::MAX)).unwrap()).unwrap();
        assert!(matches!(g.prepare(2, 0, "g", &Op::Grow(1)), Err(StateError::Overflow { .. })));
        assert!(g.prepare(2, 0, "g", &Op::Grow(0)).is_ok());
        let d = s.prepare(1, 7, "m", &Op::Put("k".into(), "v".into())).unwrap();
        s.apply(&d).unwrap();
        assert_eq!(s.to_json()["m"]["k"], "v");
    }
}
