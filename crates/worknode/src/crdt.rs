//! Delta-state CRDTs (Almeida, Shoker, Baquero, "Delta state replicated data types", 2018).
//!
//! Every mutator returns a *delta*: a small value of the same type which, merged into any replica,
//! has the effect of the operation. Deltas are what the event log stores and what replication
//! ships; full states merge the same way (anti-entropy). [`Lattice::merge`] is a join: commutative,
//! associative and idempotent (property-tested below), so deltas may be duplicated, reordered or
//! re-delivered after a partition and replicas still converge.
//!
//! Representations are canonical (causal contexts are always compacted, zero entries are never
//! stored), so two replicas that saw the same updates compare equal with `==`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Who made an update: a replica (node) identifier. Unique per node, stable across restarts.
pub type ReplicaId = u64;

/// One update event of one replica: `(replica, n)`, the replica's `n`-th event (from 1).
pub type Dot = (ReplicaId, u64);

/// A join-semilattice: `merge` is commutative, associative and idempotent.
pub trait Lattice: Clone + PartialEq {
    /// Joins `other` into `self`.
    fn merge(&mut self, other: &Self);

    /// Joins `other` into `self`; returns whether `self` changed (a delta that changes nothing
    /// is not stored).
    fn merge_changed(&mut self, other: &Self) -> bool {
        let before = self.clone();
        self.merge(other);
        *self != before
    }

    /// Whether `other` gives one update (a dot, or an LWW timestamp and replica) another value
    /// than `self` does: only a replica that reused it (equivocation) can. Merge still joins
    /// (the larger value wins everywhere); this is for auditing it.
    fn equivocates(&self, _other: &Self) -> bool {
        false
    }
}

/// What a replica takes of a value a peer sent: see [`Authored::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted<T> {
    /// The part merged here.
    pub value: T,
    /// The peer sent updates made by other replicas (counter counts, writes, live dots): they
    /// were left out.
    pub foreign: bool,
    /// The peer claimed to have seen updates of other replicas that this replica has not seen
    /// (a causal context beyond ours): the claims were left out.
    pub unseen: bool,
}

/// Authorship: a peer speaks only for itself.
///
/// A replica takes from a peer the updates that peer made (its own counter counts, writes and
/// dots). What the peer says about other replicas' updates is taken only where it cannot forge
/// anything: the claim that an update was seen (and so, absent from the peer's live dots,
/// removed) is taken for updates this replica has seen too. Other replicas' updates themselves
/// are taken from those replicas. So no peer can raise another replica's counter, write in its
/// name, or mark its future updates as seen (which would make them vanish everywhere).
pub trait Authored: Lattice + Default {
    /// The part of `self`, sent by replica `author`, that a replica holding `local` merges.
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self>;

    /// The latest write timestamp `self` holds (milliseconds; 0 for types without any): a
    /// replica refuses writes stamped far in its future, which would win over every later one.
    fn latest(&self) -> u64 {
        0
    }
}

/// Grow-only counter: one monotone count per replica; the value is their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GCounter(BTreeMap<ReplicaId, u64>);

impl GCounter {
    /// Adds `n` on behalf of `replica`; returns the delta (empty for `n == 0`).
    pub fn inc(&mut self, replica: ReplicaId, n: u64) -> GCounter {
        if n == 0 {
            return GCounter::default();
        }
        let slot = self.0.entry(replica).or_insert(0);
        *slot = slot.saturating_add(n);
        GCounter(BTreeMap::from([(replica, *slot)]))
    }

    /// The sum over all replicas (saturating).
    pub fn value(&self) -> u64 {
        self.0.values().fold(0u64, |acc, v| acc.saturating_add(*v))
    }

    /// The exact sum over all replicas.
    fn total(&self) -> u128 {
        self.0.values().map(|v| u128::from(*v)).sum()
    }

    /// Whether adding `n` keeps the value exact (within `u64`): an increment past it would be
    /// clamped, so callers refuse it instead.
    pub fn can_inc(&self, n: u64) -> bool {
        self.total() + u128::from(n) <= u128::from(u64::MAX)
    }
}

impl Lattice for GCounter {
    fn merge(&mut self, other: &Self) {
        self.merge_changed(other);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        let mut changed = false;
        for (r, v) in &other.0 {
            if *v == 0 {
                continue;
            }
            let slot = self.0.entry(*r).or_insert(0);
            if *v > *slot {
                *slot = *v;
                changed = true;
            }
        }
        changed
    }
}

impl Authored for GCounter {
    fn admit(&self, author: ReplicaId, _local: &Self) -> Admitted<Self> {
        let foreign = self.0.iter().any(|(r, v)| *r != author && *v > 0);
        let own = self.0.get(&author).copied().filter(|v| *v > 0);
        Admitted {
            value: GCounter(own.map(|v| BTreeMap::from([(author, v)])).unwrap_or_default()),
            foreign,
            unseen: false,
        }
    }
}

