//! Issue 11: startup and service-manager integration. The daemon tells
//! systemd (`sd_notify` over `$NOTIFY_SOCKET`) READY=1 once every source
//! has synced and xDS serves it, RELOADING=1 then READY=1 around a SIGHUP,
//! STOPPING=1 on SIGTERM; it logs one line when it is ready; with
//! `--log-format json` every log line is a JSON object.

use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::support::{Daemon, copy_dir, repo};

/// The next notification containing `want`, skipping others.
async fn notification(socket: &UnixDatagram, want: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want} notification in time"))
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == want) {
            return text;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_notified_and_logs_are_json() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let mut daemon = Daemon::start_config_env(
        &Daemon::config_text(&[dir.path()], ""),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
        &["--log-format", "json"],
    )
    .await;
    let ready = notification(&socket, "READY=1").await;
    assert!(
        ready.contains("STATUS=serving 4 services, 6 endpoints from 1 sources"),
        "{ready}"
    );
    // The reload is announced, then readiness again.
    daemon.signal("HUP");
    notification(&socket, "RELOADING=1").await;
    notification(&socket, "READY=1").await;
    daemon.signal("TERM");
    notification(&socket, "STOPPING=1").await;
    crate::support::eventually("the daemon to exit", Duration::from_secs(10), || {
        let exited = !daemon.alive();
        async move { exited.then_some(()) }
    })
    .await;

    // Every line is a JSON object; one says the daemon is ready, with
    // what it serves.
    let log = daemon.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ready = lines
        .iter()
        .find(|l| l["message"] == "every source synced; xDS serving")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(ready["services"], 4, "{ready}");
    assert_eq!(ready["endpoints"], 6, "{ready}");
    assert_eq!(ready["level"], "INFO", "{ready}");
}
