//! Reading and parsing files off the scanning thread, so one slow file
//! does not hold back the others (issue 18: a file that costs the parser
//! seconds must not stop every other edit from applying meanwhile).
//!
//! [`Parsers`] owns [`WORKERS`] threads fed from one queue of [`Job`]s (a
//! path each, never its text: a queued job holds no memory beyond its
//! path). A worker reads the file (bounded by [`MAX_FILE_BYTES`]), skips a
//! content it was told is already known, parses it with
//! [`convert::parse_file`] and sends the [`Done`] back. A path is queued at
//! most once and worked on by one worker at a time, so the results for one
//! file arrive in the order its contents were read.
//!
//! The scanner waits for the jobs of its own scan up to a budget (all of
//! them for the first scan, whose state must be complete), applies what
//! came back, and leaves the rest: a worker finishing while nobody waits
//! calls the wake-up it was given, and the next scan applies the result.
//! Workers stop when the [`Parsers`] is dropped, after their current job.
//!
//! What a worker made (a file's text, its parsed objects, its errors) goes
//! back to the workers to be dropped once the scanner is done with it
//! ([`Parsers::discard`]). glibc's malloc gives each thread an arena and
//! each thread a cache of recently freed chunks: a chunk a worker allocated
//! and the scanner freed went to the scanner's cache, and the scanner's
//! next allocation of that size (a key, a name it keeps for good) took it,
//! so a parser arena ended up with thousands of small chunks that live for
//! ever, scattered over pages that stayed resident (10,000 files: 17 MB;
//! BENCHMARKS.md, the 10,000-service daemon). Freed on a worker, the chunks
//! come back to the worker's own allocations, which are all temporary.
//!
//! This module knows nothing of the per-file state (see `scan`).

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use super::MAX_FILE_BYTES;
use super::scan::Fingerprint;
use crate::serviceentry::convert::{self, DocError, Parsed};

/// Parser threads. Two: a hostile file occupies one while the other goes
/// on, and an initial load of many files uses both cores.
pub(super) const WORKERS: usize = 2;

/// What to read: a file, with what the scanner knew of it when it asked.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) path: PathBuf,
    /// The fingerprint that made the scanner ask.
    pub(super) fingerprint: Option<Fingerprint>,
    /// The fingerprint before that one.
    pub(super) previous: Option<Fingerprint>,
    /// The hash of the content last read: an equal content is not parsed.
    pub(super) known: Option<u64>,
}

/// What a worker found.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The file disappeared before it could be read.
    Gone,
    /// It could not be read; `reason` is the metric label.
    Unreadable {
        reason: &'static str,
        message: String,
    },
    /// Its content is [`Job::known`].
    Same,
    /// A new content (`hash`, its `text`), what the parser made of it, and
    /// how long parsing took.
    Read {
        hash: u64,
        text: String,
        parsed: Result<Parsed, Vec<DocError>>,
        took: Duration,
    },
    /// The parser panicked on this content (a bug: the fuzz targets look
    /// for it); the file is refused like an invalid one.
    Panicked { hash: u64, message: String },
}

/// A finished [`Job`].
#[derive(Debug)]
pub(super) struct Done {
    pub(super) job: Job,
    pub(super) outcome: Outcome,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Set while the scanner is not waiting for results: a worker that
    /// finishes then calls `wake`.
    unattended: AtomicBool,
    wake: Box<dyn Fn() + Send + Sync>,
    default_namespace: String,
}

/// Room the job queue keeps once drained (an edit queues a file or a few).
const SPARE_JOBS: usize = 16;

/// At most this many leftovers wait for a worker to drop them; past it the
/// scanner drops them itself (workers busy with slow files for long).
const MAX_LEFTOVERS: usize = 4096;

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Job>,
    /// The paths in `waiting` (a scan queues every file of a directory).
    waiting_paths: HashSet<PathBuf>,
    /// Paths a worker is on.
    busy: HashSet<PathBuf>,
    /// What the scanner handed back to be dropped by a worker (see the
    /// module docs).
    leftovers: Vec<Box<dyn Send>>,
    closed: bool,
}

/// The parser threads and the results they send back.
pub(super) struct Parsers {
    shared: Arc<Shared>,
    done: mpsc::Receiver<Done>,
}

// === impl Parsers ===

