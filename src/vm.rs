//! VM auto-registration, as Istio's `autoregistration` controller does it:
//! a proxy whose node metadata names a WorkloadGroup (`AUTO_REGISTER_GROUP`,
//! in its `NAMESPACE`) is registered as a workload made from the group's
//! template while any of its streams is open, and removed a grace period
//! after the last one closed (Istio's `PILOT_WORKLOAD_ENTRY_GRACE_PERIOD`,
//! 10 s by default) unless it reconnects first.
//!
//! - The workload is named `<group>-<ip>[-<network>]` (`:` in an IPv6
//!   address becomes `-`; a name over 253 characters keeps its last 253),
//!   its address is the proxy's first IP, and its labels are the
//!   template's, overridden by the group's metadata labels, overridden by
//!   the proxy's `LABELS` (less `istio-locality`); network and locality
//!   are the proxy's when it sends them, else the template's.
//! - A proxy naming a group its namespace does not have is refused with
//!   `FAILED_PRECONDITION`, as istiod refuses it; one without an IP or a
//!   namespace is served but not registered (istiod's behaviour), and said
//!   so in the log.
//! - A group with a probe makes its workloads unhealthy until the proxy
//!   reports them healthy ([`meshreg_xds::HEALTH_INFORMATION`] requests on
//!   the stream, as Istio's agent sends them); reports follow.
//!
//! Where registrations go ([`Sink`]): without etcd, straight to the
//! registry as the `vm/autoregistration` source (this replica's own); with
//! etcd, into the shared store (`meshreg_adapters::etcd`), under this
//! replica's lease, from where every replica's `vm/etcd` source serves
//! them. This module reads the registry view (to find groups) and writes
//! only there; it touches nothing else.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshreg_adapters::etcd;
use meshreg_registry::{
    Address, Health, Locality, Object, ObjectKey, Reader, SourceId, SourceKind, TlsMode, Update,
    Workload, WorkloadGroup,
};
use meshreg_xds::{ConnectHook, Proxy, Refusal, Tracked};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Istio's default grace period before a disconnected VM's workload goes.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The label Istio's agent puts the locality in; not a workload label.
const LOCALITY_LABEL: &str = "istio-locality";

/// `(namespace, name)` of a registered workload.
type Key = (String, String);

/// One registered workload.
#[derive(Debug)]
struct Entry {
    workload: Workload,
    /// Open streams of its proxy (on this replica).
    streams: usize,
    /// When the last stream closed, while none is open.
    gone_since: Option<Instant>,
    /// Whether its group has a probe: then health follows the reports.
    checked: bool,
    /// The last report (unhealthy until the first, when checked).
    healthy: bool,
    /// When its last connection began (ms since the Unix epoch): each
    /// connection writes the record again, so the replica holding the
    /// newest stream owns it (istiod rewrites the entry's controller and
    /// `connectedAt` on every connect, and an older connection does not
    /// overwrite a newer one).
    connected_at: u64,
    /// Its WorkloadGroup's name: while the group does not exist, the
    /// workload is not registered (istiod's WorkloadEntries go with their
    /// group, and connected VMs are registered again when it comes back).
    group: String,
}

impl Entry {
    fn object(&self) -> Workload {
        let mut w = self.workload.clone();
        w.health = if !self.checked || self.healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        w
    }
}

/// Istio's auto-registration metrics (same names as istiod's) and the
/// number of workloads held.
#[derive(Debug, Clone)]
struct Metrics {
    /// `result`: `registered`, `refused`, `unregistered` (last stream
    /// closed), `deleted` (grace period over), `etcd_error` (a write to
    /// etcd failed; retried).
    events: IntCounterVec,
    registered: IntGauge,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new(
                "meshreg_vm_autoregistration_total",
                "VM auto-registration events: registered, refused (unknown group), unregistered (last stream closed), deleted (grace period over), etcd_error (a write to etcd failed; retried).",
            ),
            &["result"],
        )?;
        let registered = IntGauge::new(
            "meshreg_vm_registered",
            "Workloads auto-registered by connected (or recently disconnected) VM proxies.",
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(registered.clone()))?;
        Ok(Metrics { events, registered })
    }

    fn count(&self, result: &str) {
        self.events.with_label_values(&[result]).inc();
    }
}

#[derive(Debug)]
struct Inner {
    reader: Reader,
    grace: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
    wake: Notify,
    metrics: Metrics,
}

