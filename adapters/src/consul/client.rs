//! The HTTP side of the Consul adapter: one blocking query of Consul's
//! HTTP API, and its failures.
//!
//! # Why not a Consul client crate
//!
//! `rs-consul` (0.15, Roblox) is the maintained Rust client. Its health
//! call returns a typed `ServiceNode` that keeps the node's name, address
//! and datacenter and the service's id, address, port and tags, and drops
//! what this adapter maps: the checks (health), `Service.Meta` (labels,
//! protocol), `Service.Weights`, `Service.Kind` and `Node.Meta` (zone).
//! Its request function is private, so the missing fields cannot be read
//! through it, and the rest of it (KV, locks, ACL) is unused here.
//! `consulrs` (0.1.0, 2021) is unmaintained. So this module is a thin
//! client over `hyper-util`'s (already in the dependency tree through
//! `kube`): two GETs with `index`/`wait`, the ACL token as the
//! `X-Consul-Token` header (never a query parameter, never logged), the
//! `X-Consul-Index` header read back, and the body size bounded.
//!
//! Only `http://` agents are supported; TLS to the agent is not yet.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// The largest answer read (a 1,000-instance health answer is ~2 MB).
const MAX_BODY: usize = 64 << 20;

/// Characters escaped in a path segment or query value.
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why one query failed. Every variant is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    /// No connection, or the connection broke.
    #[error("{url}: {error}{}", cause(error))]
    Connect {
        url: String,
        error: hyper_util::client::legacy::Error,
    },
    /// No answer within the blocking wait plus a margin.
    #[error("{url}: no answer within {0:?}", timeout)]
    Timeout { url: String, timeout: Duration },
    /// The agent answered with an error status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: http::StatusCode,
        body: String,
    },
    /// The body could not be read or was too large.
    #[error("{url}: reading the answer: {error}")]
    Body { url: String, error: String },
    /// The body is not the JSON expected.
    #[error("{url}: unexpected answer: {error}")]
    Decode {
        url: String,
        error: serde_json::Error,
    },
}

/// The causes below a client error (`client error (Connect)` alone does
/// not say "connection refused").
fn cause(e: &hyper_util::client::legacy::Error) -> String {
    let mut out = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl QueryError {
    /// The `reason` label of `meshreg_source_errors_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            QueryError::Connect { .. } => "unreachable",
            QueryError::Timeout { .. } => "timeout",
            QueryError::Status { status, .. } if status.as_u16() == 403 => "forbidden",
            QueryError::Status { status, .. } if status.as_u16() == 429 => "too_many_requests",
            QueryError::Status { .. } => "status",
            QueryError::Body { .. } => "io",
            QueryError::Decode { .. } => "parse",
        }
    }
}

/// One agent's HTTP API.
#[derive(Clone)]
pub(crate) struct Client {
    http: HyperClient<HttpConnector, Empty<Bytes>>,
    /// `http://host:port`, without a trailing slash.
    base: String,
    datacenter: String,
    /// Shared by every clone: a `403` re-reads it once for all.
    token: Arc<RwLock<Option<String>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("datacenter", &self.datacenter)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A decoded answer and its `X-Consul-Index` (0 when absent).
pub(crate) struct Answer<T> {
    pub(crate) body: T,
    pub(crate) index: u64,
}

impl Client {
    /// A client of the agent at `base` (`http://host:port`), asking for
    /// `datacenter` (empty: the agent's own), sending `token`.
    pub(crate) fn new(base: &str, datacenter: &str, token: Option<String>) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        // The timer is what makes idle connections close: without it the
        // pool never evicts them, and an agent's per-client connection
        // limit fills with connections nobody uses.
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            datacenter: datacenter.to_string(),
            token: Arc::new(RwLock::new(token)),
        }
    }

    /// Replaces the ACL token (read again after a `403`).
    pub(crate) fn set_token(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// `GET /v1/catalog/services`: service name → tags.
    pub(crate) async fn services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Answer<std::collections::BTreeMap<String, Option<Vec<String>>>>, QueryError> {
        self.get("/v1/catalog/services".to_string(), index, wait)
            .await
    }

    /// `GET /v1/health/service/<name>`: every instance with its checks.
    pub(crate) async fn health(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Answer<Vec<super::convert::HealthEntry>>, QueryError> {
        let path = format!("/v1/health/service/{}", utf8_percent_encode(name, ESCAPE));
        self.get(path, index, wait).await
    }

    /// One GET of `path`, blocking on `index` for up to `wait` when `index`
    /// is not 0.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: String,
        index: u64,
        wait: Duration,
    ) -> Result<Answer<T>, QueryError> {
        let mut url = format!("{}{path}", self.base);
        let mut sep = '?';
        if !self.datacenter.is_empty() {
            url.push_str(&format!(
                "{sep}dc={}",
                utf8_percent_encode(&self.datacenter, ESCAPE)
            ));
            sep = '&';
        }
        // Consul blocks for `wait` plus up to wait/16 of jitter.
        let timeout = if index > 0 {
            url.push_str(&format!("{sep}index={index}&wait={}ms", wait.as_millis()));
            wait + wait / 16 + Duration::from_secs(10)
        } else {
            Duration::from_secs(30)
        };
        let mut request = http::Request::get(url.as_str());
        let token = self.token.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request.body(Empty::new()).map_err(|e| QueryError::Body {
            url: url.clone(),
            error: e.to_string(),
        })?;
        let response = match tokio::time::timeout(timeout, self.http.request(request)).await {
            Err(_) => return Err(QueryError::Timeout { url, timeout }),
            Ok(Err(error)) => return Err(QueryError::Connect { url, error }),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = tokio::time::timeout(
            timeout,
            Limited::new(response.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| QueryError::Timeout {
            url: url.clone(),
            timeout,
        })?
        .map_err(|e| QueryError::Body {
            url: url.clone(),
            error: e.to_string(),
        })?
        .to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body[..body.len().min(512)])
                .trim()
                .to_string();
            return Err(QueryError::Status { url, status, body });
        }
        let body =
            serde_json::from_slice(&body).map_err(|error| QueryError::Decode { url, error })?;
        Ok(Answer { body, index })
    }
}