/// Positive-negative counter: two grow-only counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PnCounter {
    p: GCounter,
    n: GCounter,
}

impl PnCounter {
    /// Adds `delta` (may be negative) on behalf of `replica`; returns the delta state.
    pub fn add(&mut self, replica: ReplicaId, delta: i64) -> PnCounter {
        let mut out = PnCounter::default();
        if delta >= 0 {
            out.p = self.p.inc(replica, delta.unsigned_abs());
        } else {
            out.n = self.n.inc(replica, delta.unsigned_abs());
        }
        out
    }

    /// Whether `replica` can add `delta` and keep the value exact: its own side's count stays
    /// within `u64` and the value within `i64`. (The sides' sums are exact in `u128`, so what
    /// other replicas counted never blocks a change that brings the value back into range.)
    pub fn can_add(&self, replica: ReplicaId, delta: i64) -> bool {
        let side = if delta >= 0 { &self.p } else { &self.n };
        let own = side.0.get(&replica).copied().unwrap_or(0);
        if own.checked_add(delta.unsigned_abs()).is_none() {
            return false;
        }
        let value = self.exact() + i128::from(delta);
        i64::try_from(value).is_ok()
    }

    /// Increments minus decrements, exactly.
    fn exact(&self) -> i128 {
        let clamp = |v: u128| i128::try_from(v).unwrap_or(i128::MAX);
        clamp(self.p.total()) - clamp(self.n.total())
    }

    /// Increments minus decrements (saturating to the i64 range: only merges of concurrent
    /// changes can take it out of range, since a local one that would is refused).
    pub fn value(&self) -> i64 {
        let v = self.exact();
        i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
    }
}

impl Lattice for PnCounter {
    fn merge(&mut self, other: &Self) {
        self.merge_changed(other);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        let p = self.p.merge_changed(&other.p);
        self.n.merge_changed(&other.n) || p
    }
}

impl Authored for PnCounter {
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self> {
        let (p, n) = (self.p.admit(author, &local.p), self.n.admit(author, &local.n));
        Admitted { value: PnCounter { p: p.value, n: n.value }, foreign: p.foreign || n.foreign, unseen: false }
    }
}

/// Last-writer-wins register: the write with the highest `(timestamp, replica)` wins (the value
/// breaks the remaining tie, which only a misbehaving replica could create, so merge stays a join).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwRegister<T> {
    entry: Option<(u64, ReplicaId, T)>,
}

impl<T> Default for LwwRegister<T> {
    fn default() -> Self {
        Self { entry: None }
    }
}

impl<T: Ord + Clone> LwwRegister<T> {
    /// Writes `value` at `now` (milliseconds; raised above the current timestamp so a write always
    /// supersedes what this replica has seen, even with a clock behind). Returns the delta.
    pub fn set(&mut self, replica: ReplicaId, now: u64, value: T) -> LwwRegister<T> {
        let ts = match &self.entry {
            Some((ts, _, _)) => now.max(ts.saturating_add(1)),
            None => now,
        };
        let delta = LwwRegister { entry: Some((ts, replica, value)) };
        self.merge(&delta);
        delta
    }

    /// The current value.
    pub fn get(&self) -> Option<&T> {
        self.entry.as_ref().map(|(_, _, v)| v)
    }

    /// Whether no write can supersede the current one (its timestamp is `u64::MAX`): a local
    /// write is then refused rather than lost.
    pub fn stuck(&self) -> bool {
        self.entry.as_ref().is_some_and(|e| e.0 == u64::MAX)
    }
}

impl<T: Ord + Clone> Lattice for LwwRegister<T> {
    fn merge(&mut self, other: &Self) {
        self.merge_changed(other);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        let Some(theirs) = &other.entry else { return false };
        let newer = match &self.entry {
            None => true,
            Some(mine) => (theirs.0, theirs.1, &theirs.2) > (mine.0, mine.1, &mine.2),
        };
        if newer {
            self.entry = other.entry.clone();
        }
        newer
    }

    fn equivocates(&self, other: &Self) -> bool {
        match (&self.entry, &other.entry) {
            (Some(a), Some(b)) => a.0 == b.0 && a.1 == b.1 && a.2 != b.2,
            _ => false,
        }
    }
}

impl<T: Ord + Clone> Authored for LwwRegister<T> {
    fn admit(&self, author: ReplicaId, _local: &Self) -> Admitted<Self> {
        let foreign = self.entry.as_ref().is_some_and(|e| e.1 != author);
        let value = if foreign { LwwRegister::default() } else { self.clone() };
        Admitted { value, foreign, unseen: false }
    }

    fn latest(&self) -> u64 {
        self.entry.as_ref().map_or(0, |e| e.0)
    }
}

