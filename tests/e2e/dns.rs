//! The DNS source against a real DNS server: dnsmasq (Debian's
//! `dnsmasq-base`, which scripts/test.sh installs) on a loopback high port,
//! authoritative for `example.internal`, with A/AAAA records from a hosts
//! file (changed at run time: rewrite, then SIGHUP) and SRV records from
//! its command line (changed by restarting it). A real Envoy gets the
//! endpoints; SRV priorities and weights reach it; stopping dnsmasq keeps
//! the last answer and marks the source stale; a name that stops existing
//! loses its endpoints after `stale_for`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::{Ads, Daemon, Envoy, eventually, http_get, metric_value};

/// dnsmasq on `127.0.0.1:<port>`, killed on drop.
struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    hosts: PathBuf,
    srv: Vec<String>,
    dir: tempfile::TempDir,
}

fn dnsmasq_bin() -> PathBuf {
    for p in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no dnsmasq: run scripts/test.sh (it installs dnsmasq-base)");
}

impl Dnsmasq {
    /// Serves `hosts` (hosts-file lines) and `srv` (`--srv-host` values).
    async fn start(hosts: &str, srv: &[String]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let hosts_path = dir.path().join("hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        let mut d = Dnsmasq {
            child: None,
            port: crate::peers::free_port(),
            hosts: hosts_path,
            srv: srv.to_vec(),
            dir,
        };
        d.spawn().await;
        d
    }

    /// Starts dnsmasq on `self.port` and waits until it answers. The port
    /// was free when picked, but it is in the ephemeral range: on a
    /// restart another socket (a resolver's query, a connection) may hold
    /// it for a moment, and dnsmasq then exits at once ("Address already
    /// in use"). That is retried for a few seconds; any other exit fails
    /// with dnsmasq's log.
    async fn spawn(&mut self) {
        let user = std::process::Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let log_path = self.dir.path().join("dnsmasq.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::File::create(&log_path).unwrap();
            let mut cmd = Command::new(dnsmasq_bin());
            cmd.arg("--keep-in-foreground")
                .arg("--conf-file=/dev/null")
                .arg(format!("--port={}", self.port))
                .arg("--listen-address=127.0.0.1")
                .arg("--bind-interfaces")
                .arg("--no-resolv")
                .arg("--no-hosts")
                .arg(format!("--addn-hosts={}", self.hosts.display()))
                // Authoritative for the test domain: unknown names are NXDOMAIN.
                .arg("--local=/example.internal/")
                .arg("--local-ttl=1")
                .arg(format!(
                    "--pid-file={}",
                    self.dir.path().join("pid").display()
                ))
                .arg(format!("--user={user}"))
                .arg("--log-queries")
                .arg(format!(
                    "--log-facility={}",
                    self.dir.path().join("queries.log").display()
                ));
            for s in &self.srv {
                cmd.arg(format!("--srv-host={s}"));
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn dnsmasq");
            let port = self.port;
            let answering = eventually(
                "dnsmasq listening or exited",
                Duration::from_secs(10),
                || {
                    let exited = child.try_wait().ok().flatten().is_some();
                    async move {
                        if exited {
                            return Some(false);
                        }
                        answers(port).then_some(true)
                    }
                },
            )
            .await;
            if answering {
                self.child = Some(child);
                return;
            }
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                text.contains("in use") && std::time::Instant::now() < deadline,
                "dnsmasq exited on port {port}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Rewrites the hosts file and makes dnsmasq read it again.
    fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let pid = self.child.as_ref().and_then(Child::id).expect("running");
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP dnsmasq");
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts again on the same port with `srv` as its SRV records.
    async fn restart(&mut self, srv: &[String]) {
        self.stop().await;
        self.srv = srv.to_vec();
        self.spawn().await;
    }
}

/// Whether a DNS server on `127.0.0.1:<port>` answers a query.
fn answers(port: u16) -> bool {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            // A query for `a.example.internal`, type A.
            let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
                      \x01a\x07example\x08internal\x00\x00\x01\x00\x01";
            s.send_to(q, ("127.0.0.1", port))?;
            let mut buf = [0u8; 512];
            s.recv(&mut buf)
        })
        .is_ok()
}

/// Envoy's hosts of `cluster`: `address weight priority` each.
async fn hosts(envoy: &Envoy, cluster: &str) -> BTreeSet<String> {
    let text = envoy.admin("/clusters").await;
    let mut by_host: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for line in text.lines() {
        // Host lines only (`<address>:<port>::<key>::<value>`, IPv6 as
        // `[…]:<port>`), not the cluster's own (`default_priority::…`).
        let Some(rest) = line.strip_prefix(&format!("{cluster}::")) else {
            continue;
        };
        let host_end = if rest.starts_with('[') {
            rest.find("]:")
                .and_then(|i| rest[i..].find("::").map(|j| i + j))
        } else {
            rest.find("::")
        };
        let Some(host_end) = host_end else { continue };
        let host = &rest[..host_end];
        if !host.contains(':') {
            continue;
        }
        let Some((key, value)) = rest[host_end + 2..].split_once("::") else {
            continue;
        };
        let entry = by_host.entry(host.to_string()).or_default();
        match key {
            "weight" => entry.0 = value.to_string(),
            "priority" => entry.1 = value.to_string(),
            _ => {}
        }
    }
    by_host
        .into_iter()
        .map(|(h, (w, p))| format!("{h} w{w} p{p}"))
        .collect()
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

async fn ready_line(daemon: &Daemon) -> String {
    http_get(daemon.http, "/ready", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("dns/dns:"))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_reach_envoy_and_follow_the_records() {
    let port = crate::support::backend("127.0.0.51", "alpha").await;
    crate::support::backend_at("127.0.0.52", port, "beta").await;
    let hosts_v1 = "127.0.0.51 a.example.internal\n127.0.0.52 b.example.internal\n\
                    127.0.0.51 web.example.internal\n127.0.0.52 web.example.internal\n\
                    fd00::7 web.example.internal\n";
    let srv_a = format!("_http._tcp.api.example.internal,a.example.internal,{port},10,60");
    let srv_b = format!("_http._tcp.api.example.internal,b.example.internal,{port},20,5");
    let mut dns = Dnsmasq::start(hosts_v1, &[srv_a.clone(), srv_b]).await;
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: dns\n  nameservers: ['127.0.0.1:{}']\n  ttl_floor: 1s\n  stale_for: 4s\n\
         \x20 services:\n\
         \x20 - srv: _http._tcp.api.example.internal\n    protocol: HTTP\n\
         \x20 - host: web.example.internal\n    ports: [{{number: 80, name: http, protocol: HTTP, target_port: {port}}}]\n",
        dns.port
    ))
    .await;
    let api = format!("outbound|{port}||api.example.internal");
    let web = "outbound|80||web.example.internal";
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "dns-e2e", &[("api", &api)]).await;

