//! `meshreg-load kubernetes`: the Kubernetes source at the size of a real
//! cluster, against the same change through the ServiceEntry source, in
//! one run.
//!
//! N Services with P pods each (one EndpointSlice per Service, the Pods
//! themselves, one Node, one Namespace), served by the protocol-faithful
//! fake API server of `meshreg-testkit` (paged lists, then watches; the
//! real `kube` client talks to it unchanged), to a fleet of simulated
//! proxies. The fake runs in the parent process, so the daemon's figures
//! (CPU, memory) are its own. A flip is one
//! pod turning not ready, as the kubelet and the EndpointSlice controller
//! report it: the Pod's `Ready` condition and then its endpoint's
//! `conditions.ready` go false (two `PUT`s to the API server). Reported: the time from the first write to the last proxy
//! holding the new ClusterLoadAssignment, and the bytes each proxy
//! received per flip.
//!
//! The comparison case serves the same N services of P endpoints from
//! ServiceEntry files and changes one endpoint's weight per flip (a change
//! of one endpoint of one assignment, like the readiness flip, that the
//! file source applies at once). Each case runs in a child process of its
//! own (`--only`), so one's memory cannot hide in the other's; the daemon
//! runs in that process as the binary wires it (`meshreg::App`), the fleet
//! in a grandchild.
//!
//! The fake keeps every object in memory and answers a list in one page:
//! the figures are the daemon's, not an API server's (a real one adds its
//! own watch latency, the same for every client).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshreg_testkit::fake_kube::FakeKube;
use meshreg_xds::Debounce;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::driver::{Fleet, InProcess, digests, endpoint_ip};
use crate::fleet::Command;
use crate::procfs;
use crate::report::Percentiles;
use meshreg_load::clock::now_ns;
use meshreg_load::proxy::Mode;

/// One case's figures.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct KubeRow {
    /// `kubernetes` or `serviceentry`.
    pub(crate) source: String,
    pub(crate) services: usize,
    pub(crate) pods: usize,
    pub(crate) proxies: usize,
    pub(crate) mode: Mode,
    pub(crate) initial_sync_s: f64,
    pub(crate) flip: Percentiles,
    /// Bytes each proxy received per flip (CDS + EDS).
    pub(crate) bytes_per_proxy: f64,
    /// The daemon's CPU per flip, milliseconds.
    pub(crate) cpu_ms_per_flip: f64,
    pub(crate) peak_rss_mb: f64,
}

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) services: usize,
    pub(crate) pods: usize,
    pub(crate) proxies: usize,
    pub(crate) flips: usize,
    pub(crate) mode: Mode,
    pub(crate) debounce: Debounce,
}

/// The fake API server's objects: a Namespace, a Node, and per service
/// its Service, Pods and EndpointSlice.
fn populate(kube: &FakeKube, services: usize, pods: usize) {
    kube.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    kube.apply(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-1",
                            "labels": {"topology.kubernetes.io/region": "r1",
                                       "topology.kubernetes.io/zone": "z1"}}}),
    );
    for i in 0..services {
        kube.apply("/api/v1/services", service(i));
        for j in 0..pods {
            kube.apply("/api/v1/pods", pod(i, j, true));
        }
        kube.apply(
            "/apis/discovery.k8s.io/v1/endpointslices",
            slice(i, pods, None),
        );
    }
}

/// Runs both cases, each in a child process, the fake API server in this
/// one; returns (kubernetes, serviceentry).
pub(crate) async fn run(shape: Shape) -> anyhow::Result<Vec<KubeRow>> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for case in ["kubernetes", "serviceentry"] {
        let fake = if case == "kubernetes" {
            let kube = FakeKube::start().await;
            populate(&kube, shape.services, shape.pods);
            Some(kube)
        } else {
            None
        };
        let mut child = tokio::process::Command::new(&exe);
        child.args(["kubernetes", "--only", case]);
        if let Some(kube) = &fake {
            child
                .arg("--kubeconfig")
                .arg(&kube.kubeconfig)
                .args(["--kube-addr", &kube.addr().to_string()]);
        }
        let out = child
            .args(["--services", &shape.services.to_string()])
            .args(["--pods", &shape.pods.to_string()])
            .args(["--proxies", &shape.proxies.to_string()])
            .args(["--flips", &shape.flips.to_string()])
            .args(["--mode", &format!("{:?}", shape.mode).to_lowercase()])
            .args([
                "--debounce-ms",
                &shape.debounce.after.as_millis().to_string(),
            ])
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "the {case} case failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        drop(fake);
        let text = String::from_utf8(out.stdout)?;
        let line = text.lines().last().context("no row")?;
        rows.push(serde_json::from_str(line)?);
    }
    Ok(rows)
}

/// Replaces one object of the fake API server.
async fn put(addr: SocketAddr, path: &str, object: &serde_json::Value) -> anyhow::Result<()> {
    match crate::consul::http(addr, "PUT", path, &object.to_string()).await? {
        (200, _) => Ok(()),
        (status, body) => bail!("PUT {path}: {status} {body}"),
    }
}

fn pod_name(i: usize, j: usize) -> String {
    format!("s{i}-{j}")
}

fn pod(i: usize, j: usize, ready: bool) -> serde_json::Value {
    let status = if ready { "True" } else { "False" };
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod_name(i, j), "namespace": "default",
                        "labels": {"app": format!("s{i}")}},
           "spec": {"nodeName": "node-1", "serviceAccountName": "default",
                    "containers": [{"name": "app", "image": "app",
                                    "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": endpoint_ip(i, j).to_string(),
                      "conditions": [{"type": "Ready", "status": status}]}})
}

fn service(i: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("s{i}"), "namespace": "default"},
           "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    "selector": {"app": format!("s{i}")},
                    "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}})
}

