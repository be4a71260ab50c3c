//! The directory's per-file state, kept so an edit costs the edited file.
//!
//! [`Scanner`] is synchronous (it runs on a blocking thread). Each file
//! keeps its fingerprint, a hash of its last content, the content it serves
//! (its text, or its parsed objects if it was slow to parse: see
//! [`Served`]) and hashes of the registry objects it contributes; a scan
//! looks at the files it is told about (the paths of filesystem events),
//! or lists the whole
//! directory (the first scan, the periodic safety net, a lost event), and
//! returns only what changed: the registry objects added or changed and the
//! keys removed. Nothing in an edit is proportional to the number of files.
//!
//! Two files declaring the same object (kind, namespace, name) cannot both
//! be used: the last by path is, as with istiod's `--configDir` (seen with
//! a real istiod in the differential test) and `kubectl apply -f <dir>`
//! (files applied in path order, the last write stays); the others are
//! reported, and the next one takes over if the used one goes.
//!
//! A refused file keeps serving its last good content. That content is
//! also remembered for the process ([`remember`]), so a scanner started
//! again on the same directory (a reload that changed the source's
//! settings) serves it too while the file is refused, instead of
//! withdrawing what the file declared with its first state.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use meshreg_registry::{Object as RegistryObject, ObjectKey, SourceId};

use super::parse::{Done, Job, Outcome, Parsers};
use super::{PARSE_BUDGET, RECOVERY_GRACE, REMOVAL_GRACE};
use crate::metrics::Metrics;
use crate::serviceentry::Config;
use crate::serviceentry::convert::{self, Object};

/// Which files a scan looks at.
#[derive(Debug)]
pub(super) enum Targets {
    /// List the directory and look at every file in it.
    All,
    /// Only these paths (from filesystem events); held-back removals that
    /// are due are applied either way.
    Paths(HashSet<PathBuf>),
}

/// What changed since the last scan.
#[derive(Debug, Default)]
pub(super) struct Delta {
    /// Registry objects added or changed.
    pub(super) apply: Vec<RegistryObject>,
    /// Keys of registry objects removed.
    pub(super) delete: Vec<ObjectKey>,
}

impl Delta {
    pub(super) fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.delete.is_empty()
    }
}

/// An object's identity across files.
type Id = (&'static str, String, String);

/// Size, mtime, inode and ctime: a file whose fingerprint is unchanged is
/// not read again.
pub(super) type Fingerprint = (u64, Option<SystemTime>, u64, i64);

fn fingerprint(m: &fs::Metadata) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        m.modified().ok(),
        m.ino(),
        m.ctime_nsec() + m.ctime() * 1_000_000_000,
    )
}

/// A content served by a file that parsed within this long and is at most
/// [`CHEAP_TEXT`] long keeps its text, not its objects (see [`Served`]).
const CHEAP_PARSE: Duration = Duration::from_millis(1);

/// See [`CHEAP_PARSE`].
const CHEAP_TEXT: usize = 64 * 1024;

/// The content a file serves: the last that parsed (and, if it removed
/// objects, stayed for [`REMOVAL_GRACE`]).
///
/// A content that was cheap to parse ([`CHEAP_PARSE`], [`CHEAP_TEXT`]) is
/// kept as text and parsed again, on the scanning thread, when its objects
/// are needed after the scan that read it: another file takes or lets go
/// of a name it declares, or a whole state is sent after the source was
/// stale. The same text parses the same (the parser is deterministic) and
/// as cheaply, so an edit never waits long for it; a content that was slow
/// or large to parse keeps its objects instead (issue 18: a valid file may
/// cost the parser seconds).
///
/// Why text: a one-host ServiceEntry of 10 endpoints takes about 2.1 KB
/// parsed and 600 bytes as text (BENCHMARKS.md, the 10,000-service
/// daemon). The text is copied here, on the scanning thread, and what the
/// parser made goes back to a parser thread to be dropped (see `parse`).
#[derive(Debug, Clone)]
struct Served {
    kept: Kept,
    /// Sorted hashes of what the content declares (see [`Object::shape`]):
    /// a new content lacking one of them removes something.
    shape: Vec<u64>,
}

/// How a [`Served`] content is kept.
#[derive(Debug, Clone)]
enum Kept {
    /// It declares no object (a file of other kinds, or comments only).
    Nothing,
    /// Its text, parsed again when its objects are needed.
    Text(Box<str>),
    /// Its parsed objects (slow or large to parse). Empty until the end of
    /// the scan that read it, which moves them here from
    /// [`FileState::fresh`].
    Objects(Vec<Object>),
}

impl Served {
    fn new(text: &str, objects: &[Object], took: Duration) -> Self {
        let mut shape = Vec::new();
        for o in objects {
            o.shape(&mut shape);
        }
        shape.sort_unstable();
        shape.dedup();
        shape.shrink_to_fit();
        let kept = if objects.is_empty() {
            Kept::Nothing
        } else if took <= CHEAP_PARSE && text.len() <= CHEAP_TEXT {
            Kept::Text(Box::from(text))
        } else {
            Kept::Objects(Vec::new())
        };
        Served { kept, shape }
    }

