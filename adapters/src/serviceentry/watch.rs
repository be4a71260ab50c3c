//! The I/O side of the `serviceentry` adapter: reading the directory,
//! noticing changes, keeping each file's last good state, and sending
//! [`Update`]s.
//!
//! How a change gets in:
//!
//! 1. A `notify` watcher on the directory and its subdirectories (the
//!    tree is read recursively, as istiod's file source does; hidden files
//!    and directories are skipped) sees every create/modify/remove/rename,
//!    including the rename-into-place editors and ConfigMap mounts use. The
//!    callback only records the path and wakes the task (a [`Notify`] holds
//!    at most one permit), so nothing queues up however many events arrive.
//! 2. A path whose last event ends a write (inotify's `IN_CLOSE_WRITE`, a
//!    rename into place, a removal; a mode change after it does not count)
//!    is read at once. A path whose write is still in progress (created,
//!    data written) waits [`Config::write_settle`] after the first such
//!    event, so a burst becomes one read; a writer that keeps the file open
//!    longer is read as the file stands then. Either way the task re-reads
//!    the files whose fingerprint (size, mtime, inode, ctime) changed and
//!    re-parses those whose content changed: an edit costs the edited file,
//!    not the directory. A directory replaced by a rename is watched again.
//! 3. A periodic rescan ([`Config::rescan_interval`]) does the same, as a
//!    safety net for missed events, and retries a directory that is missing
//!    or could not be watched.
//! 4. A change that removes objects (a file emptied, truncated or deleted)
//!    is held back until the file has stayed that way for
//!    [`REMOVAL_GRACE`]; additions and other changes apply at once.
//! 5. The objects of every file's last good state become registry objects
//!    ([`convert::objects`]: declarations, shards, workloads). The first
//!    time they go as one `Reset`; after that only the objects that differ
//!    from what was sent go, as one `Patch` (added or changed objects, keys
//!    removed), so the registry's work is proportional to the edit. A
//!    source started again on a directory an earlier one served in this
//!    process (a reload that changed its settings) sends its first state
//!    as a `Patch` without removals and its whole state as a `Reset`
//!    [`REMOVAL_GRACE`] later, so what the earlier source served and the
//!    first read lacks (a file half-written at that moment) is withdrawn
//!    only if it is still missing then, as for any removal.
//!
//! Errors in files are logged at `warn` (with file, document index and
//! field path) and counted once per distinct bad content, not on every
//! rescan. A directory that is missing or cannot be listed never empties
//! the source: it is reported with `Update::Stale` (not ready if it never
//! synced; otherwise its last state keeps being served) and retried.
//!
//! This module does not interpret YAML (see `convert`) and never retries a
//! send: the sink is the registry's queue, and a closed sink ends the task.

mod parse;
mod scan;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshreg_registry::{SourceId, Update};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) use self::scan::yaml_files;
use self::scan::{Delta, Scanner, Targets};
use super::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long a file must stay as it is before a change that removes objects
/// (an emptied, truncated or deleted file) is applied. Removing services is
/// the dangerous direction: an in-place write that truncates first, or a
/// delete-then-create, must never withdraw endpoints that still exist.
/// Additions and other changes apply at once.
const REMOVAL_GRACE: Duration = Duration::from_secs(1);

/// After the directory comes back from missing or unreadable, removals of
/// the files it had wait at least this long (and for the directory to be
/// quiet): a deploy that removes the directory, recreates it and refills
/// it (`rm -rf; mkdir; tar x`) must never withdraw what it puts back.
const RECOVERY_GRACE: Duration = Duration::from_secs(10);

/// Files larger than this are refused (reason `too_large`): a registry
/// config file is kilobytes, and reading must stay bounded.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// How long a scan waits for the files it asked the parsers for before it
/// applies what it has; a file still being parsed is applied when it is
/// done (see `parse`). Files parse in microseconds to milliseconds: only a
/// pathological one takes longer.
const PARSE_BUDGET: Duration = Duration::from_millis(100);

/// The directories whose source sent its first state in this process (see
/// the module docs, 5), at most [`MAX_SERVED_DIRS`] (then forgotten and
/// started again: a reload of a directory not in it withdraws at once).
static SERVED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// See [`SERVED_DIRS`].
const MAX_SERVED_DIRS: usize = 256;

