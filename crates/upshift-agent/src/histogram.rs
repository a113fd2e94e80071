//! What the proxy counts of each upstream on the request path, without a lock: requests,
//! errors and a latency histogram with fixed buckets, in atomic counters sharded per proxy
//! worker thread (each on its own cache line, so the workers never write the same one).
//!
//! The counters only grow. A window (since the route changed, or the latest requests) is
//! read as the difference of two [`Counts`] snapshots, so readers never reset what the
//! request path writes.
//!
//! The buckets are log-linear: 22 per decade from 10 µs to 1000 s (each at most 15 %
//! wider than the last), so a quantile read from them is within that of the exact one. Their
//! bounds include Prometheus's usual ones (1, 2.5 and 5 times a power of ten), which the
//! metrics export.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The first bound of each step within a decade, in tenths.
const MANTISSAS: [u64; 22] = [10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 25, 28, 32, 36, 40, 45, 50, 56, 63, 71, 80, 90];
/// Decades from 10 µs (10^4 ns) up to 1000 s.
const DECADES: usize = 8;
/// Upper bounds of the buckets in nanoseconds (a latency `v` goes to the first bucket with
/// `v <= bound`); one more bucket past the last holds the rest.
pub(crate) const BOUNDS_NS: [u64; DECADES * MANTISSAS.len() + 1] = bounds();
/// Buckets: one per bound and the overflow.
pub(crate) const BUCKETS: usize = BOUNDS_NS.len() + 1;
/// Shards: the proxy's workers take one each (modulo this); others share the first.
pub(crate) const SHARDS: usize = 8;

const fn bounds() -> [u64; DECADES * MANTISSAS.len() + 1] {
    let mut out = [0; DECADES * MANTISSAS.len() + 1];
    let mut decade = 0;
    // 10 µs in tenths of nanoseconds.
    let mut scale: u64 = 10_000 / 10;
    while decade < DECADES {
        let mut step = 0;
        while step < MANTISSAS.len() {
            out[decade * MANTISSAS.len() + step] = MANTISSAS[step] * scale;
            step += 1;
        }
        scale *= 10;
        decade += 1;
    }
    out[DECADES * MANTISSAS.len()] = 10 * scale;
    out
}

thread_local! {
    /// This thread's shard: its worker number, set when a proxy worker starts.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread write to shard `worker` (modulo [`SHARDS`]).
pub(crate) fn set_worker(worker: usize) {
    SHARD.with(|s| s.set(worker % SHARDS));
}

/// This thread's shard (0 outside the proxy's workers).
pub(crate) fn worker() -> usize {
    SHARD.with(Cell::get)
}

/// The bucket of a latency.
fn bucket(latency: Duration) -> usize {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    BOUNDS_NS.partition_point(|&bound| bound < ns)
}

/// One worker's counters, alone on its cache lines.
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    errors: AtomicU64,
}

/// Requests, errors and latencies of one upstream since it joined the route.
pub(crate) struct Histogram {
    shards: Box<[Shard]>,
}

impl Histogram {
    pub(crate) fn new() -> Histogram {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            })
            .collect();
        Histogram { shards }
    }

    /// Counts one request: its latency, and whether it failed. No lock, no allocation.
    pub(crate) fn record(&self, latency: Duration, error: bool) {
        let shard = &self.shards[worker()];
        shard.buckets[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if error {
            shard.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What was counted so far, all shards together.
    pub(crate) fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for shard in &*self.shards {
            for (total, bucket) in counts.buckets.iter_mut().zip(&shard.buckets) {
                *total += bucket.load(Ordering::Relaxed);
            }
            counts.sum_ns += shard.sum_ns.load(Ordering::Relaxed);
            counts.errors += shard.errors.load(Ordering::Relaxed);
        }
        counts
    }
}

/// A snapshot of a [`Histogram`], or the difference of two, or the sum of several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) buckets: [u64; BUCKETS],
    pub(crate) sum_ns: u64,
    pub(crate) errors: u64,
}

impl Default for Counts {
    fn default() -> Counts {
        Counts { buckets: [0; BUCKETS], sum_ns: 0, errors: 0 }
    }
}