    /// Whether `new` lacks an object, a host, a port or an inline endpoint
    /// address this content has (a partial write can truncate a list as
    /// well as a file).
    fn removed_by(&self, new: &Served) -> bool {
        self.shape
            .iter()
            .any(|h| new.shape.binary_search(h).is_err())
    }
}

/// The last good contents of refused files, for every scanner of the
/// process (see the module docs): (file, the fingerprint of its refused
/// content, the content it served, that content's bytes), at most
/// [`MAX_REMEMBERED`], the oldest forgotten first. A later scanner serves
/// a remembered content only for the file as it was refused (the same
/// fingerprint): a file changed or replaced since is read for what it is.
/// Refused files are few; this is empty almost always.
static REMEMBERED: Mutex<Vec<Remembered>> = Mutex::new(Vec::new());

/// See [`REMEMBERED`].
type Remembered = (PathBuf, Option<Fingerprint>, Served, usize);

/// See [`REMEMBERED`].
const MAX_REMEMBERED: usize = 1024;

fn remembered() -> std::sync::MutexGuard<'static, Vec<Remembered>> {
    REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Remembers that `path`, refused as it is at `fingerprint`, served
/// `served` (`len` bytes).
fn remember(path: &Path, fingerprint: Option<Fingerprint>, served: Served, len: usize) {
    let mut all = remembered();
    all.retain(|(p, ..)| p != path);
    if all.len() >= MAX_REMEMBERED {
        all.remove(0);
    }
    all.push((path.to_path_buf(), fingerprint, served, len));
}

/// What `path` served when it was refused as it is at `fingerprint`.
fn recall(path: &Path, fingerprint: Option<Fingerprint>) -> Option<(Served, usize)> {
    remembered()
        .iter()
        .find(|(p, f, ..)| p == path && fingerprint.is_some() && *f == fingerprint)
        .map(|(_, _, served, len)| (served.clone(), *len))
}

/// Forgets every file under `dir` (its source was removed).
pub(super) fn forget_under(dir: &Path) {
    remembered().retain(|(p, ..)| !p.starts_with(dir));
}

/// Forgets `path`: it is valid again, or gone.
fn forget(path: &Path) {
    let mut all = remembered();
    if !all.is_empty() {
        all.retain(|(p, ..)| p != path);
    }
}

/// What is known about one file.
#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    /// A hash of the content last read (parsed or refused): an equal
    /// content is not parsed or reported again.
    content: Option<u64>,
    /// The content served, if one parsed and the file is not gone.
    served: Option<Served>,
    /// The objects of `served` as the parser made them, from the scan that
    /// read it to the end of that scan (dropped then: see [`Served`]).
    fresh: Option<Vec<Object>>,
    /// A parsed content that removes objects, and since when it is there.
    /// (Boxed: rare, and every file's state is in one map.)
    pending: Option<Box<(Vec<Object>, Served, Instant)>>,
    /// When the file was first seen missing (its removal waits too).
    gone_since: Option<Instant>,
    /// The last content read was refused.
    failing: bool,
    /// The identities of the served objects (registered in `owners`).
    ids: Vec<Id>,
    /// The registry objects this file contributes now, by key with a hash
    /// of their content: what was sent is the registry's to hold, not ours
    /// (each endpoint is held once, there).
    /// (Sorted by key: a `HashMap` of a file's one or two objects kept
    /// buckets for four.)
    active: Vec<(ObjectKey, u64)>,
    /// ServiceEntries and WorkloadEntries served (for the gauges).
    counts: (usize, usize),
    /// Bytes of the last content that parsed (counted in
    /// [`Scanner::total_bytes`] while the file serves it).
    size: usize,
    /// The last content read was refused for the directory's total size
    /// (reported once; read again at every listing until it fits).
    over_total: bool,
}

impl FileState {
    /// Whether the file serves no object.
    fn serves_nothing(&self) -> bool {
        self.served.as_ref().is_none_or(|s| s.shape.is_empty())
    }
}

/// Reads the directory and keeps per-file state.
pub(super) struct Scanner {
    dir: PathBuf,
    source: SourceId,
    /// The namespace of objects that name none (parsing served texts again).
    default_namespace: String,
    metrics: Metrics,
    files: BTreeMap<PathBuf, FileState>,
    /// Which files declare each identity (the first serves it).
    /// (Sorted paths: nearly every identity has one file, and a one-entry
    /// `BTreeSet` allocates a node with room for eleven, 280 bytes.)
    owners: HashMap<Id, Vec<PathBuf>>,
    pub(super) dir_missing: bool,
    dir_failing: bool,
    /// The directory's (device, inode) at the last listing.
    dir_id: Option<(u64, u64)>,
    /// The directory was replaced (renamed over) since the last scan.
    pub(super) dir_replaced: bool,
    /// The earliest held-back removal.
    pub(super) deadline: Option<Instant>,
    /// When the directory came back after it was missing or unreadable.
    back_since: Option<Instant>,
    /// When a file last changed or went missing: removals wait until the
    /// directory has been quiet for [`REMOVAL_GRACE`].
    last_activity: Instant,
    service_entries: usize,
    workload_entries: usize,
    /// Entries the last listing skipped, and why (see [`Skipped`]).
    skipped: HashMap<PathBuf, Skipped>,
    /// Bytes of the contents the files serve, all together: bounded by
    /// `max_total_bytes` ([`Config::max_total_bytes`]).
    total_bytes: usize,
    max_total_bytes: usize,
    /// The parser threads (see `parse`).
    parsers: Parsers,
    /// Files queued for a parser whose result has not been applied.
    queued: HashSet<PathBuf>,
    /// A scan has waited for all its files (the first state is whole).
    completed_once: bool,
}

