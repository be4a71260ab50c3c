//! The I/O side of the `serviceentry` adapter: reading the directory,
//! noticing changes, keeping each file's last good state, and sending
//! [`Update`]s.
//!
//! How a change gets in:
//!
//! 1. A `notify` watcher on the directory (not recursive) marks the state
//!    dirty on any create/modify/remove/rename, including the
//!    rename-into-place editors and ConfigMap mounts use. The callback only
//!    sets a flag and wakes the task (a [`Notify`] holds at most one
//!    permit), so nothing queues up however many events arrive.
//! 2. The task waits [`COALESCE`] so a burst of events becomes one rescan,
//!    then re-reads the files whose fingerprint (size, mtime, inode, ctime)
//!    changed and re-parses those whose content changed: an edit costs the
//!    edited file, not the directory. A directory replaced by a rename is
//!    watched again.
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
//!    removed), so the registry's work is proportional to the edit.
//!
//! Errors in files are logged at `warn` (with file, document index and
//! field path) and counted once per distinct bad content, not on every
//! rescan. A directory that is missing or cannot be listed never empties
//! the source: it is reported with `Update::Stale` (not ready if it never
//! synced; otherwise its last state keeps being served) and retried.
//!
//! This module does not interpret YAML (see `convert`) and never retries a
//! send: the sink is the registry's queue, and a closed sink ends the task.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use meshreg_registry::{Object as RegistryObject, ObjectKey, SourceId, Update};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Config;
use super::convert::{self, Object};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long to wait after the first filesystem event before rescanning, so
/// a burst (write + rename + chmod) becomes one rescan.
const COALESCE: Duration = Duration::from_millis(75);

/// How long a file must stay as it is before a change that removes objects
/// (an emptied, truncated or deleted file) is applied. Removing services is
/// the dangerous direction: an in-place write that truncates first, or a
/// delete-then-create, must never withdraw endpoints that still exist.
/// Additions and other changes apply at once.
const REMOVAL_GRACE: Duration = Duration::from_secs(1);

/// Files larger than this are refused (reason `too_large`): a registry
/// config file is kilobytes, and reading must stay bounded.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

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