/// The set of dots a replica has seen: a version vector plus the dots beyond it ("dot cloud").
/// Always compacted, so the representation of a given set of dots is unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalContext {
    vv: BTreeMap<ReplicaId, u64>,
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// Whether `dot` has been seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.vv.get(&dot.0).is_some_and(|n| dot.1 <= *n) || self.cloud.contains(dot)
    }

    /// The newest dot seen from `replica` (0: none).
    fn last_dot(&self, replica: ReplicaId) -> u64 {
        let in_vv = self.vv.get(&replica).copied().unwrap_or(0);
        let in_cloud = self.cloud.range((replica, 0)..=(replica, u64::MAX)).next_back().map_or(0, |d| d.1);
        in_vv.max(in_cloud)
    }

    /// A fresh dot for `replica`: one past everything seen from it (callers check
    /// [`CausalContext::exhausted`] first).
    fn next_dot(&self, replica: ReplicaId) -> Dot {
        (replica, self.last_dot(replica).saturating_add(1))
    }

    /// Whether `replica` has no fresh dot left (its last one is `u64::MAX`).
    fn exhausted(&self, replica: ReplicaId) -> bool {
        self.last_dot(replica) == u64::MAX
    }

    /// The dots of `replica` only (`keep`), or of every other replica (`!keep`).
    fn split(&self, replica: ReplicaId, keep: bool) -> CausalContext {
        CausalContext {
            vv: self.vv.iter().filter(|(r, _)| (**r == replica) == keep).map(|(r, n)| (*r, *n)).collect(),
            cloud: self.cloud.iter().filter(|d| (d.0 == replica) == keep).copied().collect(),
        }
    }

    /// How many dots of `replica` this context holds out of order: now, and with `other`'s
    /// merged in. Costs what it holds of `replica`, not the whole context.
    fn gaps_of(&self, replica: ReplicaId, other: &Self) -> (usize, usize) {
        let mut mine = self.split(replica, true);
        let before = mine.cloud.len();
        mine.merge_changed(&other.split(replica, true));
        (before, mine.cloud.len())
    }

    /// The dots in both. Costs what `self` holds, not what `other` does (`other` is a local
    /// state, which may be large; `self` is what a peer sent).
    fn intersect(&self, other: &Self) -> CausalContext {
        let mut out = CausalContext {
            vv: self.vv.iter().filter_map(|(r, n)| other.vv.get(r).map(|m| (*r, (*n).min(*m)))).collect(),
            cloud: self.cloud.iter().filter(|d| other.contains(d)).copied().collect(),
        };
        // `other`'s cloud dots within `self`'s version vector (those in `self`'s cloud are in).
        for (r, n) in &self.vv {
            out.cloud.extend(other.cloud.range((*r, 0)..=(*r, *n)));
        }
        out.compact();
        out
    }

    fn insert(&mut self, dot: Dot) {
        if dot.1 > 0 && !self.contains(&dot) {
            self.cloud.insert(dot);
            self.compact_replicas(&BTreeSet::from([dot.0]));
        }
    }

    /// Restores the canonical form: no dot 0, no cloud dot the version vector covers or could
    /// extend over, no zero entry.
    fn compact(&mut self) {
        let replicas: BTreeSet<ReplicaId> = self.cloud.iter().map(|d| d.0).chain(self.vv.keys().copied()).collect();
        self.compact_replicas(&replicas);
    }

    /// [`CausalContext::compact`] for `replicas` only (the others are canonical already): costs
    /// the dots it moves, not the size of the context.
    fn compact_replicas(&mut self, replicas: &BTreeSet<ReplicaId>) {
        for r in replicas {
            let mut n = self.vv.get(r).copied().unwrap_or(0);
            let covered: Vec<Dot> = self.cloud.range((*r, 0)..=(*r, n)).copied().collect();
            for d in covered {
                self.cloud.remove(&d);
            }
            while n < u64::MAX && self.cloud.remove(&(*r, n + 1)) {
                n += 1;
            }
            if n > 0 {
                self.vv.insert(*r, n);
            } else {
                self.vv.remove(r);
            }
        }
    }

    /// Joins `other` in; returns whether a dot was added. Costs what `other` holds (and the dots
    /// it lets the version vector absorb), not what `self` holds.
    fn merge_changed(&mut self, other: &Self) -> bool {
        let mut changed = false;
        let mut touched = BTreeSet::new();
        for (r, n) in &other.vv {
            let mine = self.vv.get(r).copied().unwrap_or(0);
            if *n > mine {
                // New, unless the cloud holds every dot of mine+1..=n already.
                let held = self.cloud.range((*r, mine + 1)..=(*r, *n)).count() as u64;
                changed |= held < n - mine;
                self.vv.insert(*r, *n);
                touched.insert(*r);
            }
        }
        for d in &other.cloud {
            if d.1 > 0 && !self.contains(d) {
                self.cloud.insert(*d);
                changed = true;
                touched.insert(d.0);
            }
        }
        self.compact_replicas(&touched);
        changed
    }
}

/// A dot store mapping each live dot to a value, with the causal context that says which dots were
/// seen (and so, when absent from the store, were removed). The core of [`MvRegister`] and [`OrSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DotFun<T> {
    live: BTreeMap<Dot, T>,
    ctx: CausalContext,
}