    // SRV: the targets on their port, priorities ranked, weights kept.
    let a = format!("127.0.0.51:{port}");
    let b = format!("127.0.0.52:{port}");
    eventually(
        "the SRV targets in Envoy",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, &api).await == set(&[format!("{a} w60 p0"), format!("{b} w5 p1")]))
                .then_some(())
        },
    )
    .await;
    // Priority 1 is failover only: traffic goes to the priority-0 target.
    let listener = envoy.listener().await;
    for _ in 0..5 {
        assert_eq!(
            http_get(listener, "/", "api").await.unwrap(),
            (200, "alpha".to_string())
        );
    }
    // A/AAAA: every address on the target port.
    let web_hosts = |extra: &[&str]| -> BTreeSet<String> {
        extra.iter().map(|h| format!("{h}:{port} w1 p0")).collect()
    };
    eventually(
        "the host's addresses in Envoy",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, web).await == web_hosts(&["127.0.0.51", "127.0.0.52", "[fd00::7]"]))
                .then_some(())
        },
    )
    .await;

    // The hosts file changes (SIGHUP): one address leaves.
    dns.set_hosts(
        "127.0.0.51 a.example.internal\n127.0.0.52 b.example.internal\n\
         127.0.0.51 web.example.internal\nfd00::7 web.example.internal\n",
    );
    eventually(
        "127.0.0.52 gone from web",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, web).await == web_hosts(&["127.0.0.51", "[fd00::7]"])).then_some(())
        },
    )
    .await;

    // dnsmasq stops: the source is stale, the last answers stay.
    dns.stop().await;
    eventually("the source stale", Duration::from_secs(30), || async {
        ready_line(&daemon).await.contains(": stale").then_some(())
    })
    .await;
    assert_eq!(
        hosts(&envoy, web).await,
        web_hosts(&["127.0.0.51", "[fd00::7]"])
    );
    assert_eq!(hosts(&envoy, &api).await.len(), 2);
    // A reload that changes the source's settings while the server is
    // down restarts it: what it cannot resolve now is kept, not withdrawn.
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replace("ttl_floor: 1s", "ttl_floor: 1s\n  ttl_ceiling: 4m"),
    )
    .unwrap();
    let failures = daemon.log().matches("looking up").count();
    daemon.signal("HUP");
    eventually(
        "the restarted source failing",
        Duration::from_secs(30),
        || async { (daemon.log().matches("looking up").count() >= failures + 2).then_some(()) },
    )
    .await;
    // Its first state went out (a sync) without these names.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hosts(&envoy, web).await,
        web_hosts(&["127.0.0.51", "[fd00::7]"])
    );
    assert_eq!(hosts(&envoy, &api).await.len(), 2);
    // It comes back with one SRV target: the source is synced again.
    dns.restart(&[srv_a]).await;
    eventually("one SRV target", Duration::from_secs(30), || async {
        (hosts(&envoy, &api).await == set(&[format!("{a} w60 p0")])).then_some(())
    })
    .await;
    eventually("the source synced", Duration::from_secs(30), || async {
        ready_line(&daemon).await.contains(": synced").then_some(())
    })
    .await;
    let log = daemon.log();
    assert!(log.contains("keeping its last answer"), "{log}");

    // The name stops existing: kept for stale_for (4 s), then removed.
    dns.set_hosts("127.0.0.51 a.example.internal\n");
    eventually("NXDOMAIN seen", Duration::from_secs(20), || async {
        (metric_value(
            &daemon.metrics().await,
            "meshreg_source_errors_total",
            &["reason=\"not_found\""],
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        hosts(&envoy, web).await,
        web_hosts(&["127.0.0.51", "[fd00::7]"]),
        "removed before stale_for"
    );
    eventually(
        "web's endpoints removed",
        Duration::from_secs(20),
        || async { hosts(&envoy, web).await.is_empty().then_some(()) },
    )
    .await;
    // The declaration stays: its cluster is there, empty.
    assert!(envoy.clusters().await.contains(web));
}

/// The `type` of each outbound cluster in Envoy's config dump.
async fn cluster_types(envoy: &Envoy) -> std::collections::BTreeMap<String, String> {
    let dump: serde_json::Value = serde_json::from_str(
        &envoy
            .admin("/config_dump?resource=dynamic_active_clusters")
            .await,
    )
    .unwrap_or_default();
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let cluster = &c["cluster"];
            Some((
                cluster["name"].as_str()?.to_string(),
                cluster["type"].as_str().unwrap_or("?").to_string(),
            ))
        })
        .filter(|(name, _)| name.starts_with("outbound|"))
        .collect()
}