/// Notes that `dir` was served; returns whether it was before.
fn served_before(dir: &std::path::Path) -> bool {
    let mut dirs = SERVED_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
    if dirs.iter().any(|d| d == dir) {
        return true;
    }
    if dirs.len() >= MAX_SERVED_DIRS {
        dirs.clear();
    }
    dirs.push(dir.to_path_buf());
    false
}

/// Forgets what this process remembers of `dir` (see
/// [`super::forget_directory`]).
pub(super) fn forget_directory(dir: &std::path::Path) {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    SERVED_DIRS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|d| *d != dir);
    scan::forget_under(&dir);
}

/// Runs the adapter; see [`super::ServiceEntryAdapter::run`].
pub(super) async fn run(
    config: Config,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    validate(&config)?;
    let span = tracing::info_span!("adapter", kind = "serviceentry", source = %source);
    Task::new(config, metrics, source, sink, shutdown)
        .run()
        .instrument(span)
        .await
}

fn validate(config: &Config) -> Result<()> {
    let invalid = |field, reason: &str| Error::Config {
        adapter: "serviceentry",
        field,
        reason: reason.to_string(),
    };
    if config.dir.as_os_str().is_empty() {
        return Err(invalid("dir", "must not be empty"));
    }
    if config.rescan_interval.is_zero() {
        return Err(invalid("rescan_interval", "must be greater than zero"));
    }
    if config.default_namespace.is_empty() {
        return Err(invalid("default_namespace", "must not be empty"));
    }
    match fs::metadata(&config.dir) {
        Ok(m) if !m.is_dir() => Err(Error::NotADirectory {
            path: config.dir.clone(),
        }),
        // Missing or unreadable now: a source error, retried.
        _ => Ok(()),
    }
}

/// At most this many event paths are remembered between scans; past it
/// the next scan lists the whole directory.
const MAX_EVENT_PATHS: usize = 4096;

/// The wake-up shared with the watcher callback and the parser threads.
#[derive(Debug, Default)]
struct Wake {
    /// A parser finished a file a scan did not wait for: scan at once.
    parsed: AtomicBool,
    notify: Notify,
    /// The paths events named since the last scan; `overflow` when they
    /// cannot be trusted (too many, a watcher error, the directory itself).
    paths: Mutex<EventPaths>,
}

#[derive(Debug, Default)]
struct EventPaths {
    /// Paths whose last event ends a write: read at once.
    settled: HashSet<PathBuf>,
    /// Paths whose write may still be in progress: read after
    /// [`Config::write_settle`].
    pending: HashSet<PathBuf>,
    overflow: bool,
}

/// What an event says of a write to its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// It ended: a file written and closed, a rename (into or out of
    /// place), a removal. The path can be read at once.
    Ended,
    /// It began or goes on: a creation or a data write, followed by more
    /// of the same until the writer closes the file.
    InProgress,
    /// Neither: attributes changed. vim sets them right after closing the
    /// file it wrote, which must not make the finished write wait again.
    Attributes,
}

fn write_of(kind: &EventKind) -> Write {
    use notify::event::ModifyKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => Write::Ended,
        EventKind::Modify(ModifyKind::Metadata(_)) => Write::Attributes,
        _ => Write::InProgress,
    }
}

impl Wake {
    /// Records what an event names; the task reads the paths (see
    /// [`Wake::take_settled`] and [`Wake::take`]).
    fn record(&self, event: &notify::Result<notify::Event>, dir: &std::path::Path) {
        let mut p = self.paths.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            Ok(e) => {
                let write = write_of(&e.kind);
                for path in &e.paths {
                    if path == dir || p.settled.len() + p.pending.len() >= MAX_EVENT_PATHS {
                        p.overflow = true;
                        continue;
                    }
                    match write {
                        Write::Ended => {
                            p.pending.remove(path);
                            p.settled.insert(path.clone());
                        }
                        Write::InProgress => {
                            // A new write began after the last one ended.
                            p.settled.remove(path);
                            p.pending.insert(path.clone());
                        }
                        Write::Attributes if p.settled.contains(path) => {}
                        Write::Attributes => {
                            p.pending.insert(path.clone());
                        }
                    }
                }
                if e.paths.is_empty() {
                    p.overflow = true;
                }
            }
            Err(_) => p.overflow = true,
        }
    }

    /// The paths to read at once (their writes ended), and whether others
    /// wait for [`Config::write_settle`]. Nothing is read at once while
    /// the paths cannot be trusted: the whole directory is listed after the
    /// wait instead.
    fn take_settled(&self) -> (HashSet<PathBuf>, bool) {
        let mut p = self.paths.lock().unwrap_or_else(PoisonError::into_inner);
        if p.overflow {
            return (HashSet::new(), true);
        }
        (std::mem::take(&mut p.settled), !p.pending.is_empty())
    }

    /// Everything the next scan must look at.
    fn take(&self) -> Targets {
        let mut p = self.paths.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = std::mem::take(&mut *p);
        if taken.overflow {
            Targets::All
        } else {
            taken.settled.extend(taken.pending);
            Targets::Paths(taken.settled)
        }
    }
}

