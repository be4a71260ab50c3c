//! The real programs built from Go modules by `scripts/peers.sh`: etcd 3.6,
//! kube-apiserver, a Consul agent and istiod, started on loopback for one test and killed
//! when dropped. Each prints which version it is, so a test log says what
//! it ran against.
//!
//! A binary is found through `$MESHREG_PEER_<NAME>` (scripts/test.sh
//! exports them) or else `target/peers.env`, which scripts/peers.sh writes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::{eventually, repo};

/// A peer binary and its module version.
pub struct Peer {
    pub bin: PathBuf,
    pub version: String,
}

/// `key` from the environment, else from `peers.env`.
fn peer_env(key: &str) -> Option<String> {
    if let Ok(value) = std::env::var(key) {
        return Some(value);
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let text = std::fs::read_to_string(dir.join("peers.env")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// The peer `name` (e.g. "kube-apiserver"); panics with what to run when
/// it has not been built.
pub fn peer(name: &str) -> Peer {
    let var = format!("MESHREG_PEER_{}", name.to_uppercase().replace('-', "_"));
    let (bin, version) = match (peer_env(&var), peer_env(&format!("{var}_VERSION"))) {
        (Some(bin), Some(version)) => (bin, version),
        _ => {
            panic!("{name} is not built: run scripts/peers.sh (scripts/test.sh does) or set {var}")
        }
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.exists(),
        "{} does not exist: run scripts/peers.sh",
        bin.display()
    );
    eprintln!("peer {name} {version} ({})", bin.display());
    Peer { bin, version }
}

/// A free loopback port (bound, then released for the peer to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn(peer: &Peer, args: &[String], envs: &[(&str, &str)], log: &Path, cwd: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(&peer.bin)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", peer.bin.display()))
}

/// Waits until `log` contains `line`, or panics with the log's tail.
async fn wait_log(what: &str, log: &Path, line: &str, timeout: Duration) {
    let log = log.to_path_buf();
    let line = line.to_string();
    let found = tokio::time::timeout(timeout, async {
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&line)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if found.is_err() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        panic!(
            "{what}: no {line:?} in {} after {timeout:?}; last lines:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// A Kubernetes API server on loopback with its own etcd 3.6: a static
/// bearer token with `system:masters`, a self-signed serving certificate,
/// RBAC. No controllers run (no controller-manager, no scheduler).
pub struct KubeApiserver {
    _etcd: Child,
    apiserver: Option<Child>,
    /// The API server's binary and arguments, to start it again.
    bin: Peer,
    args: Vec<String>,
    secure_port: u16,
    pub dir: tempfile::TempDir,
    /// A kubeconfig for the API server (token auth, TLS unverified).
    pub kubeconfig: PathBuf,
    pub version: String,
}

impl KubeApiserver {
    pub async fn start() -> KubeApiserver {
        let etcd = peer("etcd");
        let apiserver = peer("kube-apiserver");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (client, peer_port, secure) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd_child = spawn(
            &etcd,
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--log-level=warn".into(),
            ],
            &[],
            &d.join("etcd.log"),
            d,
        );
        // The service-account signing key the API server requires.
        let key = d.join("sa.key");
        let status = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl genrsa failed");
        let token = "meshreg-test-token";
        // An admin, meshreg's service account as deploy/kubernetes.yaml
        // names it (RBAC decides what it may do), and a user with no role.
        std::fs::write(
            d.join("tokens.csv"),
            format!(
                "{token},admin,admin,\"system:masters\"\n\
                 {MESHREG_SA_TOKEN},system:serviceaccount:meshreg-system:meshreg,sa,\"system:serviceaccounts,system:authenticated\"\n\
                 {NOBODY_TOKEN},nobody,nobody,\"system:authenticated\"\n\
                 {ROTATED_ADMIN_TOKEN},admin-2,admin-2,\"system:masters\"\n"
            ),
        )
        .unwrap();
        let log = d.join("kube-apiserver.log");
        let args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // No controller-manager creates service accounts' tokens.
            "--disable-admission-plugins=ServiceAccount".into(),
        ];
        let apiserver_child = spawn(&apiserver, &args, &[], &log, d);
        let url = format!("https://127.0.0.1:{secure}");
        wait_log(
            "kube-apiserver",
            &log,
            &format!("Serving securely on 127.0.0.1:{secure}"),
            Duration::from_secs(60),
        )
        .await;
        let kubeconfig = write_kubeconfig(&d.join("kubeconfig"), &url, token);
        let server = KubeApiserver {
            _etcd: etcd_child,
            apiserver: Some(apiserver_child),
            version: format!(
                "kube-apiserver {}, etcd {}",
                apiserver.version, etcd.version
            ),
            bin: apiserver,
            args,
            secure_port: secure,
            dir,
            kubeconfig,
        };
        server.wait_ready().await;
        server
    }

    /// Waits until the API server has bootstrapped: the `default`
    /// namespace exists (it is created just after the port opens).
    async fn wait_ready(&self) {
        let client = self.client().await;
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while namespaces.get("default").await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            ready.is_ok(),
            "the API server did not create namespace default in 60 s"
        );
    }

    /// Applies the Istio CRDs of the pinned istio module (scripts/peers.sh
    /// puts them beside istiod) and waits until ServiceEntries are served.
    pub async fn apply_istio_crds(&self) {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use serde::Deserialize as _;
        let path = peer_env("MESHREG_PEER_ISTIO_CRDS")
            .expect("no Istio CRDs: run scripts/peers.sh (scripts/test.sh does)");
        let text = std::fs::read_to_string(&path).unwrap();
        let client = self.client().await;
        let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml_ng::from_value(value).unwrap();
            crds.create(&kube::api::PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("create {:?}: {e}", crd.metadata.name));
        }
        let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "networking.istio.io",
            "v1",
            "ServiceEntry",
        ));
        let entries: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client, &resource);
        let served = tokio::time::timeout(Duration::from_secs(60), async {
            while entries.list(&Default::default()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            served.is_ok(),
            "ServiceEntries not served 60 s after the CRDs"
        );
    }

    /// Stops the API server (etcd keeps the data): clients see refused
    /// connections.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the API server again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        let log = self.dir.path().join("kube-apiserver-restarted.log");
        self.apiserver = Some(spawn(&self.bin, &self.args, &[], &log, self.dir.path()));
        wait_log(
            "kube-apiserver (restarted)",
            &log,
            &format!("Serving securely on 127.0.0.1:{}", self.secure_port),
            Duration::from_secs(60),
        )
        .await;
    }
}

