//! The etcd store of what only meshreg knows: the VM workloads registered
//! through it (auto-registration), shared by every replica on one etcd, so
//! any replica serves what a VM registered through another (`etcd-client`).
//!
//! # Layout
//!
//! `<prefix>/workloads/<cluster>/<namespace>/<name>` → a JSON
//! [`WorkloadRecord`] (the cluster is [`Config::cluster`]: replicas of one
//! cluster share registrations, clusters federating through the same etcd
//! do not),
//! attached to the lease of the replica that wrote it (TTL
//! [`Config::lease_ttl`], kept alive every third of it): a replica that dies
//! takes its registrations with it once its lease expires, and a VM that
//! reconnects to another replica is written again there.
//!
//! - [`Writer`] is one replica's side: it puts and deletes records under its
//!   own lease, and says when the lease was lost (everything must be put
//!   again). A record is deleted only by the replica that wrote it last
//!   (its `controller`), as istiod only cleans up entries it controls.
//! - `<prefix>/exports/<cluster>/<hostname>/<replica>` → a JSON
//!   [`ExportRecord`] (federation): a service one cluster exports, with its
//!   ports and its local endpoints, written by each replica of that cluster
//!   on its own lease; [`run_imports`] serves the other clusters' exports
//!   as services and endpoint shards carrying the exporter's cluster id and
//!   network (one shard per exporting cluster, from its newest record).
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
    shared_locality, shared_str,
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
    /// The cluster whose VM registrations this replica shares (its
    /// federation cluster id, or `default`).
    pub cluster: String,
}

impl Config {
    fn workloads(&self) -> String {
        format!("{}/workloads/{}/", self.prefix, self.cluster)
    }

    fn key(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.workloads())
    }

    fn exports(&self) -> String {
        format!("{}/exports/", self.prefix)
    }
}

/// A service one cluster exports to the others (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The exporting cluster's id.
    pub cluster_id: String,
    /// The exporting cluster's network.
    #[serde(default)]
    pub network: String,
    /// The service's hostname.
    pub hostname: String,
    /// Its namespace.
    pub namespace: String,
    /// Its ports.
    pub ports: Vec<ExportPort>,
    /// Its endpoints in the exporting cluster.
    #[serde(default)]
    pub endpoints: Vec<ExportEndpoint>,
}

/// A port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPort {
    /// Its name.
    pub name: String,
    /// Its number.
    pub number: u16,
    /// Istio's protocol name (`HTTP`, `GRPC`, `TCP` …).
    pub protocol: String,
}

/// An endpoint of an exported service, and the endpoint fields of a
/// [`WorkloadRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEndpoint {
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
    /// Its network (empty: the exporting cluster's).
    #[serde(default)]
    pub network: String,
    /// Load-balancing weight (0: unset).
    #[serde(default)]
    pub weight: u32,
    /// Whether it is healthy.
    pub healthy: bool,
    /// Its service account.
    #[serde(default)]
    pub service_account: String,
    /// Whether it accepts Istio mTLS.
    #[serde(default)]
    pub istio_tls: bool,
}

impl ExportRecord {
    /// The registry objects an importer makes of it: the service's
    /// declaration (`origin` `federation/<cluster>`) and one endpoint shard
    /// named after the cluster, from `source`.
    ///
    /// # Errors
    ///
    /// When a name or address does not parse.
    pub fn objects(&self, source: &SourceId) -> Result<Vec<Object>, String> {
        if self.hostname.is_empty() || self.cluster_id.is_empty() {
            return Err("an export needs a hostname and a cluster id".into());
        }
        let service = meshreg_registry::Service {
            hostname: self.hostname.as_str().into(),
            namespace: self.namespace.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| meshreg_registry::Port {
                    name: p.name.clone(),
                    number: p.number,
                    protocol: meshreg_registry::Protocol::parse(&p.protocol),
                    target_port: None,
                })
                .collect(),
            resolution: meshreg_registry::Resolution::Static,
            location: meshreg_registry::Location::MeshInternal,
            labels: BTreeMap::new(),
            export_to: Vec::new(),
            addresses: BTreeMap::new(),
            workload_selector: None,
            source: source.clone(),
        };
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        let (cluster_id, network) = (shared_str(&self.cluster_id), shared_str(&self.network));
        for e in &self.endpoints {
            let (ip, health, tls_mode) = e.parts()?;
            let mut ep = meshreg_registry::Endpoint::new(Address::Ip(ip), source.clone());
            ep.ports = e.ports.clone();
            ep.labels = e.labels.clone();
            ep.locality = shared_locality(Locality::parse(&e.locality));
            ep.cluster_id = cluster_id.clone();
            ep.network = if e.network.is_empty() {
                network.clone()
            } else {
                shared_str(&e.network)
            };
            ep.health = health;
            ep.weight = e.weight;
            ep.service_account = shared_str(&e.service_account);
            ep.tls_mode = tls_mode;
            endpoints.push(ep);
        }
        Ok(vec![
            Object::Service {
                origin: format!("federation/{}", self.cluster_id),
                service,
            },
            Object::Endpoints(meshreg_registry::EndpointShard {
                hostname: self.hostname.as_str().into(),
                name: self.cluster_id.clone(),
                endpoints,
            }),
        ])
    }
}

