//! What a proxy holds of one resource type, stored as a difference from a
//! shared snapshot.
//!
//! A proxy that is up to date holds exactly the versions of the snapshot it
//! was last brought up to date with. So instead of a name → version map per
//! proxy (thousands of entries, times thousands of proxies), [`Held`] keeps
//! a reference to that snapshot (shared by every proxy, free) plus the few
//! names where the proxy differs: a rejected (NACKed) version, an
//! `initial_resource_versions` entry that is not current, a name it
//! unsubscribed from.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::Snapshot;
use crate::resource::TypeUrl;

/// The versions one proxy holds of one type.
#[derive(Debug)]
pub(crate) struct Held {
    type_url: TypeUrl,
    base: Option<Arc<Snapshot>>,
    /// Where the proxy differs from `base`: `None` means it holds nothing.
    overrides: HashMap<Arc<str>, Option<Arc<str>>>,
}

impl Held {
    /// Holds nothing.
    pub(crate) fn new(type_url: TypeUrl) -> Self {
        Held {
            type_url,
            base: None,
            overrides: HashMap::new(),
        }
    }

    /// The version the proxy holds of `name`.
    pub(crate) fn version(&self, name: &str) -> Option<&Arc<str>> {
        match self.overrides.get(name) {
            Some(v) => v.as_ref(),
            None => self
                .base
                .as_ref()?
                .get(self.type_url, name)
                .map(|r| &r.version),
        }
    }

    /// [`Held::version`] of `r`, the resource `snap` has under its name:
    /// when the base is `snap` itself (a proxy that is up to date, or in
    /// its first sync), `r`'s version unless overridden, with no lookup.
    pub(crate) fn version_in<'a>(
        &'a self,
        snap: &Arc<Snapshot>,
        r: &'a crate::resource::Resource,
    ) -> Option<&'a Arc<str>> {
        match &self.base {
            Some(base) if Arc::ptr_eq(base, snap) => match self.overrides.get(&*r.name) {
                Some(v) => v.as_ref(),
                None => Some(&r.version),
            },
            _ => self.version(&r.name),
        }
    }

    /// Records that the proxy is about to hold what the next rebase
    /// snapshot has of `name` (as [`Held::take`], when the caller already
    /// knows what it held).
    pub(crate) fn forget(&mut self, name: &str) {
        if !self.overrides.is_empty() {
            self.overrides.remove(name);
        }
    }

    /// The version recorded for `name` itself, not read from the base
    /// snapshot: `None` where nothing was recorded (see `ack::Offer`).
    pub(crate) fn recorded(&self, name: &str) -> Option<&Arc<str>> {
        self.overrides.get(name)?.as_ref()
    }

    /// Records that the proxy holds `version` of `name` (`None`: nothing);
    /// returns what it held before.
    pub(crate) fn set(&mut self, name: Arc<str>, version: Option<Arc<str>>) -> Option<Arc<str>> {
        let previous = self.version(&name).cloned();
        self.overrides.insert(name, version);
        previous
    }

    /// Records that the proxy is about to hold what the next rebase
    /// snapshot has of `name` (sent or removed); returns what it held
    /// before. Cheaper than [`Held::set`]: nothing is stored.
    pub(crate) fn take(&mut self, name: &str) -> Option<Arc<str>> {
        let previous = self.version(name).cloned();
        self.overrides.remove(name);
        previous
    }

    /// Every name the proxy holds.
    pub(crate) fn names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .overrides
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        if let Some(base) = &self.base {
            names.extend(
                base.resources(self.type_url)
                    .filter(|r| !self.overrides.contains_key(&r.name))
                    .map(|r| r.name.clone()),
            );
        }
        names
    }

    /// Every name the proxy holds with its version, ordered by name.
    pub(crate) fn entries(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut all: Vec<(Arc<str>, Arc<str>)> = self
            .names()
            .into_iter()
            .filter_map(|n| {
                let v = self.version(&n)?.clone();
                Some((n, v))
            })
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Moves the base to `snap`. The caller guarantees that every name whose
    /// version differs between the old base and `snap` has been `set`;
    /// overrides equal to `snap` are dropped.
    pub(crate) fn rebase(&mut self, snap: &Arc<Snapshot>) {
        let t = self.type_url;
        self.overrides
            .retain(|name, v| v.as_ref() != snap.get(t, name).map(|r| &r.version));
        // A first sync can leave a large, now nearly empty table: give the
        // memory back.
        if self.overrides.capacity() > 4 * self.overrides.len() + 16 {
            self.overrides.shrink_to_fit();
        }
        self.base = Some(snap.clone());
    }

    /// Starts over from `snap`: the proxy holds exactly its versions.
    pub(crate) fn reset_to(&mut self, snap: &Arc<Snapshot>) {
        self.base = Some(snap.clone());
        self.overrides = HashMap::new();
    }

    /// How many names differ from the base (memory accounting, tests).
    #[cfg(test)]
    pub(crate) fn overrides(&self) -> usize {
        self.overrides.len()
    }
}