impl<T> Default for DotFun<T> {
    fn default() -> Self {
        Self { live: BTreeMap::new(), ctx: CausalContext::default() }
    }
}

impl<T: Clone + Ord> DotFun<T> {
    /// A delta that removes `dots` and, if given, adds `value` under a fresh dot; applied to `self`.
    fn replace(&mut self, replica: ReplicaId, dots: Vec<Dot>, value: Option<T>) -> DotFun<T> {
        let mut delta = DotFun::default();
        for d in dots {
            delta.ctx.insert(d);
        }
        if let Some(v) = value {
            let dot = self.ctx.next_dot(replica);
            delta.ctx.insert(dot);
            delta.live.insert(dot, v);
        }
        self.merge(&delta);
        delta
    }

    fn merge(&mut self, other: &Self) {
        self.merge_changed(other);
    }

    /// [`DotFun::merge`], returning whether anything changed.
    fn merge_changed(&mut self, other: &Self) -> bool {
        // Keep a dot if both have it, or one has it and the other never saw it. Only dots
        // `other` saw can go: found through its context, so a small delta costs little however
        // large `self` is.
        // (`n == 0` only in a peer's context that is not canonical: `1..=0` would panic.)
        let seen_by_other = other
            .ctx
            .vv
            .iter()
            .filter(|(_, n)| **n > 0)
            .flat_map(|(r, n)| self.live.range((*r, 1)..=(*r, *n)).map(|(d, _)| *d));
        let gone: Vec<Dot> = seen_by_other
            .chain(other.ctx.cloud.iter().filter(|d| self.live.contains_key(d)).copied())
            .filter(|d| !other.live.contains_key(d))
            .collect();
        let mut changed = !gone.is_empty();
        for d in gone {
            self.live.remove(&d);
        }
        for (d, v) in &other.live {
            match self.live.get_mut(d) {
                // One dot with two values: only a replica that reused a dot (equivocation) makes
                // this. The larger value wins everywhere, so merge stays a join.
                Some(mine) if v > mine => {
                    v.clone_into(mine);
                    changed = true;
                }
                Some(_) => {}
                None if !self.ctx.contains(d) => {
                    self.live.insert(*d, v.clone());
                    changed = true;
                }
                None => {}
            }
        }
        self.ctx.merge_changed(&other.ctx) || changed
    }

    /// Whether `other` has a dot `self` has, with another value.
    fn equivocates(&self, other: &Self) -> bool {
        other.live.iter().any(|(d, v)| self.live.get(d).is_some_and(|mine| mine != v))
    }

    /// See [`Authored::admit`]: `author`'s own dots (never dot 0, which no context can hold, so
    /// nothing could ever remove it), and of its claims on other replicas' dots, those that
    /// remove a dot live here: seen here, so never forged ahead of its author. The result holds
    /// none of this replica's values, so what is stored is never more than what the peer sent.
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self> {
        let others = self.ctx.split(author, false);
        let unseen = others.intersect(&local.ctx) != others;
        let mut ctx = self.ctx.split(author, true);
        let mut live = BTreeMap::new();
        let mut foreign = false;
        for (d, v) in &self.live {
            if d.0 == author && d.1 > 0 {
                // A live dot is always in the context (compacted once, below).
                if !ctx.contains(d) {
                    ctx.cloud.insert(*d);
                }
                live.insert(*d, v.clone());
            } else {
                foreign = true;
            }
        }
        // Removals: other replicas' dots live here that the peer has seen and holds no more.
        let gone = |d: &Dot| !self.live.contains_key(d);
        // A peer's context may not be canonical: a zero entry (`1..=0` would panic) names no dot.
        for (r, n) in others.vv.iter().filter(|(_, n)| **n > 0) {
            ctx.cloud.extend(local.live.range((*r, 1)..=(*r, *n)).map(|(d, _)| *d).filter(gone));
        }
        ctx.cloud.extend(others.cloud.iter().filter(|d| local.live.contains_key(d) && gone(d)));
        ctx.compact();
        Admitted { value: DotFun { live, ctx }, foreign, unseen }
    }
}

/// Multi-value register: a write replaces every value it has seen; concurrent writes all survive
/// until a later write supersedes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MvRegister<T>(DotFun<T>);

impl<T> Default for MvRegister<T> {
    fn default() -> Self {
        Self(DotFun::default())
    }
}

impl<T: Clone + Ord> MvRegister<T> {
    /// Writes `value`; returns the delta.
    pub fn set(&mut self, replica: ReplicaId, value: T) -> MvRegister<T> {
        let seen = self.0.live.keys().copied().collect();
        MvRegister(self.0.replace(replica, seen, Some(value)))
    }

    /// Whether `replica` can make no more writes here (its dots are used up).
    pub fn exhausted(&self, replica: ReplicaId) -> bool {
        self.0.ctx.exhausted(replica)
    }

