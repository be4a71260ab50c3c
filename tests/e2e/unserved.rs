//! Issue 14, item 5: a proxy that asks over ADS for a type meshreg does not
//! generate (a standard sidecar bootstrap asks for LDS) gets an empty
//! response at once, so it does not wait for its init-fetch timeout, and
//! meshreg says so once at info.

use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, repo};

#[tokio::test]
async fn an_envoy_asking_for_lds_goes_live_without_waiting() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    for ads in [Ads::Delta, Ads::Sotw] {
        // With a 60 s init-fetch timeout, Envoy stays INITIALIZING for a
        // minute unless its LDS request is answered.
        let envoy = Envoy::start_dynamic(
            daemon.xds,
            ads,
            &format!("{{id: \"lds-{ads:?}\", cluster: e2e}}"),
            &[],
            "  lds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 60s}",
        )
        .await;
        eventually("Envoy LIVE", Duration::from_secs(20), || async {
            envoy
                .admin("/server_info")
                .await
                .contains("\"state\": \"LIVE\"")
                .then_some(())
        })
        .await;
        // It got its clusters too.
        eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
            (envoy.endpoints().await.len() == 6).then_some(())
        })
        .await;
    }
    let log = daemon.log();
    let said = log
        .lines()
        .filter(|l| l.contains("does not serve") && l.contains("envoy.config.listener.v3.Listener"))
        .count();
    assert_eq!(said, 2, "once per stream: {log}");
}