// === impl Scanner ===

impl Scanner {
    /// A scanner of `config.dir`; `wake` is called from a parser thread
    /// when a file's result is ready and no scan is waiting for it.
    pub(super) fn new(
        config: Config,
        metrics: Metrics,
        source: SourceId,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Scanner {
            parsers: Parsers::new(config.default_namespace.clone(), wake),
            default_namespace: config.default_namespace,
            queued: HashSet::new(),
            completed_once: false,
            dir: config.dir,
            source,
            metrics,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            dir_missing: false,
            dir_failing: false,
            dir_id: None,
            dir_replaced: false,
            deadline: None,
            back_since: None,
            last_activity: Instant::now(),
            service_entries: 0,
            workload_entries: 0,
            skipped: HashMap::new(),
            total_bytes: 0,
            max_total_bytes: config.max_total_bytes,
        }
    }

    /// Every registry object the directory contributes now (for a reset;
    /// converted again, and parsed again where only a text is kept: see
    /// [`Served`]).
    pub(super) fn all(&self) -> Vec<RegistryObject> {
        self.files
            .keys()
            .flat_map(|path| self.convert(path).unwrap_or_default())
            .collect()
    }

    /// The objects `path` serves: as parsed by this scan, kept, or its
    /// served text parsed again (see [`Served`]); `None` if that text no
    /// longer parses (a meshreg bug: it parsed when it was read).
    fn objects(&self, path: &Path) -> Option<Cow<'_, [Object]>> {
        let Some(state) = self.files.get(path) else {
            return Some(Cow::Borrowed(&[]));
        };
        if let Some(fresh) = &state.fresh {
            return Some(Cow::Borrowed(fresh));
        }
        let text = match state.served.as_ref().map(|s| &s.kept) {
            None | Some(Kept::Nothing) => return Some(Cow::Borrowed(&[])),
            Some(Kept::Objects(objects)) => return Some(Cow::Borrowed(objects)),
            Some(Kept::Text(text)) => text,
        };
        let file = path.display().to_string();
        let namespace = self.default_namespace.as_str();
        let parsed = std::panic::catch_unwind(|| convert::parse_file(&file, text, namespace));
        match parsed {
            Ok(Ok(parsed)) => Some(Cow::Owned(parsed.objects)),
            Ok(Err(_)) | Err(_) => {
                tracing::error!(%file, "a served content no longer parses (a meshreg bug); what the file contributes is left as it is");
                self.metrics.error(&self.source, "parse");
                None
            }
        }
    }

    /// The registry objects `path` contributes: its objects whose identity
    /// it owns, converted.
    fn convert(&self, path: &Path) -> Option<Vec<RegistryObject>> {
        let objects = self.objects(path)?;
        let served: Vec<&Object> = objects
            .iter()
            .filter(|o| {
                self.owners
                    .get(&owned_id(o))
                    .and_then(|p| p.last())
                    .is_some_and(|used| used == path)
            })
            .collect();
        let converted = convert::objects(served, &self.source);
        for u in &converted.unsupported {
            tracing::warn!(entry = %u, "valid ServiceEntry meshreg cannot serve");
        }
        // Two objects of one kind and name in this file (across files,
        // `recompute` reports them).
        for c in &converted.conflicts {
            tracing::warn!(conflict = %c, "ServiceEntries disagree");
        }
        Some(converted.objects)
    }

    /// Brings the state of `targets` up to date; returns what changed, or
    /// why the directory cannot be read (every file's state is kept).
    pub(super) fn scan(&mut self, targets: Targets) -> Result<Delta, String> {
        let now = Instant::now();
        let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
        match targets {
            Targets::All => {
                let paths = match self.list() {
                    Ok(paths) => paths,
                    Err(e) => return Err(self.list_failed(e)),
                };
                if self.dir_missing || self.dir_failing {
                    tracing::info!(dir = %self.dir.display(), "directory readable again; removals wait for it to settle");
                    self.back_since = Some(now);
                }
                self.dir_missing = false;
                self.dir_failing = false;
                let listed: HashSet<&PathBuf> = paths.iter().collect();
                for (p, state) in &mut self.files {
                    // A file replaced by a FIFO or a broken link is bad
                    // input (reported by the listing): it keeps serving
                    // its last good state.
                    if !listed.contains(p)
                        && state.gone_since.is_none()
                        && !self.skipped.contains_key(p)
                    {
                        state.gone_since = Some(now);
                        self.last_activity = now;
                    }
                }
                for path in paths {
                    self.refresh(&path, now);
                }
            }
            Targets::Paths(paths) if paths.iter().any(|p| self.names_a_subdirectory(p)) => {
                return self.scan(Targets::All);
            }
            Targets::Paths(paths) => {
                // A directory being removed (`rm -rf` deletes its files one
                // by one first) must never withdraw them: without the
                // directory, nothing is applied and the source goes stale.
                if let Err(e) = fs::metadata(&self.dir) {
                    return Err(self.list_failed(e));
                }
                if paths.iter().any(|p| {
                    self.is_candidate(p)
                        && fs::symlink_metadata(p).is_ok()
                        && !fs::metadata(p).is_ok_and(|m| m.is_file())
                        && !self.skipped.contains_key(p)
                }) {
                    // A new FIFO, device or broken link: the listing
                    // reports it.
                    return self.scan(Targets::All);
                }
                for path in paths {
                    if !self.is_candidate(&path) {
                        continue;
                    }
                    if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                        self.refresh(&path, now);
                    } else if !self.skipped.contains_key(&path)
                        && let Some(state) = self.files.get_mut(&path)
                        && state.gone_since.is_none()
                    {
                        state.gone_since = Some(now);
                        self.last_activity = now;
                    }
                }
            }
        }
        let first = !self.completed_once;
        self.collect(&mut changed, now);
        changed.extend(self.settle(now));
        let delta = self.recompute(changed);
        if first {
            // The first listing inserted every file in path order, which
            // leaves a `BTreeMap`'s nodes half full (a split keeps half of
            // each); built again from its sorted entries, they are full
            // (10,000 files: about 3 MB less).
            self.files = std::mem::take(&mut self.files).into_iter().collect();
        }
        Ok(delta)
    }

    /// Applies the parsers' results: those already there, then those of
    /// the jobs this scan queued, waiting for them up to [`PARSE_BUDGET`]
    /// (without limit until one scan has completed, so the first state is
    /// whole). A job still running after that is applied by a later scan
    /// (its worker wakes the task).
    fn collect(&mut self, changed: &mut BTreeSet<PathBuf>, now: Instant) {
        let deadline = self.completed_once.then(|| Instant::now() + PARSE_BUDGET);
        self.parsers.set_unattended(false);
        while let Some(done) = self.parsers.try_done() {
            self.take_done(done, changed, now);
        }
        while !self.queued.is_empty() {
            let Some(done) = self.parsers.wait_done(deadline) else {
                break;
            };
            self.take_done(done, changed, now);
        }
        if !self.queued.is_empty() {
            tracing::debug!(
                files = self.queued.len(),
                "still parsing; applied when done"
            );
        }
        self.parsers.set_unattended(true);
        while let Some(done) = self.parsers.try_done() {
            self.take_done(done, changed, now);
        }
        self.completed_once = true;
    }

    fn take_done(&mut self, done: Done, changed: &mut BTreeSet<PathBuf>, now: Instant) {
        let path = done.job.path.clone();
        self.queued.remove(&path);
        if self.absorb(done, now) {
            changed.insert(path);
        }
    }

    fn list_failed(&mut self, e: io::Error) -> String {
        if e.kind() == io::ErrorKind::NotFound {
            // Removing services is the dangerous direction: a vanished
            // directory makes the source stale, never empty.
            if !self.dir_missing {
                tracing::warn!(dir = %self.dir.display(), "directory does not exist; its last state (if any) is kept and the source reported stale until it is back");
                self.metrics.error(&self.source, "io");
                self.dir_missing = true;
            }
            return format!("directory {} does not exist", self.dir.display());
        }
        // Keep what we have: a transient error must not drop hosts.
        if !self.dir_failing {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list directory; keeping the last state");
            self.metrics.error(&self.source, "io");
            self.dir_failing = true;
        }
        format!("cannot list {}: {e}", self.dir.display())
    }

    /// A YAML file in the directory or below it, with no hidden component
    /// (istiod's file source reads the tree recursively too; hidden names
    /// are skipped so a ConfigMap mount's `..data` and timestamped copies
    /// are not read twice).
    fn is_candidate(&self, path: &Path) -> bool {
        is_yaml_under(&self.dir, path)
    }

    /// Whether an event's path may stand for a whole subdirectory (created,
    /// renamed into place or removed): a non-hidden path under the
    /// directory that is not a YAML file. Its files never get events of
    /// their own, so the scan lists the tree.
    fn names_a_subdirectory(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return false;
        };
        !rel.as_os_str().is_empty()
            && !hidden(rel)
            && !self.is_candidate(path)
            && fs::symlink_metadata(path).map_or(true, |m| m.is_dir())
    }

    /// The YAML files in the directory tree, sorted; notes whether the
    /// directory itself was replaced. Symlinked files are followed (a
    /// dangling one skipped); symlinked directories are not (no loops).
    fn list(&mut self) -> io::Result<Vec<PathBuf>> {
        let id = {
            use std::os::unix::fs::MetadataExt;
            let m = fs::metadata(&self.dir)?;
            (m.dev(), m.ino())
        };
        if self.dir_id.is_some_and(|old| old != id) {
            self.dir_replaced = true;
        }
        self.dir_id = Some(id);
        let listing = yaml_files(&self.dir)?;
        self.report_skipped(listing.skipped);
        Ok(listing.files)
    }

    /// Reports the entries a listing skips: each (path, reason) once (log
    /// at `warn`, `meshreg_source_errors_total{reason}`, a rejection
    /// `meshreg ctl rejected` lists); an entry skipped no more is withdrawn
    /// from the rejections. Bounded by the directory's entries.
    fn report_skipped(&mut self, now: Vec<(PathBuf, Skipped)>) {
        let now: HashMap<PathBuf, Skipped> = now.into_iter().collect();
        for (path, why) in &now {
            if self.skipped.get(path) == Some(why) {
                continue;
            }
            let file = path.display().to_string();
            tracing::warn!(%file, reason = why.reason(), "{}", why.message());
            self.reject_file(&file, why.reason(), why.message().to_string());
        }
        for path in now.keys() {
            // Replaced by a FIFO or broken link, even after a removal was
            // seen: kept, not withdrawn.
            if let Some(state) = self.files.get_mut(path) {
                state.gone_since = None;
            }
        }
        for path in self.skipped.keys() {
            if now.contains_key(path) {
                continue;
            }
            self.metrics
                .rejections()
                .accepted(&self.source, &path.display().to_string());
            // A file back in place of the FIFO or link is read again (and
            // reported again if it is bad), even with its old content.
            if let Some(state) = self.files.get_mut(path) {
                state.fingerprint = None;
                state.content = None;
            }
        }
        self.skipped = now;
    }

    /// For `path`, whose content at `fingerprint` was just refused:
    /// remembers what it serves, for a scanner started again on the
    /// directory; or, if it serves nothing yet, serves what an earlier
    /// scanner remembered of the file as it is (see [`REMEMBERED`]).
    /// Returns whether what it serves changed.
    fn keep_refused(&mut self, path: &Path, fingerprint: Option<Fingerprint>) -> bool {
        let Some(state) = self.files.get_mut(path) else {
            return false;
        };
        // A held-back removal applies even if the file is refused
        // meanwhile: what the file will serve is its content (remembered
        // here, so nothing needs remembering when it applies: a content is
        // held back only while the file is valid).
        let will_serve = match state.pending.as_deref() {
            Some((objects, served, _)) => Some((served, Some(objects))),
            None => state.served.as_ref().map(|s| (s, state.fresh.as_ref())),
        };
        if let Some((served, objects)) = will_serve {
            // Its objects, if kept, may still be apart from it (read valid
            // earlier in this scan, or held back).
            let mut served = served.clone();
            if let (Kept::Objects(kept), Some(objects)) = (&mut served.kept, objects)
                && kept.is_empty()
            {
                kept.clone_from(objects);
            }
            remember(path, fingerprint, served, state.size);
            return false;
        }
        match recall(path, fingerprint) {
            Some((served, len)) if self.total_bytes + len <= self.max_total_bytes => {
                tracing::info!(file = %path.display(), "serving the file's last good content, from before the source was restarted");
                self.total_bytes += len;
                state.size = len;
                state.served = Some(served);
                true
            }
            _ => false,
        }
    }

    /// Counts `file` as refused as a whole for `reason` (the metric, and a
    /// rejection `meshreg ctl rejected` lists until it is accepted).
    fn reject_file(&self, file: &str, reason: &str, message: String) {
        self.metrics.error(&self.source, reason);
        self.metrics.rejections().rejected(
            &self.source,
            file,
            vec![crate::Problem {
                document: None,
                field: String::new(),
                reason: reason.to_string(),
                message,
            }],
        );
    }

    /// Asks a parser to read `path` again if its fingerprint changed (or
    /// its last content waits for room); the result comes back through
    /// [`Scanner::absorb`]. Returns whether a job was queued.
    fn refresh(&mut self, path: &Path, now: Instant) -> bool {
        let fingerprint = fs::metadata(path).ok().map(|m| fingerprint(&m));
        let state = self.files.entry(path.to_path_buf()).or_default();
        state.gone_since = None;
        let unchanged = fingerprint.is_some() && state.fingerprint == fingerprint;
        if unchanged && !state.over_total {
            return false;
        }
        if !unchanged {
            // A file refused for the total, read again, is not activity
            // (removals wait for a quiet directory).
            self.last_activity = now;
        }
        let previous = std::mem::replace(&mut state.fingerprint, fingerprint);
        let job = Job {
            path: path.to_path_buf(),
            fingerprint,
            previous,
            known: state.content,
        };
        self.parsers.push(job);
        self.queued.insert(path.to_path_buf());
        true
    }

    /// Applies what a parser found; returns whether the objects the file
    /// serves changed.
    fn absorb(&mut self, done: Done, now: Instant) -> bool {
        let Done { job, outcome } = done;
        let path = job.path;
        let Some(state) = self.files.get_mut(&path) else {
            // Forgotten meanwhile (it went away). Made by a parser thread:
            // dropped on one (see `parse`).
            self.parsers.discard(outcome);
            return false;
        };
        let file = path.display().to_string();
        let (hash, text, parsed, took) = match outcome {
            Outcome::Same if state.content == job.known => return false,
            Outcome::Same => {
                // The file holds the content the scanner knew when it
                // asked, but a result for an earlier read of the file (a
                // file's results arrive in the order it was read) has
                // been applied since: what is served is not on disk (a
                // slow file edited, then written back while the edit was
                // parsing). Read it again, knowing what is served now.
                state.fingerprint = None;
                self.refresh(&path, now);
                return false;
            }
            Outcome::Gone => {
                // Raced with a delete: treated as gone from now.
                state.gone_since = Some(now);
                return false;
            }
            Outcome::Unreadable { reason, message } => {
                let again =
                    state.failing && job.previous == job.fingerprint && state.content.is_none();
                state.content = None;
                state.failing = true;
                if !again {
                    tracing::warn!(%file, error = %message, "cannot read file; keeping its last good state");
                    self.reject_file(&file, reason, message);
                }
                return self.keep_refused(&path, job.fingerprint);
            }
            Outcome::Panicked { hash, message } => {
                let new = state.content != Some(hash);
                state.content = Some(hash);
                state.failing = true;
                if new {
                    tracing::error!(%file, panic = %message, "the parser failed on this file (a meshreg bug); keeping its last good state");
                    self.metrics.error(&self.source, "parse");
                    self.reject_file(
                        &file,
                        "parse",
                        format!("meshreg could not parse it: {message}"),
                    );
                }
                return self.keep_refused(&path, job.fingerprint);
            }
            Outcome::Read {
                hash,
                text,
                parsed,
                took,
            } => (hash, text, parsed, took),
        };
        let len = text.len();
        // Made by a parser thread: dropped on one (see `parse`).
        let parsers = &self.parsers;
        if state.content == Some(hash) {
            parsers.discard((text, parsed));
            return false;
        }
        state.content = Some(hash);
        let others = self.total_bytes - state.size;
        if others + len > self.max_total_bytes {
            let first = !state.over_total;
            state.over_total = true;
            state.failing = true;
            // Read again at the next listing (see the start), content
            // unchanged or not: another file may have made room by then.
            state.content = None;
            if first {
                let message = format!(
                    "with this content ({len} bytes) the directory's files would pass {} bytes together",
                    self.max_total_bytes
                );
                tracing::warn!(%file, "{message}; keeping the file's last good state, and reading it again when there is room");
                self.reject_file(&file, "too_large", message);
            }
            parsers.discard((text, parsed));
            return self.keep_refused(&path, job.fingerprint);
        }
        state.over_total = false;
        match parsed {
            Ok(parsed) => {
                self.total_bytes = others + len;
                state.size = len;
                self.metrics.rejections().accepted(&self.source, &file);
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
                state.failing = false;
                forget(&path);
                let served = Served::new(&text, &parsed.objects, took);
                parsers.discard((text, parsed.warnings));
                if state.served.as_ref().is_some_and(|s| s.removed_by(&served)) {
                    // Held back: an in-place write may have truncated it.
                    tracing::debug!(%file, "content removes objects; applying it if it stays for the grace period");
                    if let Some(old) =
                        state
                            .pending
                            .replace(Box::new((parsed.objects, served, now)))
                    {
                        parsers.discard(old.0);
                    }
                    false
                } else {
                    if let Some(old) = state.fresh.replace(parsed.objects) {
                        parsers.discard(old);
                    }
                    state.served = Some(served);
                    if let Some(old) = state.pending.take() {
                        parsers.discard(old.0);
                    }
                    true
                }
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
                self.metrics.rejections().rejected(
                    &self.source,
                    &file,
                    errors
                        .iter()
                        .map(|e| crate::Problem {
                            document: Some(e.doc),
                            field: e.path.clone(),
                            reason: e.reason.as_str().to_string(),
                            message: e.message.clone(),
                        })
                        .collect(),
                );
                state.failing = true;
                parsers.discard((text, errors));
                self.keep_refused(&path, job.fingerprint)
            }
        }
    }

    /// Applies held-back removals that are due (files gone, contents that
    /// remove objects); returns the files whose served objects changed, and
    /// notes when the next one is due.
    fn settle(&mut self, now: Instant) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        let mut next: Option<Instant> = None;
        let mut note = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        let mut gone = Vec::new();
        // Removals also wait for the directory to be quiet (a copy or a
        // checkout in progress), and, after it came back from missing, for
        // it to be refilled (`rm -rf; mkdir; cp` withdraws nothing).
        let mut gate = self.last_activity + REMOVAL_GRACE;
        if let Some(back) = self.back_since {
            gate = gate.max(back + RECOVERY_GRACE);
        }
        for (path, state) in &mut self.files {
            if let Some(since) = state.gone_since {
                let due = (since + REMOVAL_GRACE).max(gate);
                if state.serves_nothing() || now >= due {
                    gone.push(path.clone());
                    continue;
                }
                note(due);
            }
            if let Some((_, _, since)) = state.pending.as_deref() {
                let due = (*since + REMOVAL_GRACE).max(gate);
                if now >= due {
                    if let Some((objects, served, _)) = state.pending.take().map(|p| *p) {
                        tracing::info!(file = %path.display(), "applying the file's removals after it stayed unchanged");
                        if let Some(old) = state.fresh.replace(objects) {
                            self.parsers.discard(old);
                        }
                        state.served = Some(served);
                        changed.push(path.clone());
                    }
                } else {
                    note(due);
                }
            }
        }
        if !gone.is_empty() && !self.dir.is_dir() {
            // Files vanished with their directory: keep them (stale).
            self.deadline = next;
            return changed;
        }
        for path in gone {
            if let Some(state) = self.files.get_mut(&path) {
                tracing::info!(file = %path.display(), "file removed");
                forget(&path);
                // A refused file that is gone is refused no more.
                self.metrics
                    .rejections()
                    .accepted(&self.source, &path.display().to_string());
                state.served = None;
                if let Some(old) = state.fresh.replace(Vec::new()) {
                    self.parsers.discard(old);
                }
                if let Some(old) = state.pending.take() {
                    self.parsers.discard(old.0);
                }
                self.total_bytes -= state.size;
                state.size = 0;
                changed.push(path);
            }
        }
        self.deadline = next;
        changed
    }

    /// Recomputes what `changed` files (and files whose ownership of an
    /// object moved because of them) contribute; returns the difference.
    fn recompute(&mut self, changed: BTreeSet<PathBuf>) -> Delta {
        let mut affected: BTreeSet<PathBuf> = BTreeSet::new();
        for path in &changed {
            // Set by the scan for every changed file: never parsed again.
            let objects = self.objects(path).unwrap_or_default();
            let ses = objects
                .iter()
                .filter(|o| o.id().0 == "ServiceEntry")
                .count();
            let wes = objects
                .iter()
                .filter(|o| o.id().0 == "WorkloadEntry")
                .count();
            let new_ids: Vec<Id> = objects.iter().map(owned_id).collect();
            drop(objects);
            let Some(state) = self.files.get_mut(path) else {
                continue;
            };
            let counts = (ses, wes);
            let old_counts = std::mem::replace(&mut state.counts, counts);
            self.service_entries = self.service_entries + counts.0 - old_counts.0;
            self.workload_entries = self.workload_entries + counts.1 - old_counts.1;
            let old_ids = std::mem::replace(&mut state.ids, new_ids.clone());
            for id in old_ids.iter().filter(|i| !new_ids.contains(i)) {
                if let Some(paths) = self.owners.get_mut(id) {
                    let was_used = paths.last() == Some(path);
                    if let Ok(i) = paths.binary_search(path) {
                        paths.remove(i);
                    }
                    if was_used && let Some(next) = paths.last() {
                        affected.insert(next.clone());
                    }
                    if paths.is_empty() {
                        self.owners.remove(id);
                    }
                }
            }
            for id in new_ids.iter().filter(|i| !old_ids.contains(i)) {
                let paths = self
                    .owners
                    .entry(id.clone())
                    .or_insert_with(|| Vec::with_capacity(1));
                let old_used = paths.last().cloned();
                if let Err(i) = paths.binary_search(path) {
                    paths.insert(i, path.clone());
                }
                if paths.len() > 1 {
                    let (kind, ns, name) = id;
                    let used = paths.last().map(|p| p.display().to_string());
                    tracing::warn!(
                        "{kind} {ns}/{name} is declared in {} files; {} is used",
                        paths.len(),
                        used.unwrap_or_default()
                    );
                }
                if let Some(old) = old_used
                    && paths.last() != Some(&old)
                {
                    affected.insert(old);
                }
            }
            affected.insert(path.clone());
        }
        let mut delta = Delta::default();
        for path in affected {
            let new = self.convert(&path);
            let Some(state) = self.files.get_mut(&path) else {
                continue;
            };
            // What the parser made is kept if the content was slow or large
            // to parse, or else dropped once converted, on a parser thread
            // (see `parse`) while the text stays (see `Served`).
            if let Some(fresh) = state.fresh.take() {
                match state.served.as_mut().map(|s| &mut s.kept) {
                    Some(Kept::Objects(kept)) => *kept = fresh,
                    _ => self.parsers.discard(fresh),
                }
            }
            // A served text that no longer parses (a bug): what the file
            // contributes stays as it is.
            let Some(new) = new else {
                continue;
            };
            let mut active = Vec::with_capacity(new.len());
            for o in new {
                let key = o.key();
                let hash = content_hash(&o);
                if active_hash(&state.active, &key) != Some(hash) {
                    delta.apply.push(o);
                }
                active.push((key, hash));
            }
            // One entry per key, with the hash of the last converted (as a
            // map's insert): the sort is stable, and `dedup_by` hands the
            // later duplicate first, the kept earlier one second.
            active.sort_by(|a, b| a.0.cmp(&b.0));
            active.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 = later.1;
                }
                same
            });
            let old = std::mem::replace(&mut state.active, active);
            let applied = delta.apply.len();
            let deleted = delta.delete.len();
            delta.delete.extend(
                old.into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| active_hash(&state.active, k).is_none()),
            );
            let (applied, deleted) = (delta.apply.len() - applied, delta.delete.len() - deleted);
            if applied + deleted > 0 {
                tracing::info!(
                    file = %path.display(),
                    added_or_changed = applied,
                    removed = deleted,
                    "file changed"
                );
            }
            if state.serves_nothing() && state.gone_since.is_some() {
                self.files.remove(&path);
            }
        }
        self.metrics
            .objects(&self.source, "ServiceEntry", self.service_entries);
        self.metrics
            .objects(&self.source, "WorkloadEntry", self.workload_entries);
        delta
    }
}