/// Membership of an ascending sequence of names in a sorted slice, one
/// step at a time: O(slice + sequence) for the whole sequence.
pub(crate) struct Cursor<'a> {
    sorted: &'a [Arc<str>],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(sorted: &'a [Arc<str>]) -> Self {
        Cursor { sorted }
    }

    /// Whether `name` is in the slice; names must come in ascending order.
    pub(crate) fn has(&mut self, name: &Arc<str>) -> bool {
        while let Some((first, rest)) = self.sorted.split_first() {
            // Interned names are mostly the same allocation.
            if Arc::ptr_eq(first, name) {
                return true;
            }
            match (**first).cmp(&**name) {
                std::cmp::Ordering::Less => self.sorted = rest,
                std::cmp::Ordering::Equal => return true,
                std::cmp::Ordering::Greater => return false,
            }
        }
        false
    }
}

/// The snapshot's own `Arc` for `name` when it has the resource, so that
/// thousands of proxies subscribing to the same name share one allocation.
pub(crate) fn intern(snap: &Snapshot, type_url: TypeUrl, name: &str) -> Arc<str> {
    snap.get(type_url, name)
        .map(|r| r.name.clone())
        .unwrap_or_else(|| Arc::from(name))
}

/// A set of resource names, kept sorted in one shared allocation: a
/// proxy's subscriptions (thousands of names, times thousands of proxies).
///
/// Proxies of one mesh subscribe to the same names (every Envoy asks for
/// the ClusterLoadAssignment of every cluster it was sent), so equal sets
/// are shared: each set is looked up in a process-wide table of live sets
/// when it changes, and a proxy whose set equals another's holds the same
/// allocation. 1,000 proxies holding the same 1,000 names cost one 16 KB
/// array, not 1,000, and the lookups of a push to all of them read the
/// same memory. Measured (BENCHMARKS.md, issue 13): the lookups took about
/// 5% of the server's CPU per endpoint change (perf: cache misses, one
/// array per proxy) and no longer show; the standard profile's peak RSS
/// fell from 182–192 MB to 151–168 MB. Sets are compared by the names'
/// allocations, which are shared with the snapshot (see [`intern`]): two
/// sets of equal names whose allocations differ are correct, only not
/// shared.
#[derive(Debug, Clone)]
pub(crate) struct NameSet(Arc<[Arc<str>]>);

impl Default for NameSet {
    fn default() -> Self {
        NameSet(shared::empty())
    }
}

impl PartialEq for NameSet {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for NameSet {}

impl NameSet {
    /// A set of `names` (any order, duplicates allowed).
    pub(crate) fn from_names(names: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut names: Vec<Arc<str>> = names.into_iter().collect();
        names.sort();
        names.dedup();
        NameSet(shared::intern(names))
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|n| (**n).cmp(name))
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Adds `names`. Proxies subscribing to the same names in the same
    /// batches (Envoy subscribes to the EDS of each CDS chunk it receives)
    /// go through the same sets: a step another proxy already took is
    /// reused in O(k log n) for k names, not rebuilt in O(n), so a first
    /// sync's subscriptions cost O(n log n) per proxy, not O(n²/k).
    pub(crate) fn extend(&mut self, mut names: Vec<Arc<str>>) {
        names.retain(|n| !self.contains(n));
        if names.is_empty() {
            return;
        }
        names.sort();
        names.dedup();
        if let Some(next) = shared::extended(&self.0, &names) {
            self.0 = next;
            return;
        }
        let mut all = Vec::with_capacity(self.0.len() + names.len());
        all.extend(self.0.iter().cloned());
        all.extend(names.iter().cloned());
        // Stable sort: the sorted set plus a sorted batch of new names
        // merge in linear time.
        all.sort();
        let next = shared::intern(all);
        shared::remember(&self.0, &names, &next);
        self.0 = next;
    }

    /// Removes every name of `names` (one copy of the set, however many).
    pub(crate) fn remove_all(&mut self, names: &[&str]) {
        if !names.iter().any(|n| self.contains(n)) {
            return;
        }
        let dropped: std::collections::HashSet<&str> = names.iter().copied().collect();
        let kept: Vec<Arc<str>> = self
            .0
            .iter()
            .filter(|n| !dropped.contains(&***n))
            .cloned()
            .collect();
        self.0 = shared::intern(kept);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter()
    }

    /// The names, in ascending order.
    pub(crate) fn as_slice(&self) -> &[Arc<str>] {
        &self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The names in `self` and not in `other`.
    pub(crate) fn difference<'a>(
        &'a self,
        other: &'a NameSet,
    ) -> impl Iterator<Item = &'a Arc<str>> {
        self.0.iter().filter(|n| !other.contains(n))
    }

