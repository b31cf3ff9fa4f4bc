//! `/login` rate limiting: after `http.login_max_failures` failed sign-ins from one client
//! address within `http.login_window_secs`, that address gets 429 with Retry-After for
//! `http.login_lockout_secs`, whatever it sends (so guessing tokens through the form costs
//! time). A success clears the address's count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; past this, entries whose window and lockout are over are
/// forgotten, then the oldest (a flood of addresses must not grow memory without bound).
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Default)]
struct Entry {
    /// Start of the window the failures count in.
    since: Option<Instant>,
    failures: u32,
    locked_until: Option<Instant>,
}

impl Entry {
    fn stale(&self, now: Instant, window: Duration) -> bool {
        let locked = self.locked_until.is_some_and(|t| t > now);
        let counting = self.since.is_some_and(|t| now.duration_since(t) < window);
        !locked && !counting
    }
}

/// Failed sign-ins by client address.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl LoginLimiter {
    /// `max_failures` 0: no limit.
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> LoginLimiter {
        LoginLimiter {
            max_failures,
            window,
            lockout,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        self.max_failures > 0 && !self.lockout.is_zero()
    }

    /// `Err(wait)` while `addr` is locked out.
    pub fn check(&self, addr: IpAddr) -> Result<(), Duration> {
        self.check_at(addr, Instant::now())
    }

    fn check_at(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let Ok(entries) = self.entries.lock() else {
            return Ok(());
        };
        match entries.get(&addr).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// A failed sign-in from `addr`; `true` when it starts a lockout.
    pub fn failed(&self, addr: IpAddr) -> bool {
        self.failed_at(addr, Instant::now())
    }

    fn failed_at(&self, addr: IpAddr, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return false;
        };
        if entries.len() >= MAX_ADDRESSES && !entries.contains_key(&addr) {
            self.make_room(&mut entries, now);
        }
        let entry = entries.entry(addr).or_default();
        if entry
            .since
            .is_none_or(|t| now.duration_since(t) >= self.window)
        {
            entry.since = Some(now);
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry.failures < self.max_failures {
            return false;
        }
        entry.locked_until = Some(now + self.lockout);
        entry.since = None;
        entry.failures = 0;
        true
    }

    /// A successful sign-in: the address starts afresh.
    pub fn succeeded(&self, addr: IpAddr) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&addr);
        }
    }

    fn make_room(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        entries.retain(|_, e| !e.stale(now, self.window));
        if entries.len() < MAX_ADDRESSES {
            return;
        }
        let oldest = entries
            .iter()
            .min_by_key(|(_, e)| e.since.or(e.locked_until))
            .map(|(a, _)| *a);
        if let Some(a) = oldest {
            entries.remove(&a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn limiter() -> LoginLimiter {
        LoginLimiter::new(3, Duration::from_secs(60), Duration::from_secs(30))
    }

    #[test]
    fn the_nth_failure_locks_the_address_out_for_a_while() {
        let l = limiter();
        let t0 = Instant::now();
        assert!(!l.failed_at(A, t0));
        assert!(!l.failed_at(A, t0));
        assert!(l.failed_at(A, t0 + Duration::from_secs(1)));
        let wait = l.check_at(A, t0 + Duration::from_secs(11)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert!(l.check_at(B, t0).is_ok(), "another address is not affected");
        assert!(l.check_at(A, t0 + Duration::from_secs(32)).is_ok());
    }

    #[test]
    fn failures_outside_the_window_and_successes_start_afresh() {
        let l = limiter();
        let t0 = Instant::now();
        l.failed_at(A, t0);
        l.failed_at(A, t0);
        assert!(!l.failed_at(A, t0 + Duration::from_secs(61)));
        l.succeeded(A);
        assert!(!l.failed_at(A, t0 + Duration::from_secs(62)));
        assert!(!l.failed_at(A, t0 + Duration::from_secs(62)));
        let off = LoginLimiter::new(0, Duration::from_secs(60), Duration::from_secs(30));
        for _ in 0..10 {
            assert!(!off.failed_at(A, t0));
        }
        assert!(off.check_at(A, t0).is_ok());
    }
}