/// A hash of a registry object's content (what decides whether it is sent
/// again).
fn content_hash(o: &RegistryObject) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    o.hash(&mut h);
    h.finish()
}

fn owned_id(o: &Object) -> Id {
    let (kind, ns, name) = o.id();
    (kind, ns.to_string(), name.to_string())
}

/// The content hash `active` (sorted by key) has for `key`.
fn active_hash(active: &[(ObjectKey, u64)], key: &ObjectKey) -> Option<u64> {
    active
        .binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| active[i].1)
}

/// Whether any component of `rel` (a path relative to the directory) is
/// hidden (starts with a dot).
fn hidden(rel: &Path) -> bool {
    rel.components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}

/// Whether `path` is a YAML file name under `root` with no hidden component.
fn is_yaml_under(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let lower = name.to_ascii_lowercase();
    !hidden(rel) && (lower.ends_with(".yaml") || lower.ends_with(".yml"))
}

/// Why an entry named like a YAML file (or a symlinked directory) is not
/// read: reported once per path and reason (log, `reason` of
/// `meshreg_source_errors_total`, `meshreg ctl rejected`), never skipped
/// silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skipped {
    /// A symlink whose target does not exist.
    DanglingLink,
    /// A symlink chain that loops (`ELOOP`).
    LinkLoop,
    /// A FIFO, socket or device file, or a link to one: reading it could
    /// block or never end.
    NotAFile,
    /// A symlink to a directory: not followed (a link may loop back).
    LinkedDirectory,
}

