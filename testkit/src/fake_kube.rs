//! A protocol-faithful Kubernetes API server for faults on demand: list
//! (with `resourceVersion` in the list's metadata, in pages with `limit`
//! and `continue`, a stale continue token answering `410 Gone`), `PUT` of
//! one object, and watch (ADDED, MODIFIED, DELETED, and BOOKMARK on demand
//! for watches that allow them) (a stream of
//! newline-delimited `ADDED`/`MODIFIED`/`DELETED` events from a given
//! resourceVersion) for Services, EndpointSlices, Pods, Nodes and
//! Namespaces, over plain HTTP. Istio's groups answer `404 page not found`,
//! as an API server without Istio's CRDs does. Faults: every open watch
//! dropped and older resourceVersions expired (the next watch gets the
//! `410 Gone` ERROR event, and the client must relist), every open watch
//! dropped with resourceVersions kept, and lists or watches answering `500`
//! a given number of times.
//!
//! The real kube-apiserver (the e2e tests' `peers::KubeApiserver`) is the reference; this
//! one exists for what a real one does only by chance.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The collections served: (path, list kind).
const COLLECTIONS: &[(&str, &str)] = &[
    ("/api/v1/services", "ServiceList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
    ),
    ("/api/v1/pods", "PodList"),
    ("/api/v1/nodes", "NodeList"),
    ("/api/v1/namespaces", "NamespaceList"),
];

#[derive(Default)]
struct Inner {
    rv: u64,
    /// path → (namespace, name) → object.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every event: (path, resourceVersion, event).
    history: Vec<(&'static str, u64, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    expired_before: u64,
    /// Lists left to fail with 500.
    failing_lists: u32,
    /// Watches left to fail with 500.
    failing_watches: u32,
    /// Requests served, per path (lists and watches).
    lists: u32,
    /// Lists served in pages: continue token → (the items still to send,
    /// the list's resourceVersion). At most [`MAX_PAGED_LISTS`]; the
    /// oldest goes first, and its token then answers `410 Gone`.
    pages: BTreeMap<u64, (Vec<Value>, u64)>,
    next_token: u64,
    /// Watch requests served (whatever the answer).
    watches: u32,
    /// Watches answered `410 Gone`.
    gone: u32,
    /// BOOKMARK events written to watches.
    bookmarks: u32,
}

/// The path of the broadcast message that asks every watch for a BOOKMARK.
const BOOKMARK: &str = "";

/// Paged lists kept at once (a real API server expires continue tokens
/// after about five minutes).
const MAX_PAGED_LISTS: usize = 64;

impl Inner {
    /// Stores `object` in the collection at `path` with the next
    /// resourceVersion; returns it and the watch event.
    fn store(&mut self, path: &'static str, mut object: Value) -> (u64, Value) {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let key = (
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let collection = self.objects.entry(path).or_default();
        let kind = if collection.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let event = json!({"type": kind, "object": object});
        self.history.push((path, rv, event.clone()));
        (rv, event)
    }

