//! The directory of kubeconfig files behind a [`super::ClustersAdapter`]:
//! reads it every rescan interval, and starts, stops or restarts one
//! [`super::KubernetesAdapter`] per file whose content appeared, vanished
//! or changed. A file's content is compared by hash; a file that cannot be
//! read keeps its cluster running on what it had (a half-written rotation
//! must not stop a cluster).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use meshreg_registry::{SourceId, SourceKind, Update};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ClustersConfig, Config, KubernetesAdapter};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How long the first scan's clusters may take to send their first state
/// before the directory counts as read anyway (Istio's
/// `PILOT_REMOTE_CLUSTER_TIMEOUT` default).
const FIRST_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A running cluster.
struct Running {
    hash: u64,
    token: CancellationToken,
    task: JoinHandle<Result<()>>,
}

/// The cluster id of a kubeconfig file: its name without a `.yaml`/`.yml`
/// extension, or its whole name when it has no extension (a mounted
/// Secret's keys); `None` for hidden files (editors' temporaries, a mounted
/// Secret's `..data`) and files with another extension (a README).
fn cluster_id(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    let id = match name
        .strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"))
    {
        Some(id) => id,
        None if !name.contains('.') => name,
        None => return None,
    };
    (!id.is_empty()).then(|| id.to_string())
}

/// A listing: cluster id → (file, content hash), the ids of files that
/// could not be read, and files left out because an earlier file (by name)
/// names the same cluster (`east` and `east.yaml`).
type Listing = (HashMap<String, (PathBuf, u64)>, Vec<String>, Vec<PathBuf>);

/// Every kubeconfig file with its content's hash; `None` when the
/// directory cannot be listed. A file that cannot be read is left out of
/// the listing's hashes but reported in `unreadable`, so its cluster keeps
/// running.
fn scan(dir: &Path) -> Option<Listing> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut files = HashMap::new();
    let mut unreadable = Vec::new();
    let mut clashing = Vec::new();
    for path in paths {
        let Some(id) = cluster_id(&path) else {
            continue;
        };
        if files.contains_key(&id) || unreadable.contains(&id) {
            clashing.push(path);
            continue;
        }
        // Mounted Secrets are symlinks to files: follow them.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                files.insert(id, (path, h.finish()));
            }
            Err(_) => unreadable.push(id),
        }
    }
    Some((files, unreadable, clashing))
}

