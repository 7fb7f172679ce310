//! Hybrid logical clocks: physical milliseconds plus a logical counter,
//! packed into one `u64` as `(physical_ms << 16) | logical` so timestamps
//! order as integers. A clock never goes backwards, even when the wall clock
//! does, and moves past every timestamp it observes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid logical clock timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    pub fn new(physical_ms: u64, logical: u16) -> Self {
        Hlc((physical_ms << LOGICAL_BITS) | u64::from(logical))
    }

    pub fn from_packed(packed: u64) -> Self {
        Hlc(packed)
    }

    pub fn packed(self) -> u64 {
        self.0
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

/// A node's clock. `now` is lock-free; the wall clock source is injectable
/// for tests.
#[derive(Debug)]
pub struct HlcClock {
    last: AtomicU64,
    wall_ms: fn() -> u64,
}

/// Milliseconds since the Unix epoch by the wall clock (0 before it).
pub fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl HlcClock {
    /// A clock that starts after `floor` (e.g. the newest timestamp this node
    /// ever stored, so a restart with a slow wall clock cannot go back).
    pub fn new(floor: Hlc) -> Self {
        Self::with_wall_clock(floor, system_ms)
    }

    pub fn with_wall_clock(floor: Hlc, wall_ms: fn() -> u64) -> Self {
        HlcClock {
            last: AtomicU64::new(floor.0),
            wall_ms,
        }
    }

    /// A fresh timestamp, strictly greater than every one returned or
    /// observed before. When the logical counter is full, the carry moves
    /// into the physical part, which keeps the order.
    pub fn now(&self) -> Hlc {
        let wall = Hlc::new((self.wall_ms)(), 0).0;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if wall > last { wall } else { last + 1 };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Hlc(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a timestamp received from another node.
    pub fn observe(&self, remote: Hlc) {
        self.last.fetch_max(remote.0, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packs_and_unpacks() {
        let t = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(t.physical_ms(), 1_700_000_000_000);
        assert_eq!(t.logical(), 7);
        assert!(Hlc::new(5, 0) > Hlc::new(4, u16::MAX));
    }

    #[test]
    fn frozen_wall_clock_still_advances() {
        let clock = HlcClock::with_wall_clock(Hlc::default(), || 1000);
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        assert_eq!(b.physical_ms(), 1000);
    }

    #[test]
    fn floor_survives_a_wall_clock_behind_it() {
        let floor = Hlc::new(10_000, 3);
        let clock = HlcClock::with_wall_clock(floor, || 5);
        assert!(clock.now() > floor);
    }

    proptest! {
        #[test]
        fn strictly_monotonic_across_observations(observed in proptest::collection::vec(any::<u64>().prop_map(|v| v >> 1), 0..50)) {
            let clock = HlcClock::new(Hlc::default());
            let mut prev = clock.now();
            for remote in observed {
                clock.observe(Hlc::from_packed(remote));
                let next = clock.now();
                prop_assert!(next > prev);
                prop_assert!(next > Hlc::from_packed(remote));
                prev = next;
            }
        }
    }
}