/// Service `i`'s slice; `not_ready` is the pod that is not ready, if any.
fn slice(i: usize, pods: usize, not_ready: Option<usize>) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = (0..pods)
        .map(|j| {
            let ready = not_ready != Some(j);
            json!({"addresses": [endpoint_ip(i, j).to_string()],
                   "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "nodeName": "node-1",
                   "targetRef": {"kind": "Pod", "name": pod_name(i, j), "namespace": "default"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("s{i}-abcde"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": format!("s{i}")}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// The ServiceEntry of service `i`; endpoint `heavy` has weight `weight`.
fn entry(i: usize, pods: usize, heavy: Option<(usize, usize)>) -> String {
    let endpoints: Vec<String> = (0..pods)
        .map(|j| {
            let weight = match heavy {
                Some((h, w)) if h == j => w,
                _ => 1,
            };
            format!("{{address: {}, weight: {weight}}}", endpoint_ip(i, j))
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: s{i}, namespace: default}}\n\
         spec:\n  hosts: [s{i}.default.svc.cluster.local]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n\
         \x20 endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// Runs one case in this process (`kubernetes`, against the API server
/// `kube` = (kubeconfig, address), or `serviceentry`).
pub(crate) async fn run_case(
    case: &str,
    shape: Shape,
    kube: Option<(&Path, SocketAddr)>,
) -> anyhow::Result<KubeRow> {
    let Shape {
        services,
        pods,
        proxies,
        flips,
        mode,
        debounce,
    } = shape;
    let debounce_yaml = format!(
        "debounce: {{after: {}ms, max: {}ms}}\n",
        debounce.after.as_millis(),
        debounce.max.as_millis()
    );
    let dir = std::env::temp_dir().join(format!("meshreg-load-kube-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let fake = match (case, kube) {
        ("kubernetes", Some((_, addr))) => Some(addr),
        ("kubernetes", None) => bail!("the kubernetes case needs --kubeconfig and --kube-addr"),
        _ => None,
    };
    let config = match (case, kube) {
        ("kubernetes", Some((kubeconfig, _))) => format!(
            "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n{debounce_yaml}\
             sources: [{{kind: kubernetes, kubeconfig: {}, cluster_id: c1}}]\n",
            kubeconfig.display()
        ),
        ("serviceentry", _) => {
            for i in 0..services {
                std::fs::write(dir.join(format!("s{i}.yaml")), entry(i, pods, None))?;
            }
            format!(
                "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n{debounce_yaml}\
                 sources: [{{kind: serviceentry, dir: {}}}]\n",
                dir.display()
            )
        }
        (other, _) => bail!("unknown case {other:?} (kubernetes or serviceentry)"),
    };
    procfs::reset_peak_rss();
    let t0 = now_ns();
    let mut meshreg = InProcess::start(&config, &format!("kube-{case}")).await?;
    let snap = meshreg
        .wait_clusters(services, Duration::from_secs(300))
        .await
        .context("the services were not all served")?;
    let mut fleet = Fleet::spawn(meshreg.xds, proxies, mode).await?;
    let synced = fleet
        .wait_view(digests(&snap), Duration::from_secs(300))
        .await?;
    if !synced.ok {
        bail!("{case}: {} of {proxies} proxies synced", synced.matching);
    }
    let initial_sync_s = synced.last_ns.saturating_sub(t0) as f64 / 1e9;

    let bytes0 = fleet.call(&Command::Counters).await?.bytes;
    let cpu0 = procfs::cpu_seconds("self");
    let mut latencies = Vec::new();
    for k in 0..flips {
        let i = (k * 7919) % services;
        let j = k % pods;
        // Each flip turns the pod not ready; the same pod again (after
        // `services` flips) would turn it back.
        let down = (k / services) % 2 == 0;
        let name = format!("outbound|8080||s{i}.default.svc.cluster.local");
        let what = format!("{case}: flip {k}");
        let latency = match fake {
            Some(addr) => {
                let change = async {
                    let pod_path = format!("/api/v1/namespaces/default/pods/{}", pod_name(i, j));
                    put(addr, &pod_path, &pod(i, j, !down)).await?;
                    let slice_path = format!(
                        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/s{i}-abcde"
                    );
                    put(addr, &slice_path, &slice(i, pods, down.then_some(j))).await
                };
                meshreg
                    .converge(&mut fleet, &name, &what, change)
                    .await?
                    .last_proxy_ms
            }
            None => {
                let path = dir.join(format!("s{i}.yaml"));
                let tmp = dir.join(format!(".s{i}.tmp"));
                std::fs::write(&tmp, entry(i, pods, Some((j, 2 + k % 50))))?;
                let change = async { Ok(std::fs::rename(&tmp, &path)?) };
                meshreg
                    .converge(&mut fleet, &name, &what, change)
                    .await?
                    .last_proxy_ms
            }
        };
        latencies.push(latency);
    }
    let cpu_ms_per_flip = (procfs::cpu_seconds("self") - cpu0) * 1e3 / flips.max(1) as f64;
    let bytes1 = fleet.call(&Command::Counters).await?.bytes;
    let received = (bytes1[0] - bytes0[0]) + (bytes1[1] - bytes0[1]);
    let bytes_per_proxy = received as f64 / proxies.max(1) as f64 / flips.max(1) as f64;
    let peak_rss_mb = procfs::rss_bytes("self").1 as f64 / 1e6;
    fleet.exit().await;
    meshreg.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(KubeRow {
        source: case.to_string(),
        services,
        pods,
        proxies,
        mode,
        initial_sync_s,
        flip: Percentiles::of(latencies),
        bytes_per_proxy,
        cpu_ms_per_flip,
        peak_rss_mb,
    })
}