struct Task {
    dir: PathBuf,
    source: SourceId,
    metrics: Metrics,
    scanner: Arc<Mutex<Scanner>>,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
    wake: Arc<Wake>,
    watcher: Option<RecommendedWatcher>,
    watching: bool,
    /// The complete state was sent once (later changes go as patches).
    sent_once: bool,
    /// The directory could not be read at the last scan (reported stale).
    stale: bool,
    /// When a held-back removal is due (see [`REMOVAL_GRACE`]).
    deadline: Option<Instant>,
    /// When the whole state is due after a first state sent without
    /// removals (see the module docs, 5).
    reset_at: Option<Instant>,
    /// When the paths whose writes may be in progress are read (see
    /// [`Config::write_settle`]).
    settle_at: Option<Instant>,
    write_settle: Duration,
    interval: Duration,
}

// === impl Task ===

impl Task {
    fn new(
        config: Config,
        metrics: Metrics,
        source: SourceId,
        sink: mpsc::Sender<Update>,
        shutdown: CancellationToken,
    ) -> Self {
        let wake = Arc::new(Wake::default());
        let cb = wake.clone();
        let parsed = wake.clone();
        let dir = config.dir.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads do not change anything; everything else (and watcher
            // errors, which may mean lost events) triggers a rescan.
            if let Ok(e) = &event
                && matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            cb.record(&event, &dir);
            cb.notify.notify_one();
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(error) => {
                // Still correct, only slower: the periodic rescan remains.
                tracing::warn!(%error, "cannot create a filesystem watcher; relying on periodic rescans");
                metrics.error(&source, "watch");
                None
            }
        };
        metrics.unsynced(&source);
        Task {
            dir: config.dir.clone(),
            interval: config.rescan_interval,
            write_settle: config.write_settle,
            settle_at: None,
            scanner: Arc::new(Mutex::new(Scanner::new(
                config,
                metrics.clone(),
                source.clone(),
                Box::new(move || {
                    parsed.parsed.store(true, Ordering::Release);
                    parsed.notify.notify_one();
                }),
            ))),
            source,
            metrics,
            sink,
            shutdown,
            wake,
            watcher,
            watching: false,
            sent_once: false,
            stale: false,
            deadline: None,
            reset_at: None,
        }
    }

