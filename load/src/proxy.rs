//! One simulated proxy: an ADS stream that behaves like Envoy. Wildcard CDS,
//! then EDS for every EDS cluster received; every response ACKed with its
//! nonce; on reconnect in delta mode, `initial_resource_versions` for what
//! it holds. It records what it holds, bytes and responses received, and
//! when each stamped change arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;

use crate::clock::now_ns;
use crate::wire::{self, LiteCodec};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LEDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.LbEndpoint";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// Which ADS flavour a proxy speaks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Incremental xDS (`DeltaAggregatedResources`).
    Delta,
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
}

/// Whether the fleet should be connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connect, and reconnect after errors.
    Connected,
    /// Drop the stream and stay away.
    Disconnected,
}

/// A stamp: probe `probe` reached sequence `seq` at `at_ns`.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The probe (a tracked assignment).
    pub probe: u32,
    /// The sequence number the change carried.
    pub seq: u32,
    /// When it arrived ([`crate::clock::now_ns`]).
    pub at_ns: u64,
}

/// What one proxy holds and has seen; shared with the fleet for reports.
#[derive(Debug, Default)]
pub struct View {
    /// name → version, per type (0 = clusters, 1 = assignments); both
    /// interned, since every proxy holds the same ones.
    pub held: [HashMap<Arc<str>, Arc<str>>; 2],
    /// XOR of `digest_term` over `held`, per type.
    pub digest: [u64; 2],
    /// When `digest` last changed.
    pub digest_changed_ns: u64,
    /// Bytes received, per type.
    pub bytes: [u64; 2],
    /// Responses received, per type.
    pub responses: [u64; 2],
    /// Resources received, per type.
    pub resources: [u64; 2],
    /// Arrivals of tracked changes, in order.
    pub stamps: Vec<Stamp>,
    /// Highest sequence seen per probe.
    pub last_seq: HashMap<u32, u32>,
    /// Times a probe went backwards.
    pub out_of_order: u64,
    /// The stream is up.
    pub connected: bool,
    /// Streams that failed.
    pub errors: u64,
    /// NACKs this proxy sent.
    pub nacks: u64,
    /// LEDS: the collections subscribed to, and the members held (name →
    /// version). Bytes, responses and resources of LEDS count as EDS.
    pub collections: std::collections::HashSet<String>,
    /// See `collections`.
    pub members: HashMap<Arc<str>, Arc<str>>,
}

impl View {
    fn upsert(&mut self, t: usize, name: &str, version: &str, strings: &Interner) {
        let (name, version) = (strings.get(name), strings.get(version));
        if let Some(old) = self.held[t].insert(name.clone(), version.clone()) {
            self.digest[t] ^= wire::digest_term(&name, &old);
        }
        self.digest[t] ^= wire::digest_term(&name, &version);
        self.digest_changed_ns = now_ns();
    }

    fn remove(&mut self, t: usize, name: &str) {
        if let Some(old) = self.held[t].remove(name) {
            self.digest[t] ^= wire::digest_term(name, &old);
            self.digest_changed_ns = now_ns();
        }
    }

    fn stamp(&mut self, probe: u32, seq: u32, at_ns: u64) {
        let last = self.last_seq.entry(probe).or_default();
        if seq < *last {
            self.out_of_order += 1;
        } else if seq > *last {
            *last = seq;
            self.stamps.push(Stamp { probe, seq, at_ns });
        }
    }
}

/// One shared allocation per distinct string (resource names and
/// versions), so a fleet of thousands of proxies holding the same resources
/// fits in memory.
#[derive(Debug, Default)]
pub struct Interner(Mutex<std::collections::HashSet<Arc<str>>>);

impl Interner {
    /// The shared allocation of `s`.
    pub fn get(&self, s: &str) -> Arc<str> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match set.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(s);
                set.insert(a.clone());
                a
            }
        }
    }
}

/// Settings shared by every proxy of a fleet.
#[derive(Debug)]
pub struct Shared {
    /// Shared names and versions.
    pub strings: Interner,
    /// The ADS server.
    pub xds: SocketAddr,
    /// Delta or SotW.
    pub mode: Mode,
    /// Assignment names whose weight stamps are tracked, with their probe id.
    pub probes: RwLock<HashMap<String, u32>>,
    /// Proxy 0 rejects (NACKs, and does not apply) every response that
    /// carries a cluster or assignment of this name, as an Envoy does with
    /// a resource it finds invalid.
    pub reject: RwLock<Option<String>>,
    /// With N > 0, proxy `id` is a sidecar of namespace `ns-<id % N>`
    /// (Istio's node id, from which the server reads the namespace);
    /// with 0, every proxy is of namespace `load`.
    pub namespaces: usize,
    /// Say `user_agent_name: envoy`, as Envoy does: meshreg then serves
    /// large assignments through LEDS (delta only), and the proxy
    /// subscribes to the collections they name, as Envoy does.
    pub leds: bool,
}

