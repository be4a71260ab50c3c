//! What the simulated-Envoy tests of the delta and SotW connections share
//! (`delta/tests.rs`, `sotw/tests.rs`): the random source, the suite's
//! check over a range of seeds, and the debugging aids that run seeds
//! named in the environment. A simulation is `fn(seed, steps)` returning
//! the first disagreement with its trace.

/// One run: `Err` holds the disagreement (first line) and the trace.
pub(crate) type Simulation = fn(u64, usize) -> Result<(), String>;

/// A small deterministic generator (xorshift64).
pub(crate) struct Rng(u64);

impl Rng {
    /// The generator of run `seed` (any seed, zero included).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// Fails with every disagreeing seed of `1..=runs` (and the shortest
/// trace) unless all agree.
pub(crate) fn assert_all_agree(sim: Simulation, runs: u64, steps: usize) {
    let failures: Vec<String> = (1..=runs)
        .filter_map(|seed| sim(seed, steps).err())
        .collect();
    let firsts: Vec<&str> = failures.iter().map(|f| f.lines().next().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} of {runs} runs disagree:\n{}\nthe shortest:\n{}",
        failures.len(),
        firsts.join("\n"),
        failures.iter().min_by_key(|f| f.len()).unwrap()
    );
}

/// The number in environment variable `name`, or `default` if unset.
fn number(name: &str, default: Option<u64>) -> u64 {
    match (std::env::var(name), default) {
        (Ok(v), _) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        (Err(_), Some(d)) => d,
        (Err(_), None) => panic!("set {name}=n"),
    }
}

/// Debugging aid: runs `SEED` (`STEPS` steps, 40 if unset) and panics
/// with its trace if it disagrees; says so if it agrees.
pub(crate) fn one_seed_from_env(sim: Simulation) {
    let (seed, steps) = (number("SEED", None), number("STEPS", Some(40)));
    if let Err(e) = sim(seed, steps as usize) {
        panic!("{e}");
    }
    println!("seed {seed} of {steps} steps agrees");
}

/// Debugging aid: lists the seeds of `1..=SEEDS` (`STEPS` steps each, 40
/// if unset) that disagree, then how many did.
pub(crate) fn many_seeds_from_env(sim: Simulation) {
    let (seeds, steps) = (number("SEEDS", None), number("STEPS", Some(40)));
    let mut failed = 0;
    for seed in 1..=seeds {
        if let Err(e) = sim(seed, steps as usize) {
            println!("FAIL {}", e.lines().next().unwrap());
            failed += 1;
        }
    }
    println!("{failed} of {seeds} seeds of {steps} steps disagree");
}
