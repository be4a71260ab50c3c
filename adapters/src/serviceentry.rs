//! The `serviceentry` adapter: a directory of Istio `ServiceEntry` and
//! `WorkloadEntry` YAML files as one registry source.
//!
//! # Layout
//!
//! - `convert`: pure functions. YAML text of one file (read as `kubectl`
//!   reads it) → validated objects (`convert::parse_file`, with Istio's CRD
//!   schema and webhook rules in `convert/validate.rs`, table-tested against
//!   Istio's own examples); objects → registry objects (declarations,
//!   shards, workloads: `convert::objects`). Table-tested against
//!   `adapters/tests/fixtures/istio` (copies of `shared/fixtures`, origins
//!   in `ORIGINS.md` there).
//! - `watch`: the I/O. Initial load, `notify` watcher plus a periodic
//!   safety-net rescan, per-file last-good state (`watch/scan.rs`), and
//!   sending a [`Update::Reset`] first, then only what changed.
//!
//! # Behaviour
//!
//! - Every `*.yaml`/`*.yml` file in [`Config::dir`] and its subdirectories
//!   is read (recursively, as istiod's `--configDir` file source reads a
//!   tree). Files and directories whose names start with `.` are ignored,
//!   which skips editor swap files and the `..data` links and timestamped
//!   copies of a mounted ConfigMap, while the ConfigMap's file symlinks are
//!   followed; symlinked directories are not (no loops). Files may hold
//!   many `---`-separated documents.
//! - `networking.istio.io/{v1,v1beta1,v1alpha3}` `ServiceEntry`,
//!   `WorkloadEntry`, `DestinationRule`, `Sidecar` and `WorkloadGroup` are
//!   converted; every other kind (VirtualService, Gateway, Kubernetes
//!   objects …) and empty documents are skipped without error.
//! - A file with any bad document is logged (file, 0-based document index,
//!   field path), counted in `meshreg_source_errors_total{reason}` once per
//!   distinct bad content, and keeps its last good state; a file that was
//!   never good contributes nothing. A deleted or emptied file's
//!   contribution goes away once it has stayed so for a grace period.
//! - The first state goes as one `Reset`; then each edit sends only the
//!   objects it changed (`Patch`). A missing or unreadable directory makes
//!   the source stale (`Update::Stale`), never empty.
//!
//! This module does not merge with other sources (the registry does), does
//! not resolve DNS and knows nothing about xDS.

mod convert;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use meshreg_registry::{SourceId, SourceKind, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;

/// What [`validate_dir`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    /// One message per refused document or unreadable file (file,
    /// document, field path, Istio rule).
    pub problems: Vec<String>,
    /// Istio's warnings on accepted documents (they are applied).
    pub warnings: Vec<String>,
}

/// Validates every Istio file of `dir` as the source would read it (like
/// `istioctl validate`).
///
/// # Errors
///
/// If the directory cannot be listed.
pub fn validate_dir(dir: &std::path::Path, default_namespace: &str) -> std::io::Result<Validation> {
    let listing = watch::yaml_files(dir)?;
    let paths = listing.files;
    let mut out = Validation::default();
    out.problems.extend(
        listing
            .skipped
            .iter()
            .map(|(path, why)| format!("{}: {}", path.display(), why.message())),
    );
    for path in paths {
        let file = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => match convert::parse_file(&file, &text, default_namespace) {
                Ok(parsed) => out
                    .warnings
                    .extend(parsed.warnings.iter().map(ToString::to_string)),
                Err(errors) => out.problems.extend(errors.iter().map(ToString::to_string)),
            },
            Err(e) => out.problems.push(format!("{file}: {e}")),
        }
    }
    Ok(out)
}

/// Validates `text` as the source would read a file named `file` (like
/// `istioctl validate` on one file), converting what is valid into
/// registry objects as well; returns the problems and warnings.
pub fn validate_text(file: &str, text: &str, default_namespace: &str) -> Validation {
    match convert::parse_file(file, text, default_namespace) {
        Ok(parsed) => {
            let source = SourceId::new(meshreg_registry::SourceKind::ServiceEntry, file);
            let _ = convert::objects(&parsed.objects, &source);
            Validation {
                problems: Vec::new(),
                warnings: parsed.warnings.iter().map(ToString::to_string).collect(),
            }
        }
        Err(errors) => Validation {
            problems: errors.iter().map(ToString::to_string).collect(),
            warnings: Vec::new(),
        },
    }
}