    /// Whether `self` and `other` are one allocation (then equal; equal
    /// sets usually are one, see [`shared`]).
    pub(crate) fn is_same(&self, other: &NameSet) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether `self` and `other` are one allocation (tests).
    #[cfg(test)]
    pub(crate) fn shares(&self, other: &NameSet) -> bool {
        self.is_same(other)
    }

    /// The names in `self` and not in `old`, in one walk of both (both
    /// are sorted): O(len + old.len()).
    pub(crate) fn added_since<'a>(
        &'a self,
        old: &'a NameSet,
    ) -> impl Iterator<Item = &'a Arc<str>> {
        let mut in_old = Cursor::new(&old.0);
        self.0.iter().filter(move |n| !in_old.has(n))
    }
}

/// The table of live name sets behind [`NameSet`]'s sharing: a set's
/// pointer hash (its names' allocations) → weak references to the live
/// sets with that hash. Bounded: entries whose sets are gone are swept
/// whenever the table has doubled since the last sweep, so it holds at
/// most about twice the live sets (plus 64).
mod shared {
    use std::collections::HashMap;
    use std::hash::Hasher;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

    type Names = Arc<[Arc<str>]>;

    #[derive(Default)]
    struct Table {
        sets: HashMap<u64, Vec<Weak<[Arc<str>]>>>,
        /// Entries after the last sweep.
        swept: usize,
        entries: usize,
    }