impl Inner {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connect hook the xDS server calls, and the task that sends the
/// registrations to the registry ([`Registrar::run`]). Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Registrar {
    inner: Arc<Inner>,
}

/// Where the registrations go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Straight to the registry, as the [`source`].
    Registry(mpsc::Sender<Update>),
    /// Into etcd, shared by replicas.
    Etcd(Box<etcd::Writer>),
}

/// This replica's name in the records it writes to etcd: unique per
/// process (pid and start time).
pub(crate) fn controller_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("meshreg-{}-{nanos:x}", std::process::id())
}

/// The source the registrations are sent as (without etcd).
pub(crate) fn source() -> SourceId {
    SourceId::new(SourceKind::Vm, "autoregistration")
}

/// Istio's `autoregisteredWorkloadEntryName`.
fn entry_name(group: &str, ip: &std::net::IpAddr, network: &str) -> String {
    let mut name = format!("{group}-{}", ip.to_string().replace(':', "-"));
    if !network.is_empty() {
        name.push('-');
        name.push_str(network);
    }
    if name.len() > 253 {
        let cut = name.len() - 253;
        name = name[cut..].to_string();
    }
    name
}

/// Istio's `workloadEntryFromGroup`, in the registry's terms.
fn workload_from_group(name: String, proxy: &Proxy, group: &WorkloadGroup) -> Workload {
    let t = &group.template;
    let mut labels = t.labels.clone();
    labels.extend(group.labels.clone());
    labels.extend(proxy.labels.clone());
    labels.remove(LOCALITY_LABEL);
    let network = if proxy.network.is_empty() {
        t.network.clone()
    } else {
        proxy.network.clone()
    };
    let (region, zone, subzone) = &proxy.locality;
    let locality = if region.is_empty() && zone.is_empty() && subzone.is_empty() {
        t.locality.clone()
    } else {
        Locality {
            region: region.clone(),
            zone: zone.clone(),
            subzone: subzone.clone(),
        }
    };
    // Istio's getTLSModeFromWorkloadEntry: the label when present, else
    // Istio mTLS for an entry with a service account.
    let tls_mode = match labels.get("security.istio.io/tlsMode").map(String::as_str) {
        Some("istio") => TlsMode::Istio,
        Some(_) => TlsMode::Disabled,
        None if !t.service_account.is_empty() => TlsMode::Istio,
        None => TlsMode::Disabled,
    };
    Workload {
        namespace: proxy.namespace.clone(),
        name,
        address: proxy.ips.first().map(|ip| Address::Ip(*ip)),
        ports: t.ports.clone(),
        labels,
        locality,
        cluster_id: proxy.cluster_id.clone(),
        network,
        health: Health::Healthy,
        weight: t.weight,
        service_account: t.service_account.clone(),
        tls_mode,
    }
}

impl Registrar {
    /// A registrar reading groups from `reader`, removing a disconnected
    /// VM's workload `grace` after its last stream closed; its metrics go
    /// in `registry`.
    pub(crate) fn new(
        reader: Reader,
        grace: Duration,
        registry: &Registry,
    ) -> Result<Registrar, prometheus::Error> {
        Ok(Registrar {
            inner: Arc::new(Inner {
                reader,
                grace,
                entries: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                metrics: Metrics::register(registry)?,
            }),
        })
    }

    /// Writes the registrations to `sink` until `shutdown` (see
    /// [`Registrar::run_registry`] and [`Registrar::run_etcd`]).
    pub(crate) async fn run(self, sink: Sink, shutdown: CancellationToken) {
        match sink {
            Sink::Registry(updates) => self.run_registry(updates, shutdown).await,
            Sink::Etcd(writer) => self.run_etcd(*writer, shutdown).await,
        }
    }

