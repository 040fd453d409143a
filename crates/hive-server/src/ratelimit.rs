//! Per-token rate limiting: a token bucket per token id, answered with 429 and `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests per second and burst size per token. A rate of 0 disables limiting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_sec: 200.0,
            burst: 400.0,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket, or says how many whole seconds until one is
    /// available.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), u64> {
        if self.limit.per_sec <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.limit.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.limit.per_sec).min(self.limit.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.limit.per_sec;
            Err(wait.ceil().max(1.0) as u64)
        }
    }

    /// Forgets buckets idle long enough to be full again, so memory tracks active tokens.
    pub fn prune(&self) {
        if self.limit.per_sec <= 0.0 {
            return;
        }
        let refill = Duration::from_secs_f64(self.limit.burst / self.limit.per_sec);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| now.saturating_duration_since(b.updated) < refill);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate() {
        let rl = RateLimiter::new(RateLimit {
            per_sec: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.check_at("a", t0), Ok(()));
        }
        assert_eq!(rl.check_at("a", t0), Err(1));
        // Another token has its own bucket.
        assert_eq!(rl.check_at("b", t0), Ok(()));
        // Half a second later one request is allowed again.
        assert_eq!(rl.check_at("a", t0 + Duration::from_millis(500)), Ok(()));
        assert!(rl.check_at("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn zero_rate_disables() {
        let rl = RateLimiter::new(RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        });
        for _ in 0..10_000 {
            assert!(rl.check("a").is_ok());
        }
        assert_eq!(rl.tracked(), 0);
    }
}
