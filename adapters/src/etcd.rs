//! The etcd store of what only meshreg knows: the VM workloads registered
//! through it (auto-registration), shared by every replica on one etcd, so
//! any replica serves what a VM registered through another (`etcd-client`).
//!
//! # Layout
//!
//! `<prefix>/workloads/<namespace>/<name>` → a JSON [`WorkloadRecord`],
//! attached to the lease of the replica that wrote it (TTL
//! [`Config::lease_ttl`], kept alive every third of it): a replica that dies
//! takes its registrations with it once its lease expires, and a VM that
//! reconnects to another replica is written again there.
//!
//! - [`Writer`] is one replica's side: it puts and deletes records under its
//!   own lease, and says when the lease was lost (everything must be put
//!   again). A record is deleted only by the replica that wrote it last
//!   (its `controller`), as istiod only cleans up entries it controls.
//! - [`run`] is the source every replica runs (`vm/etcd`): it lists the
//!   prefix (one `Reset`), watches from the listed revision (a `Patch` per
//!   response), and when the connection fails or the watch's revision was
//!   compacted, marks the source stale (keeping the last state) and lists
//!   again after a pause. A listing is a consistent snapshot at its
//!   revision, so no event is lost or applied twice.
//!
//! This module owns the etcd connection and the record format; it sends
//! registry updates and knows nothing of proxies or xDS. etcd is trusted
//! infrastructure: a record that does not parse is skipped and counted.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use meshreg_registry::{
    Address, Health, Locality, Object, ObjectKey, SourceId, TlsMode, Update, Workload,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Where the store is and how it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix of everything meshreg writes (no trailing `/`), e.g.
    /// `/meshreg`.
    pub prefix: String,
    /// The TTL of a replica's lease: how long a dead replica's
    /// registrations outlive it.
    pub lease_ttl: Duration,
}

impl Config {
    fn workloads(&self) -> String {
        format!("{}/workloads/", self.prefix)
    }

    fn key(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.workloads())
    }
}

/// A registered workload as stored in etcd (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// Its namespace.
    pub namespace: String,
    /// Its name (`<group>-<ip>[-<network>]`).
    pub name: String,
    /// Its IP address.
    pub address: String,
    /// Service port name → its port.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Its cluster id.
    #[serde(default)]
    pub cluster_id: String,
    /// Its network.
    #[serde(default)]
    pub network: String,
    /// Load-balancing weight (0: unset).
    #[serde(default)]
    pub weight: u32,
    /// Its service account.
    #[serde(default)]
    pub service_account: String,
    /// Whether it accepts Istio mTLS.
    #[serde(default)]
    pub istio_tls: bool,
    /// Whether it is healthy.
    pub healthy: bool,
    /// The replica that wrote it last (only it deletes it).
    pub controller: String,
}

impl WorkloadRecord {
    /// The record of `w` (its health as `healthy`), written by `controller`.
    pub fn new(w: &Workload, healthy: bool, controller: &str) -> WorkloadRecord {
        let l = &w.locality;
        WorkloadRecord {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            address: match &w.address {
                Some(Address::Ip(ip)) => ip.to_string(),
                _ => String::new(),
            },
            ports: w.ports.clone(),
            labels: w.labels.clone(),
            locality: format!("{}/{}/{}", l.region, l.zone, l.subzone)
                .trim_end_matches('/')
                .to_string(),
            cluster_id: w.cluster_id.clone(),
            network: w.network.clone(),
            weight: w.weight,
            service_account: w.service_account.clone(),
            istio_tls: w.tls_mode == TlsMode::Istio,
            healthy,
            controller: controller.to_string(),
        }
    }

    /// The registry's workload.
    ///
    /// # Errors
    ///
    /// When the address is not an IP address.
    pub fn workload(&self) -> Result<Workload, String> {
        let ip = self
            .address
            .parse()
            .map_err(|_| format!("address {:?} is not an IP address", self.address))?;
        Ok(Workload {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            address: Some(Address::Ip(ip)),
            ports: self.ports.clone(),
            labels: self.labels.clone(),
            locality: Locality::parse(&self.locality),
            cluster_id: self.cluster_id.clone(),
            network: self.network.clone(),
            health: if self.healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            },
            weight: self.weight,
            service_account: self.service_account.clone(),
            tls_mode: if self.istio_tls {
                TlsMode::Istio
            } else {
                TlsMode::Disabled
            },
        })
    }
}

async fn connect(config: &Config) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    Client::connect(&config.endpoints, Some(options)).await
}

/// One replica's writes, under its own lease.
pub struct Writer {
    config: Config,
    controller: String,
    /// The client and the lease, once granted; the task keeping the lease
    /// alive ends (and `lost` says so) when it can no longer.
    conn: Option<(Client, i64, tokio::task::JoinHandle<()>)>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("config", &self.config)
            .field("controller", &self.controller)
            .field("lease", &self.conn.as_ref().map(|(_, lease, _)| lease))
            .finish()
    }
}

