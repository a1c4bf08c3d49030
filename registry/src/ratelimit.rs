//! Per-key token buckets (guest attribute writes per VM). In memory and per replica: a
//! limit on how fast one guest can make its host write to the registry, not a quota.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept before idle (full) ones are dropped.
const MAX_TRACKED: usize = 10_000;

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token if there is one at `now`. Pure arithmetic on the bucket.
    pub fn take(&mut self, now: Instant, per_sec: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant, per_sec: f64, burst: u32) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_sec
            >= f64::from(burst)
    }
}

/// Buckets by key.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_sec` sustained, `burst` at once, per key.
    pub fn new(per_sec: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` may act now (and counts it).
    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            let (rate, burst) = (self.per_sec, self.burst);
            map.retain(|_, b| !b.is_full(now, rate, burst));
        }
        map.entry(key.to_string())
            .or_insert_with(|| Bucket::full(self.burst, now))
            .take(now, self.per_sec, self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3, t0);
        assert!((0..3).all(|_| b.take(t0, 2.0, 3)));
        assert!(!b.take(t0, 2.0, 3), "burst spent");
        assert!(!b.take(t0 + Duration::from_millis(400), 2.0, 3));
        assert!(b.take(t0 + Duration::from_millis(600), 2.0, 3), "refilled");
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.take(later, 2.0, 3)));
        assert!(!b.take(later, 2.0, 3));
    }

    #[test]
    fn keys_are_independent() {
        let l = RateLimiter::new(0.001, 2);
        assert!(l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"));
    }
}