    /// Dots seen out of order (held one by one until the ones before them arrive).
    pub fn gaps(&self) -> usize {
        self.0.ctx.cloud.len()
    }

    /// How many of `replica`'s dots `self` holds out of order: now, and with `other` merged.
    pub fn gaps_of(&self, replica: ReplicaId, other: &Self) -> (usize, usize) {
        self.0.ctx.gaps_of(replica, &other.0.ctx)
    }

    /// The concurrent values, sorted, without duplicates.
    pub fn values(&self) -> Vec<T> {
        let set: BTreeSet<&T> = self.0.live.values().collect();
        set.into_iter().cloned().collect()
    }
}

impl<T: Clone + Ord> Authored for MvRegister<T> {
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self> {
        let a = self.0.admit(author, &local.0);
        Admitted { value: MvRegister(a.value), foreign: a.foreign, unseen: a.unseen }
    }
}

impl<T: Clone + Ord> Lattice for MvRegister<T> {
    fn merge(&mut self, other: &Self) {
        self.0.merge(&other.0);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        self.0.merge_changed(&other.0)
    }

    fn equivocates(&self, other: &Self) -> bool {
        self.0.equivocates(&other.0)
    }
}

/// Observed-remove (add-wins) set: a remove only removes the additions it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrSet<T>(DotFun<T>);

impl<T> Default for OrSet<T> {
    fn default() -> Self {
        Self(DotFun::default())
    }
}

impl<T: Clone + Ord> OrSet<T> {
    fn dots_of(&self, elem: &T) -> Vec<Dot> {
        self.0.live.iter().filter(|(_, v)| *v == elem).map(|(d, _)| *d).collect()
    }

    /// Adds `elem`; returns the delta.
    pub fn add(&mut self, replica: ReplicaId, elem: T) -> OrSet<T> {
        let old = self.dots_of(&elem);
        OrSet(self.0.replace(replica, old, Some(elem)))
    }

    /// Removes `elem` as observed here; returns the delta (empty if absent).
    pub fn remove(&mut self, replica: ReplicaId, elem: &T) -> OrSet<T> {
        let old = self.dots_of(elem);
        OrSet(self.0.replace(replica, old, None))
    }

    /// Whether `replica` can make no more changes here (its dots are used up).
    pub fn exhausted(&self, replica: ReplicaId) -> bool {
        self.0.ctx.exhausted(replica)
    }

    /// Dots seen out of order (held one by one until the ones before them arrive).
    pub fn gaps(&self) -> usize {
        self.0.ctx.cloud.len()
    }

    /// How many of `replica`'s dots `self` holds out of order: now, and with `other` merged.
    pub fn gaps_of(&self, replica: ReplicaId, other: &Self) -> (usize, usize) {
        self.0.ctx.gaps_of(replica, &other.0.ctx)
    }

    /// Whether `elem` is present.
    pub fn contains(&self, elem: &T) -> bool {
        self.0.live.values().any(|v| v == elem)
    }

    /// The elements, sorted.
    pub fn elements(&self) -> Vec<T> {
        let set: BTreeSet<&T> = self.0.live.values().collect();
        set.into_iter().cloned().collect()
    }
}

impl<T: Clone + Ord> Authored for OrSet<T> {
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self> {
        let a = self.0.admit(author, &local.0);
        Admitted { value: OrSet(a.value), foreign: a.foreign, unseen: a.unseen }
    }
}

impl<T: Clone + Ord> Lattice for OrSet<T> {
    fn merge(&mut self, other: &Self) {
        self.0.merge(&other.0);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        self.0.merge_changed(&other.0)
    }

    fn equivocates(&self, other: &Self) -> bool {
        self.0.equivocates(&other.0)
    }
}

/// Observed-remove map of embedded CRDTs: key presence is an add-wins [`OrSet`]; values merge
/// pointwise. Removing a key hides it; its value is not reset, so a concurrent or later update
/// of that key shows the merged value again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrMap<K: Ord, V> {
    keys: OrSet<K>,
    values: BTreeMap<K, V>,
}

impl<K: Ord, V> Default for OrMap<K, V> {
    fn default() -> Self {
        Self { keys: OrSet::default(), values: BTreeMap::new() }
    }
}

impl<K: Clone + Ord, V: Lattice + Default> OrMap<K, V> {
    /// Updates the value at `key` with `f`, which mutates it and returns the value's delta.
    /// Returns the map delta (presence of `key` plus the value delta).
    pub fn update(&mut self, replica: ReplicaId, key: K, f: impl FnOnce(&mut V) -> V) -> OrMap<K, V> {
        let keys = self.keys.add(replica, key.clone());
        let slot = self.values.entry(key.clone()).or_default();
        let vdelta = f(slot);
        // Canonical: a bottom value is never stored (merge does not store one either).
        if *slot == V::default() {
            self.values.remove(&key);
        }
        let values = if vdelta == V::default() { BTreeMap::new() } else { BTreeMap::from([(key, vdelta)]) };
        OrMap { keys, values }
    }