/// `resolve_dns` on a ServiceEntry source: the DNS entries whose host
/// matches are resolved by meshreg and become EDS clusters that follow
/// the records; the others stay DNS clusters resolved by Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entry_hosts_resolved_by_meshreg_become_eds() {
    let dns = Dnsmasq::start(
        "127.0.0.61 ext.example.internal\n127.0.0.62 ext.example.internal\n\
         127.0.0.63 db-a.example.internal\n",
        &[],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("entries.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: ext, namespace: default}\n\
         spec:\n  hosts: [ext.example.internal]\n  resolution: DNS\n\
         \x20 ports: [{number: 80, name: http, protocol: HTTP}]\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: db, namespace: default}\n\
         spec:\n  hosts: [db.example.internal]\n  resolution: DNS_ROUND_ROBIN\n\
         \x20 ports: [{number: 5432, name: tcp, protocol: TCP}]\n\
         \x20 endpoints: [{address: db-a.example.internal, labels: {role: primary}}]\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: other, namespace: default}\n\
         spec:\n  hosts: [other.example.org]\n  resolution: DNS\n\
         \x20 ports: [{number: 443, name: tls, protocol: TLS}]\n",
    )
    .unwrap();
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: serviceentry\n  dir: {}\n  rescan_interval: 1s\n  resolve_dns:\n\
         \x20   hosts: ['*.example.internal']\n    nameservers: ['127.0.0.1:{}']\n    ttl_floor: 1s\n",
        dir.path().display(),
        dns.port
    ))
    .await;
    let envoy = Envoy::start(daemon.xds, Ads::Sotw, "dns-se", &[]).await;
    let ext = "outbound|80||ext.example.internal";
    let db = "outbound|5432||db.example.internal";
    eventually(
        "the resolved entries in Envoy",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, ext).await
                == set(&["127.0.0.61:80 w1 p0".into(), "127.0.0.62:80 w1 p0".into()])
                && hosts(&envoy, db).await == set(&["127.0.0.63:5432 w1 p0".into()]))
            .then_some(())
        },
    )
    .await;
    let types = cluster_types(&envoy).await;
    assert_eq!(types.get(ext).map(String::as_str), Some("EDS"), "{types:?}");
    assert_eq!(types.get(db).map(String::as_str), Some("EDS"), "{types:?}");
    assert_eq!(
        types
            .get("outbound|443||other.example.org")
            .map(String::as_str),
        Some("STRICT_DNS"),
        "{types:?}"
    );
    // The endpoint keeps its ServiceEntry labels.
    let registry = http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        registry.contains("127.0.0.63 {} Healthy labels=role=primary"),
        "{registry}"
    );
    // The records change: the EDS endpoints follow.
    dns.set_hosts("127.0.0.62 ext.example.internal\n127.0.0.64 db-a.example.internal\n");
    eventually(
        "the new addresses in Envoy",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, ext).await == set(&["127.0.0.62:80 w1 p0".into()])
                && hosts(&envoy, db).await == set(&["127.0.0.64:5432 w1 p0".into()]))
            .then_some(())
        },
    )
    .await;
}