/// A registered workload as stored in etcd (JSON): its identity and, in
/// the same JSON object, the endpoint fields an export's endpoints have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// Its namespace.
    pub namespace: String,
    /// Its name (`<group>-<ip>[-<network>]`).
    pub name: String,
    /// Its cluster id.
    #[serde(default)]
    pub cluster_id: String,
    /// The replica that wrote it last (only it deletes it).
    pub controller: String,
    /// When the proxy connected to that replica (ms since the Unix
    /// epoch): a replica holding an older connection does not overwrite
    /// the record (istiod's `connectedAt` check).
    #[serde(default)]
    pub connected_at: u64,
    /// Address, ports, labels, locality, network, weight, health, service
    /// account and mTLS.
    #[serde(flatten)]
    pub endpoint: ExportEndpoint,
}

impl WorkloadRecord {
    /// The record of `w` (its health as `healthy`), written by
    /// `controller`, whose connection began `connected_at` (ms since the
    /// Unix epoch).
    pub fn new(w: &Workload, healthy: bool, controller: &str, connected_at: u64) -> WorkloadRecord {
        WorkloadRecord {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            cluster_id: w.cluster_id.clone(),
            controller: controller.to_string(),
            connected_at,
            endpoint: ExportEndpoint {
                address: match &w.address {
                    Some(Address::Ip(ip)) => ip.to_string(),
                    _ => String::new(),
                },
                ports: w.ports.clone(),
                labels: w.labels.clone(),
                locality: w.locality.to_string(),
                network: w.network.clone(),
                weight: w.weight,
                healthy,
                service_account: w.service_account.clone(),
                istio_tls: w.tls_mode == TlsMode::Istio,
            },
        }
    }

    /// The registry's workload.
    ///
    /// # Errors
    ///
    /// When the address is not an IP address.
    pub fn workload(&self) -> Result<Workload, String> {
        let e = &self.endpoint;
        let (ip, health, tls_mode) = e.parts()?;
        Ok(Workload {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            address: Some(Address::Ip(ip)),
            ports: e.ports.clone(),
            labels: e.labels.clone(),
            locality: Locality::parse(&e.locality),
            cluster_id: self.cluster_id.clone(),
            network: e.network.clone(),
            health,
            weight: e.weight,
            service_account: e.service_account.clone(),
            tls_mode,
        })
    }
}

