//! The bookinfo example reaches Envoy over delta and SotW ADS with exactly
//! the endpoints in the files, and no cluster is left warming.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, eventually, repo};

fn expected() -> BTreeSet<(String, String)> {
    [
        ("productpage", "127.0.0.11"),
        ("details", "127.0.0.12"),
        ("reviews", "127.0.0.13"),
        ("reviews", "127.0.0.14"),
        ("reviews", "127.0.0.15"),
        ("ratings", "127.0.0.16"),
    ]
    .iter()
    .map(|(svc, ip)| {
        (
            format!("outbound|9080||{svc}.default.svc.cluster.local"),
            format!("{ip}:9080"),
        )
    })
    .collect()
}

async fn bookinfo_over(ads: Ads) {
    let daemon = Daemon::start(&repo().join("examples/bookinfo/config")).await;
    let envoy = Envoy::start(daemon.xds, ads, &format!("bookinfo-{ads:?}"), &[]).await;
    let want = expected();
    let got = eventually(
        "Envoy to hold bookinfo's endpoints",
        Duration::from_secs(20),
        || async {
            let got = envoy.endpoints().await;
            (got == want).then_some(got)
        },
    )
    .await;
    assert_eq!(got, want);
    assert_eq!(envoy.warming_clusters().await, 0, "{}", envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_over_delta_ads() {
    bookinfo_over(Ads::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_over_sotw_ads() {
    bookinfo_over(Ads::Sotw).await;
}