/// The registry objects of Istio `ServiceEntry`/`WorkloadEntry` objects
/// given as YAML or JSON text (e.g. read from a Kubernetes API server),
/// validated and converted by exactly the code that reads files; `what`
/// names the object in errors.
///
/// # Errors
///
/// Every refused document, as one message.
pub(crate) fn registry_objects(
    what: &str,
    text: &str,
    source: &SourceId,
) -> std::result::Result<Vec<meshreg_registry::Object>, String> {
    let parsed = convert::parse_file(what, text, DEFAULT_NAMESPACE).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(convert::objects(&parsed.objects, source).objects)
}

/// The namespace of objects that do not name one, unless configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The safety-net full rescan period, unless configured.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Configuration of one [`ServiceEntryAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The directory whose `*.yaml`/`*.yml` files are read (with its
    /// subdirectories; made absolute). It may be missing at startup: the
    /// source is then not ready, with the reason, and the directory is
    /// retried every [`Config::rescan_interval`].
    pub dir: PathBuf,
    /// The namespace of objects without `metadata.namespace`. Default:
    /// [`DEFAULT_NAMESPACE`] (`default`).
    pub default_namespace: String,
    /// How often the directory is rescanned (changed size or mtime) in case
    /// a filesystem event was missed. Default: [`DEFAULT_RESCAN_INTERVAL`]
    /// (5 s). Must not be zero.
    pub rescan_interval: Duration,
    /// The files' contents served at once may total this many bytes; a
    /// content that would pass it is refused (reason `too_large`) and its
    /// file keeps its last good state. Default:
    /// [`DEFAULT_MAX_TOTAL_BYTES`] (256 MiB).
    pub max_total_bytes: usize,
    /// How long a write still in progress is waited for before its file is
    /// read: events that do not end a write (a file created, data written,
    /// attributes changed, unless the write already ended) start this wait,
    /// so a burst becomes one read; a writer that keeps the file open
    /// longer is read as the file stands then.
    /// Events that end one (a written file closed, a rename into place, a
    /// removal) are read at once, so an edit adds no wait before the
    /// registry's debounce. Default: [`DEFAULT_WRITE_SETTLE`] (75 ms).
    pub write_settle: Duration,
}

/// See [`Config::write_settle`]: long enough for a writer that keeps a
/// file open between writes, short against the push debounce.
pub const DEFAULT_WRITE_SETTLE: Duration = Duration::from_millis(75);

/// See [`Config::max_total_bytes`]: what the source holds is proportional
/// to it (the objects parsed; the text itself is not kept), and a registry
/// config directory is megabytes.
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 256 * 1024 * 1024;

impl Config {
    /// A configuration for `dir` with the default namespace and rescan
    /// interval.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Config {
            dir: dir.into(),
            default_namespace: DEFAULT_NAMESPACE.to_string(),
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            write_settle: DEFAULT_WRITE_SETTLE,
        }
    }
}

/// Forgets what this process remembers of the source on `dir` after it
/// was removed by a reload: that it was served (a source started on it
/// again sends its first state whole) and the last good contents of its
/// refused files (a source added back reads them for what they are).
pub fn forget_directory(dir: &std::path::Path) {
    watch::forget_directory(dir);
}

/// Watches a directory of Istio `ServiceEntry`/`WorkloadEntry` files and
/// sends the registry its complete state once, then what changes.
#[derive(Debug)]
pub struct ServiceEntryAdapter {
    config: Config,
    metrics: Metrics,
    source: SourceId,
}

// === impl ServiceEntryAdapter ===

impl ServiceEntryAdapter {
    /// An adapter for `config`, reporting into `metrics`. Nothing is read
    /// until [`ServiceEntryAdapter::run`].
    pub fn new(mut config: Config, metrics: Metrics) -> Self {
        // Filesystem events name absolute paths: compare like with like.
        if let Ok(abs) = std::path::absolute(&config.dir) {
            config.dir = abs;
        }
        let source = SourceId::new(SourceKind::ServiceEntry, config.dir.display().to_string());
        ServiceEntryAdapter {
            config,
            metrics,
            source,
        }
    }

    /// The registry source this adapter sends as: kind `serviceentry`, named
    /// after the directory.
    pub fn source_id(&self) -> SourceId {
        self.source.clone()
    }

    /// Loads the directory, sends an [`Update::Reset`] with its complete
    /// state, then an [`Update::Patch`] within about 100 ms of every change
    /// that alters it. Runs until `shutdown` is cancelled or `sink`
    /// is closed (both return `Ok`).
    ///
    /// # Errors
    ///
    /// Only configuration errors: an empty `dir`, a zero `rescan_interval`,
    /// an empty `default_namespace`, or a `dir` that exists but is not a
    /// directory. Problems with the files are logged, counted and retried.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        watch::run(self.config, self.metrics, self.source, sink, shutdown).await
    }
}