    async fn run(mut self) -> Result<()> {
        // Watch before the first read, so a change during it is not lost.
        self.ensure_watching();
        if !self.rescan(Targets::All).await {
            return Ok(());
        }
        let mut tick = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let targets = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(()),
                () = self.sink.closed() => return Ok(()),
                () = self.wake.notify.notified() => {
                    let (settled, waiting) = self.wake.take_settled();
                    if waiting && self.settle_at.is_none() {
                        self.settle_at = Some(Instant::now() + self.write_settle);
                    }
                    let parsed = self.wake.parsed.swap(false, Ordering::AcqRel);
                    if settled.is_empty() && !parsed {
                        // Writes in progress, or a permit left from a
                        // burst already handled.
                        continue;
                    }
                    // Only the files whose writes ended (none: only what
                    // the parsers finished).
                    Targets::Paths(settled)
                }
                () = sleep_until_some(self.settle_at) => {
                    self.settle_at = None;
                    // Every file the events named.
                    self.wake.take()
                }
                _ = tick.tick() => {
                    self.ensure_watching();
                    Targets::All
                }
                () = sleep_until_some(self.deadline) => Targets::Paths(HashSet::new()),
                () = sleep_until_some(self.reset_at) => Targets::Paths(HashSet::new()),
            };
            if !self.rescan(targets).await {
                return Ok(());
            }
        }
    }

    /// Starts watching the directory if it is not watched yet; failure (e.g.
    /// the directory is missing) is retried on the next tick.
    fn ensure_watching(&mut self) {
        if self.watching {
            return;
        }
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        match watcher.watch(&self.dir, RecursiveMode::Recursive) {
            Ok(()) => {
                tracing::debug!(dir = %self.dir.display(), "watching");
                self.watching = true;
            }
            Err(error) => {
                tracing::debug!(%error, "cannot watch the directory yet");
            }
        }
    }

    /// Rescans `targets` and sends what changed. `false` when the task must
    /// stop (shutdown or closed sink).
    async fn rescan(&mut self, targets: Targets) -> bool {
        // File I/O and parsing block; keep them off the async workers. The
        // lock is only ever taken on that blocking thread, one scan at a time.
        let scanner = self.scanner.clone();
        // A state after the source was stale goes whole (the first one
        // too, but its delta already is everything: every file is new), and
        // so does the state due after a first state without removals.
        let due = self.reset_at.is_some_and(|at| at <= Instant::now());
        let full = self.sent_once && (self.stale || due);
        let joined = tokio::task::spawn_blocking(move || {
            let mut scanner = scanner.lock().unwrap_or_else(PoisonError::into_inner);
            let delta = scanner.scan(targets);
            let all = (full && delta.is_ok()).then(|| scanner.all());
            let replaced = std::mem::take(&mut scanner.dir_replaced);
            (delta, all, scanner.dir_missing, replaced, scanner.deadline)
        })
        .await;
        let (delta, all, dir_missing, replaced, deadline) = match joined {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => return false,
        };
        self.deadline = deadline.map(Instant::from_std);
        if replaced && self.watching {
            // Renamed over: the watch follows the old directory.
            tracing::info!(dir = %self.dir.display(), "directory replaced; watching the new one");
            if let Some(w) = self.watcher.as_mut() {
                let _ = w.unwatch(&self.dir);
            }
            self.watching = false;
            self.ensure_watching();
        }
        if dir_missing && self.watching {
            // The kernel dropped the watch with the directory; re-add it
            // when the directory is back.
            if let Some(w) = self.watcher.as_mut() {
                let _ = w.unwatch(&self.dir);
            }
            self.watching = false;
        }
        match (delta, all) {
            (Err(error), _) => self.send_stale(error).await,
            (Ok(_), Some(all)) => {
                self.reset_at = None;
                tracing::info!(objects = all.len(), "sent the directory's state");
                let update = Update::Reset {
                    source: self.source.clone(),
                    objects: all,
                };
                self.send(update).await
            }
            (Ok(delta), None) if !self.sent_once && served_before(&self.dir) => {
                tracing::info!(
                    objects = delta.apply.len(),
                    "sent the directory's state without removals (an earlier source served it); the whole state follows after the removal grace"
                );
                self.reset_at = Some(Instant::now() + REMOVAL_GRACE);
                let update = Update::Patch {
                    source: self.source.clone(),
                    apply: delta.apply,
                    delete: Vec::new(),
                };
                self.send(update).await
            }
            (Ok(delta), None) if !self.sent_once => {
                tracing::info!(objects = delta.apply.len(), "sent the directory's state");
                let update = Update::Reset {
                    source: self.source.clone(),
                    objects: delta.apply,
                };
                self.send(update).await
            }
            (Ok(delta), None) => {
                if delta.is_empty() {
                    tracing::trace!("nothing changed");
                    return true;
                }
                log_delta(&delta);
                let update = Update::Patch {
                    source: self.source.clone(),
                    apply: delta.apply,
                    delete: delta.delete,
                };
                self.send(update).await
            }
        }
    }

    /// The directory cannot be read: the source keeps serving its last
    /// state (or stays not ready if it never had one), reported stale.
    async fn send_stale(&mut self, error: String) -> bool {
        if self.stale {
            return true;
        }
        let update = Update::Stale {
            source: self.source.clone(),
            error,
        };
        if !self.deliver(update).await {
            return false;
        }
        self.stale = true;
        true
    }

    async fn send(&mut self, update: Update) -> bool {
        if !self.deliver(update).await {
            return false;
        }
        self.metrics.update_sent(&self.source);
        self.sent_once = true;
        self.stale = false;
        true
    }

    async fn deliver(&mut self, update: Update) -> bool {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => false,
            sent = self.sink.send(update) => sent.is_ok(),
        }
    }
}

fn log_delta(delta: &Delta) {
    for key in &delta.delete {
        tracing::info!(object = %key, "removed");
    }
    for o in &delta.apply {
        tracing::info!(object = %o.key(), "added or changed");
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
