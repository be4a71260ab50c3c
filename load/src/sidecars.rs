//! `meshreg-load sidecars`: the cost and the reach of Sidecar scoping.
//!
//! N services spread over K namespaces (`ns-0` … as ServiceEntry files),
//! P simulated proxies spread over the same namespaces (Istio node ids, so
//! the daemon scopes them), once without Sidecars and once with one
//! Sidecar per namespace importing `./*` and `istio-system/*`. Each case
//! runs in a child process of its own (so one case's freed memory cannot
//! hide the other's), with meshreg as the binary wires it (`meshreg::App`)
//! and the fleet in a grandchild. Reported per case: the time from the
//! fleet's start until every proxy holds exactly what it should (N, or
//! N / K with Sidecars), the daemon's RSS before the fleet and at the end,
//! and, for one endpoint change in `ns-3`, how many proxies got an EDS
//! response (P, or P / K with Sidecars).

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::driver::{Fleet, InProcess, endpoint_ip};
use crate::fleet::Command;
use crate::procfs;
use meshreg_load::clock::now_ns;
use meshreg_load::proxy::Mode;

/// One case's figures.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SidecarRow {
    pub(crate) sidecars: bool,
    pub(crate) services: usize,
    pub(crate) namespaces: usize,
    pub(crate) proxies: usize,
    pub(crate) mode: Mode,
    /// Clusters each proxy holds once synced.
    pub(crate) held: usize,
    pub(crate) initial_sync_s: f64,
    pub(crate) rss_before_mb: f64,
    pub(crate) rss_after_mb: f64,
    pub(crate) scopes: f64,
    /// EDS responses the fleet got for one endpoint change.
    pub(crate) eds_responses: u64,
    /// Milliseconds from the change to the last of them.
    pub(crate) change_ms: f64,
}

fn entry(i: usize, namespaces: usize, weight: usize) -> String {
    let ns = i % namespaces;
    let ip = endpoint_ip(i, 0);
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: s{i}, namespace: ns-{ns}}}\n\
         spec:\n  hosts: [s{i}.ns-{ns}.svc.cluster.local]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n\
         \x20 endpoints: [{{address: {ip}, weight: {weight}}}]\n"
    )
}

fn sidecar(ns: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n\
         metadata: {{name: default, namespace: ns-{ns}}}\n\
         spec:\n  egress:\n  - hosts: [\"./*\", \"istio-system/*\"]\n"
    )
}

/// Runs both cases, each in a child process; returns (without, with).
pub(crate) async fn run(
    services: usize,
    namespaces: usize,
    proxies: usize,
    mode: Mode,
) -> anyhow::Result<Vec<SidecarRow>> {
    if namespaces < 4 || !services.is_multiple_of(namespaces) || !proxies.is_multiple_of(namespaces)
    {
        bail!("services and proxies must be multiples of --namespaces (at least 4)");
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for case in ["without", "with"] {
        let out = tokio::process::Command::new(&exe)
            .args(["sidecars", "--only", case])
            .args(["--services", &services.to_string()])
            .args(["--namespaces", &namespaces.to_string()])
            .args(["--proxies", &proxies.to_string()])
            .args(["--mode", &format!("{mode:?}").to_lowercase()])
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "the {case} case failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let line = text.lines().last().context("no row")?;
        rows.push(serde_json::from_str(line)?);
    }
    Ok(rows)
}

/// Runs one case in this process.
pub(crate) async fn run_case(
    with_sidecars: bool,
    services: usize,
    namespaces: usize,
    proxies: usize,
    mode: Mode,
) -> anyhow::Result<SidecarRow> {
    let dir = std::env::temp_dir().join(format!("meshreg-load-sidecars-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for i in 0..services {
        std::fs::write(dir.join(format!("s{i}.yaml")), entry(i, namespaces, 1))?;
    }
    if with_sidecars {
        for ns in 0..namespaces {
            std::fs::write(dir.join(format!("sidecar-{ns}.yaml")), sidecar(ns))?;
        }
    }
    let config = format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        dir.display()
    );
    let mut meshreg = InProcess::start(&config, "sidecars").await?;
    meshreg
        .wait_clusters(services, Duration::from_secs(300))
        .await
        .context("the services were not all served")?;
    let rss_before_mb = procfs::rss_bytes("self").0 as f64 / 1e6;
    let held = if with_sidecars {
        services / namespaces
    } else {
        services
    };
    let t0 = now_ns();
    let mut fleet = Fleet::spawn_in(meshreg.xds, proxies, mode, namespaces).await?;
    let synced = fleet
        .call(&Command::WaitHeld {
            clusters: held,
            assignments: held,
            members: 0,
            timeout_ms: 300_000,
        })
        .await?;
    if !synced.ok {
        bail!(
            "{} of {proxies} proxies hold {held} clusters",
            synced.matching
        );
    }
    let initial_sync_s = synced.last_ns.saturating_sub(t0) as f64 / 1e9;

    // One endpoint change in ns-3: the proxies that see it get one EDS
    // response each.
    let before = fleet.call(&Command::Counters).await?.responses[1];
    let want = if with_sidecars {
        proxies / namespaces
    } else {
        proxies
    } as u64;
    let i = 3;
    let tmp = dir.join(".edit.tmp");
    std::fs::write(&tmp, entry(i, namespaces, 7))?;
    let start = now_ns();
    std::fs::rename(&tmp, dir.join(format!("s{i}.yaml")))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let change_ms = loop {
        let got = fleet.call(&Command::Counters).await?.responses[1] - before;
        if got >= want {
            break now_ns().saturating_sub(start) as f64 / 1e6;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("only {got} of {want} proxies got the change in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Pushes to proxies that do not see the host would come in the same
    // generation; a second is ample to count them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let eds_responses = fleet.call(&Command::Counters).await?.responses[1] - before;
    let rss_after_mb = procfs::rss_bytes("self").0 as f64 / 1e6;
    let (_, metrics) = crate::consul::http(meshreg.http, "GET", "/metrics", "").await?;
    let scopes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshreg_xds_scopes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    fleet.exit().await;
    meshreg.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SidecarRow {
        sidecars: with_sidecars,
        services,
        namespaces,
        proxies,
        mode,
        held,
        initial_sync_s,
        rss_before_mb,
        rss_after_mb,
        scopes,
        eds_responses,
        change_ms,
    })
}