/// The bearer token of meshreg's service account (`system:serviceaccount:
/// meshreg-system:meshreg`), which has only what RBAC grants it.
pub const MESHREG_SA_TOKEN: &str = "meshreg-sa-token";

/// A second admin token, for credential rotation.
pub const ROTATED_ADMIN_TOKEN: &str = "meshreg-rotated-token";

/// The bearer token of an authenticated user with no role.
pub const NOBODY_TOKEN: &str = "meshreg-nobody-token";

/// Writes a kubeconfig for `url` with `token` (TLS unverified).
fn write_kubeconfig(path: &Path, url: &str, token: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: test, cluster: {{server: \"{url}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: user, user: {{token: {token}}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: user}}}}]\n\
             current-context: test\n"
        ),
    )
    .unwrap();
    path.to_path_buf()
}

impl KubeApiserver {
    /// A kubeconfig for the same API server with another `token`.
    pub fn kubeconfig_for(&self, token: &str) -> PathBuf {
        write_kubeconfig(
            &self.dir.path().join(format!("kubeconfig-{token}")),
            &format!("https://127.0.0.1:{}", self.secure_port),
            token,
        )
    }

    /// A `kube` client for the API server, through its kubeconfig.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

/// istiod (`pilot-discovery discovery`) reading Istio YAML from a
/// directory (`--configDir`), with plaintext xDS on a loopback port.
///
/// istiod cannot run without a Kubernetes client: its ServiceEntry
/// controller dereferences the multicluster controller, which exists only
/// with one (a nil-pointer panic at start otherwise, seen with this
/// version), so it is given a real API server and its Kubernetes registry.
/// That registry adds the API server's own `kubernetes.default` Service.
/// Istio-only features a plain Envoy cannot take are switched off: metadata
/// exchange (`PILOT_ENABLE_METADATA_EXCHANGE=false`), auto mTLS
/// (`enableAutoMtls: false`), the CA; telemetry labels are off too.
pub struct Istiod {
    _child: Child,
    pub xds: SocketAddr,
    pub version: String,
    log: PathBuf,
}

impl Istiod {
    pub async fn start(config_dir: &Path, kube: &KubeApiserver) -> Istiod {
        let istiod = peer("istiod");
        let d = kube.dir.path();
        let mesh = d.join("mesh.yaml");
        std::fs::write(
            &mesh,
            "enableAutoMtls: false\nlocalityLbSetting: {enabled: false}\nrootNamespace: istio-system\n",
        )
        .unwrap();
        let (grpc, http, https, ctrlz) = (free_port(), free_port(), free_port(), free_port());
        let log = d.join("istiod.log");
        let child = spawn(
            &istiod,
            &[
                "discovery".into(),
                format!("--kubeconfig={}", kube.kubeconfig.display()),
                "--registries=Kubernetes".into(),
                format!("--configDir={}", config_dir.display()),
                format!("--meshConfig={}", mesh.display()),
                format!("--networksConfig={}", d.join("no-networks.yaml").display()),
                format!("--grpcAddr=127.0.0.1:{grpc}"),
                format!("--httpAddr=127.0.0.1:{http}"),
                "--monitoringAddr=".into(),
                "--secureGRPCAddr=".into(),
                // The webhook server istiod starts with a Kubernetes client.
                format!("--httpsAddr=127.0.0.1:{https}"),
                format!("--ctrlz_port={ctrlz}"),
            ],
            &[
                ("ENABLE_CA_SERVER", "false"),
                ("POD_NAMESPACE", "istio-system"),
                ("PILOT_ENABLE_METADATA_EXCHANGE", "false"),
                ("PILOT_ENABLE_TELEMETRY_LABEL", "false"),
                ("PILOT_ENDPOINT_TELEMETRY_LABEL", "false"),
                ("PILOT_DEBOUNCE_AFTER", "10ms"),
                ("PILOT_DEBOUNCE_MAX", "100ms"),
            ],
            &log,
            d,
        );
        wait_log(
            "istiod",
            &log,
            &format!("starting gRPC discovery service at 127.0.0.1:{grpc}"),
            Duration::from_secs(60),
        )
        .await;
        let xds: SocketAddr = format!("127.0.0.1:{grpc}").parse().unwrap();
        eventually(
            "istiod's xDS port",
            Duration::from_secs(30),
            || async move { tokio::net::TcpStream::connect(xds).await.ok().map(|_| ()) },
        )
        .await;
        Istiod {
            _child: child,
            xds,
            version: istiod.version,
            log,
        }
    }

