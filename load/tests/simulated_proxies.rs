//! The simulated proxy as a library (issue 9): an in-process xDS server
//! (registry, generator, ADS) and simulated Envoys over delta and SotW,
//! checked by digest: every proxy holds exactly the snapshot after the
//! initial sync, an endpoint change, a new service and a removal.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshreg_load::proxy::{self, Mode, Phase, Shared, View};
use meshreg_registry::test_util::{contribution, delete, reset, test_source, upsert};
use meshreg_xds::{AdsService, Debounce, Generator, Metrics, Snapshot, TypeUrl};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PER_MODE: usize = 5;

struct Fleet {
    views: Vec<Arc<Mutex<View>>>,
    _phase: watch::Sender<Phase>,
}

fn fleet(xds: SocketAddr, mode: Mode, first_id: usize) -> Fleet {
    let shared = Arc::new(Shared::new(xds, mode));
    let (views, phase) = proxy::spawn(&shared, first_id..first_id + PER_MODE);
    Fleet {
        views,
        _phase: phase,
    }
}

/// Waits until every proxy's view equals the newest snapshot that reflects
/// registry `version`.
async fn converge(
    fleets: &[&Fleet],
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    version: u64,
    what: &str,
) {
    let snap = tokio::time::timeout(
        Duration::from_secs(10),
        snapshots.wait_for(|s| s.is_ready() && s.registry_version() >= version),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no snapshot"))
    .unwrap()
    .clone();
    let want = [
        snap.digest(TypeUrl::Cluster),
        snap.digest(TypeUrl::ClusterLoadAssignment),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let matching = fleets
            .iter()
            .flat_map(|f| f.views.iter())
            .filter(|v| v.lock().unwrap().digest == want)
            .count();
        if matching == fleets.len() * PER_MODE {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {matching} of {} proxies hold the snapshot",
            fleets.len() * PER_MODE
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_envoys_hold_exactly_the_snapshot() {
    let (mut w, reader) = meshreg_registry::new([test_source()]);
    w.apply(reset(
        (0..20)
            .map(|i| contribution(&format!("s{i}.test"), &[&format!("10.0.0.{}", i + 1)]))
            .collect(),
    ));
    let generator = Generator::new();
    let mut snapshots = generator.subscribe();
    let shutdown = CancellationToken::new();
    let metrics = Metrics::unregistered();
    let debounce = Debounce {
        after: Duration::from_millis(5),
        max: Duration::from_millis(20),
    };
    tokio::spawn(meshreg_xds::run_pusher(
        reader,
        generator,
        debounce,
        metrics.clone(),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AdsService::new(snapshots.clone(), metrics, shutdown.clone());
    let token = shutdown.clone();
    tokio::spawn(async move {
        meshreg_xds::serve(service, listener, token.cancelled_owned()).await;
    });

    let delta = fleet(addr, Mode::Delta, 0);
    let sotw = fleet(addr, Mode::Sotw, PER_MODE);
    let both = [&delta, &sotw];
    converge(&both, &mut snapshots, w.view().version(), "initial sync").await;

    w.apply(upsert(contribution("s3.test", &["10.0.1.1", "10.0.1.2"])));
    converge(
        &both,
        &mut snapshots,
        w.view().version(),
        "an endpoint change",
    )
    .await;

    w.apply(upsert(contribution("new.test", &["10.0.2.1"])));
    converge(&both, &mut snapshots, w.view().version(), "a new service").await;

    w.apply(delete("s7.test"));
    converge(&both, &mut snapshots, w.view().version(), "a removal").await;

    for v in both.iter().flat_map(|f| f.views.iter()) {
        let v = v.lock().unwrap();
        assert_eq!(v.errors, 0);
        assert!(!v.held[0].contains_key("outbound|80||s7.test"));
    }
    shutdown.cancel();
}