impl Counts {
    /// Requests counted (each has a latency).
    pub(crate) fn requests(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// What was counted since `earlier` (a snapshot of the same histogram).
    pub(crate) fn since(&self, earlier: &Counts) -> Counts {
        let mut out = self.clone();
        for (bucket, before) in out.buckets.iter_mut().zip(&earlier.buckets) {
            *bucket = bucket.saturating_sub(*before);
        }
        out.sum_ns = out.sum_ns.saturating_sub(earlier.sum_ns);
        out.errors = out.errors.saturating_sub(earlier.errors);
        out
    }

    /// Adds `other`'s counts to these.
    pub(crate) fn add(&mut self, other: &Counts) {
        for (bucket, more) in self.buckets.iter_mut().zip(&other.buckets) {
            *bucket += more;
        }
        self.sum_ns += other.sum_ns;
        self.errors += other.errors;
    }

    /// The `q` quantile (0 < q <= 1) in milliseconds: the bucket that holds the
    /// `ceil(q * n)`-th latency, interpolated linearly inside it (as Prometheus's
    /// `histogram_quantile` does). None without requests.
    #[allow(clippy::cast_precision_loss)]
    pub(crate) fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.requests();
        if total == 0 {
            return None;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut below = 0;
        for (index, &count) in self.buckets.iter().enumerate() {
            if below + count >= rank {
                let lower = if index == 0 { 0 } else { BOUNDS_NS[index - 1] };
                // The overflow bucket has no upper bound: its lower one is all that is known.
                let upper = BOUNDS_NS.get(index).copied().unwrap_or(lower);
                let ns = lower as f64 + (upper - lower) as f64 * (rank - below) as f64 / count as f64;
                return Some(ns / 1_000_000.0);
            }
            below += count;
        }
        None
    }

    /// Cumulative counts at the bounds of `le_ns` (each one of [`BOUNDS_NS`]), for the
    /// Prometheus `_bucket` series; the `+Inf` one is [`Counts::requests`].
    pub(crate) fn cumulative(&self, le_ns: &[u64]) -> Vec<u64> {
        le_ns
            .iter()
            .map(|&le| {
                let last = BOUNDS_NS.partition_point(|&bound| bound <= le);
                self.buckets[..last].iter().sum()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_grow_and_hold_the_usual_prometheus_ones() {
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1] && w[1] * 100 <= w[0] * 115), "{BOUNDS_NS:?}");
        for le in [1_000_000, 2_500_000, 5_000_000, 10_000_000, 250_000_000, 1_000_000_000, 10_000_000_000] {
            assert!(BOUNDS_NS.contains(&le), "{le}");
        }
        assert_eq!((BOUNDS_NS[0], *BOUNDS_NS.last().unwrap()), (10_000, 1_000_000_000_000));
    }

    #[test]
    fn a_latency_goes_to_the_first_bucket_whose_bound_holds_it() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_micros(10)), 0);
        assert_eq!(bucket(Duration::from_nanos(10_001)), 1);
        assert_eq!(BOUNDS_NS[bucket(Duration::from_millis(10))], 10_000_000);
        assert_eq!(bucket(Duration::from_secs(5000)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_windows_and_sums() {
        let histogram = Histogram::new();
        for ms in 1..=10 {
            histogram.record(Duration::from_millis(ms), ms > 8);
        }
        let first = histogram.counts();
        assert_eq!((first.requests(), first.errors, first.sum_ns), (10, 2, 55_000_000));
        assert_eq!(first.quantile_ms(0.99), Some(10.0));
        assert_eq!(first.quantile_ms(0.5), Some(5.0));
        set_worker(3);
        for _ in 0..100 {
            histogram.record(Duration::from_micros(200), false);
        }
        let window = histogram.counts().since(&first);
        assert_eq!((window.requests(), window.errors), (100, 0));
        assert!((window.quantile_ms(0.99).unwrap() - 0.2).abs() < 0.001, "{window:?}");
        let mut both = first.clone();
        both.add(&window);
        assert_eq!(both, histogram.counts());
        assert_eq!(both.cumulative(&[1_000_000, 5_000_000]), [101, 105]);
        assert_eq!(Counts::default().quantile_ms(0.99), None);
    }
}
