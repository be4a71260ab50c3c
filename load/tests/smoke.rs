//! The `small` benchmark profile as a smoke test: it checks correctness
//! only (every proxy synced, every change arrived in order, every view
//! equal to the registry, delta reconnects resent only what changed), over
//! delta and SotW. No timing is asserted; timings live in BENCHMARKS.md.

use std::process::Command;

#[test]
fn small_profile_is_correct_over_delta_and_sotw() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshreg-load"))
        .args(["run", "--profile", "small", "--mode", "both", "--check"])
        .args(["--churn-seconds", "1", "--churn-rates", "10,100"])
        .output()
        .expect("run meshreg-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshreg-load failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all correctness checks passed"), "{stdout}");
    // Every scenario ran in both modes.
    for scenario in [
        "initial sync",
        "churn 10/s",
        "churn 100/s",
        "service add+remove",
        "burst",
        "reconnect storm",
        "one proxy NACKs",
    ] {
        for mode in ["delta", "sotw"] {
            assert!(
                stdout.contains(&format!("| {scenario} | {mode} |")),
                "{scenario} over {mode} missing:\n{stdout}"
            );
        }
    }
}

/// A peer scripts/peers.sh builds: from `$<var>`, else `target/peers.env`.
fn peer(var: &str) -> String {
    if let Ok(bin) = std::env::var(var) {
        return bin;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_string());
    let env = std::fs::read_to_string(format!("{target}/peers.env")).unwrap_or_default();
    env.lines()
        .find_map(|l| l.strip_prefix(var)?.strip_prefix('='))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!("{var} is not built: run scripts/peers.sh (scripts/test.sh does)")
        })
}

fn go_control_plane() -> String {
    peer("MESHREG_PEER_GO_CONTROL_PLANE")
}

#[test]
fn the_consul_benchmark_runs_against_a_real_agent() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshreg-load"))
        .args([
            "consul",
            "--services",
            "20",
            "--proxies",
            "10",
            "--flips",
            "3",
        ])
        .args([
            "--idle-seconds",
            "1",
            "--peer",
            &peer("MESHREG_PEER_CONSUL"),
        ])
        .output()
        .expect("run meshreg-load consul");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshreg-load consul failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("| Consul v") && l.contains("| 20 | Delta | 10 |")),
        "{stdout}"
    );
}

#[test]
fn compare_runs_meshreg_and_go_control_plane_side_by_side() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshreg-load"))
        .args([
            "compare",
            "--profile",
            "small",
            "--proxies",
            "20",
            "--mode",
            "both",
        ])
        .args(["--churn-seconds", "1", "--peer", &go_control_plane()])
        .output()
        .expect("run meshreg-load compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshreg-load compare failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for server in [
        "meshreg",
        "go-control-plane linear",
        "go-control-plane snapshot",
    ] {
        for mode in ["delta", "sotw"] {
            for scenario in ["initial sync", "churn 10/s"] {
                assert!(
                    stdout
                        .lines()
                        .any(|l| l.starts_with(&format!("| {scenario} | {mode} |"))
                            && l.contains(&format!("| {server}"))),
                    "{scenario} over {mode} against {server} missing:\n{stdout}"
                );
            }
        }
    }
    // One ratio line per peer, scenario and mode.
    assert_eq!(
        stdout.lines().filter(|l| l.contains("/ meshreg:")).count(),
        2 * 2 * 2,
        "{stdout}"
    );
}

#[test]
fn the_kubernetes_benchmark_runs_both_sources() {
    // 200 × 3 pods: more than a 500-item page, so the Pod list is paged.
    let out = Command::new(env!("CARGO_BIN_EXE_meshreg-load"))
        .args(["kubernetes", "--services", "200", "--pods", "3"])
        .args(["--proxies", "10", "--flips", "3"])
        .output()
        .expect("run meshreg-load kubernetes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshreg-load kubernetes failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for source in ["kubernetes", "serviceentry"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {source} | 200 × 3 | Delta | 10 |"))),
            "{stdout}"
        );
    }
}