    /// Puts every registration in etcd and deletes those whose grace period
    /// ended (only the ones this replica wrote last); everything is put
    /// again under a new lease when the old one was lost. Failures are
    /// logged once per outage and retried (`etcd_sync`).
    async fn run_etcd(self, mut writer: etcd::Writer, shutdown: CancellationToken) {
        let mut sent: BTreeMap<Key, (Workload, u64)> = BTreeMap::new();
        let mut outage = crate::etcd_sync::Outage::new("VM registrations");
        let mut reader = self.inner.reader.clone();
        loop {
            let woken = self.inner.wake.notified();
            let (desired, next) = self.prune(Instant::now());
            if writer.lost() {
                sent.clear();
            }
            let error = crate::etcd_sync::write_changes(&mut writer, &desired, &mut sent).await;
            if error.is_some() {
                self.inner.metrics.count("etcd_error");
            }
            let retry = outage.after(error);
            // With registrations held, look at the lease now and then: a
            // lost lease (its keep-alive failed) means putting them again.
            let check = (!sent.is_empty()).then(|| Instant::now() + writer.check_every());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = woken => {}
                // A group may have come or gone.
                changed = reader.changed() => if changed.is_none() { return },
                () = crate::etcd_sync::sleep_until_first(&[next, retry, check]) => {}
            }
        }
    }

    /// Sends the registrations to the registry as the [`source`]: the
    /// whole state at the first registration (the source then appears,
    /// synced), then what changed whenever a proxy connects, reports or
    /// leaves, and the removals as grace periods end.
    async fn run_registry(self, updates: mpsc::Sender<Update>, shutdown: CancellationToken) {
        let source = source();
        let mut sent: BTreeMap<Key, Workload> = BTreeMap::new();
        let mut reader = self.inner.reader.clone();
        // The source appears with the first registration (a daemon no VM
        // ever connects to shows no such source).
        let mut announced = false;
        loop {
            // Subscribed before reading, so no wake-up falls in between.
            let woken = self.inner.wake.notified();
            let (patch, next) = self.step(&mut sent, Instant::now());
            let update = match patch {
                Some(_) if !announced => {
                    announced = true;
                    Some(Update::Reset {
                        source: source.clone(),
                        objects: sent.values().cloned().map(Object::Workload).collect(),
                    })
                }
                other => other,
            };
            if let Some(update) = update
                && updates.send(update).await.is_err()
            {
                return;
            }
            let sleep = match next {
                Some(at) => tokio::time::sleep_until(at.into()),
                None => tokio::time::sleep(Duration::from_secs(86_400)),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = woken => {}
                // A group may have come or gone.
                changed = reader.changed() => if changed.is_none() { return },
                () = sleep => {}
            }
        }
    }

    /// Drops the entries whose grace period ended by `now` and diffs the
    /// rest against `sent`; returns the patch (if anything changed) and
    /// when the next grace period ends.
    fn step(
        &self,
        sent: &mut BTreeMap<Key, Workload>,
        now: Instant,
    ) -> (Option<Update>, Option<Instant>) {
        let (desired, next) = self.prune(now);
        let desired: BTreeMap<Key, Workload> =
            desired.into_iter().map(|(k, (w, _))| (k, w)).collect();
        let mut apply = Vec::new();
        for (key, w) in &desired {
            if sent.get(key) != Some(w) {
                sent.insert(key.clone(), w.clone());
                apply.push(Object::Workload(w.clone()));
            }
        }
        let gone: Vec<Key> = sent
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        let delete: Vec<ObjectKey> = gone
            .into_iter()
            .map(|(namespace, name)| {
                sent.remove(&(namespace.clone(), name.clone()));
                ObjectKey::Workload { namespace, name }
            })
            .collect();
        let patch = (!apply.is_empty() || !delete.is_empty()).then(|| Update::Patch {
            source: source(),
            apply,
            delete,
        });
        (patch, next)
    }

    /// Drops the entries whose grace period ended by `now`; returns the
    /// workloads of the rest (with their health) and when the next grace
    /// period ends.
    fn prune(&self, now: Instant) -> (BTreeMap<Key, (Workload, u64)>, Option<Instant>) {
        let grace = self.inner.grace;
        let mut entries = self.inner.entries();
        let before = entries.len();
        entries.retain(|(ns, name), e| match e.gone_since {
            Some(since) if since + grace <= now => {
                tracing::info!(namespace = %ns, name = %name, "auto-registered workload deleted: its proxy did not reconnect within the grace period");
                false
            }
            _ => true,
        });
        for _ in entries.len()..before {
            self.inner.metrics.count("deleted");
        }
        self.inner
            .metrics
            .registered
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
        let next = entries
            .values()
            .filter_map(|e| e.gone_since.map(|s| s + grace))
            .min();
        let view = self.inner.reader.view();
        let desired = entries
            .iter()
            .filter(|((ns, _), entry)| view.workload_group(ns, &entry.group).is_some())
            .map(|(key, entry)| (key.clone(), (entry.object(), entry.connected_at)))
            .collect();
        (desired, next)
    }
}