impl Skipped {
    /// The `reason` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Skipped::DanglingLink => "dangling_link",
            Skipped::LinkLoop => "link_loop",
            Skipped::NotAFile => "not_a_file",
            Skipped::LinkedDirectory => "linked_directory",
        }
    }

    /// What is wrong, for the log and `meshreg ctl rejected`.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Skipped::DanglingLink => "a symlink whose target does not exist; not read",
            Skipped::LinkLoop => "a symlink that loops; not read",
            Skipped::NotAFile => {
                "not a regular file (a FIFO, socket or device, or a link to one); not read"
            }
            Skipped::LinkedDirectory => {
                "a symlink to a directory; not followed (link the files instead)"
            }
        }
    }
}

/// What listing the tree gives: the files to read, sorted, and the entries
/// that are not read, with why.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    pub(crate) files: Vec<PathBuf>,
    pub(crate) skipped: Vec<(PathBuf, Skipped)>,
}

/// Whether the symlink at `path` leads to a regular file, and if not, why
/// it is skipped.
fn follow(path: &Path) -> Result<(), Skipped> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => Err(Skipped::LinkedDirectory),
        Ok(_) => Err(Skipped::NotAFile),
        Err(e) if e.raw_os_error() == Some(ELOOP) => Err(Skipped::LinkLoop),
        Err(_) => Err(Skipped::DanglingLink),
    }
}

