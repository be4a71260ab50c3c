//! The shipped Grafana dashboard (`deploy/grafana-dashboard.json`) against a
//! real Prometheus: meshreg serves a ServiceEntry directory and a (fake)
//! Consul agent to two real Envoys (delta and state of the world), a real
//! Prometheus scrapes it every second, a few edits happen (an endpoint
//! moves, a service appears, a file that does not parse is added), and
//! then every PromQL expression of every panel must return data: a
//! non-empty result with at least one number (not only `NaN`, which is
//! what a quantile over a histogram without samples in the window gives).
//!
//! Prometheus is `$PROMETHEUS_BIN`, else `prometheus` on `PATH`, else
//! `/usr/bin/prometheus` (Debian's `prometheus` package, which
//! scripts/test.sh installs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_consul::{FakeConsul, Instance};
use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, http_get, repo, write_atomic};

/// Where the dashboard lives, relative to the repository root.
const DASHBOARD: &str = "deploy/grafana-dashboard.json";

/// The Prometheus job that scrapes the daemon.
const JOB: &str = "meshreg";

/// What Grafana's `$__rate_interval` and `$__interval` become: long enough
/// that the edits of this test stay inside the window while the queries
/// are retried.
const INTERVAL: &str = "1m";

/// The PromQL of every target of every panel in the dashboard, as (panel
/// title, expression), after checking the dashboard's shape: it parses,
/// its data source is the `${datasource}` variable (of Prometheus type)
/// for every panel and target, and every panel but rows has a target with
/// an expression.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join(DASHBOARD);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dash: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "{DASHBOARD}: schemaVersion {} (Grafana 9 and later use 36 and up)",
        dash["schemaVersion"]
    );
    let variables = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{DASHBOARD}: no `datasource` variable of Prometheus type"
    );
    let datasource = |v: &Value, what: &str| {
        assert!(
            v["datasource"]["type"] == "prometheus" && v["datasource"]["uid"] == "${datasource}",
            "{DASHBOARD}: {what} does not use the ${{datasource}} variable: {}",
            v["datasource"]
        );
    };
    let panels = dash["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
        .filter(|p| p["type"] != "row")
    {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "{DASHBOARD}: a panel without a title");
        datasource(panel, &format!("panel {title:?}"));
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(
            !targets.is_empty(),
            "{DASHBOARD}: panel {title:?} has no target"
        );
        for target in targets {
            datasource(target, &format!("a target of {title:?}"));
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "{DASHBOARD}: panel {title:?} has a target without an expression"
            );
            queries.push((title.clone(), expr.to_string()));
        }
    }
    assert!(
        queries.len() >= 20,
        "{DASHBOARD}: only {} queries",
        queries.len()
    );
    queries
}

/// `expr` as Grafana sends it: the interval variables replaced, and the
/// instance variable set to the one scraped target.
fn substitute(expr: &str, instance: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", INTERVAL)
        .replace("${__rate_interval}", INTERVAL)
        .replace("$__interval", INTERVAL)
        .replace("${__interval}", INTERVAL)
        .replace("${instance}", instance)
        .replace("$instance", instance);
    assert!(
        !expr.contains('$'),
        "{DASHBOARD}: a variable this test does not know in {expr:?}"
    );
    expr
}

/// The Prometheus binary: `$PROMETHEUS_BIN`, else `prometheus` on `PATH`,
/// else Debian's `/usr/bin/prometheus`.
fn prometheus_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "$PROMETHEUS_BIN is {}, which does not exist",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("prometheus"))
        .chain([PathBuf::from("/usr/bin/prometheus")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no Prometheus: install Debian's `prometheus` package (scripts/test.sh does: \
                 apt-get install --no-install-recommends prometheus) or set PROMETHEUS_BIN"
            )
        })
}

/// A real Prometheus on a free loopback port, scraping one target every
/// second into a temporary TSDB; killed (and reaped) on drop.
struct Prometheus {
    child: std::sync::Mutex<std::process::Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s `/metrics` as job [`JOB`].
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 - job_name: {JOB}\n  metrics_path: /metrics\n  \
                 static_configs: [{{targets: [\"{target}\"]}}]\n"
            ),
        )
        .unwrap();
        // A free port: bound and released (Prometheus cannot report a
        // port of its own choosing).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child: std::sync::Mutex::new(child),
            addr,
            dir,
        }
    }

    /// Waits until Prometheus has scraped the daemon and found it up;
    /// panics with Prometheus's log if it exits (e.g. its port was taken).
    async fn wait_up(&self) {
        let up = format!("up{{job=\"{JOB}\"}} == 1");
        let exited = eventually(
            "Prometheus to scrape meshreg as up",
            Duration::from_secs(30),
            || async {
                if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                    return Some(Some(status));
                }
                matches!(self.query(&up).await, Ok(s) if !s.is_empty()).then_some(None)
            },
        )
        .await;
        if let Some(status) = exited {
            panic!("Prometheus exited ({status}):\n{}", self.log());
        }
    }

    /// Prometheus's log (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs `expr` as an instant query through `/api/v1/query`; returns
    /// the result's samples as (labels, value), or what went wrong.
    async fn query(&self, expr: &str) -> Result<Vec<(String, f64)>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (status, body) = http_get(self.addr, &path, "prometheus")
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("status {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!(
                "status {status}: {} {}",
                v["errorType"], v["error"]
            ));
        }
        let value = |pair: &Value| -> f64 {
            pair[1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let data = &v["data"];
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (s["metric"].to_string(), value(&s["value"])))
                .collect()),
            Some("scalar") => Ok(vec![(String::new(), value(&data["result"]))]),
            other => Err(format!("result type {other:?}: {data}")),
        }
    }
}