    fn table() -> &'static Mutex<Table> {
        static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
        TABLE.get_or_init(Mutex::default)
    }

    pub(super) fn empty() -> Names {
        static EMPTY: OnceLock<Names> = OnceLock::new();
        EMPTY.get_or_init(|| Arc::from(Vec::new())).clone()
    }

    /// Hashes the names' allocations, not their text: equal sets built
    /// from the snapshot's names hash alike, in a few ns a name.
    fn hash(names: &[Arc<str>]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_usize(names.len());
        for n in names {
            h.write_usize(Arc::as_ptr(n) as *const u8 as usize);
        }
        h.finish()
    }

    fn same(a: &[Arc<str>], b: &[Arc<str>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
    }

    /// The live set equal to `names` (sorted, unique), or `names` as a new
    /// shared set.
    pub(super) fn intern(names: Vec<Arc<str>>) -> Names {
        if names.is_empty() {
            return empty();
        }
        let key = hash(&names);
        let mut t = table().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = t.sets.get(&key).and_then(|list| {
            list.iter()
                .filter_map(Weak::upgrade)
                .find(|set| same(set, &names))
        }) {
            return found;
        }
        let set: Names = Arc::from(names);
        t.sets.entry(key).or_default().push(Arc::downgrade(&set));
        t.entries += 1;
        if t.entries > 2 * t.swept + 64 {
            t.sets.retain(|_, list| {
                list.retain(|w| w.strong_count() > 0);
                !list.is_empty()
            });
            t.entries = t.sets.values().map(Vec::len).sum();
            t.swept = t.entries;
        }
        set
    }

    /// One step of [`super::NameSet::extend`]: from the set `from` (kept
    /// as a weak reference, which also keeps its address from being
    /// reused), adding names whose pointer hash is the key's, gave `to`.
    struct Step {
        from: Weak<[Arc<str>]>,
        to: Weak<[Arc<str>]>,
    }

    /// Steps by (the old set's address, the added names' hash). Bounded
    /// as the table of sets is: steps whose sets are gone are swept
    /// whenever it has doubled since the last sweep.
    #[derive(Default)]
    struct Steps {
        steps: HashMap<(usize, u64), Step>,
        swept: usize,
    }

    fn steps() -> &'static Mutex<Steps> {
        static STEPS: OnceLock<Mutex<Steps>> = OnceLock::new();
        STEPS.get_or_init(Mutex::default)
    }

    fn address(set: &Names) -> usize {
        Arc::as_ptr(set) as *const u8 as usize
    }

    /// The live set `from` ∪ `added` if some proxy built it from this very
    /// `from`. `added`: sorted, unique, none of them in `from`. Checked,
    /// not trusted: the result has exactly `added.len()` more names and
    /// holds every one of `added`, so a hash collision cannot give a wrong
    /// set.
    pub(super) fn extended(from: &Names, added: &[Arc<str>]) -> Option<Names> {
        let key = (address(from), hash(added));
        let found = {
            let s = steps().lock().unwrap_or_else(PoisonError::into_inner);
            let step = s.steps.get(&key)?;
            if step.from.as_ptr() as *const u8 as usize != key.0 {
                return None;
            }
            step.to.upgrade()?
        };
        let holds_all = added
            .iter()
            .all(|n| found.binary_search_by(|m| (**m).cmp(&**n)).is_ok());
        (found.len() == from.len() + added.len() && holds_all).then_some(found)
    }

    /// Records that `from` plus `added` gave `to` (see [`extended`]).
    pub(super) fn remember(from: &Names, added: &[Arc<str>], to: &Names) {
        let mut s = steps().lock().unwrap_or_else(PoisonError::into_inner);
        let step = Step {
            from: Arc::downgrade(from),
            to: Arc::downgrade(to),
        };
        s.steps.insert((address(from), hash(added)), step);
        if s.steps.len() > 2 * s.swept + 64 {
            s.steps
                .retain(|_, step| step.from.strong_count() > 0 && step.to.strong_count() > 0);
            s.swept = s.steps.len();
        }
    }

    /// Steps remembered (tests).
    #[cfg(test)]
    pub(super) fn steps_remembered() -> usize {
        steps()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .steps
            .len()
    }

    /// Entries in the table (tests).
    #[cfg(test)]
    pub(super) fn entries() -> usize {
        table()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_set_is_a_sorted_set() {
        let mut s = NameSet::from_names(["b", "a", "b"].map(Arc::from));
        assert_eq!(s.iter().map(|n| &**n).collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(s.contains("a") && !s.contains("c"));
        s.extend(["c", "a"].map(Arc::from).to_vec());
        s.remove_all(&["b"]);
        let other = NameSet::from_names(["a"].map(Arc::from));
        assert_eq!(
            s.difference(&other).map(|n| &**n).collect::<Vec<_>>(),
            vec!["c"]
        );
        s.remove_all(&["a", "z"]);
        assert_eq!(s.iter().map(|n| &**n).collect::<Vec<_>>(), vec!["c"]);
    }

    #[test]
    fn equal_sets_share_one_allocation_and_the_table_stays_bounded() {
        let names: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("n{i:03}"))).collect();
        // Two proxies subscribing to the same names, in different orders
        // and batches.
        let mut a = NameSet::from_names(names[..50].iter().cloned());
        a.extend(names[50..].to_vec());
        let mut b = NameSet::default();
        b.extend(names.iter().rev().cloned().collect());
        assert!(a.shares(&b), "equal sets are one allocation");
        // One of them changes: the other keeps its set.
        b.remove_all(&[&names[0]]);
        assert!(!a.shares(&b));
        assert_eq!(a.len(), 100);
        assert_eq!(b.len(), 99);
        // Equal text in other allocations: equal, not shared.
        let c = NameSet::from_names(names.iter().map(|n| Arc::from(&**n)));
        assert!(c == a && !c.shares(&a));
        // Thousands of short-lived sets leave a bounded table.
        for i in 0..5000 {
            let mut s = NameSet::default();
            s.extend(vec![Arc::from(format!("x{i}"))]);
        }
        assert!(shared::entries() < 1000, "{} entries", shared::entries());
    }

    #[test]
    fn added_since_walks_both_sets() {
        let old = NameSet::from_names(["b", "d"].map(Arc::from));
        let new = NameSet::from_names(["a", "b", "c", "e"].map(Arc::from));
        let added: Vec<&str> = new.added_since(&old).map(|n| &**n).collect();
        assert_eq!(added, ["a", "c", "e"]);
        assert_eq!(
            old.added_since(&new).map(|n| &**n).collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(new.added_since(&new).count(), 0);
        assert_eq!(new.added_since(&NameSet::default()).count(), 4);
    }

    #[test]
    fn a_step_another_set_took_is_reused_and_checked() {
        let names: Vec<Arc<str>> = (0..30).map(|i| Arc::from(format!("s{i:03}"))).collect();
        // Two proxies subscribe in the same batches: every step of the
        // second is the first's result (the same allocation).
        let mut a = NameSet::default();
        let mut b = NameSet::default();
        for batch in names.chunks(10) {
            a.extend(batch.to_vec());
            b.extend(batch.to_vec());
            assert!(a.shares(&b));
        }
        assert_eq!(a.len(), 30);
        // A batch with names already held adds only the new ones.
        let mut c = NameSet::from_names(names[..10].iter().cloned());
        c.extend(names[5..20].to_vec());
        assert!(c.iter().map(|n| &**n).eq(names[..20].iter().map(|n| &**n)));
        // The same batch from a different set gives that set's union.
        let mut d = NameSet::from_names([Arc::from("other")]);
        d.extend(names[..10].to_vec());
        assert_eq!(d.len(), 11);
        assert!(d.contains("other") && d.contains("s009"));
        // Thousands of short-lived steps leave a bounded table.
        for i in 0..5000 {
            let mut s = NameSet::default();
            s.extend(vec![Arc::from(format!("y{i}"))]);
        }
        let remembered = shared::steps_remembered();
        assert!(remembered < 1000, "{remembered} steps");
    }
}