    /// Removes `key` as observed here; returns the delta.
    pub fn remove(&mut self, replica: ReplicaId, key: &K) -> OrMap<K, V> {
        OrMap { keys: self.keys.remove(replica, key), values: BTreeMap::new() }
    }

    /// The value at `key`, present or hidden (what a new put of `key` merges with).
    pub fn value(&self, key: &K) -> Option<&V> {
        self.values.get(key)
    }

    /// The value at `key`, if the key is present.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.keys.contains(key).then(|| self.values.get(key)).flatten()
    }

    /// Whether `replica` can make no more changes here (its dots are used up).
    pub fn exhausted(&self, replica: ReplicaId) -> bool {
        self.keys.exhausted(replica)
    }

    /// Dots seen out of order (held one by one until the ones before them arrive).
    pub fn gaps(&self) -> usize {
        self.keys.gaps()
    }

    /// How many of `replica`'s dots `self` holds out of order: now, and with `other` merged.
    pub fn gaps_of(&self, replica: ReplicaId, other: &Self) -> (usize, usize) {
        self.keys.gaps_of(replica, &other.keys)
    }

    /// The present entries, sorted by key.
    pub fn entries(&self) -> Vec<(&K, &V)> {
        self.values.iter().filter(|(k, _)| self.keys.contains(k)).collect()
    }
}

impl<K: Clone + Ord, V: Authored> Authored for OrMap<K, V> {
    fn admit(&self, author: ReplicaId, local: &Self) -> Admitted<Self> {
        let keys = self.keys.admit(author, &local.keys);
        let (mut foreign, mut unseen) = (keys.foreign, keys.unseen);
        let bottom = V::default();
        let mut values = BTreeMap::new();
        for (k, v) in &self.values {
            let a = v.admit(author, local.values.get(k).unwrap_or(&bottom));
            foreign |= a.foreign;
            unseen |= a.unseen;
            if a.value != bottom {
                values.insert(k.clone(), a.value);
            }
        }
        Admitted { value: OrMap { keys: keys.value, values }, foreign, unseen }
    }

    fn latest(&self) -> u64 {
        self.values.values().map(Authored::latest).max().unwrap_or(0)
    }
}

impl<K: Clone + Ord, V: Lattice + Default> Lattice for OrMap<K, V> {
    fn merge(&mut self, other: &Self) {
        self.merge_changed(other);
    }