/// The wake-up shared with the watcher callback.
#[derive(Debug, Default)]
struct Wake {
    dirty: AtomicBool,
    notify: Notify,
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
    /// What the registry holds from this source, by key; `None` before the
    /// first complete state was sent.
    last_sent: Option<BTreeMap<ObjectKey, RegistryObject>>,
    /// The directory could not be read at the last scan (reported stale).
    stale: bool,
    /// When a held-back removal is due (see [`REMOVAL_GRACE`]).
    deadline: Option<Instant>,
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
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads do not change anything; everything else (and watcher
            // errors, which may mean lost events) triggers a rescan.
            if let Ok(e) = &event
                && matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            cb.dirty.store(true, Ordering::Release);
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
            scanner: Arc::new(Mutex::new(Scanner::new(
                config,
                metrics.clone(),
                source.clone(),
            ))),
            source,
            metrics,
            sink,
            shutdown,
            wake,
            watcher,
            watching: false,
            last_sent: None,
            stale: false,
            deadline: None,
        }
    }

    async fn run(mut self) -> Result<()> {
        // Watch before the first read, so a change during it is not lost.
        self.ensure_watching();
        if !self.rescan(true).await {
            return Ok(());
        }
        let mut tick = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(()),
                () = self.sink.closed() => return Ok(()),
                () = self.wake.notify.notified() => {
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(COALESCE) => {}
                    }
                    if !self.wake.dirty.swap(false, Ordering::AcqRel) {
                        // A permit left from a burst already handled.
                        continue;
                    }
                    // Only files whose fingerprint changed are read again.
                    false
                }
                _ = tick.tick() => {
                    self.ensure_watching();
                    false
                }
                () = sleep_until_some(self.deadline) => false,
            };
            if !self.rescan(force).await {
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
        match watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %self.dir.display(), "watching");
                self.watching = true;
            }
            Err(error) => {
                tracing::debug!(%error, "cannot watch the directory yet");
            }
        }
    }

    /// Rescans and sends the state if it changed. `false` when the task
    /// must stop (shutdown or closed sink).
    async fn rescan(&mut self, force: bool) -> bool {
        // File I/O and parsing block; keep them off the async workers. The
        // lock is only ever taken on that blocking thread, one scan at a time.
        let scanner = self.scanner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut scanner = scanner.lock().unwrap_or_else(PoisonError::into_inner);
            let state = scanner.scan(force);
            let replaced = std::mem::take(&mut scanner.dir_replaced);
            (state, scanner.dir_missing, replaced, scanner.deadline)
        })
        .await;
        let (state, dir_missing, replaced, deadline) = match joined {
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
        match state {
            Ok(objects) => self.send(objects).await,
            Err(error) => self.send_stale(error).await,
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

    /// Sends what changed since the last state sent: the complete state the
    /// first time (a `Reset`), then only the objects that differ.
    async fn send(&mut self, objects: Vec<RegistryObject>) -> bool {
        let current: BTreeMap<ObjectKey, RegistryObject> =
            objects.into_iter().map(|o| (o.key(), o)).collect();
        let recovered = std::mem::take(&mut self.stale);
        let update = match &self.last_sent {
            Some(last) if !recovered => {
                let apply: Vec<RegistryObject> = current
                    .iter()
                    .filter(|(k, o)| last.get(*k) != Some(*o))
                    .map(|(_, o)| o.clone())
                    .collect();
                let delete: Vec<ObjectKey> = last
                    .keys()
                    .filter(|k| !current.contains_key(*k))
                    .cloned()
                    .collect();
                if apply.is_empty() && delete.is_empty() {
                    tracing::trace!("state unchanged; nothing sent");
                    return true;
                }
                for key in &delete {
                    tracing::info!(object = %key, "removed");
                }
                for o in &apply {
                    tracing::info!(object = %o.key(), "added or changed");
                }
                Update::Patch {
                    source: self.source.clone(),
                    apply,
                    delete,
                }
            }
            _ => {
                tracing::info!(objects = current.len(), "sent the directory's state");
                Update::Reset {
                    source: self.source.clone(),
                    objects: current.values().cloned().collect(),
                }
            }
        };
        if !self.deliver(update).await {
            return false;
        }
        self.metrics.update_sent(&self.source);
        self.last_sent = Some(current);
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

/// What is known about one file.
#[derive(Debug, Default)]
struct FileState {
    /// Size and mtime at the last read.
    fingerprint: Option<Fingerprint>,
    /// The content last read (parsed or refused); an equal content is not
    /// parsed or reported again.
    content: Option<String>,
    /// The objects served: of the last content that parsed (and, if it
    /// removed objects, stayed for [`REMOVAL_GRACE`]); empty if none ever did.
    objects: Vec<Object>,
    /// A parsed content that removes objects, and since when it is there.
    pending: Option<(Vec<Object>, std::time::Instant)>,
    /// When the file was first seen missing (its removal waits too).
    gone_since: Option<std::time::Instant>,
    /// The last content read was refused.
    failing: bool,
}

/// Size, mtime, inode and ctime: a file whose fingerprint is unchanged is
/// not read again, on events as on rescans.
type Fingerprint = (u64, Option<SystemTime>, u64, i64);

fn fingerprint(m: &fs::Metadata) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        m.modified().ok(),
        m.ino(),
        m.ctime_nsec() + m.ctime() * 1_000_000_000,
    )
}

/// Whether `new` lacks an object `old` has (same kind, namespace, name).
fn removes(old: &[Object], new: &[Object]) -> bool {
    let ids: std::collections::HashSet<_> = new.iter().map(Object::id).collect();
    old.iter().any(|o| !ids.contains(&o.id()))
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads the directory and keeps per-file state. Synchronous: runs on a
/// blocking thread.
struct Scanner {
    dir: PathBuf,
    default_namespace: String,
    source: SourceId,
    metrics: Metrics,
    files: BTreeMap<PathBuf, FileState>,
    dir_missing: bool,
    dir_failing: bool,
    /// The directory's (device, inode) at the last scan.
    dir_id: Option<(u64, u64)>,
    /// The directory was replaced (renamed over) since the last scan.
    dir_replaced: bool,
    /// The earliest held-back removal.
    deadline: Option<std::time::Instant>,
    conflicts: Vec<String>,
    /// Valid entries that cannot be served, as last logged.
    unsupported: Vec<String>,
}

// === impl Scanner ===

impl Scanner {
    fn new(config: Config, metrics: Metrics, source: SourceId) -> Self {
        Scanner {
            dir: config.dir,
            default_namespace: config.default_namespace,
            source,
            metrics,
            files: BTreeMap::new(),
            dir_missing: false,
            dir_failing: false,
            dir_id: None,
            dir_replaced: false,
            deadline: None,
            conflicts: Vec::new(),
            unsupported: Vec::new(),
        }
    }

    /// Brings the per-file state up to date and returns the complete state,
    /// or why the directory cannot be read (its files' last state is kept).
    /// With `force`, every file is read (a filesystem event said something
    /// changed); otherwise only files whose size or mtime changed.
    fn scan(&mut self, force: bool) -> Result<Vec<RegistryObject>, String> {
        match self.list() {
            Ok(paths) => {
                if self.dir_missing || self.dir_failing {
                    tracing::info!(dir = %self.dir.display(), "directory readable again");
                }
                self.dir_missing = false;
                self.dir_failing = false;
                let id = fs::metadata(&self.dir).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino())
                });
                if self.dir_id.is_some() && id != self.dir_id {
                    self.dir_replaced = true;
                }
                self.dir_id = id;
                let now = std::time::Instant::now();
                let listed: std::collections::HashSet<&PathBuf> = paths.iter().collect();
                self.files.retain(|p, state| {
                    if listed.contains(p) {
                        state.gone_since = None;
                        return true;
                    }
                    let since = *state.gone_since.get_or_insert(now);
                    let due = state.objects.is_empty() || now >= since + REMOVAL_GRACE;
                    if due {
                        tracing::info!(file = %p.display(), "file removed");
                    }
                    !due
                });
                for path in paths {
                    self.refresh(path, force);
                }
                self.settle(now);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removing services is the dangerous direction: a vanished
                // directory makes the source stale, never empty.
                if !self.dir_missing {
                    tracing::warn!(dir = %self.dir.display(), "directory does not exist; keeping the last state (the source is stale) until it is back");
                    self.metrics.error(&self.source, "io");
                    self.dir_missing = true;
                }
                return Err(format!("directory {} does not exist", self.dir.display()));
            }
            Err(error) => {
                // Keep what we have: a transient error must not drop hosts.
                if !self.dir_failing {
                    tracing::warn!(dir = %self.dir.display(), %error, "cannot list directory; keeping the last state");
                    self.metrics.error(&self.source, "io");
                    self.dir_failing = true;
                }
                return Err(format!("cannot list {}: {error}", self.dir.display()));
            }
        }
        Ok(self.build())
    }

    /// The YAML files directly in the directory, sorted.
    fn list(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let lower = name.to_ascii_lowercase();
            if name.starts_with('.') || !(lower.ends_with(".yaml") || lower.ends_with(".yml")) {
                continue;
            }
            let path = entry.path();
            // Follows symlinks (ConfigMap mounts); a dangling link is skipped.
            if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Applies held-back removals that have waited long enough; notes when
    /// the next one is due.
    fn settle(&mut self, now: std::time::Instant) {
        let mut next: Option<std::time::Instant> = None;
        for (path, state) in &mut self.files {
            let due_at = |since: std::time::Instant| since + REMOVAL_GRACE;
            if let Some((_, since)) = &state.pending {
                if now >= due_at(*since) {
                    if let Some((objects, _)) = state.pending.take() {
                        tracing::info!(file = %path.display(), "applying the file's removals after it stayed unchanged");
                        state.objects = objects;
                    }
                } else {
                    next = Some(next.map_or(due_at(*since), |n| n.min(due_at(*since))));
                }
            }
            if let Some(since) = state.gone_since {
                next = Some(next.map_or(due_at(since), |n| n.min(due_at(since))));
            }
        }
        self.deadline = next;
    }

    fn refresh(&mut self, path: PathBuf, force: bool) {
        let fingerprint = fs::metadata(&path).ok().map(|m| fingerprint(&m));
        let state = self.files.entry(path.clone()).or_default();
        if !force && fingerprint.is_some() && state.fingerprint == fingerprint {
            return;
        }
        let file = path.display().to_string();
        let text = match read_bounded(&path) {
            Ok(text) => text,
            Err(ReadError::Gone) => {
                // Raced with a delete: the next listing drops it.
                self.files.remove(&path);
                return;
            }
            Err(ReadError::Failed { reason, message }) => {
                let again =
                    state.failing && state.fingerprint == fingerprint && state.content.is_none();
                if !again {
                    tracing::warn!(%file, error = %message, "cannot read file; keeping its last good state");
                    self.metrics.error(&self.source, reason);
                }
                state.fingerprint = fingerprint;
                state.content = None;
                state.failing = true;
                return;
            }
        };
        state.fingerprint = fingerprint;
        if state.content.as_deref() == Some(text.as_str()) {
            return;
        }
        match convert::parse_file(&file, &text, &self.default_namespace) {
            Ok(parsed) => {
                if state.failing {
                    tracing::info!(%file, "file is valid again");
                } else {
                    tracing::debug!(%file, objects = parsed.objects.len(), "file loaded");
                }
                // Istio's warnings do not refuse anything; logged once per
                // content, like errors.
                for w in &parsed.warnings {
                    tracing::warn!(
                        file = %w.file,
                        document = w.doc,
                        path = %w.path,
                        "{w} (an Istio warning; the document is accepted)"
                    );
                }
                if removes(&state.objects, &parsed.objects) {
                    // Held back: an in-place write may have truncated it.
                    tracing::debug!(%file, "content removes objects; applying it if it stays for the grace period");
                    state.pending = Some((parsed.objects, std::time::Instant::now()));
                } else {
                    state.objects = parsed.objects;
                    state.pending = None;
                }
                state.failing = false;
            }
            Err(errors) => {
                for e in &errors {
                    tracing::warn!(
                        file = %e.file,
                        document = e.doc,
                        path = %e.path,
                        reason = e.reason.as_str(),
                        "{e}; keeping the file's last good state"
                    );
                }
                let reason = errors.first().map_or("invalid", |e| e.reason.as_str());
                self.metrics.error(&self.source, reason);
                state.failing = true;
            }
        }
        state.content = Some(text);
    }

    fn build(&mut self) -> Vec<RegistryObject> {
        let built = convert::objects(
            self.files.values().flat_map(|f| f.objects.iter()),
            &self.source,
        );
        for c in &built.conflicts {
            if !self.conflicts.contains(c) {
                tracing::warn!(conflict = %c, "ServiceEntries disagree");
            }
        }
        self.conflicts = built.conflicts;
        for u in &built.unsupported {
            if !self.unsupported.contains(u) {
                tracing::warn!(entry = %u, "valid ServiceEntry meshreg cannot serve");
            }
        }
        self.unsupported = built.unsupported;
        self.metrics
            .objects(&self.source, "ServiceEntry", built.service_entries);
        self.metrics
            .objects(&self.source, "WorkloadEntry", built.workload_entries);
        built.objects
    }
}

enum ReadError {
    /// The file disappeared.
    Gone,
    /// It could not be used; `reason` is the metric label.
    Failed {
        reason: &'static str,
        message: String,
    },
}

fn read_bounded(path: &Path) -> Result<String, ReadError> {
    let failed = |reason, message: String| ReadError::Failed { reason, message };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Gone),
        Err(e) => return Err(failed("io", e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed("io", e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(failed(
            "too_large",
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| failed("parse", format!("not UTF-8: {e}")))
}