impl Writer {
    /// A writer for `config`, whose records name `controller`.
    pub fn new(config: Config, controller: String) -> Writer {
        Writer {
            config,
            controller,
            conn: None,
        }
    }

    /// The replica's name in its records.
    pub fn controller(&self) -> &str {
        &self.controller
    }

    /// How often to look whether the lease was lost: a third of its TTL,
    /// so the records are put again under a new lease before the old one
    /// expires when etcd forgot it (an outage longer than the TTL).
    pub fn check_every(&self) -> Duration {
        self.config.lease_ttl / 3
    }

    /// Whether the lease is gone (or was never granted): every record
    /// must be put again.
    pub fn lost(&self) -> bool {
        self.conn
            .as_ref()
            .is_none_or(|(_, _, keeper)| keeper.is_finished())
    }

    /// The client and a live lease, connecting and granting as needed.
    async fn ready(&mut self) -> Result<(&mut Client, i64), etcd_client::Error> {
        if self.lost() {
            if let Some((_, _, keeper)) = self.conn.take() {
                keeper.abort();
            }
            let mut client = connect(&self.config).await?;
            let ttl = i64::try_from(self.config.lease_ttl.as_secs().max(2)).unwrap_or(i64::MAX);
            let lease = client.lease_grant(ttl, None).await?.id();
            let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
            let every = self.config.lease_ttl / 3;
            let task = tokio::spawn(async move {
                loop {
                    if keeper.keep_alive().await.is_err() {
                        return;
                    }
                    match answers.message().await {
                        // A TTL of 0: the lease expired meanwhile.
                        Ok(Some(a)) if a.ttl() > 0 => {}
                        _ => return,
                    }
                    tokio::time::sleep(every).await;
                }
            });
            tracing::info!(lease, ttl, "etcd lease granted");
            self.conn = Some((client, lease, task));
        }
        match &mut self.conn {
            Some((client, lease, _)) => Ok((client, *lease)),
            None => Err(etcd_client::Error::InvalidArgs("no connection".into())),
        }
    }

    fn fail(&mut self) {
        if let Some((_, _, keeper)) = self.conn.take() {
            keeper.abort();
        }
    }

    /// Puts `record` under this replica's lease.
    ///
    /// # Errors
    ///
    /// When etcd cannot be reached or refuses; the connection is dropped
    /// and the next call reconnects (with a new lease: [`Writer::lost`]).
    pub async fn put(&mut self, record: &WorkloadRecord) -> Result<(), etcd_client::Error> {
        let key = self.config.key(&record.namespace, &record.name);
        let value = serde_json::to_vec(record).unwrap_or_default();
        let (client, lease) = self.ready().await?;
        let result = client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await;
        if result.is_err() {
            self.fail();
        }
        result.map(|_| ())
    }

    /// Deletes `namespace/name` if this replica wrote it last.
    ///
    /// # Errors
    ///
    /// As [`Writer::put`].
    pub async fn delete(&mut self, namespace: &str, name: &str) -> Result<(), etcd_client::Error> {
        let key = self.config.key(namespace, name);
        let me = self.controller.clone();
        let (client, _) = self.ready().await?;
        let result = async {
            let got = client.get(key.clone(), None).await?;
            let Some(kv) = got.kvs().first() else {
                return Ok(());
            };
            let ours = serde_json::from_slice::<WorkloadRecord>(kv.value())
                .is_ok_and(|r| r.controller == me);
            if !ours {
                return Ok(());
            }
            // Unless it changed since it was read.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(key, None)]);
            client.txn(txn).await.map(|_| ())
        }
        .await;
        if result.is_err() {
            self.fail();
        }
        result
    }
}