    /// Removes `namespace/name` from the collection at `path`; returns the
    /// resourceVersion and the DELETED event, if it was there.
    fn remove(&mut self, path: &'static str, namespace: &str, name: &str) -> Option<(u64, Value)> {
        let key = (namespace.to_string(), name.to_string());
        let mut object = self.objects.get_mut(path)?.remove(&key)?;
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let event = json!({"type": "DELETED", "object": object});
        self.history.push((path, rv, event.clone()));
        Some((rv, event))
    }
}

/// The fake API server, stopped when dropped.
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(&'static str, u64, Value)>,
    /// Bumped to end every open watch.
    generation: watch::Sender<u64>,
    /// A kubeconfig for it (plain HTTP, a token the fake ignores).
    pub kubeconfig: PathBuf,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self._server.abort();
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeKube {
    /// Starts it on a free loopback port, on the current Tokio runtime.
    ///
    /// # Panics
    ///
    /// When no port or temporary directory can be had (a test cannot go on
    /// then).
    pub async fn start() -> FakeKube {
        let (events, _) = broadcast::channel(1024);
        let (generation, _) = watch::channel(0);
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let app = {
            let (inner, events, generation) = (inner.clone(), events.clone(), generation.clone());
            axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
                let (inner, events, generation) =
                    (inner.clone(), events.clone(), generation.subscribe());
                async move {
                    if method == Method::PUT {
                        return replace(&uri, &body, &inner, &events);
                    }
                    serve(uri, inner, events, generation)
                }
            })
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
                 users: [{{name: u, user: {{token: fake}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: u}}}}]\n\
                 current-context: fake\n"
            ),
        )
        .unwrap();
        FakeKube {
            inner,
            events,
            generation,
            kubeconfig,
            addr,
            _dir: dir,
            _server: server,
        }
    }

    /// Adds or replaces `object` (JSON with metadata.name, and namespace
    /// for namespaced kinds) in the collection at `path`.
    pub fn apply(&self, path: &'static str, object: Value) {
        let (rv, event) = self.store(path, object);
        let _ = self.events.send((path, rv, event));
    }

    /// [`FakeKube::apply`] without telling open watches: the change is seen
    /// only by a list (what a compacted history looks like to a client).
    pub fn apply_unseen(&self, path: &'static str, object: Value) {
        self.store(path, object);
    }

    fn store(&self, path: &'static str, object: Value) -> (u64, Value) {
        lock(&self.inner).store(path, object)
    }

    /// The API server's address (`http://…` in the kubeconfig).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends every open watch and expires every resourceVersion so far: the
    /// clients' next watches get `410 Gone` and must list again.
    pub fn expire_watches(&self) {
        let mut inner = lock(&self.inner);
        inner.expired_before = inner.rv + 1;
        drop(inner);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Deletes `namespace/name` (empty namespace for cluster-scoped kinds)
    /// from the collection at `path`; watches get a DELETED event.
    pub fn delete(&self, path: &'static str, namespace: &str, name: &str) {
        let removed = lock(&self.inner).remove(path, namespace, name);
        if let Some((rv, event)) = removed {
            let _ = self.events.send((path, rv, event));
        }
    }

    /// Sends every open watch that asked for bookmarks
    /// (`allowWatchBookmarks=true`) a BOOKMARK event at the current
    /// resourceVersion, as an API server does periodically.
    pub fn bookmark(&self) {
        let rv = lock(&self.inner).rv;
        let _ = self.events.send((BOOKMARK, rv, Value::Null));
    }

    /// Expires every resourceVersion before the current one: a watch from
    /// an older one gets `410 Gone` (a compacted history); open watches
    /// stay open.
    pub fn compact(&self) {
        let mut inner = lock(&self.inner);
        inner.expired_before = inner.rv;
    }

    /// (watch requests served, of them answered `410 Gone`, BOOKMARK
    /// events written).
    pub fn watch_counts(&self) -> (u32, u32, u32) {
        let inner = lock(&self.inner);
        (inner.watches, inner.gone, inner.bookmarks)
    }

    /// Ends every open watch; resourceVersions stay valid, so the clients
    /// can watch again from where they were (what a restarted API server
    /// with its history intact looks like).
    pub fn drop_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The next `n` watches answer `500`.
    pub fn fail_watches(&self, n: u32) {
        lock(&self.inner).failing_watches = n;
    }

    /// The next `n` lists answer `500`.
    pub fn fail_lists(&self, n: u32) {
        lock(&self.inner).failing_lists = n;
    }

    /// Lists answered so far (successful or not).
    pub fn lists(&self) -> u32 {
        lock(&self.inner).lists
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `PUT` of one object (`/api/v1/namespaces/<ns>/<resource>/<name>`, or
/// `/apis/<group>/<version>/namespaces/…`): replaces it, or creates it (as
/// a real API server does not; the fake is lenient there), and tells the
/// watches. Answers the object with its new resourceVersion.
fn replace(
    uri: &Uri,
    body: &[u8],
    inner: &Mutex<Inner>,
    events: &broadcast::Sender<(&'static str, u64, Value)>,
) -> Response {
    let parts: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("/api/v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return (StatusCode::NOT_FOUND, "404 page not found").into_response(),
    };
    let resource = match rest {
        ["namespaces", _, resource, _] | [resource, _] => *resource,
        _ => return (StatusCode::NOT_FOUND, "404 page not found").into_response(),
    };
    let wanted = format!("{prefix}/{resource}");
    let Some(&(path, _)) = COLLECTIONS.iter().find(|(p, _)| *p == wanted) else {
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    };
    let Ok(object) = serde_json::from_slice::<Value>(body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "the body is not a JSON object"),
        );
    };
    let (rv, event) = lock(inner).store(path, object);
    let stored = event["object"].clone();
    let _ = events.send((path, rv, event));
    json_response(StatusCode::OK, &stored)
}

fn serve(
    uri: Uri,
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(&'static str, u64, Value)>,
    mut generation: watch::Receiver<u64>,
) -> Response {
    let Some(&(path, list_kind)) = COLLECTIONS.iter().find(|(p, _)| *p == uri.path()) else {
        // What an API server without the group or resource answers.
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    };
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if query.get("watch").map(String::as_str) != Some("true") {
        let mut guard = lock(&inner);
        guard.lists += 1;
        if guard.failing_lists > 0 {
            guard.failing_lists -= 1;
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError", "injected failure"),
            );
        }
        // A page of a paged list continues from what was left of it (the
        // items as they were at its first page, as etcd serves them).
        let (mut items, rv) = match query.get("continue").filter(|t| !t.is_empty()) {
            Some(token) => match token.parse().ok().and_then(|t| guard.pages.remove(&t)) {
                Some(rest) => rest,
                None => {
                    return json_response(
                        StatusCode::GONE,
                        &status(410, "Expired", "the continue token is no longer valid"),
                    );
                }
            },
            None => (
                guard
                    .objects
                    .get(path)
                    .map(|c| c.values().cloned().collect())
                    .unwrap_or_default(),
                guard.rv,
            ),
        };
        let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if limit > 0 && items.len() > limit {
            let rest = items.split_off(limit);
            guard.next_token += 1;
            let token = guard.next_token;
            guard.pages.insert(token, (rest, rv));
            while guard.pages.len() > MAX_PAGED_LISTS {
                guard.pages.pop_first();
            }
            metadata["continue"] = token.to_string().into();
        }
        let list = json!({"kind": list_kind, "apiVersion": "v1",
                          "metadata": metadata, "items": items});
        return json_response(StatusCode::OK, &list);
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut guard = lock(&inner);
    guard.watches += 1;
    if guard.failing_watches > 0 {
        guard.failing_watches -= 1;
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "injected failure"),
        );
    }
    if from < guard.expired_before {
        guard.gone += 1;
        // The API server's answer to an expired resourceVersion: one ERROR
        // event carrying a 410 Status, then the end of the stream.
        let line = json!({"type": "ERROR",
                          "object": status(410, "Expired", "too old resource version")});
        return (StatusCode::OK, format!("{line}\n")).into_response();
    }
    // Subscribe before replaying, so nothing falls between the two.
    let mut live = events.subscribe();
    let replay: Vec<Value> = guard
        .history
        .iter()
        .filter(|(p, rv, _)| *p == path && *rv > from)
        .map(|(_, _, e)| e.clone())
        .collect();
    let mut last = guard.rv;
    drop(guard);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    // A BOOKMARK carries only the kind and a resourceVersion.
    let api_version = path
        .strip_prefix("/apis/")
        .and_then(|p| p.rsplit_once('/'))
        .map_or("v1".to_string(), |(gv, _)| gv.to_string());
    let kind = list_kind.trim_end_matches("List").to_string();
    generation.borrow_and_update();
    let stream = async_stream(
        move |tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>| async move {
            for e in replay {
                if tx.send(Ok(Bytes::from(format!("{e}\n")))).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = generation.changed() => return,
                    event = live.recv() => match event {
                        Ok((BOOKMARK, rv, _)) if bookmarks => {
                            let e = json!({"type": "BOOKMARK",
                                           "object": {"kind": kind, "apiVersion": api_version,
                                                      "metadata": {"resourceVersion": rv.to_string()}}});
                            if tx.send(Ok(Bytes::from(format!("{e}\n")))).await.is_err() {
                                return;
                            }
                            lock(&inner).bookmarks += 1;
                        }
                        Ok((p, rv, e)) if p == path && rv > last => {
                            last = rv;
                            if tx.send(Ok(Bytes::from(format!("{e}\n")))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(stream)
        .unwrap()
}

/// A streaming body fed by `produce` through a channel.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// One HTTP/1.1 request; the status and the body.
    async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn lists_are_paged_from_one_snapshot_and_put_replaces() {
        let kube = FakeKube::start().await;
        for n in ["a", "b", "c"] {
            kube.apply(
                "/api/v1/namespaces",
                json!({"metadata": {"name": n}, "kind": "Namespace"}),
            );
        }
        let (status, first) = request(kube.addr(), "GET", "/api/v1/namespaces?limit=2", "").await;
        assert_eq!(status, 200);
        assert_eq!(names(&first), ["a", "b"]);
        let token = first["metadata"]["continue"].as_str().unwrap().to_string();
        // A change between pages is not in the rest of this list.
        let (status, stored) = request(
            kube.addr(),
            "PUT",
            "/api/v1/namespaces/d",
            r#"{"metadata": {"name": "d"}, "kind": "Namespace"}"#,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(stored["metadata"]["resourceVersion"], "4");
        let (_, rest) = request(
            kube.addr(),
            "GET",
            &format!("/api/v1/namespaces?limit=2&continue={token}"),
            "",
        )
        .await;
        assert_eq!(names(&rest), ["c"]);
        assert!(rest["metadata"].get("continue").is_none());
        assert_eq!(
            rest["metadata"]["resourceVersion"],
            first["metadata"]["resourceVersion"]
        );
        // A token used up (or too old) is 410 Gone.
        let (status, _) = request(
            kube.addr(),
            "GET",
            &format!("/api/v1/namespaces?limit=2&continue={token}"),
            "",
        )
        .await;
        assert_eq!(status, 410);
        let (_, all) = request(kube.addr(), "GET", "/api/v1/namespaces", "").await;
        assert_eq!(names(&all), ["a", "b", "c", "d"]);
    }
}
