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

/// The snapshot's own `Arc` for `name` when it has the resource, so that
/// thousands of proxies subscribing to the same name share one allocation.
pub(crate) fn intern(snap: &Snapshot, type_url: TypeUrl, name: &str) -> Arc<str> {
    snap.get(type_url, name)
        .map(|r| r.name.clone())
        .unwrap_or_else(|| Arc::from(name))
}

/// A set of resource names, kept sorted in one allocation: a proxy's
/// subscriptions (thousands of names, times thousands of proxies) at 16
/// bytes a name, the names themselves shared with the snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct NameSet(Vec<Arc<str>>);

impl NameSet {
    /// A set of `names` (any order, duplicates allowed).
    pub(crate) fn from_names(names: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut set = NameSet(names.into_iter().collect());
        set.normalize();
        set
    }

    fn normalize(&mut self) {
        // Stable sort: an already-sorted set plus a sorted batch of new
        // names merge in linear time.
        self.0.sort();
        self.0.dedup();
        if self.0.capacity() > 2 * self.0.len() + 16 {
            self.0.shrink_to_fit();
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.binary_search_by(|n| (**n).cmp(name)).is_ok()
    }

    pub(crate) fn extend(&mut self, names: Vec<Arc<str>>) {
        if names.len() <= 16 {
            // A few new clusters: insert in place, no re-sort.
            for name in names {
                if let Err(i) = self.0.binary_search_by(|n| (**n).cmp(&name)) {
                    self.0.insert(i, name);
                }
            }
        } else {
            self.0.extend(names);
            self.normalize();
        }
    }

    pub(crate) fn remove(&mut self, name: &str) {
        if let Ok(i) = self.0.binary_search_by(|n| (**n).cmp(name)) {
            self.0.remove(i);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter()
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
        s.remove("b");
        let other = NameSet::from_names(["a"].map(Arc::from));
        assert_eq!(
            s.difference(&other).map(|n| &**n).collect::<Vec<_>>(),
            vec!["c"]
        );
    }
}
