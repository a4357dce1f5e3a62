//! Per-token rate (token bucket) and concurrency limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Why a request was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate; retry after this many whole seconds (at least 1).
    Rate {
        /// Seconds until a token is available.
        retry_after: u64,
    },
    /// Too many requests of this token in flight.
    Concurrency,
}

/// Limits shared by every listener.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    concurrency: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// Most keys tracked; past it idle full buckets are dropped.
const MAX_KEYS: usize = 100_000;

/// Holds one concurrency slot until dropped.
#[derive(Debug)]
pub struct Permit {
    counter: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    /// `rate` requests a second with bursts of `burst`, `concurrency` in flight, per key.
    /// A rate of 0 disables rate limiting.
    pub fn new(rate: f64, burst: u32, concurrency: usize) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            concurrency: concurrency.max(1),
            buckets: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request's worth of rate and a concurrency slot for `key`.
    pub fn admit(&self, key: &str) -> Result<Permit, Refusal> {
        self.take(key, Instant::now())?;
        let counter = {
            let mut map = self.in_flight.lock().map_err(|_| Refusal::Concurrency)?;
            match map.get(key) {
                Some(c) => c.clone(),
                None => {
                    if map.len() >= MAX_KEYS {
                        map.retain(|_, c| Arc::strong_count(c) > 1);
                    }
                    map.entry(key.to_owned()).or_default().clone()
                }
            }
        };
        let before = counter.fetch_add(1, Ordering::AcqRel);
        let permit = Permit { counter };
        if before >= self.concurrency {
            return Err(Refusal::Concurrency);
        }
        Ok(permit)
    }

    fn take(&self, key: &str, now: Instant) -> Result<(), Refusal> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().map_err(|_| Refusal::Rate { retry_after: 1 })?;
        if buckets.len() >= MAX_KEYS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        // Look up before inserting: the hot path must not allocate the key.
        if !buckets.contains_key(key) {
            buckets.insert(key.to_owned(), Bucket { tokens: self.burst, last: now });
        }
        let Some(bucket) = buckets.get_mut(key) else { return Err(Refusal::Rate { retry_after: 1 }) };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate);
            Err(Refusal::Rate { retry_after: wait.as_secs_f64().ceil().max(1.0) as u64 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses_then_refills() {
        let limiter = Limiter::new(2.0, 3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take("a", t0), Ok(()));
        }
        assert_eq!(limiter.take("a", t0), Err(Refusal::Rate { retry_after: 1 }));
        // Another key has its own bucket.
        assert_eq!(limiter.take("b", t0), Ok(()));
        // Half a second at 2/s refills one token.
        assert_eq!(limiter.take("a", t0 + Duration::from_millis(500)), Ok(()));
        assert!(limiter.take("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn slow_rates_ask_for_longer_waits() {
        let limiter = Limiter::new(0.1, 1, 100);
        let t0 = Instant::now();
        assert_eq!(limiter.take("a", t0), Ok(()));
        assert_eq!(limiter.take("a", t0), Err(Refusal::Rate { retry_after: 10 }));
    }

    #[test]
    fn concurrency_slots_are_released_on_drop() {
        let limiter = Limiter::new(0.0, 1, 2);
        let a = limiter.admit("k").unwrap();
        let _b = limiter.admit("k").unwrap();
        assert_eq!(limiter.admit("k").unwrap_err(), Refusal::Concurrency);
        drop(a);
        assert!(limiter.admit("k").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(steps in proptest::collection::vec(0u64..400, 1..200)) {
            let limiter = Limiter::new(5.0, 4, 1);
            let t0 = Instant::now();
            let mut at = 0u64;
            let mut admitted = 0u64;
            for step in steps {
                at += step;
                if limiter.take("k", t0 + Duration::from_millis(at)).is_ok() {
                    admitted += 1;
                }
            }
            // 4 saved up plus 5 per second elapsed.
            proptest::prop_assert!(admitted as f64 <= 4.0 + 5.0 * at as f64 / 1000.0 + 1e-9);
        }
    }
}
