//! A protocol-faithful Consul agent HTTP API for faults on demand:
//! `GET /v1/catalog/services` and `GET /v1/health/service/<name>` with
//! `X-Consul-Index` and blocking queries (`?index=&wait=` holds the request
//! until the resource's index moves or `wait` passes), answers shaped as
//! Consul's documented samples (`adapters/tests/fixtures/consul`).
//! Faults: the next requests answer `500`, the agent stops (connections
//! refused, blocked queries cut) and restarts on the same port, and every
//! index goes backwards (a snapshot restore).
//!
//! Indexes: one raft-like counter; each service remembers the index of its
//! last write, the catalog the index of its last registration change.
//! A blocked query answers as soon as its resource's index differs from
//! the one asked for (backwards too: the real agent answers then once
//! `wait` passes).
//!
//! The real Consul agent (`peers::Consul`) is the reference; this one
//! exists for what a real one does only by chance.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::repo;

/// One instance as a test registers it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub service: &'static str,
    pub id: &'static str,
    pub node: &'static str,
    pub address: &'static str,
    pub port: u16,
    pub tags: Vec<&'static str>,
}

#[derive(Default)]
struct Inner {
    index: u64,
    catalog_index: u64,
    /// service → (index of its last write, instance id → entry).
    services: BTreeMap<String, (u64, BTreeMap<String, Value>)>,
    /// Requests left to answer with 500.
    failing: u32,
    /// Every request: (path and query, X-Consul-Token header).
    requests: Vec<(String, Option<String>)>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every write, waking blocked queries.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, f: impl FnOnce(&mut Inner)) {
        let index = {
            let mut inner = self.lock();
            inner.index += 1;
            f(&mut inner);
            inner.index
        };
        self.changed.send_replace(index);
    }
}

/// The fake agent; its server runs on a runtime of its own, so stopping
/// it drops every connection at once, as a dead agent does.
pub struct FakeConsul {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The documented health sample's one entry, as the template of every
/// instance.
fn template() -> Value {
    let text = std::fs::read_to_string(repo().join(
        "adapters/tests/fixtures/consul/hashicorp-consul/api-docs/GET_v1_health_service_my-service.json",
    ))
    .unwrap();
    let entries: Vec<Value> = serde_json::from_str(&text).unwrap();
    entries[0].clone()
}

/// `index` and `wait` (Go duration syntax: `ms`, `s`, `m`) of a query.
fn blocking(uri: &Uri) -> (u64, Duration) {
    let mut index = 0;
    let mut wait = Duration::from_secs(300);
    for pair in uri.query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("index", v)) => index = v.parse().unwrap_or(0),
            Some(("wait", v)) => {
                let (n, unit) =
                    v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
                let n: u64 = n.parse().unwrap_or(0);
                wait = match unit {
                    "ms" => Duration::from_millis(n),
                    "m" => Duration::from_secs(n * 60),
                    _ => Duration::from_secs(n),
                };
            }
            _ => {}
        }
    }
    (index, wait.min(Duration::from_secs(600)))
}