/// The registry key of an etcd key under `workloads`.
fn object_key(workloads: &str, key: &[u8]) -> Option<ObjectKey> {
    let key = std::str::from_utf8(key).ok()?.strip_prefix(workloads)?;
    let (namespace, name) = key.split_once('/')?;
    Some(ObjectKey::Workload {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// The workload of one stored value, or why it is skipped.
fn workload(value: &[u8]) -> Result<Workload, String> {
    let record: WorkloadRecord = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    record.workload()
}

/// The pause before listing again after a failure: 0.5 s doubling to 30 s.
fn pause(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.min(6))
        .min(Duration::from_secs(30))
}

/// Runs the `vm/etcd` source (see the module docs) until `shutdown`.
pub async fn run(
    config: Config,
    source: SourceId,
    metrics: Metrics,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let workloads = config.workloads();
    let mut failures: u32 = 0;
    let mut reported = false;
    metrics.unsynced(&source);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            o = follow(&config, &workloads, &source, &metrics, &sink) => o,
        };
        let why = match outcome {
            Followed::SinkClosed => return,
            Followed::Compacted(rev) => {
                // Not a failure: the history is gone, a listing replaces it.
                tracing::info!(
                    compact_revision = rev,
                    "etcd history compacted past the watch; listing again"
                );
                continue;
            }
            Followed::Failed { why, listed } => {
                if listed {
                    // It worked for a while: a new outage.
                    failures = 0;
                    reported = false;
                }
                why
            }
        };
        if !reported {
            tracing::warn!(source = %source, error = %why, "cannot read etcd; keeping the last state and retrying");
            reported = true;
        }
        metrics.error(&source, "etcd");
        let stale = Update::Stale {
            source: source.clone(),
            error: why,
        };
        if sink.send(stale).await.is_err() {
            return;
        }
        let wait = pause(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How following the prefix ended.
enum Followed {
    SinkClosed,
    /// The watch's revision was compacted (the minimum kept revision).
    Compacted(i64),
    /// A failure, after a listing that worked or not.
    Failed {
        why: String,
        listed: bool,
    },
}

/// Lists the prefix (one `Reset`), then applies the watch's events from
/// the listed revision, until something ends it.
async fn follow(
    config: &Config,
    workloads: &str,
    source: &SourceId,
    metrics: &Metrics,
    sink: &mpsc::Sender<Update>,
) -> Followed {
    let mut client = match connect(config).await {
        Ok(c) => c,
        Err(e) => {
            return Followed::Failed {
                why: format!("connecting to {:?}: {e}", config.endpoints),
                listed: false,
            };
        }
    };
    let listed = match client
        .get(workloads, Some(GetOptions::new().with_prefix()))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            return Followed::Failed {
                why: format!("listing {workloads}: {e}"),
                listed: false,
            };
        }
    };
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut objects = Vec::new();
    for kv in listed.kvs() {
        match workload(kv.value()) {
            Ok(w) => objects.push(Object::Workload(w)),
            Err(why) => skip(source, metrics, kv.key(), &why),
        }
    }
    metrics.objects(source, "Workload", objects.len());
    tracing::info!(workloads = objects.len(), revision, "etcd listed");
    if sink
        .send(Update::Reset {
            source: source.clone(),
            objects,
        })
        .await
        .is_err()
    {
        return Followed::SinkClosed;
    }
    metrics.update_sent(source);
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let failed = |why: String| Followed::Failed { why, listed: true };
    let mut stream = match client.watch(workloads, Some(options)).await {
        Ok(s) => s,
        Err(e) => return failed(format!("watching {workloads}: {e}")),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return failed("the watch ended".into()),
            Err(e) => return failed(format!("watching {workloads}: {e}")),
        };
        if response.compact_revision() > 0 {
            return Followed::Compacted(response.compact_revision());
        }
        if response.canceled() {
            return failed(format!(
                "the watch was canceled: {}",
                response.cancel_reason()
            ));
        }
        let mut apply = Vec::new();
        let mut delete = Vec::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = object_key(workloads, kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => match workload(kv.value()) {
                    Ok(w) => apply.push(Object::Workload(w)),
                    Err(why) => {
                        skip(source, metrics, kv.key(), &why);
                        delete.push(key);
                    }
                },
                EventType::Delete => delete.push(key),
            }
        }
        if apply.is_empty() && delete.is_empty() {
            continue;
        }
        let patch = Update::Patch {
            source: source.clone(),
            apply,
            delete,
        };
        if sink.send(patch).await.is_err() {
            return Followed::SinkClosed;
        }
        metrics.update_sent(source);
    }
}

fn skip(source: &SourceId, metrics: &Metrics, key: &[u8], why: &str) {
    let key = String::from_utf8_lossy(key);
    tracing::warn!(source = %source, %key, reason = why, "etcd record skipped");
    metrics.error(source, "invalid");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_keys_map_to_workloads() {
        let w = WorkloadRecord {
            namespace: "vm".into(),
            name: "ratings-10.0.0.1".into(),
            address: "10.0.0.1".into(),
            ports: [("http".to_string(), 9080)].into(),
            labels: [("app".to_string(), "ratings".to_string())].into(),
            locality: "eu/eu-1".into(),
            cluster_id: String::new(),
            network: "n1".into(),
            weight: 0,
            service_account: "ratings".into(),
            istio_tls: true,
            healthy: false,
            controller: "a".into(),
        }
        .workload()
        .unwrap();
        assert_eq!(w.health, Health::Unhealthy);
        assert_eq!(w.locality.zone, "eu-1");
        let again = WorkloadRecord::new(&w, false, "a").workload().unwrap();
        assert_eq!(again, w);
        assert!(workload(br#"{"namespace":"vm"}"#).is_err());
        assert!(
            workload(
                br#"{"namespace":"vm","name":"x","address":"nope","healthy":true,"controller":"a"}"#
            )
            .is_err()
        );
        assert_eq!(
            object_key("/m/workloads/", b"/m/workloads/vm/ratings-10.0.0.1"),
            Some(ObjectKey::Workload {
                namespace: "vm".into(),
                name: "ratings-10.0.0.1".into()
            })
        );
        assert_eq!(object_key("/m/workloads/", b"/m/other/vm/x"), None);
        assert_eq!(pause(0), Duration::from_millis(500));
        assert_eq!(pause(20), Duration::from_secs(30));
    }
}
