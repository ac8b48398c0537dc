//! Exponential backoff for retrying API calls, as the kubelet's node status and lease loops do.

use std::time::Duration;

/// Doubles from [`Backoff::FIRST`] up to a cap; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The kubelet's lease controller starts retrying after 200 ms.
    pub const FIRST: Duration = Duration::from_millis(200);

    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST.min(max),
            max,
        }
    }

    /// The wait before the next attempt.
    pub fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let waits: Vec<_> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(200));
    }
}