impl ExportEndpoint {
    /// Its address, health and TLS mode in the registry's terms.
    fn parts(&self) -> Result<(std::net::IpAddr, Health, TlsMode), String> {
        let ip = self
            .address
            .parse()
            .map_err(|_| format!("address {:?} is not an IP address", self.address))?;
        let health = if self.healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        let tls_mode = if self.istio_tls {
            TlsMode::Istio
        } else {
            TlsMode::Disabled
        };
        Ok((ip, health, tls_mode))
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
    /// Puts `record` under this replica's lease, unless the stored record
    /// is of a later connection (another replica took the VM over: its
    /// writes may reach etcd before this replica's older ones). Read and
    /// write are one transaction on the key's revision.
    pub async fn put(&mut self, record: &WorkloadRecord) -> Result<(), etcd_client::Error> {
        let key = self.config.key(&record.namespace, &record.name);
        let value = serde_json::to_vec(record).unwrap_or_default();
        let (client, lease) = self.ready().await?;
        let result = async {
            loop {
                let got = client.get(key.clone(), None).await?;
                let (stored, revision) = match got.kvs().first() {
                    Some(kv) => (
                        serde_json::from_slice::<WorkloadRecord>(kv.value()).ok(),
                        kv.mod_revision(),
                    ),
                    None => (None, 0),
                };
                if stored.is_some_and(|s| s.connected_at > record.connected_at) {
                    return Ok(());
                }
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                if client.txn(txn).await?.succeeded() {
                    return Ok(());
                }
                // Written meanwhile: read again.
            }
        }
        .await;
        if result.is_err() {
            self.fail();
        }
        result
    }

    /// Puts this replica's copy of `record` under its lease.
    ///
    /// # Errors
    ///
    /// As [`Writer::put`].
    pub async fn put_export(&mut self, record: &ExportRecord) -> Result<(), etcd_client::Error> {
        let key = format!(
            "{}{}/{}/{}",
            self.config.exports(),
            record.cluster_id,
            record.hostname,
            self.controller
        );
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

    /// Deletes this replica's copy of the export of `hostname` by
    /// `cluster_id`.
    ///
    /// # Errors
    ///
    /// As [`Writer::put`].
    pub async fn delete_export(
        &mut self,
        cluster_id: &str,
        hostname: &str,
    ) -> Result<(), etcd_client::Error> {
        let key = format!(
            "{}{cluster_id}/{hostname}/{}",
            self.config.exports(),
            self.controller
        );
        let (client, _) = self.ready().await?;
        let result = client.delete(key, None).await;
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

/// The workload of one stored value at `key`, or why it is skipped: its
/// namespace and name must be its key's (the key decides what a delete
/// removes), its ports real.
fn workload(value: &[u8], key: &ObjectKey) -> Result<Workload, String> {
    let record: WorkloadRecord = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let ObjectKey::Workload { namespace, name } = key else {
        return Err("not a workload key".into());
    };
    if record.namespace != *namespace || record.name != *name {
        return Err(format!(
            "the record names {}/{}, its key {namespace}/{name}",
            record.namespace, record.name
        ));
    }
    if record.endpoint.ports.values().any(|p| *p == 0) {
        return Err("a port is 0".into());
    }
    record.workload()
}

/// The pause before listing again after a failure: 0.5 s doubling to 30 s.
fn pause(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.min(6))
        .min(Duration::from_secs(30))
}

/// What the keys under a followed prefix become in the registry.
trait Decode: Send {
    /// Forgets everything: a listing follows.
    fn clear(&mut self);
    /// A key put (`Some(value)`, at `revision`) or deleted (`None`);
    /// returns what to apply and what to delete.
    ///
    /// # Errors
    ///
    /// When a put value does not parse (its key then counts as deleted).
    fn event(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        revision: i64,
    ) -> (Vec<Object>, Vec<ObjectKey>, Option<String>);
    /// Everything held now.
    fn all(&self) -> Vec<Object>;
}

/// Registered workloads.
struct Workloads {
    prefix: String,
    held: BTreeMap<ObjectKey, Workload>,
}

impl Decode for Workloads {
    fn clear(&mut self) {
        self.held.clear();
    }

    fn event(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        _revision: i64,
    ) -> (Vec<Object>, Vec<ObjectKey>, Option<String>) {
        let Some(k) = object_key(&self.prefix, key) else {
            return (Vec::new(), Vec::new(), None);
        };
        match value.map(|v| workload(v, &k)) {
            Some(Ok(w)) => {
                self.held.insert(k, w.clone());
                (vec![Object::Workload(w)], Vec::new(), None)
            }
            Some(Err(why)) => {
                self.held.remove(&k);
                (Vec::new(), vec![k], Some(why))
            }
            None => {
                self.held.remove(&k);
                (Vec::new(), vec![k], None)
            }
        }
    }

    fn all(&self) -> Vec<Object> {
        self.held.values().cloned().map(Object::Workload).collect()
    }
}

/// Other clusters' exports: per (cluster, hostname), each replica's
/// record with its revision; the newest is served.
struct Imports {
    prefix: String,
    own_cluster: String,
    source: SourceId,
    records: BTreeMap<(String, String), BTreeMap<String, (i64, ExportRecord)>>,
    /// What is served per (cluster, hostname).
    served: BTreeMap<(String, String), Vec<Object>>,
}

impl Imports {
    /// Serves the newest record of `id` again; returns what changed.
    fn refresh(&mut self, id: (String, String)) -> (Vec<Object>, Vec<ObjectKey>, Option<String>) {
        let newest = self
            .records
            .get(&id)
            .and_then(|r| r.values().max_by_key(|(rev, _)| *rev))
            .map(|(_, record)| record.objects(&self.source));
        let (now, why) = match newest {
            Some(Ok(objects)) => (objects, None),
            Some(Err(why)) => (Vec::new(), Some(why)),
            None => (Vec::new(), None),
        };
        let old = self.served.remove(&id).unwrap_or_default();
        let keys: Vec<ObjectKey> = now.iter().map(Object::key).collect();
        let delete = old
            .iter()
            .map(Object::key)
            .filter(|k| !keys.contains(k))
            .collect();
        let apply = now.iter().filter(|o| !old.contains(o)).cloned().collect();
        if !now.is_empty() {
            self.served.insert(id, now);
        }
        (apply, delete, why)
    }
}

impl Decode for Imports {
    fn clear(&mut self) {
        self.records.clear();
        self.served.clear();
    }

    fn event(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        revision: i64,
    ) -> (Vec<Object>, Vec<ObjectKey>, Option<String>) {
        let parsed = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(&self.prefix))
            .and_then(|k| {
                let (cluster, rest) = k.split_once('/')?;
                let (hostname, replica) = rest.rsplit_once('/')?;
                Some((
                    cluster.to_string(),
                    hostname.to_string(),
                    replica.to_string(),
                ))
            });
        let Some((cluster, hostname, replica)) = parsed else {
            return (Vec::new(), Vec::new(), None);
        };
        if cluster == self.own_cluster {
            return (Vec::new(), Vec::new(), None);
        }
        let id = (cluster.clone(), hostname.clone());
        let mut why = None;
        match value.map(serde_json::from_slice::<ExportRecord>) {
            Some(Ok(record)) if record.cluster_id == cluster && record.hostname == hostname => {
                self.records
                    .entry(id.clone())
                    .or_default()
                    .insert(replica, (revision, record));
            }
            Some(Ok(_)) => {
                why = Some("the record's cluster or hostname is not its key's".to_string());
                self.drop_record(&id, &replica);
            }
            Some(Err(e)) => {
                why = Some(e.to_string());
                self.drop_record(&id, &replica);
            }
            None => self.drop_record(&id, &replica),
        }
        let (apply, delete, refused) = self.refresh(id);
        (apply, delete, why.or(refused))
    }

    fn all(&self) -> Vec<Object> {
        self.served.values().flatten().cloned().collect()
    }
}

impl Imports {
    fn drop_record(&mut self, id: &(String, String), replica: &str) {
        if let Some(r) = self.records.get_mut(id) {
            r.remove(replica);
            if r.is_empty() {
                self.records.remove(id);
            }
        }
    }
}

/// Runs the `vm/etcd` source (see the module docs) until `shutdown`.
pub async fn run(
    config: Config,
    source: SourceId,
    metrics: Metrics,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let prefix = config.workloads();
    let decode = Workloads {
        prefix: prefix.clone(),
        held: BTreeMap::new(),
    };
    follow_forever(config, prefix, decode, source, metrics, sink, shutdown).await;
}

/// Runs the federation import source until `shutdown`: every other
/// cluster's exports (not `own_cluster`'s) as services and endpoint shards
/// (see the module docs).
pub async fn run_imports(
    config: Config,
    own_cluster: String,
    source: SourceId,
    metrics: Metrics,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let prefix = config.exports();
    let decode = Imports {
        prefix: prefix.clone(),
        own_cluster,
        source: source.clone(),
        records: BTreeMap::new(),
        served: BTreeMap::new(),
    };
    follow_forever(config, prefix, decode, source, metrics, sink, shutdown).await;
}

/// Follows `prefix` with `decode` until `shutdown`: lists and watches, and
/// after a failure marks the source stale and lists again after a pause.
async fn follow_forever(
    config: Config,
    prefix: String,
    mut decode: impl Decode,
    source: SourceId,
    metrics: Metrics,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut reported = false;
    // Until a first listing, the source holds readiness back, for at most
    // STARTUP_WAIT: then it counts as synced (empty) and stale, so an
    // unreachable etcd does not keep the daemon from serving everything
    // else (as istiod stops waiting for a remote cluster).
    let started = tokio::time::Instant::now();
    let mut listed_once = false;
    metrics.unsynced(&source);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            o = follow(&config, &prefix, &mut decode, &source, &metrics, &sink) => o,
        };
        let why = match outcome {
            Followed::SinkClosed => return,
            Followed::Compacted(rev) => {
                // Not a failure: the history is gone, a listing replaces it.
                tracing::info!(source = %source, compact_revision = rev, "etcd history compacted past the watch; listing again");
                continue;
            }
            Followed::Failed { why, listed } => {
                if listed {
                    // It worked for a while: a new outage.
                    failures = 0;
                    reported = false;
                    listed_once = true;
                }
                why
            }
        };
        if !listed_once && started.elapsed() >= STARTUP_WAIT {
            listed_once = true;
            tracing::warn!(source = %source, wait = ?STARTUP_WAIT, "etcd not read in time; serving without what it holds until it is");
            let empty = Update::Reset {
                source: source.clone(),
                objects: Vec::new(),
            };
            if sink.send(empty).await.is_err() {
                return;
            }
        }
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

/// How long a source that never listed holds readiness back.
const STARTUP_WAIT: Duration = Duration::from_secs(10);

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

/// Lists `prefix` (one `Reset`), then applies the watch's events from the
/// listed revision, until something ends it.
async fn follow(
    config: &Config,
    prefix: &str,
    decode: &mut impl Decode,
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
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            return Followed::Failed {
                why: format!("listing {prefix}: {e}"),
                listed: false,
            };
        }
    };
    let revision = listed.header().map_or(0, |h| h.revision());
    decode.clear();
    for kv in listed.kvs() {
        if let (_, _, Some(why)) = decode.event(kv.key(), Some(kv.value()), kv.mod_revision()) {
            skip(source, metrics, kv.key(), &why);
        }
    }
    let objects = decode.all();
    tracing::info!(source = %source, objects = objects.len(), revision, "etcd listed");
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
    let mut stream = match client.watch(prefix, Some(options)).await {
        Ok(s) => s,
        Err(e) => return failed(format!("watching {prefix}: {e}")),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return failed("the watch ended".into()),
            Err(e) => return failed(format!("watching {prefix}: {e}")),
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
            let value = match event.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            let (a, d, why) = decode.event(kv.key(), value, kv.mod_revision());
            if let Some(why) = why {
                skip(source, metrics, kv.key(), &why);
            }
            // A later event of the same object replaces an earlier one.
            let keys: Vec<ObjectKey> = a.iter().map(Object::key).chain(d.iter().cloned()).collect();
            apply.retain(|o: &Object| !keys.contains(&o.key()));
            delete.retain(|k| !keys.contains(k));
            apply.extend(a);
            delete.extend(d);
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
            cluster_id: String::new(),
            controller: "a".into(),
            connected_at: 0,
            endpoint: ExportEndpoint {
                address: "10.0.0.1".into(),
                ports: [("http".to_string(), 9080)].into(),
                labels: [("app".to_string(), "ratings".to_string())].into(),
                locality: "eu/eu-1".into(),
                network: "n1".into(),
                weight: 0,
                service_account: "ratings".into(),
                istio_tls: true,
                healthy: false,
            },
        }
        .workload()
        .unwrap();
        assert_eq!(w.health, Health::Unhealthy);
        assert_eq!(w.locality.zone, "eu-1");
        let again = WorkloadRecord::new(&w, false, "a", 1).workload().unwrap();
        assert_eq!(again, w);
        let key = |ns: &str, name: &str| ObjectKey::Workload {
            namespace: ns.into(),
            name: name.into(),
        };
        assert!(workload(br#"{"namespace":"vm"}"#, &key("vm", "x")).is_err());
        let good = br#"{"namespace":"vm","name":"x","address":"10.0.0.1","healthy":true,"controller":"a"}"#;
        assert!(workload(good, &key("vm", "x")).is_ok());
        // Another key than the record's names: refused (a delete of the
        // key would leave the record's workload behind).
        assert!(workload(good, &key("vm", "y")).is_err());
        assert!(
            workload(
                br#"{"namespace":"vm","name":"x","address":"nope","healthy":true,"controller":"a"}"#,
                &key("vm", "x")
            )
            .is_err()
        );
        assert!(
            workload(
                br#"{"namespace":"vm","name":"x","address":"10.0.0.1","ports":{"http":0},"healthy":true,"controller":"a"}"#,
                &key("vm", "x")
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
        assert_eq!(pause(2), Duration::from_secs(2));
        assert_eq!(pause(20), Duration::from_secs(30));
    }

    fn export(cluster: &str, ip: &str) -> Vec<u8> {
        serde_json::to_vec(&ExportRecord {
            cluster_id: cluster.into(),
            network: format!("net-{cluster}"),
            hostname: "r.test".into(),
            namespace: "fed".into(),
            ports: vec![ExportPort {
                name: "http".into(),
                number: 9080,
                protocol: "HTTP".into(),
            }],
            endpoints: vec![ExportEndpoint {
                address: ip.into(),
                ports: BTreeMap::new(),
                labels: BTreeMap::new(),
                locality: String::new(),
                network: String::new(),
                weight: 0,
                healthy: true,
                service_account: String::new(),
                istio_tls: false,
            }],
        })
        .unwrap()
    }

    fn endpoints(objects: &[Object]) -> Vec<(String, String, String)> {
        objects
            .iter()
            .filter_map(|o| match o {
                Object::Endpoints(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| {
                s.endpoints.iter().map(|e| {
                    (
                        format!("{:?}", e.address),
                        e.cluster_id.to_string(),
                        e.network.to_string(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn imports_skip_their_own_cluster_and_serve_the_newest_replica_record() {
        use meshreg_registry::SourceKind;
        let mut imports = Imports {
            prefix: "/m/exports/".into(),
            own_cluster: "west".into(),
            source: SourceId::new(SourceKind::Federation, "etcd"),
            records: BTreeMap::new(),
            served: BTreeMap::new(),
        };
        // Its own cluster's export: nothing.
        let (a, d, why) = imports.event(
            b"/m/exports/west/r.test/x",
            Some(&export("west", "10.0.0.9")),
            1,
        );
        assert!(a.is_empty() && d.is_empty() && why.is_none());
        // East's, from two replicas: the newest is served, with east's
        // cluster id and network.
        let (a, _, _) = imports.event(
            b"/m/exports/east/r.test/r1",
            Some(&export("east", "10.0.0.1")),
            2,
        );
        assert_eq!(a.len(), 2, "the declaration and the shard");
        let (a, d, _) = imports.event(
            b"/m/exports/east/r.test/r2",
            Some(&export("east", "10.0.0.2")),
            3,
        );
        assert!(d.is_empty());
        let got = endpoints(&a);
        assert_eq!(got.len(), 1);
        assert!(
            got[0].0.contains("10.0.0.2") && got[0].1 == "east" && got[0].2 == "net-east",
            "{got:?}"
        );
        // The newest replica's record goes: the other one is served again.
        let (a, _, _) = imports.event(b"/m/exports/east/r.test/r2", None, 4);
        assert!(endpoints(&a)[0].0.contains("10.0.0.1"));
        // A record whose content names another cluster is refused.
        let (_, _, why) = imports.event(
            b"/m/exports/east/r.test/r3",
            Some(&export("south", "10.0.0.3")),
            5,
        );
        assert!(why.is_some());
        // The last record goes: the declaration and the shard are deleted.
        let (a, d, _) = imports.event(b"/m/exports/east/r.test/r1", None, 6);
        assert!(a.is_empty());
        assert_eq!(d.len(), 2);
        assert!(imports.all().is_empty());
    }
}