    /// istiod's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A Consul agent in `-dev` mode (a one-node server with its own
/// datacenter `dc1`, in memory) on loopback, every port its own.
pub struct Consul {
    _child: Child,
    pub http: SocketAddr,
    pub version: String,
    dir: tempfile::TempDir,
}

impl Consul {
    pub async fn start() -> Consul {
        let consul = peer("consul");
        let dir = tempfile::tempdir().expect("tempdir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args: Vec<String> = vec![
            "agent".into(),
            "-dev".into(),
            "-bind=127.0.0.1".into(),
            "-client=127.0.0.1".into(),
            "-node=meshreg-e2e".into(),
            format!("-http-port={}", http.port()),
            "-dns-port=-1".into(),
            format!("-serf-lan-port={}", free_port()),
            format!("-serf-wan-port={}", free_port()),
            format!("-server-port={}", free_port()),
            "-hcl=ports { grpc = -1 grpc_tls = -1 }".into(),
        ];
        let log = dir.path().join("consul.log");
        let child = spawn(&consul, &args, &[], &log, dir.path());
        let c = Consul {
            _child: child,
            http,
            version: consul.version,
            dir,
        };
        eventually(
            "the Consul agent has a leader",
            Duration::from_secs(60),
            || async {
                let (status, body) = crate::support::http_get(http, "/v1/status/leader", "consul")
                    .await
                    .ok()?;
                (status == 200 && body.contains(':')).then_some(())
            },
        )
        .await;
        c
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `PUT path` with `body` on the agent's HTTP API; panics unless 200.
    pub async fn put(&self, path: &str, body: &str) {
        let (status, answer) = crate::support::http_request(self.http, "PUT", path, "consul", body)
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        assert_eq!(status, 200, "PUT {path}: {answer}\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("consul.log")).unwrap_or_default()
    }
}

/// An etcd 3.6 server on loopback that can be stopped and started again
/// with its data (an outage).
pub struct Etcd {
    child: Option<Child>,
    peer: Peer,
    args: Vec<String>,
    dir: tempfile::TempDir,
    /// The client URL.
    pub url: String,
    client: u16,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let peer = peer("etcd");
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let args = vec![
            format!("--data-dir={}", dir.path().join("data").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--log-level=warn".into(),
        ];
        let mut etcd = Etcd {
            child: None,
            peer,
            args,
            dir,
            url,
            client,
        };
        etcd.restart().await;
        eprintln!("etcd {} at {}", etcd.peer.version, etcd.url);
        etcd
    }

    /// Stops it (its data stays): clients see refused connections.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port and data, and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) {
        self.stop().await;
        let d = self.dir.path().to_path_buf();
        self.child = Some(spawn(&self.peer, &self.args, &[], &d.join("etcd.log"), &d));
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client).parse().unwrap();
        eventually(
            "etcd accepting connections",
            Duration::from_secs(30),
            || async { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }
}
