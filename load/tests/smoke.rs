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