/// Answers with what `read` gives (body, index) once its index differs
/// from the one asked for, or `wait` passes.
async fn answer(
    shared: Arc<Shared>,
    uri: Uri,
    headers: HeaderMap,
    read: impl Fn(&Inner) -> (Value, u64),
) -> Response {
    let token = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    {
        let mut inner = shared.lock();
        inner.requests.push((uri.to_string(), token));
        if inner.failing > 0 {
            inner.failing -= 1;
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rpc error making call: No cluster leader",
            )
                .into_response();
        }
    }
    let (asked, wait) = blocking(&uri);
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = shared.changed.subscribe();
    loop {
        let (body, index) = read(&shared.lock());
        if asked == 0 || index != asked || tokio::time::Instant::now() >= deadline {
            return (
                [
                    ("x-consul-index", index.to_string()),
                    ("content-type", "application/json".to_string()),
                ],
                body.to_string(),
            )
                .into_response();
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn services(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    answer(shared, uri, headers, |inner| {
        let map: serde_json::Map<String, Value> = inner
            .services
            .iter()
            .map(|(name, (_, instances))| {
                let mut tags: Vec<Value> = instances
                    .values()
                    .flat_map(|e| e["Service"]["Tags"].as_array().cloned().unwrap_or_default())
                    .collect();
                tags.sort_by_key(|t| t.to_string());
                tags.dedup();
                (name.clone(), Value::Array(tags))
            })
            .collect();
        (Value::Object(map), inner.catalog_index)
    })
    .await
}

async fn health(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    answer(shared, uri, headers, move |inner| {
        match inner.services.get(&name) {
            Some((index, instances)) => {
                (Value::Array(instances.values().cloned().collect()), *index)
            }
            // Consul answers an unknown service with an empty list at the
            // catalog's index.
            None => (json!([]), inner.catalog_index.max(1)),
        }
    })
    .await
}

impl FakeConsul {
    /// Starts the agent on a free loopback port.
    pub async fn start() -> FakeConsul {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                index: 10,
                catalog_index: 10,
                ..Inner::default()
            }),
            changed,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = Some(serve(&shared, addr, Some(listener)));
        FakeConsul {
            shared,
            addr,
            runtime,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers (or replaces) an instance with one passing service check.
    pub fn register(&self, i: &Instance) {
        let mut entry = template();
        entry["Node"]["Node"] = json!(i.node);
        entry["Node"]["Address"] = json!(i.address);
        entry["Node"]["Meta"] = json!({"zone": "zone-a"});
        entry["Service"]["ID"] = json!(i.id);
        entry["Service"]["Service"] = json!(i.service);
        entry["Service"]["Address"] = json!(i.address);
        entry["Service"]["Port"] = json!(i.port);
        entry["Service"]["Tags"] = json!(i.tags);
        entry["Service"]["Meta"] = json!({});
        entry["Service"]["Weights"] = json!({"Passing": 1, "Warning": 1});
        entry["Checks"] = json!([
            {"Node": i.node, "CheckID": format!("service:{}", i.id), "Name": "check",
             "Status": "passing", "ServiceID": i.id, "ServiceName": i.service},
            {"Node": i.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
             "Status": "passing", "ServiceID": "", "ServiceName": ""},
        ]);
        self.shared.write(|inner| {
            let index = inner.index;
            let (at, instances) = inner.services.entry(i.service.to_string()).or_default();
            *at = index;
            instances.insert(i.id.to_string(), entry);
            inner.catalog_index = index;
        });
    }

    /// Sets the service check of instance `id` of `service` to `status`
    /// (`passing`, `warning`, `critical`).
    pub fn set_check(&self, service: &str, id: &str, status: &str) {
        self.shared.write(|inner| {
            let index = inner.index;
            let (at, instances) = inner.services.get_mut(service).expect("registered");
            *at = index;
            instances.get_mut(id).expect("registered")["Checks"][0]["Status"] = json!(status);
        });
    }

    /// Deregisters instance `id` of `service` (the service goes with its
    /// last instance).
    pub fn deregister(&self, service: &str, id: &str) {
        self.shared.write(|inner| {
            let index = inner.index;
            if let Some((at, instances)) = inner.services.get_mut(service) {
                *at = index;
                instances.remove(id);
                if instances.is_empty() {
                    inner.services.remove(service);
                }
            }
            inner.catalog_index = index;
        });
    }

    /// The next `n` requests answer `500`.
    pub fn fail(&self, n: u32) {
        self.shared.lock().failing = n;
    }

    /// Requests still to answer `500`.
    pub fn failing(&self) -> u32 {
        self.shared.lock().failing
    }

    /// Every index goes back to a low value (a snapshot restore), waking
    /// blocked queries.
    pub fn rewind_indexes(&self) {
        let index = {
            let mut inner = self.shared.lock();
            inner.index = 2;
            inner.catalog_index = 2;
            for (at, _) in inner.services.values_mut() {
                *at = 2;
            }
            inner.index
        };
        self.shared.changed.send_replace(index);
    }

    /// Stops answering: connections are cut and new ones refused.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Answers again on the same port, with the state it had.
    pub fn restart(&mut self) {
        self.runtime = Some(serve(&self.shared, self.addr, None));
    }

    /// Every request so far: (path and query, token header).
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.shared.lock().requests.clone()
    }
}

/// Serves the API from a runtime of its own, on `listener` or else on a
/// new listener at `addr` (bound with `SO_REUSEADDR`, retried while the
/// old one is being closed).
fn serve(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    listener: Option<std::net::TcpListener>,
) -> tokio::runtime::Runtime {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route("/v1/catalog/services", axum::routing::get(services))
        .route("/v1/health/service/{name}", axum::routing::get(health))
        .with_state(shared.clone());
    runtime.spawn(async move {
        let listener = match listener {
            Some(l) => {
                l.set_nonblocking(true).unwrap();
                tokio::net::TcpListener::from_std(l).unwrap()
            }
            None => {
                let mut tries = 0;
                loop {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.set_reuseaddr(true).unwrap();
                    match socket.bind(addr).and_then(|()| socket.listen(128)) {
                        Ok(l) => break l,
                        Err(e) if tries < 100 => {
                            tries += 1;
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("rebind {addr}: {e}"),
                    }
                }
            }
        };
        let _ = axum::serve(listener, app).await;
    });
    runtime
}
