//! Keeping what this replica holds written to etcd: the part VM
//! registrations (`vm`) and federation exports (`federation`) share. Each
//! keeps the records it wants (`desired`) and what it wrote (`sent`); a
//! [`Store`] writes one record. [`write_changes`] puts what changed and
//! deletes what left, stopping at the first failure; [`Outage`] logs a
//! failure once and says when to retry. What the records are and where
//! they go is the callers' (and `meshreg_adapters::etcd`'s).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The pause before writing again after a failure.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

/// Writes and deletes one kind of record.
pub(crate) trait Store<K, V> {
    /// Puts `value` at `key`.
    async fn put(&mut self, key: &K, value: &V) -> Result<(), String>;
    /// Deletes `key`.
    async fn delete(&mut self, key: &K) -> Result<(), String>;
}

/// Puts every record of `desired` that `sent` lacks or holds otherwise,
/// then deletes every key of `sent` that `desired` lacks; `sent` follows
/// what was written. Returns the first failure (the rest waits for the
/// next call).
pub(crate) async fn write_changes<K, V, S>(
    store: &mut S,
    desired: &BTreeMap<K, V>,
    sent: &mut BTreeMap<K, V>,
) -> Option<String>
where
    K: Ord + Clone,
    V: PartialEq + Clone,
    S: Store<K, V>,
{
    for (key, value) in desired {
        if sent.get(key) == Some(value) {
            continue;
        }
        if let Err(e) = store.put(key, value).await {
            return Some(e);
        }
        sent.insert(key.clone(), value.clone());
    }
    let gone: Vec<K> = sent
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        if let Err(e) = store.delete(&key).await {
            return Some(e);
        }
        sent.remove(&key);
    }
    None
}

/// Whether writing fails now, so a failure is logged once per outage.
#[derive(Debug)]
pub(crate) struct Outage {
    /// What is written, for the log (`VM registrations`).
    what: &'static str,
    failing: bool,
}

impl Outage {
    pub(crate) fn new(what: &'static str) -> Outage {
        Outage {
            what,
            failing: false,
        }
    }

    /// Records how a round of writes ended; returns when to retry (after
    /// a failure).
    pub(crate) fn after(&mut self, error: Option<String>) -> Option<Instant> {
        match error {
            Some(why) => {
                if !self.failing {
                    tracing::warn!(error = %why, "cannot write {} to etcd; retrying", self.what);
                    self.failing = true;
                }
                Some(Instant::now() + RETRY)
            }
            None => {
                if self.failing {
                    tracing::info!("{} written to etcd again", self.what);
                    self.failing = false;
                }
                None
            }
        }
    }
}

/// A sleep until the earliest of `at` (a day when none).
pub(crate) fn sleep_until_first(at: &[Option<Instant>]) -> tokio::time::Sleep {
    match at.iter().flatten().min() {
        Some(at) => tokio::time::sleep_until((*at).into()),
        None => tokio::time::sleep(Duration::from_secs(86_400)),
    }
}