/// Percent-encodes `s` for a URL query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What is wrong with each query's answer now: errors, empty results,
/// results that are all `NaN`.
async fn failures(prometheus: &Prometheus, queries: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (panel, expr) in queries {
        match prometheus.query(expr).await {
            Err(e) => out.push(format!("{panel:?}: {expr}: {e}")),
            Ok(samples) if samples.is_empty() => {
                out.push(format!("{panel:?}: {expr}: empty result"));
            }
            Ok(samples) if !samples.iter().any(|(_, v)| v.is_finite()) => {
                out.push(format!("{panel:?}: {expr}: no number: {samples:?}"));
            }
            Ok(_) => {}
        }
    }
    out
}

/// Waits until Envoy has `cluster` with `host` in it.
async fn wait_host(envoy: &Envoy, cluster: &str, host: &str) {
    eventually(
        &format!("{host} in {cluster}"),
        Duration::from_secs(20),
        || async { envoy.hosts(cluster).await.contains(host).then_some(()) },
    )
    .await;
}

const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";
const EXTRA: &str = "outbound|8080||extra.default.svc.cluster.local";
const WEB: &str = "outbound|8080||web.service.consul";

fn write_extra_entry(dir: &Path) {
    write_atomic(
        &dir.join("extra.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: extra, namespace: default}\n\
         spec:\n  hosts: [extra.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  \
         resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n  \
         endpoints: [{address: 127.0.0.61}]\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let started = Instant::now();
    let queries = dashboard_queries();
    // Fail before starting anything when Prometheus is missing.
    prometheus_bin();

    let consul = FakeConsul::start().await;
    consul.register(&Instance {
        service: "web",
        id: "web-1",
        node: "node-1",
        address: "127.0.0.51",
        port: 8080,
        tags: vec![],
    });
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let config = format!(
        "{}- kind: consul\n  address: {}\n  wait: 2s\n",
        Daemon::config_text(&[dir.path()], ""),
        consul.url()
    );
    let daemon = Daemon::start_config(&config).await;
    // A sidecar-style node with an Istio version (scoped to its namespace,
    // labelled by version) over delta, a plain Envoy over SotW.
    let delta = Envoy::start_node(
        daemon.xds,
        Ads::Delta,
        "{id: \"sidecar~127.0.0.1~client.default~default.svc.cluster.local\", cluster: e2e, \
         metadata: {ISTIO_VERSION: \"1.24.0\"}}",
        &[],
    )
    .await;
    let sotw = Envoy::start(daemon.xds, Ads::Sotw, "prometheus-sotw", &[]).await;
    for envoy in [&delta, &sotw] {
        wait_host(envoy, RATINGS, "127.0.0.16:9080").await;
        wait_host(envoy, WEB, "127.0.0.51:8080").await;
    }

    let prometheus = Prometheus::start(daemon.http);
    prometheus.wait_up().await;

    // Edits after the first scrape, so that rates and histograms move
    // inside the query window: an endpoint moves, a service appears, a
    // file does not parse.
    let ratings = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&ratings).unwrap();
    write_atomic(&ratings, &text.replace("127.0.0.16", "127.0.0.116"));
    write_extra_entry(dir.path());
    write_atomic(
        &dir.path().join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: [not, a, map\n",
    );
    for envoy in [&delta, &sotw] {
        wait_host(envoy, RATINGS, "127.0.0.116:9080").await;
        wait_host(envoy, EXTRA, "127.0.0.61:8080").await;
    }
    eventually(
        "the parse error counted",
        Duration::from_secs(10),
        || async {
            (daemon
                .metric("meshreg_source_errors_total", &["reason=\"parse\""])
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;

    let instance = daemon.http.to_string();
    let queries: Vec<(String, String)> = queries
        .into_iter()
        .map(|(panel, expr)| (panel, substitute(&expr, &instance)))
        .collect();
    // `eventually` would panic without saying which queries fail: the
    // timeout around it (shorter than its own deadline) lets this test say.
    let wait = Duration::from_secs(45);
    let all_answer = eventually(
        "every dashboard query to return data",
        wait + Duration::from_secs(60),
        || async {
            failures(&prometheus, &queries)
                .await
                .is_empty()
                .then_some(())
        },
    );
    if tokio::time::timeout(wait, all_answer).await.is_err() {
        let failures = failures(&prometheus, &queries).await;
        panic!(
            "{} of {} dashboard queries without data after {wait:?}:\n{}\n\
             --- Prometheus log (tail):\n{}\n--- /metrics:\n{}",
            failures.len(),
            queries.len(),
            failures.join("\n"),
            tail(&prometheus.log(), 30),
            daemon.metrics().await
        );
    }

    // A few values the scenario fixes.
    let ok = |samples: Result<Vec<(String, f64)>, String>| -> Vec<(String, f64)> {
        samples.unwrap_or_else(|e| panic!("{e}"))
    };
    let proxies = ok(prometheus.query("sum by (version) (pilot_xds)").await);
    assert!(
        proxies.contains(&("{\"version\":\"1.24.0\"}".into(), 1.0))
            && proxies.contains(&("{\"version\":\"unknown\"}".into(), 1.0)),
        "{proxies:?}"
    );
    let sources = ok(prometheus.query("count(meshreg_source_synced == 1)").await);
    assert_eq!(sources.first().map(|s| s.1), Some(2.0), "{sources:?}");

    drop(prometheus);
    eprintln!(
        "{} dashboard queries answered; the test took {:?}",
        queries.len(),
        started.elapsed()
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
