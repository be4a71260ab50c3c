//! Issue 9: SIGHUP reloads the config's sources without a restart, an
//! invalid new config is reported and the running one kept, and SIGUSR1
//! no longer kills the daemon.

use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, repo};

const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const EXTRA: &str = "outbound|80||extra.example.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_sources() {
    let bookinfo = copy_dir(&repo().join("examples/bookinfo/config"));
    let extra = tempfile::tempdir().unwrap();
    std::fs::write(
        extra.path().join("extra.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: extra, namespace: default}\n\
         spec:\n  hosts: [extra.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 127.0.0.61}]\n",
    )
    .unwrap();
    let mut daemon = Daemon::start_config(&Daemon::config_text(&[bookinfo.path()], "")).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "reload", &[]).await;
    eventually("bookinfo", Duration::from_secs(20), || async {
        envoy.clusters().await.contains(REVIEWS).then_some(())
    })
    .await;

    // Add a source.
    let both = Daemon::config_text(&[bookinfo.path(), extra.path()], "");
    std::fs::write(daemon.config_path(), both).unwrap();
    daemon.signal("HUP");
    eventually(
        "the new source's cluster",
        Duration::from_secs(10),
        || async { (envoy.hosts(EXTRA).await.len() == 1).then_some(()) },
    )
    .await;
    assert!(envoy.clusters().await.contains(REVIEWS));

    // SIGUSR1 is logged, not fatal.
    daemon.signal("USR1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.alive(), "SIGUSR1 killed the daemon");

    // Remove the first source: its clusters go, the other stays.
    std::fs::write(
        daemon.config_path(),
        Daemon::config_text(&[extra.path()], ""),
    )
    .unwrap();
    daemon.signal("HUP");
    eventually("bookinfo to go", Duration::from_secs(10), || async {
        let c = envoy.clusters().await;
        (!c.contains(REVIEWS) && c.contains(EXTRA)).then_some(())
    })
    .await;
    let ready = crate::support::http_get(daemon.http, "/ready", "meshreg")
        .await
        .unwrap();
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert!(
        !ready.1.contains(&bookinfo.path().display().to_string()),
        "the removed source is forgotten:\n{}",
        ready.1
    );

    // An invalid config changes nothing.
    std::fs::write(daemon.config_path(), "sources: [").unwrap();
    daemon.signal("HUP");
    eventually(
        "the reload error in the log",
        Duration::from_secs(5),
        || async {
            daemon
                .log()
                .contains("keeping the running one")
                .then_some(())
        },
    )
    .await;
    assert!(daemon.alive());
    assert_eq!(envoy.hosts(EXTRA).await.len(), 1);
}
