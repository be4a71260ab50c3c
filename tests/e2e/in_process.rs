//! The daemon as a library (issue 9): [`meshreg::App`] run in this
//! process, with a real Envoy, and stopped cleanly by its token.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, http_get, repo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_runs_in_process_and_stops_on_its_token() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("meshreg.yaml");
    std::fs::write(&path, Daemon::config_text(&[dir.path()], "")).unwrap();
    let config = meshreg::Config::load(Some(&path)).unwrap();
    let app = meshreg::App::bind(config, Some(path)).await.unwrap();
    let (xds, http) = (app.xds_addr(), app.http_addr());
    let shutdown = CancellationToken::new();
    let (_reload_tx, reload_rx) = mpsc::channel(1);
    let running = tokio::spawn(app.run(shutdown.clone(), reload_rx));

    let envoy = Envoy::start(xds, Ads::Delta, "in-process", &[]).await;
    eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
        (envoy.endpoints().await.len() == 6).then_some(())
    })
    .await;
    let (status, body) = http_get(http, "/ready", "meshreg").await.unwrap();
    assert_eq!(status, 200, "{body}");

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the app stops within its grace period")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