impl Parsers {
    /// Starts the workers; `wake` is called when a result arrives that
    /// nobody is waiting for.
    pub(super) fn new(default_namespace: String, wake: Box<dyn Fn() + Send + Sync>) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            unattended: AtomicBool::new(true),
            wake,
            default_namespace,
        });
        let (tx, done) = mpsc::channel();
        for i in 0..WORKERS {
            let (shared, tx) = (shared.clone(), tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("meshreg-parse-{i}"))
                .spawn(move || work(&shared, &tx));
            if let Err(error) = spawned {
                // With none at all the scanner finds the channel closed and
                // reports the files as unreadable.
                tracing::error!(%error, "cannot start a parser thread");
            }
        }
        Parsers { shared, done }
    }

    /// Queues `job`; `false` when its path was already waiting (the waiting
    /// job takes the newer fingerprint: it has not read the file yet).
    pub(super) fn push(&self, job: Job) -> bool {
        let mut q = self.lock();
        if q.waiting_paths.contains(&job.path) {
            if let Some(waiting) = q.waiting.iter_mut().find(|j| j.path == job.path) {
                waiting.fingerprint = job.fingerprint;
            }
            return false;
        }
        q.waiting_paths.insert(job.path.clone());
        q.waiting.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
        true
    }

    /// Hands back `leftover`, something a worker made (a text, parsed
    /// objects, errors), to be dropped on a worker thread (see the module
    /// docs). Dropped here instead when the workers are gone or
    /// [`MAX_LEFTOVERS`] already wait.
    pub(super) fn discard(&self, leftover: impl Send + 'static) {
        let mut q = self.lock();
        if q.closed || q.leftovers.len() >= MAX_LEFTOVERS {
            drop(q);
            drop(leftover);
            return;
        }
        q.leftovers.push(Box::new(leftover));
        let first = q.leftovers.len() == 1;
        drop(q);
        if first {
            self.shared.ready.notify_one();
        }
    }

    /// A result that is already there.
    pub(super) fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// The next result, waiting until `deadline` (or for ever); `None` at
    /// the deadline or when no worker is left.
    pub(super) fn wait_done(&self, deadline: Option<Instant>) -> Option<Done> {
        match deadline {
            None => self.done.recv().ok(),
            Some(at) => self
                .done
                .recv_timeout(at.saturating_duration_since(Instant::now()))
                .ok(),
        }
    }

    /// Whether the scanner is waiting for results (see [`Shared`]): set to
    /// `false` before waiting; after setting it to `true`, drain with
    /// [`Parsers::try_done`] (a worker that finished in between sees the
    /// flag or left its result in the channel).
    pub(super) fn set_unattended(&self, unattended: bool) {
        self.shared.unattended.store(unattended, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Parsers {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

/// A worker: takes the first waiting job whose path no other worker is
/// on, until the queue is closed.
fn work(shared: &Shared, tx: &mpsc::Sender<Done>) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if q.closed {
                    return;
                }
                if !q.leftovers.is_empty() {
                    let leftovers = std::mem::take(&mut q.leftovers);
                    drop(q);
                    drop(leftovers);
                    q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                let free = q.waiting.iter().position(|j| !q.busy.contains(&j.path));
                if let Some(job) = free.and_then(|i| q.waiting.remove(i)) {
                    q.waiting_paths.remove(&job.path);
                    if q.waiting.is_empty() && q.waiting.capacity() > SPARE_JOBS {
                        // A listing queued every file of the directory (10,000
                        // files: 2 MB of jobs and 1 MB of paths); that room
                        // is not kept for the next one.
                        q.waiting.shrink_to(SPARE_JOBS);
                        q.waiting_paths.shrink_to(SPARE_JOBS);
                    }
                    q.busy.insert(job.path.clone());
                    break job;
                }
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let outcome = read_and_parse(&job, &shared.default_namespace);
        let path = job.path.clone();
        let sent = tx.send(Done { job, outcome });
        shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .busy
            .remove(&path);
        // A job for the same path may have waited for this one.
        shared.ready.notify_all();
        if sent.is_err() {
            return;
        }
        if shared.unattended.load(Ordering::SeqCst) {
            (shared.wake)();
        }
    }
}

fn read_and_parse(job: &Job, default_namespace: &str) -> Outcome {
    let text = match read_bounded(&job.path) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let hash = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    if job.known == Some(hash) {
        return Outcome::Same;
    }
    #[cfg(test)]
    held::wait(&job.path);
    let file = job.path.display().to_string();
    let started = Instant::now();
    let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| {
        convert::parse_file(&file, &text, default_namespace)
    }));
    let took = started.elapsed();
    match parsed {
        Ok(parsed) => Outcome::Read {
            hash,
            text,
            parsed,
            took,
        },
        Err(panic) => Outcome::Panicked {
            hash,
            message: panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        },
    }
}

/// The file's text, at most [`MAX_FILE_BYTES`], as UTF-8.
fn read_bounded(path: &Path) -> Result<String, Outcome> {
    let failed = |reason, message: String| Outcome::Unreadable { reason, message };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Outcome::Gone),
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

/// Tests hold a file's parse until they release it, to stand for a file
/// that takes the parser long.
#[cfg(test)]
pub(super) mod held {
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::{Condvar, Mutex, PoisonError};

    static HELD: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    static RELEASED: Condvar = Condvar::new();

    /// Parses of files named `name` wait until [`release`].
    pub(in crate::serviceentry) fn hold(name: &str) {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        held.get_or_insert_default().insert(name.to_string());
    }

    pub(in crate::serviceentry) fn release(name: &str) {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        held.get_or_insert_default().remove(name);
        RELEASED.notify_all();
    }

    pub(super) fn wait(path: &Path) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        while held
            .as_ref()
            .is_some_and(|h| name.as_ref().is_some_and(|n| h.contains(n)))
        {
            held = RELEASED.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A listing of many files queues them all; once every job is taken,
    /// the queue keeps room for a few, not for the listing.
    #[test]
    fn a_drained_queue_lets_go_of_a_listings_room() {
        let dir = tempfile::tempdir().unwrap();
        let parsers = Parsers::new("default".to_string(), Box::new(|| {}));
        let files = 500;
        for i in 0..files {
            let path = dir.path().join(format!("missing-{i}.yaml"));
            assert!(parsers.push(Job {
                path,
                fingerprint: None,
                previous: None,
                known: None,
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..files {
            let done = parsers
                .wait_done(Some(deadline))
                .expect("every job is done");
            assert!(matches!(done.outcome, Outcome::Gone), "{:?}", done.outcome);
        }
        let q = parsers.lock();
        assert!(q.waiting.is_empty());
        assert!(
            q.waiting.capacity() <= SPARE_JOBS,
            "{}",
            q.waiting.capacity()
        );
        assert!(
            q.waiting_paths.capacity() <= 2 * SPARE_JOBS,
            "{}",
            q.waiting_paths.capacity()
        );
    }
}
