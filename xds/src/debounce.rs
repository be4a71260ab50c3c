//! Debouncing registry changes before generating resources, and the push
//! loop that does it.
//!
//! Registry events are batched: a batch is generated once no new event has
//! arrived for `after` (default 100 ms, as Istio), or at the latest `max`
//! after its first event (default 150 ms), so a steady stream of events
//! cannot postpone pushes. Istio's `max` is 10 s because its pushes are
//! expensive; meshreg's are incremental, and steady churn of 100 changes/s
//! converges within about 200 ms (p99, delta) and 280 ms (SotW) only with a
//! short `max` (BENCHMARKS.md, standard profile). Generation happens once
//! per batch, on a blocking thread; every connection then picks up the new
//! snapshot.

use std::time::Duration;

use meshreg_registry::Reader;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::Generator;
use crate::metrics::Metrics;
use crate::resource::TypeUrl;

/// Debounce settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    /// Quiet time after the last event before generating. Zero generates
    /// at once.
    pub after: Duration,
    /// Longest delay from a batch's first event to its generation.
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            after: Duration::from_millis(100),
            max: Duration::from_millis(150),
        }
    }
}

/// The debounce clock of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    first: Instant,
    last: Instant,
}

impl Batch {
    pub(crate) fn start(now: Instant) -> Self {
        Batch {
            first: now,
            last: now,
        }
    }

    pub(crate) fn event(&mut self, now: Instant) {
        self.last = now;
    }

    /// When the batch must be generated.
    pub(crate) fn deadline(&self, d: Debounce) -> Instant {
        (self.last + d.after).min(self.first + d.max)
    }
}

/// Generates a snapshot for every debounced batch of registry changes (on
/// a blocking thread, see [`generate_off_thread`]) until
/// `shutdown` or until the registry is gone. Waits for the registry to be
/// ready first, so no proxy is sent an empty mesh.
pub async fn run(
    mut reader: Reader,
    mut generator: Generator,
    debounce: Debounce,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        ready = reader.wait_until_ready() => if ready.is_none() { return },
    }
    generator = match generate_off_thread(&reader, generator, &metrics, None).await {
        Some(g) => g,
        None => return,
    };
    let scopes = generator.scopes().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            v = reader.changed() => if v.is_none() { return },
            // A stream asked for a scope: generate it now, not after a
            // quiet period.
            _ = scopes.requested() => {
                generator = match generate_off_thread(&reader, generator, &metrics, None).await {
                    Some(g) => g,
                    None => return,
                };
                continue;
            }
        }
        let mut batch = Batch::start(Instant::now());
        loop {
            let deadline = batch.deadline(debounce);
            if deadline <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => break,
                v = reader.changed() => match v {
                    Some(_) => batch.event(Instant::now()),
                    None => return,
                },
            }
        }
        metrics
            .debounce_time
            .observe(batch.first.elapsed().as_secs_f64());
        generator = match generate_off_thread(&reader, generator, &metrics, Some(batch.first)).await
        {
            Some(g) => g,
            None => return,
        };
    }
}

/// Generates on a blocking thread: regenerating thousands of resources is
/// CPU work that must not stall the async workers serving xDS streams.
/// `None` when the runtime is shutting down.
async fn generate_off_thread(
    reader: &Reader,
    mut generator: Generator,
    metrics: &Metrics,
    first_event: Option<Instant>,
) -> Option<Generator> {
    let (reader, metrics) = (reader.clone(), metrics.clone());
    match tokio::task::spawn_blocking(move || {
        generate(&reader, &mut generator, &metrics, first_event);
        generator
    })
    .await
    {
        Ok(g) => Some(g),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

fn generate(
    reader: &Reader,
    generator: &mut Generator,
    metrics: &Metrics,
    first_event: Option<Instant>,
) {
    let started = std::time::Instant::now();
    let view = reader.view();
    let stats = generator.apply(&view);
    let snap = generator.snapshot();
    for (t, n) in stats.triggers.by_type() {
        metrics
            .push_triggers
            .with_label_values(&[t])
            .inc_by(n as u64);
    }
    let proxies = {
        use prometheus::core::Collector;
        metrics
            .connected
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_gauge().get_value())
            .sum::<f64>() as i64
    };
    generator.push_history().record(crate::status::Push {
        at: std::time::SystemTime::now(),
        registry_version: view.version(),
        generation: snap.generation(),
        triggers: stats.triggers,
        clusters_changed: stats.clusters_changed,
        assignments_changed: stats.assignments_changed,
        published: stats.published,
        proxies,
        duration: started.elapsed(),
        since_event: first_event.map(|at| at.elapsed()),
    });
    metrics.services.set(view.service_count() as i64);
    metrics.endpoints.set(view.endpoint_count() as i64);
    metrics.generation.set(snap.generation() as i64);
    metrics.scopes.set(generator.scopes().len() as i64);
    for t in TypeUrl::SERVED {
        metrics
            .resources
            .with_label_values(&[t.short()])
            .set(snap.len(t) as i64);
        metrics
            .invalid
            .with_label_values(&[t.short()])
            .inc_by(stats.invalid[t as usize] as u64);
        metrics
            .internal_errors
            .with_label_values(&[t.short()])
            .inc_by(stats.invalid[t as usize] as u64);
        metrics
            .withheld
            .with_label_values(&[t.short()])
            .set(generator.withheld(t) as i64);
    }
    tracing::debug!(
        registry_version = view.version(),
        generation = snap.generation(),
        clusters_changed = stats.clusters_changed,
        assignments_changed = stats.assignments_changed,
        "generated"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::test_util::{contribution, test_source};
    use meshreg_registry::{Update, new};

    const D: Debounce = Debounce {
        after: Duration::from_millis(100),
        max: Duration::from_millis(1000),
    };

    #[test]
    fn quiet_period_and_max_delay() {
        let t0 = Instant::now();
        let mut b = Batch::start(t0);
        assert_eq!(b.deadline(D), t0 + Duration::from_millis(100));
        b.event(t0 + Duration::from_millis(50));
        assert_eq!(b.deadline(D), t0 + Duration::from_millis(150));
        // Events every 50 ms cannot push it past `max`.
        b.event(t0 + Duration::from_millis(950));
        assert_eq!(b.deadline(D), t0 + Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn batches_changes_into_one_generation() {
        let (mut w, r) = new([test_source()]);
        let generator = Generator::new();
        let mut snaps = generator.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            r,
            generator,
            D,
            Metrics::unregistered(),
            shutdown.clone(),
        ));
        w.apply(meshreg_registry::test_util::reset_of(
            test_source(),
            vec![contribution("a.test", &["10.0.0.1"])],
        ));
        snaps.changed().await.unwrap();
        let first = snaps.borrow_and_update().generation();
        assert!(snaps.borrow().is_ready());
        let start = Instant::now();
        for i in 2..6 {
            let ip = format!("10.0.0.{i}");
            w.apply(Update::contribution(
                test_source(),
                contribution("a.test", &[&ip]),
            ));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        snaps.changed().await.unwrap();
        let snap = snaps.borrow_and_update().clone();
        assert_eq!(snap.generation(), first + 1, "four changes, one generation");
        // Events at 0, 30, 60 and 90 ms; 100 ms of quiet after the last.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_millis(200),
            "{waited:?}"
        );
        shutdown.cancel();
        task.await.unwrap();
    }
}