    fn merge_changed(&mut self, other: &Self) -> bool {
        let mut changed = self.keys.merge_changed(&other.keys);
        for (k, v) in &other.values {
            match self.values.get_mut(k) {
                Some(mine) => changed |= mine.merge_changed(v),
                // A value equal to the bottom (an empty register) changes nothing.
                None if *v == V::default() => {}
                None => {
                    self.values.insert(k.clone(), v.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    fn equivocates(&self, other: &Self) -> bool {
        self.keys.equivocates(&other.keys)
            || other.values.iter().any(|(k, v)| self.values.get(k).is_some_and(|mine| mine.equivocates(v)))
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use proptest::prelude::*;

    use super::*;

    /// One step of a random history over three replicas: an operation at a replica, or a sync.
    #[derive(Debug, Clone)]
    enum Step {
        Op { at: usize, kind: u8, arg: u8 },
        Sync { from: usize, to: usize },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            3 => (0..3usize, 0..4u8, 0..6u8).prop_map(|(at, kind, arg)| Step::Op { at, kind, arg }),
            1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
        ];
        prop::collection::vec(step, 0..40)
    }

    /// Runs `history` on three replicas with `op` (which must return the delta and has already
    /// applied it), checking on the way that merging the delta into a stale copy agrees.
    fn run<T: Lattice + Default + Debug>(history: &[Step], op: impl Fn(&mut T, ReplicaId, u8, u8) -> T) -> [T; 3] {
        let mut r: [T; 3] = Default::default();
        for s in history {
            match *s {
                Step::Op { at, kind, arg } => {
                    let before = r[at].clone();
                    let delta = op(&mut r[at], at as ReplicaId + 1, kind, arg);
                    let mut via_delta = before;
                    via_delta.merge(&delta);
                    assert_eq!(via_delta, r[at], "delta disagrees with the mutation");
                }
                Step::Sync { from, to } => {
                    let src = r[from].clone();
                    let before = r[to].clone();
                    let changed = r[to].merge_changed(&src);
                    assert_eq!(changed, r[to] != before, "merge_changed disagrees with ==");
                }
            }
        }
        r
    }

    fn join<T: Lattice>(a: &T, b: &T) -> T {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    fn laws<T: Lattice + Debug>([a, b, c]: &[T; 3]) {
        assert_eq!(join(a, b), join(b, a), "not commutative");
        assert_eq!(join(&join(a, b), c), join(a, &join(b, c)), "not associative");
        assert_eq!(join(a, a), *a, "not idempotent");
        let all = join(&join(a, b), c);
        assert_eq!(join(&all, a), all, "join is not an upper bound");
    }

    /// Replicas that take from each other only what [`Authored::admit`] lets through (each peer
    /// speaking for itself, as over `Replicator`) still converge, to the join of what they hold,
    /// once every pair has exchanged full states twice (the second round carries the claims on
    /// updates the first round made seen).
    fn converge_by_admit<T: Authored + Debug>(history: &[Step], op: impl Fn(&mut T, ReplicaId, u8, u8) -> T) {
        let mut r: [T; 3] = Default::default();
        let admit_into = |r: &mut [T; 3], from: usize, to: usize| {
            let a = r[from].admit(from as ReplicaId + 1, &r[to]);
            assert!(!a.foreign || from != to);
            r[to].merge(&a.value);
        };
        for s in history {
            match *s {
                Step::Op { at, kind, arg } => drop(op(&mut r[at], at as ReplicaId + 1, kind, arg)),
                Step::Sync { from, to } if from != to => admit_into(&mut r, from, to),
                Step::Sync { .. } => {}
            }
        }
        let all = join(&join(&r[0], &r[1]), &r[2]);
        for _ in 0..2 {
            for from in 0..3 {
                for to in 0..3 {
                    if from != to {
                        admit_into(&mut r, from, to);
                    }
                }
            }
        }
        for x in &r {
            assert_eq!(*x, all, "replicas did not converge to the join");
        }
    }

    fn counter_op(c: &mut PnCounter, r: ReplicaId, kind: u8, arg: u8) -> PnCounter {
        let n = i64::from(arg);
        c.add(r, if kind.is_multiple_of(2) { n } else { -n })
    }

    fn set_op(s: &mut OrSet<u8>, r: ReplicaId, kind: u8, arg: u8) -> OrSet<u8> {
        if kind < 2 { s.add(r, arg) } else { s.remove(r, &arg) }
    }

    proptest! {
        #[test]
        fn gcounter_laws(h in steps()) {
            let r = run(&h, |c: &mut GCounter, r, _, arg| c.inc(r, u64::from(arg)));
            laws(&r);
            // Independent expectation: the converged value is the sum of every increment.
            let total: u64 = h.iter().map(|s| match s { Step::Op { arg, .. } => u64::from(*arg), Step::Sync { .. } => 0 }).sum();
            prop_assert_eq!(join(&join(&r[0], &r[1]), &r[2]).value(), total);
        }

        #[test]
        fn pncounter_laws(h in steps()) {
            let r = run(&h, counter_op);
            laws(&r);
            let total: i64 = h.iter().map(|s| match s {
                Step::Op { kind, arg, .. } => if kind.is_multiple_of(2) { i64::from(*arg) } else { -i64::from(*arg) },
                Step::Sync { .. } => 0,
            }).sum();
            prop_assert_eq!(join(&join(&r[0], &r[1]), &r[2]).value(), total);
        }

        #[test]
        fn lww_laws(h in steps()) {
            let r = run(&h, |reg: &mut LwwRegister<u8>, r, kind, arg| reg.set(r, u64::from(kind), arg));
            laws(&r);
        }

        #[test]
        fn mvregister_laws(h in steps()) {
            let r = run(&h, |reg: &mut MvRegister<u8>, r, _, arg| reg.set(r, arg));
            laws(&r);
        }

        #[test]
        fn orset_laws(h in steps()) {
            let r = run(&h, set_op);
            laws(&r);
        }

        #[test]
        fn admitted_sets_counters_and_maps_converge(h in steps()) {
            converge_by_admit(&h, counter_op);
            converge_by_admit(&h, set_op);
            converge_by_admit(&h, |reg: &mut MvRegister<u8>, r, _, arg| reg.set(r, arg));
            converge_by_admit(&h, |reg: &mut LwwRegister<u8>, r, kind, arg| reg.set(r, u64::from(kind), arg));
            converge_by_admit(&h, |m: &mut OrMap<u8, LwwRegister<u8>>, r, kind, arg| {
                if kind == 3 { m.remove(r, &arg) } else { m.update(r, arg % 3, |v| v.set(r, u64::from(kind), arg)) }
            });
        }

        #[test]
        fn ormap_laws(h in steps()) {
            let r = run(&h, |m: &mut OrMap<u8, PnCounter>, r, kind, arg| {
                if kind == 3 { m.remove(r, &arg) } else { m.update(r, arg % 3, |c| counter_op(c, r, kind, arg)) }
            });
            laws(&r);
        }
    }

    #[test]
    fn one_dot_with_two_values_merges_to_the_larger_in_any_order() {
        let (mut a, mut b) = (OrSet::default(), OrSet::default());
        let (da, db) = (a.add(7, "a"), b.add(7, "b"));
        assert!(a.equivocates(&db) && b.equivocates(&da));
        a.merge(&db);
        b.merge(&da);
        assert_eq!((a.elements(), b.elements()), (vec!["b"], vec!["b"]));
        assert!(!a.equivocates(&b));
        let (mut x, y) = (LwwRegister::default(), LwwRegister { entry: Some((5, 1, "y")) });
        x.set(1, 5, "x");
        assert!(x.equivocates(&y));
        x.merge(&y);
        assert_eq!(x.get(), Some(&"y"));
    }

    #[test]
    fn a_peer_speaks_for_itself_and_claims_only_what_was_seen_here() {
        // Replica 1 added "x"; replica 2 saw it and removed it, then added "y".
        let (mut one, mut two) = (OrSet::default(), OrSet::default());
        let add_x = one.add(1, "x");
        two.merge(&add_x);
        let remove_x = two.remove(2, &"x");
        two.add(2, "y");
        // Replica 3 has not seen "x": the claim on (1, 1) waits for it; "y" is taken.
        let mut three = OrSet::default();
        let a = two.admit(2, &three);
        assert!(a.unseen && !a.foreign);
        three.merge(&a.value);
        assert_eq!(three.elements(), vec!["y"]);
        three.merge(&add_x);
        assert_eq!(three.elements(), vec!["x", "y"]);
        // Once seen, the same claim is a remove.
        let a = remove_x.admit(2, &three);
        assert!(!a.unseen);
        three.merge(&a.value);
        assert_eq!(three.elements(), vec!["y"]);
        // A forged claim on replica 1's next dot (or any beyond) takes nothing: 1's next add stays.
        let forged: OrSet<&str> = OrSet(DotFun {
            live: BTreeMap::new(),
            ctx: CausalContext { vv: BTreeMap::from([(1, u64::MAX)]), cloud: BTreeSet::new() },
        });
        let a = forged.admit(2, &three);
        assert!(a.unseen);
        three.merge(&a.value);
        let next = one.add(1, "z");
        three.merge(&next);
        assert!(three.contains(&"z"));
        // Another replica's live dot is never taken from a peer, whatever its value; held live
        // by the peer, it is not removed here either; and nothing of this replica's is copied.
        let mut lying = three.clone();
        if let Some(v) = lying.0.live.get_mut(&(1, 2)) {
            *v = "zz";
        }
        let a = lying.admit(2, &three);
        assert!(a.foreign && !a.value.0.live.contains_key(&(1, 2)));
        assert!(a.value.0.live.keys().all(|d| d.0 == 2));
        three.merge(&a.value);
        assert!(three.contains(&"z") && !three.contains(&"zz"));
        // A peer's context with a zero entry (not canonical) names no dot, and panics nothing.
        let zero_vv: OrSet<&str> = OrSet(DotFun {
            live: BTreeMap::new(),
            ctx: CausalContext { vv: BTreeMap::from([(1, 0), (2, 0)]), cloud: BTreeSet::new() },
        });
        let a = zero_vv.admit(2, &three);
        let mut copy = three.clone();
        copy.merge(&a.value);
        copy.merge(&zero_vv);
        assert_eq!(copy, three);
        // Dot 0 is nobody's: no context holds it, so nothing could remove it.
        let zero: OrSet<&str> =
            OrSet(DotFun { live: BTreeMap::from([((2, 0), "pinned")]), ctx: CausalContext::default() });
        let a = zero.admit(2, &three);
        assert!(a.foreign && a.value.0.live.is_empty());
        // Counts and writes in another replica's name are left out.
        let c = GCounter::default().inc(1, 5);
        let a = c.admit(2, &GCounter::default());
        assert!(a.foreign && a.value == GCounter::default());
        let w = LwwRegister::default().set(1, 5, "w");
        assert!(w.admit(2, &LwwRegister::default()).foreign);
        assert!(!w.admit(1, &LwwRegister::default()).foreign);
    }

    #[test]
    fn orset_add_wins_over_concurrent_remove() {
        let (mut a, mut b) = (OrSet::default(), OrSet::default());
        let d = a.add(1, "x");
        b.merge(&d);
        let removed = b.remove(2, &"x");
        let readded = a.add(1, "x");
        a.merge(&removed);
        b.merge(&readded);
        assert!(a.contains(&"x") && b.contains(&"x"));
        assert_eq!(a, b);
    }

    #[test]
    fn mvregister_keeps_concurrent_writes_until_overwritten() {
        let (mut a, mut b) = (MvRegister::default(), MvRegister::default());
        let da = a.set(1, "left");
        let db = b.set(2, "right");
        a.merge(&db);
        b.merge(&da);
        assert_eq!(a.values(), vec!["left", "right"]);
        let dc = a.set(1, "both");
        b.merge(&dc);
        assert_eq!(b.values(), vec!["both"]);
    }

    #[test]
    fn lww_later_write_wins_even_with_clock_behind() {
        let mut reg = LwwRegister::default();
        reg.set(1, 100, "first");
        reg.set(1, 5, "second");
        assert_eq!(reg.get(), Some(&"second"));
    }
}
