//! What this process did lately: accepted requests, completed and dead-lettered entries,
//! counted in 10-second buckets over the last hour, for the console's overview.
//!
//! Prometheus has the same counters, but the console must answer without one; a ring of
//! 360 buckets is a few kilobytes and needs no scrape. The counts are this process's own
//! (a listener counts what it accepted, a worker what it completed or dead-lettered), since
//! the process started; in tests, every app in the test binary shares them.

use std::sync::Mutex;

use crate::clock::now_millis;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An ensure request queued (answered 200, 202 or 500).
    Accepted = 0,
    /// An entry stored, published and acknowledged.
    Completed = 1,
    /// An entry moved to the dead letters.
    Failed = 2,
}

const BUCKET_MS: u64 = 10_000;
const BUCKETS: usize = 360;

/// Counts per bucket: `(bucket number since the epoch, [accepted, completed, failed])`.
pub struct Rates {
    ring: Mutex<[(u64, [u64; 3]); BUCKETS]>,
}

/// Counts over the last minute and the last hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub minute: [u64; 3],
    pub hour: [u64; 3],
}

impl Window {
    pub fn minute(&self, event: Event) -> u64 {
        self.minute[event as usize]
    }

    pub fn hour(&self, event: Event) -> u64 {
        self.hour[event as usize]
    }
}

static PROCESS: Rates = Rates::new();

/// The process's counts.
pub fn process() -> &'static Rates {
    &PROCESS
}

/// Counts `n` events of this kind now, in the process's counts.
pub fn record(event: Event, n: u64) {
    PROCESS.record_at(event, n, now_millis());
}

impl Rates {
    pub const fn new() -> Self {
        Self {
            ring: Mutex::new([(0, [0; 3]); BUCKETS]),
        }
    }

    pub fn record_at(&self, event: Event, n: u64, now_ms: u64) {
        if n == 0 {
            return;
        }
        let bucket = now_ms / BUCKET_MS;
        // A poisoned lock only means a panic elsewhere mid-update: counts are still usable.
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut ring[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, [0; 3]);
        }
        slot.1[event as usize] += n;
    }

    /// The last minute is the current bucket and the five before it (50 to 60 s); the last
    /// hour all 360.
    pub fn window_at(&self, now_ms: u64) -> Window {
        let now = now_ms / BUCKET_MS;
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut window = Window::default();
        for (bucket, counts) in ring.iter() {
            if *bucket > now || now - bucket >= BUCKETS as u64 {
                continue;
            }
            for (i, count) in counts.iter().enumerate() {
                window.hour[i] += count;
                if now - bucket < 6 {
                    window.minute[i] += count;
                }
            }
        }
        window
    }

    pub fn window(&self) -> Window {
        self.window_at(now_millis())
    }
}

impl Default for Rates {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fall_out_of_the_minute_then_the_hour() {
        let rates = Rates::new();
        let t0 = 1_700_000_000_000;
        rates.record_at(Event::Accepted, 2, t0);
        rates.record_at(Event::Completed, 1, t0 + 1_000);
        rates.record_at(Event::Failed, 1, t0 + 30_000);
        let w = rates.window_at(t0 + 30_000);
        assert_eq!(w.minute, [2, 1, 1]);
        assert_eq!(w.hour, [2, 1, 1]);
        let w = rates.window_at(t0 + 120_000);
        assert_eq!(w.minute, [0, 0, 0]);
        assert_eq!(w.hour, [2, 1, 1]);
        // A bucket reused an hour later starts from zero.
        rates.record_at(Event::Accepted, 5, t0 + 3_600_000);
        let w = rates.window_at(t0 + 3_600_000);
        assert_eq!(w.minute, [5, 0, 0]);
        assert_eq!(w.hour(Event::Accepted), 5);
        // Exactly an hour old: out; 59.5 minutes old: still in.
        assert_eq!(w.hour(Event::Completed), 0);
        assert_eq!(w.hour(Event::Failed), 1);
    }
}