/// Linux's `ELOOP` ("too many levels of symbolic links"): stable
/// `io::ErrorKind` has no variant for it yet (`FilesystemLoop` is
/// unstable), and the daemon runs on Linux (systemd, `/proc`).
const ELOOP: i32 = 40;

/// The YAML files of the tree under `root`, sorted: what the source reads.
/// Hidden files and directories are skipped; symlinked files are followed;
/// dangling or looping links, FIFOs, sockets, devices and symlinked
/// directories (not followed: no loops) are listed in
/// [`Listing::skipped`].
///
/// # Errors
///
/// If `root` cannot be listed, or a subdirectory fails for a reason other
/// than having just been removed.
pub(crate) fn yaml_files(root: &Path) -> io::Result<Listing> {
    let mut out = Listing::default();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A subdirectory removed while listing is simply gone.
            Err(e) if dir != root && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            // The entry's type comes with the listing (no stat).
            let ft = entry.file_type()?;
            let hidden_name = entry.file_name().to_string_lossy().starts_with('.');
            if ft.is_dir() {
                if !hidden_name {
                    dirs.push(path);
                }
                continue;
            }
            if ft.is_symlink() && !hidden_name {
                match follow(&path) {
                    Ok(()) if is_yaml_under(root, &path) => out.files.push(path),
                    Ok(()) => {}
                    Err(Skipped::LinkedDirectory) => {
                        out.skipped.push((path, Skipped::LinkedDirectory));
                    }
                    Err(why) if is_yaml_under(root, &path) => out.skipped.push((path, why)),
                    Err(_) => {}
                }
                continue;
            }
            if !is_yaml_under(root, &path) {
                continue;
            }
            if ft.is_file() {
                out.files.push(path);
            } else {
                out.skipped.push((path, Skipped::NotAFile));
            }
        }
    }
    out.files.sort();
    out.skipped.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