impl crate::etcd_sync::Store<Key, (Workload, u64)> for etcd::Writer {
    async fn put(&mut self, _: &Key, (w, connected_at): &(Workload, u64)) -> Result<(), String> {
        let record = etcd::WorkloadRecord::new(
            w,
            w.health == Health::Healthy,
            self.controller(),
            *connected_at,
        );
        etcd::Writer::put(self, &record)
            .await
            .map_err(|e| e.to_string())
    }

    async fn delete(&mut self, (namespace, name): &Key) -> Result<(), String> {
        etcd::Writer::delete(self, namespace, name)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A connected VM proxy's stream; dropping it is the disconnect.
struct Stream {
    inner: Arc<Inner>,
    key: Key,
}

impl Tracked for Stream {
    fn health(&self, report: Result<(), &str>) {
        let mut entries = self.inner.entries();
        let Some(e) = entries.get_mut(&self.key) else {
            return;
        };
        // Istio applies reports only to health-checked entries.
        if !e.checked || e.healthy == report.is_ok() {
            return;
        }
        e.healthy = report.is_ok();
        match report {
            Ok(()) => {
                tracing::info!(namespace = %self.key.0, name = %self.key.1, "VM workload reported healthy")
            }
            Err(why) => {
                tracing::info!(namespace = %self.key.0, name = %self.key.1, reason = why, "VM workload reported unhealthy")
            }
        }
        drop(entries);
        self.inner.wake.notify_one();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut entries = self.inner.entries();
        if let Some(e) = entries.get_mut(&self.key) {
            e.streams = e.streams.saturating_sub(1);
            if e.streams == 0 {
                e.gone_since = Some(Instant::now());
                self.inner.metrics.count("unregistered");
                tracing::info!(namespace = %self.key.0, name = %self.key.1, grace = ?self.inner.grace, "VM proxy disconnected; its workload goes after the grace period unless it reconnects");
            }
        }
        drop(entries);
        self.inner.wake.notify_one();
    }
}

impl ConnectHook for Registrar {
    fn connect(&self, proxy: &Proxy) -> Result<Option<Box<dyn Tracked>>, Refusal> {
        let group_name = &proxy.auto_register_group;
        if group_name.is_empty() {
            return Ok(None);
        }
        let Some(ip) = proxy.ips.first() else {
            tracing::warn!(node = ?proxy.id, group = %group_name, "auto-registration skipped: the proxy sends no IP (INSTANCE_IPS)");
            return Ok(None);
        };
        if !proxy.namespace_in_metadata {
            tracing::warn!(node = ?proxy.id, group = %group_name, "auto-registration skipped: the proxy names no namespace (NAMESPACE)");
            return Ok(None);
        }
        let view = self.inner.reader.view();
        let Some(group) = view.workload_group(&proxy.namespace, group_name) else {
            self.inner.metrics.count("refused");
            return Err(Refusal::FailedPrecondition(format!(
                "auto-registration WorkloadEntry of {:?} failed: cannot find WorkloadGroup {}/{group_name}",
                proxy.id, proxy.namespace
            )));
        };
        let name = entry_name(group_name, ip, &proxy.network);
        let workload = workload_from_group(name.clone(), proxy, group);
        let checked = group.probe.is_some();
        let key = (proxy.namespace.clone(), name);
        let mut entries = self.inner.entries();
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            workload: workload.clone(),
            streams: 0,
            gone_since: None,
            checked,
            healthy: false,
            connected_at: 0,
            group: group_name.clone(),
        });
        if entry.streams == 0 && entry.gone_since.is_none() {
            self.inner.metrics.count("registered");
            tracing::info!(namespace = %key.0, name = %key.1, group = %group_name, health_checked = checked, "VM auto-registered");
        }
        entry.streams += 1;
        // Strictly later than the last one, even within a millisecond.
        entry.connected_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .max(entry.connected_at + 1);
        entry.gone_since = None;
        entry.workload = workload;
        entry.checked = checked;
        drop(entries);
        self.inner.wake.notify_one();
        Ok(Some(Box::new(Stream {
            inner: self.inner.clone(),
            key,
        })))
    }
}
