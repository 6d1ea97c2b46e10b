//! Slows down password guessing: counts failed logins per client IP address
//! and tells callers how long to delay their next authentication reply to
//! that address. Must not lock anyone out, and must not slow down addresses
//! that have not failed: a legitimate user elsewhere is never affected.
//!
//! Pure bookkeeping: the caller passes the time in, and does the waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins of one address in its current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    window_started: Instant,
    count: u32,
}

/// Failed-login counts per address, bounded in size.
#[derive(Debug)]
pub struct LoginThrottle {
    failures_max: u32,
    window: Duration,
    delay: Duration,
    addresses_max: usize,
    by_address: Mutex<HashMap<IpAddr, Failures>>,
}

impl LoginThrottle {
    /// After `failures_max` failures from one address within `window`, each
    /// further authentication reply to it waits `delay`, until the window
    /// passes. At most `addresses_max` addresses are remembered.
    pub fn new(
        failures_max: u32,
        window: Duration,
        delay: Duration,
        addresses_max: usize,
    ) -> LoginThrottle {
        LoginThrottle {
            failures_max,
            window,
            delay,
            addresses_max,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// How long to wait before answering an authentication attempt from `ip`.
    pub fn delay_for(&self, ip: IpAddr, now: Instant) -> Duration {
        let by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        match by_address.get(&ip) {
            Some(f)
                if f.count >= self.failures_max
                    && now.saturating_duration_since(f.window_started) < self.window =>
            {
                self.delay
            }
            _ => Duration::ZERO,
        }
    }

    /// Records a failed login from `ip`; returns the failures in its window.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if !by_address.contains_key(&ip) && by_address.len() >= self.addresses_max {
            let window = self.window;
            by_address.retain(|_, f| now.saturating_duration_since(f.window_started) < window);
            if by_address.len() >= self.addresses_max
                && let Some(oldest) = by_address
                    .iter()
                    .min_by_key(|(_, f)| f.window_started)
                    .map(|(ip, _)| *ip)
            {
                by_address.remove(&oldest);
            }
        }
        let entry = by_address.entry(ip).or_insert(Failures {
            window_started: now,
            count: 0,
        });
        if now.saturating_duration_since(entry.window_started) >= self.window {
            *entry = Failures {
                window_started: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
        entry.count
    }

    /// Addresses currently remembered.
    pub fn n_addresses(&self) -> usize {
        self.by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn delays_only_the_failing_address_and_only_within_the_window() {
        // Goal: the (max+1)th attempt from a failing address waits; others and later attempts do not.
        let throttle = LoginThrottle::new(3, Duration::from_secs(60), Duration::from_secs(2), 100);
        let t0 = Instant::now();
        for n in 1..=3 {
            assert_eq!(throttle.delay_for(ip(1), t0), Duration::ZERO, "attempt {n}");
            assert_eq!(throttle.record_failure(ip(1), t0), n);
        }
        assert_eq!(throttle.delay_for(ip(1), t0), Duration::from_secs(2));
        assert_eq!(throttle.delay_for(ip(2), t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(throttle.delay_for(ip(1), later), Duration::ZERO);
        assert_eq!(throttle.record_failure(ip(1), later), 1, "a new window");
    }

    #[test]
    fn remembers_a_bounded_number_of_addresses() {
        // Goal: a flood of distinct addresses never grows the table past its bound.
        let throttle = LoginThrottle::new(1, Duration::from_secs(60), Duration::from_secs(1), 8);
        let t0 = Instant::now();
        for last in 0..=255u8 {
            throttle.record_failure(ip(last), t0 + Duration::from_millis(u64::from(last)));
        }
        assert_eq!(throttle.n_addresses(), 8);
        assert_eq!(
            throttle.delay_for(ip(255), t0 + Duration::from_secs(1)),
            Duration::from_secs(1),
            "the newest address is kept"
        );
    }
}