pub(super) async fn run(
    config: ClustersConfig,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    let bad = |field: &'static str, reason: &str| Error::Config {
        adapter: "kubernetes clusters",
        field,
        reason: reason.into(),
    };
    if config.dir.as_os_str().is_empty() {
        return Err(bad("dir", "must not be empty"));
    }
    if config.domain.is_empty() {
        return Err(bad("domain", "must not be empty"));
    }
    if config.rescan_interval.is_zero() {
        return Err(bad("rescan_interval", "must be greater than zero"));
    }
    let span = tracing::info_span!("adapter", kind = "kubernetes-clusters", source = %source);
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut refused: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Files ignored because another names the same cluster (logged once).
    let mut clashes: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut synced = false;
    let mut listing_failed = false;
    let mut tick = tokio::time::interval(config.rescan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some((mut files, unreadable, clashing)) = scan(&config.dir) else {
            // Keep every cluster running; report once.
            if !listing_failed {
                tracing::warn!(parent: &span, dir = %config.dir.display(), "cannot list the kubeconfig directory; clusters keep running");
                metrics.error(&source, "io");
                listing_failed = true;
                let stale = Update::Stale {
                    source: source.clone(),
                    error: format!("cannot list {}", config.dir.display()),
                };
                if sink.send(stale).await.is_err() {
                    break;
                }
            }
            continue;
        };
        listing_failed = false;
        for path in clashing {
            if clashes.insert(path.clone()) {
                tracing::warn!(parent: &span, file = %path.display(), "another kubeconfig file (first by name) already names this cluster; file ignored");
                metrics.error(&source, "duplicate_cluster");
            }
        }
        // A file named after a cluster another source serves would take
        // that cluster's source over: refused, logged once.
        files.retain(|id, (path, _)| {
            if !config.reserved.contains(id) {
                return true;
            }
            if refused.insert(id.clone()) {
                tracing::warn!(parent: &span, cluster = %id, file = %path.display(), "a configured kubernetes source already has this cluster id; file ignored");
                metrics.error(&source, "duplicate_cluster");
            }
            false
        });
        // Removed: stop the cluster, then withdraw exactly its objects.
        let gone: Vec<String> = running
            .keys()
            .filter(|id| !files.contains_key(*id) && !unreadable.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(r) = running.remove(&id) {
                r.token.cancel();
                let _ = r.task.await;
                tracing::info!(parent: &span, cluster = %id, "kubeconfig removed; the cluster's objects are withdrawn");
                let forget = Update::Forget {
                    source: SourceId::new(SourceKind::Kubernetes, id),
                };
                if sink.send(forget).await.is_err() {
                    return Ok(());
                }
            }
        }
        // Added or changed: (re)start it. The clusters of the first scan
        // report their first update before the directory counts as read.
        let mut first_updates = Vec::new();
        for (id, (path, hash)) in files {
            if running.get(&id).is_some_and(|r| r.hash == hash) {
                continue;
            }
            if let Some(old) = running.remove(&id) {
                // Rotated: the new connection's first state replaces the
                // old one object by object; nothing is withdrawn.
                tracing::info!(parent: &span, cluster = %id, "kubeconfig changed; reconnecting");
                old.token.cancel();
                let _ = old.task.await;
            } else {
                tracing::info!(parent: &span, cluster = %id, "kubeconfig added");
            }
            let adapter = KubernetesAdapter::new(
                Config {
                    kubeconfig: Some(path),
                    cluster_id: id.clone(),
                    network: config.network.clone(),
                    domain: config.domain.clone(),
                },
                metrics.clone(),
            );
            let token = shutdown.child_token();
            let task = if synced {
                tokio::spawn(adapter.run(sink.clone(), token.clone()))
            } else {
                let (tx, rx) = tokio::sync::oneshot::channel();
                first_updates.push(rx);
                tokio::spawn(adapter.run_reporting(sink.clone(), token.clone(), tx))
            };
            running.insert(id, Running { hash, token, task });
        }
        if !synced {
            // Istio waits for the remote clusters it knows at start
            // (`PILOT_REMOTE_CLUSTER_TIMEOUT`, 30 s): so does the
            // directory's readiness, for its first scan's clusters' first
            // state (or their first failure, which the registry then
            // reports as not ready).
            let waited = tokio::select! {
                () = shutdown.cancelled() => break,
                r = tokio::time::timeout(FIRST_SYNC_TIMEOUT, futures::future::join_all(first_updates)) => r,
            };
            if waited.is_err() {
                tracing::warn!(parent: &span, timeout = ?FIRST_SYNC_TIMEOUT, "not every cluster sent its first state in time; the directory counts as read");
            }
            // The directory itself is read: its own (empty) source is ready.
            synced = true;
            let ready = Update::Reset {
                source: source.clone(),
                objects: Vec::new(),
            };
            if sink.send(ready).await.is_err() {
                break;
            }
        }
    }
    for (_, r) in running {
        r.token.cancel();
        let _ = r.task.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_files_naming_one_cluster_keep_the_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("west"), "a").unwrap();
        std::fs::write(dir.path().join("west.yaml"), "b").unwrap();
        std::fs::write(dir.path().join("east.yaml"), "c").unwrap();
        let (files, unreadable, clashing) = scan(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files["west"].0, dir.path().join("west"));
        assert!(unreadable.is_empty());
        assert_eq!(clashing, [dir.path().join("west.yaml")]);
    }

    #[test]
    fn cluster_ids_are_file_names_without_yaml() {
        let id = |p: &str| cluster_id(Path::new(p));
        assert_eq!(id("/k/cluster-1"), Some("cluster-1".into()));
        assert_eq!(id("/k/cluster-2.yaml"), Some("cluster-2".into()));
        assert_eq!(id("/k/east.yml"), Some("east".into()));
        assert_eq!(id("/k/.swp"), None);
        assert_eq!(id("/k/..data"), None);
        assert_eq!(id("/k/.yaml"), None);
        assert_eq!(id("/k/README.md"), None);
        assert_eq!(id("/k/east.prod.yaml"), Some("east.prod".into()));
    }

    #[tokio::test]
    async fn a_file_named_after_a_configured_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Not a kubeconfig: a cluster started from it would report itself
        // stale at once, so silence means it was never started.
        std::fs::write(dir.path().join("east.yaml"), "not a kubeconfig").unwrap();
        std::fs::write(dir.path().join("west.yaml"), "not a kubeconfig").unwrap();
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let source = SourceId::new(SourceKind::Kubernetes, "dir:test");
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            ClustersConfig {
                dir: dir.path().to_path_buf(),
                network: String::new(),
                domain: "cluster.local".into(),
                rescan_interval: std::time::Duration::from_millis(50),
                reserved: vec!["east".into()],
            },
            metrics,
            source,
            tx,
            shutdown.clone(),
        ));
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
        while let Ok(Some(update)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            seen.insert(update.source().to_string());
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(seen.contains("kubernetes/west"), "{seen:?}");
        assert!(!seen.contains("kubernetes/east"), "{seen:?}");
        let families = registry.gather();
        let refused = families
            .iter()
            .find(|f| f.name() == "meshreg_source_errors_total")
            .and_then(|f| {
                f.get_metric().iter().find(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.value() == "duplicate_cluster")
                })
            })
            .map(|m| m.get_counter().get_value());
        assert_eq!(refused, Some(1.0));
    }
}