impl Shared {
    /// Settings for proxies of `mode` against `xds`: no probes, no
    /// rejection.
    pub fn new(xds: SocketAddr, mode: Mode) -> Self {
        Shared {
            strings: Interner::default(),
            xds,
            mode,
            probes: RwLock::new(HashMap::new()),
            reject: RwLock::new(None),
            namespaces: 0,
            leds: false,
        }
    }

    /// Whether proxy 0 rejects anything now.
    fn rejecting(&self) -> bool {
        self.reject
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether proxy `id` rejects a response naming `names`.
    fn rejects<'a>(&self, id: usize, mut names: impl Iterator<Item = &'a str>) -> bool {
        if id != 0 {
            return false;
        }
        let reject = self.reject.read().unwrap_or_else(|p| p.into_inner());
        reject.as_deref().is_some_and(|bad| names.any(|n| n == bad))
    }
}

/// The `error_detail` of a NACK.
fn rejection() -> Option<envoy_types::pb::google::rpc::Status> {
    Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "meshreg-load: resource rejected on purpose".into(),
        ..Default::default()
    })
}

/// Spawns one proxy per id in `ids` on the current runtime, all sharing
/// `shared`; they connect while the returned sender says
/// [`Phase::Connected`] and end when it is dropped. Returns each proxy's
/// view, in `ids` order.
pub fn spawn(
    shared: &Arc<Shared>,
    ids: std::ops::Range<usize>,
) -> (Vec<Arc<Mutex<View>>>, watch::Sender<Phase>) {
    let (tx, rx) = watch::channel(Phase::Connected);
    let views: Vec<Arc<Mutex<View>>> = ids
        .map(|id| {
            let view = Arc::<Mutex<View>>::default();
            tokio::spawn(run(id, shared.clone(), view.clone(), rx.clone()));
            view
        })
        .collect();
    (views, tx)
}

/// Runs proxy `id` until the fleet ends: connected while `phase` says so,
/// reconnecting after errors.
pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    view: Arc<Mutex<View>>,
    mut phase: watch::Receiver<Phase>,
) {
    let ns = match shared.namespaces {
        0 => "load".to_string(),
        n => format!("ns-{}", id % n),
    };
    let node = Node {
        id: format!("sidecar~10.0.0.1~load-{id}.{ns}~{ns}.svc.cluster.local"),
        cluster: "meshreg-load".into(),
        user_agent_name: if shared.leds { "envoy" } else { "meshreg-load" }.into(),
        ..Default::default()
    };
    loop {
        if phase.wait_for(|p| *p == Phase::Connected).await.is_err() {
            return;
        }
        let session = async {
            match shared.mode {
                Mode::Delta => delta_session(id, &shared, &node, &view).await,
                Mode::Sotw => sotw_session(id, &shared, &node, &view).await,
            }
        };
        let result = tokio::select! {
            r = session => r,
            _ = phase.wait_for(|p| *p == Phase::Disconnected) => Ok(()),
        };
        lock(&view).connected = false;
        if let Err(e) = result {
            lock(&view).errors += 1;
            tracing::debug!(id, error = %e, "stream ended; reconnecting");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn lock(view: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    view.lock().unwrap_or_else(|p| p.into_inner())
}

async fn channel(addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?,
    )
}

async fn delta_session(
    id: usize,
    shared: &Shared,
    node: &Node,
    view: &Mutex<View>,
) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel(shared.xds).await?);
    grpc.ready().await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    // Like Envoy: CDS first, with what it already holds; EDS for the
    // clusters it holds, with their versions.
    let (cds_initial, eds_initial, leds_initial, collections) = {
        let v = lock(view);
        let strings = |held: &HashMap<Arc<str>, Arc<str>>| -> HashMap<String, String> {
            held.iter()
                .map(|(n, ver)| (n.to_string(), ver.to_string()))
                .collect()
        };
        let collections: Vec<String> = v.collections.iter().cloned().collect();
        (
            strings(&v.held[0]),
            strings(&v.held[1]),
            strings(&v.members),
            collections,
        )
    };
    tx.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: CDS.into(),
        initial_resource_versions: cds_initial,
        ..Default::default()
    })
    .await?;
    if !eds_initial.is_empty() {
        tx.send(DeltaDiscoveryRequest {
            type_url: EDS.into(),
            resource_names_subscribe: eds_initial.keys().cloned().collect(),
            initial_resource_versions: eds_initial,
            ..Default::default()
        })
        .await?;
    }
    if !collections.is_empty() {
        tx.send(DeltaDiscoveryRequest {
            type_url: LEDS.into(),
            resource_names_subscribe: collections,
            initial_resource_versions: leds_initial,
            ..Default::default()
        })
        .await?;
    }
    let codec = LiteCodec::<DeltaDiscoveryRequest, wire::DeltaResponse>::default();
    let mut stream = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(DELTA_PATH),
            codec,
        )
        .await?
        .into_inner();
    lock(view).connected = true;
    while let Some((len, resp)) = stream.message().await? {
        let at_ns = now_ns();
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut collections = Vec::new();
        let leds = resp.type_url == LEDS;
        let t = usize::from(resp.type_url == EDS || leds);
        if shared.rejects(id, resp.resources.iter().map(|r| r.name.as_str())) {
            {
                let mut v = lock(view);
                v.bytes[t] += len as u64;
                v.responses[t] += 1;
                v.nacks += 1;
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: rejection(),
                ..Default::default()
            })
            .await?;
            continue;
        }
        {
            let probes = shared.probes.read().unwrap_or_else(|p| p.into_inner());
            let mut v = lock(view);
            v.bytes[t] += len as u64;
            v.responses[t] += 1;
            v.resources[t] += resp.resources.len() as u64;
            for r in &resp.resources {
                let value = r
                    .resource
                    .as_ref()
                    .map(|a| a.value.clone())
                    .unwrap_or_default();
                if leds {
                    // A member of a collection: its cluster is in its name.
                    if let Some(&probe) = member_cluster(&r.name).and_then(|c| probes.get(c))
                        && let Some(w) = wire::LbEndpoint::decode(value)?.load_balancing_weight
                    {
                        v.stamp(probe, w.value, at_ns);
                    }
                    let (name, version) =
                        (shared.strings.get(&r.name), shared.strings.get(&r.version));
                    v.members.insert(name, version);
                    continue;
                }
                if t == 0 {
                    let c = wire::Cluster::decode(value)?;
                    if let Some(eds) = c.eds_name()
                        && !v.held[1].contains_key(eds)
                    {
                        subscribe.push(eds.to_string());
                    }
                } else {
                    let cla = wire::ClusterLoadAssignment::decode(value)?;
                    if let Some(&probe) = probes.get(&r.name) {
                        v.stamp(probe, cla.stamp(), at_ns);
                    }
                    for c in cla.collections() {
                        if !v.collections.contains(c) {
                            v.collections.insert(c.to_string());
                            collections.push(c.to_string());
                        }
                    }
                }
                v.upsert(t, &r.name, &r.version, &shared.strings);
            }
            if leds {
                for name in &resp.removed_resources {
                    v.members.remove(name.as_str());
                }
            }
            for name in resp.removed_resources.iter().filter(|_| !leds) {
                v.remove(t, name);
                if t == 0 && v.held[1].contains_key(name.as_str()) {
                    unsubscribe.push(name.clone());
                    v.remove(1, name);
                }
            }
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            tx.send(DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            })
            .await?;
        }
        if !collections.is_empty() {
            // Like Envoy: a new collection named by an assignment is
            // subscribed to. (Collections an assignment stops naming stay
            // subscribed: the simulation does not unsubscribe them.)
            tx.send(DeltaDiscoveryRequest {
                type_url: LEDS.into(),
                resource_names_subscribe: collections,
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}

/// The cluster of a LEDS member `xdstp://meshreg/<type>/<cluster>/<locality>/<id>`.
fn member_cluster(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(meshreg_xds::leds::PREFIX)?;
    let mut parts = rest.rsplitn(3, '/');
    parts.next()?;
    parts.next()?;
    parts.next()
}

async fn sotw_session(
    id: usize,
    shared: &Shared,
    node: &Node,
    view: &Mutex<View>,
) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel(shared.xds).await?);
    grpc.ready().await?;
    let (tx, rx) = mpsc::channel::<wire::SotwRequest>(64);
    // A SotW stream starts from nothing: the server does not know what the
    // proxy holds, so everything is sent again.
    {
        let mut v = lock(view);
        v.held = Default::default();
        v.digest = [0, 0];
    }
    tx.send(wire::SotwRequest {
        head: DiscoveryRequest {
            node: Some(node.clone()),
            type_url: CDS.into(),
            ..Default::default()
        },
        names: Default::default(),
    })
    .await?;
    let codec = LiteCodec::<wire::SotwRequest, wire::SotwResponse>::default();
    let mut stream = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(SOTW_PATH),
            codec,
        )
        .await?
        .into_inner();
    lock(view).connected = true;
    let mut eds_names: Vec<String> = Vec::new();
    let mut eds_names_encoded = bytes::Bytes::new();
    let mut eds_acked = (String::new(), String::new());
    let mut cds_accepted = String::new();
    while let Some((len, resp)) = stream.message().await? {
        let at_ns = now_ns();
        let t = usize::from(resp.type_url == EDS);
        if id == 0 && shared.rejecting() {
            let mut names = Vec::with_capacity(resp.resources.len());
            for a in &resp.resources {
                names.push(if t == 0 {
                    wire::Cluster::decode(a.value.clone())?.name
                } else {
                    wire::ClusterLoadAssignment::decode(a.value.clone())?.cluster_name
                });
            }
            if shared.rejects(id, names.iter().map(String::as_str)) {
                {
                    let mut v = lock(view);
                    v.bytes[t] += len as u64;
                    v.responses[t] += 1;
                    v.nacks += 1;
                }
                // A NACK carries the last accepted version and the names
                // the proxy still wants.
                let (version_info, names) = if t == 0 {
                    (cds_accepted.clone(), bytes::Bytes::new())
                } else {
                    (eds_acked.0.clone(), eds_names_encoded.clone())
                };
                tx.send(wire::SotwRequest {
                    head: DiscoveryRequest {
                        type_url: resp.type_url,
                        version_info,
                        response_nonce: resp.nonce,
                        error_detail: rejection(),
                        ..Default::default()
                    },
                    names,
                })
                .await?;
                continue;
            }
        }
        if t == 0 {
            cds_accepted = resp.version_info.clone();
        }
        let mut new_eds_names = None;
        {
            let probes = shared.probes.read().unwrap_or_else(|p| p.into_inner());
            let mut v = lock(view);
            v.bytes[t] += len as u64;
            v.responses[t] += 1;
            v.resources[t] += resp.resources.len() as u64;
            if t == 0 {
                // Full state: what is not here is gone.
                let mut names = Vec::with_capacity(resp.resources.len());
                let mut present = std::collections::HashSet::with_capacity(resp.resources.len());
                for a in &resp.resources {
                    let c = wire::Cluster::decode(a.value.clone())?;
                    if let Some(eds) = c.eds_name() {
                        names.push(eds.to_string());
                    }
                    // SotW carries no per-resource version: the proxy's
                    // digest uses the resource's content hash, as the server does.
                    let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&a.value));
                    v.upsert(0, &c.name, &version, &shared.strings);
                    present.insert(c.name);
                }
                let gone: Vec<String> = v.held[0]
                    .keys()
                    .filter(|k| !present.contains(&***k))
                    .map(|k| k.to_string())
                    .collect();
                for name in gone {
                    v.remove(0, &name);
                    v.remove(1, &name);
                }
                names.sort();
                if names != eds_names {
                    new_eds_names = Some(names);
                }
            } else {
                for a in &resp.resources {
                    let cla = wire::ClusterLoadAssignment::decode(a.value.clone())?;
                    if let Some(&probe) = probes.get(&cla.cluster_name) {
                        v.stamp(probe, cla.stamp(), at_ns);
                    }
                    let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&a.value));
                    v.upsert(1, &cla.cluster_name, &version, &shared.strings);
                }
            }
        }
        let names = if t == 0 {
            bytes::Bytes::new()
        } else {
            eds_names_encoded.clone()
        };
        if t == 1 {
            eds_acked = (resp.version_info.clone(), resp.nonce.clone());
        }
        tx.send(wire::SotwRequest {
            head: DiscoveryRequest {
                type_url: resp.type_url,
                version_info: resp.version_info,
                response_nonce: resp.nonce,
                ..Default::default()
            },
            names,
        })
        .await?;
        if let Some(names) = new_eds_names {
            eds_names = names;
            eds_names_encoded = wire::encode_names(&eds_names);
            tx.send(wire::SotwRequest {
                head: DiscoveryRequest {
                    type_url: EDS.into(),
                    version_info: eds_acked.0.clone(),
                    response_nonce: eds_acked.1.clone(),
                    ..Default::default()
                },
                names: eds_names_encoded.clone(),
            })
            .await?;
        }
    }
    Ok(())
}
