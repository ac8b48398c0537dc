//! CPU limits the way CFS bandwidth control enforces them for containers.
//!
//! The kubelet turns `resources.limits.cpu` into `cpu.cfs_quota_us = limit × cpu.cfs_period_us`
//! with a 100 ms period: a cgroup that used its quota within a period is throttled until the
//! next one. Here a container's [`CpuQuota`] is charged with the thread CPU time of every poll
//! that runs its guest (instance and execs alike, as one cgroup holds both); once the period's
//! budget is spent, the guest's future is not polled again until the period ends. A guest only
//! gives the thread back at an epoch tick (10 ms), so a slice may overrun the budget by up to a
//! tick; the overrun is a debt paid from the next period, which keeps the long-run rate at the
//! limit (CFS's own slices overrun the same way, by less).
//!
//! Time spent waiting in a host call (a sleep, a poll on I/O) uses no thread CPU time and is
//! never charged.
//!
//! Requests weight the sharing of the runtime's threads under contention, as `cpu.shares`
//! weights CFS: a guest's slice between yields grows with its share ([`slice_ticks`]).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `cpu.cfs_period_us`: the kubelet's default CFS period.
pub const CFS_PERIOD: Duration = Duration::from_millis(100);
/// The kubelet never sets a quota below 1 ms (`minQuotaPeriod`): the kernel refuses smaller ones.
const MIN_QUOTA: Duration = Duration::from_millis(1);

/// A container's CPU bandwidth: `quota` of CPU time per [`CFS_PERIOD`].
#[derive(Debug)]
pub struct CpuQuota {
    quota_nanos: i64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Start of the current period; set by the first check (the container's first run).
    period_start: Option<Instant>,
    /// CPU time left in the current period, in nanoseconds; negative after an overrun.
    budget_nanos: i64,
    /// Periods in which the container was throttled, and how long it waited (CFS's
    /// `nr_throttled` and `throttled_time`).
    throttled_periods: u64,
    throttled_nanos: u64,
}

impl CpuQuota {
    /// The quota for a limit of `millicores` (1000 = one core), as the kubelet computes it
    /// (`MilliCPUToQuota`); `None` for 0, which the kubelet also leaves unlimited.
    pub fn from_millicores(millicores: u64) -> Option<Self> {
        if millicores == 0 {
            return None;
        }
        let quota = (CFS_PERIOD.as_nanos() as u64).saturating_mul(millicores) / 1000;
        let quota_nanos = i64::try_from(quota.max(MIN_QUOTA.as_nanos() as u64)).unwrap_or(i64::MAX);
        Some(Self {
            quota_nanos,
            bucket: Mutex::new(Bucket {
                budget_nanos: quota_nanos,
                ..Default::default()
            }),
        })
    }

    /// CPU time allowed per period.
    pub fn quota(&self) -> Duration {
        Duration::from_nanos(self.quota_nanos as u64)
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `nanos` of CPU time the container just used from the current period's budget.
    pub fn charge(&self, nanos: u64) {
        let mut bucket = self.bucket();
        bucket.budget_nanos = bucket
            .budget_nanos
            .saturating_sub(i64::try_from(nanos).unwrap_or(i64::MAX));
    }

    /// `None` when the container may run at `now`; else the end of the period it has to wait
    /// for (its budget is refilled then; a debt larger than a quota waits more than one period).
    pub fn throttled_until(&self, now: Instant) -> Option<Instant> {
        let mut bucket = self.bucket();
        let start = *bucket.period_start.get_or_insert(now);
        if now >= start + CFS_PERIOD {
            let periods = (now - start).as_nanos() / CFS_PERIOD.as_nanos();
            let periods_u32 = u32::try_from(periods).unwrap_or(u32::MAX);
            bucket.period_start = Some(start + CFS_PERIOD * periods_u32);
            // Unused quota does not carry over (no burst); a debt does.
            let refill = self
                .quota_nanos
                .saturating_mul(i64::try_from(periods).unwrap_or(i64::MAX));
            bucket.budget_nanos = bucket
                .budget_nanos
                .saturating_add(refill)
                .min(self.quota_nanos);
        }
        if bucket.budget_nanos > 0 {
            return None;
        }
        let until = bucket.period_start.unwrap_or(now) + CFS_PERIOD;
        bucket.throttled_periods += 1;
        bucket.throttled_nanos += (until - now).as_nanos() as u64;
        Some(until)
    }

    /// (periods throttled, total time waited).
    pub fn throttling(&self) -> (u64, Duration) {
        let bucket = self.bucket();
        (
            bucket.throttled_periods,
            Duration::from_nanos(bucket.throttled_nanos),
        )
    }
}

/// `cpu.shares` for a container requesting `millicores`, as the kubelet computes it
/// (`MilliCPUToShares`): 1024 per core, at least 2 (what a container without requests gets).
pub fn shares(millicores: u64) -> u64 {
    (millicores.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES)
}
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;
/// Epoch ticks a guest runs before it yields, for a container with `shares`: the slice grows
/// with the share, so under contention (more runnable guests than worker threads, which the
/// runtime serves round-robin) each gets CPU in proportion to its slice. One tick per 256
/// shares (a quarter core), from 1 to 8 ticks: requests from 250m to 2 cores get proportional
/// time; below 250m (and BestEffort) all get the smallest slice, above 2 cores the largest.
/// 8 ticks (80 ms) bounds how long one guest holds a thread, and how late it sees a stop.
pub fn slice_ticks(shares: u64) -> u64 {
    (shares + 128).div_euclid(256).clamp(1, MAX_SLICE_TICKS)
}
const MAX_SLICE_TICKS: u64 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn shares_follow_the_kubelet() {
        assert_eq!(shares(0), 2);
        assert_eq!(shares(1000), 1024);
        assert_eq!(shares(250), 256);
        assert_eq!(shares(1), 2);
    }

    #[test]
    fn slices_grow_with_the_share_within_bounds() {
        assert_eq!(slice_ticks(shares(0)), 1);
        assert_eq!(slice_ticks(shares(250)), 1);
        assert_eq!(slice_ticks(shares(500)), 2);
        assert_eq!(slice_ticks(shares(1000)), 4);
        assert_eq!(slice_ticks(shares(2000)), 8);
        assert_eq!(slice_ticks(shares(64_000)), 8);
    }

    #[test]
    fn quota_is_limit_times_period_with_the_kubelets_floor() {
        assert_eq!(
            CpuQuota::from_millicores(200).unwrap().quota(),
            Duration::from_millis(20)
        );
        assert_eq!(
            CpuQuota::from_millicores(1500).unwrap().quota(),
            Duration::from_millis(150)
        );
        assert_eq!(
            CpuQuota::from_millicores(5).unwrap().quota(),
            Duration::from_millis(1)
        );
        assert!(CpuQuota::from_millicores(0).is_none());
    }

    #[test]
    fn a_spent_budget_waits_for_the_next_period() {
        let q = CpuQuota::from_millicores(200).unwrap();
        let t0 = Instant::now();
        assert_eq!(q.throttled_until(t0), None);
        q.charge(10 * MS);
        assert_eq!(q.throttled_until(t0 + Duration::from_millis(10)), None);
        q.charge(10 * MS);
        assert_eq!(
            q.throttled_until(t0 + Duration::from_millis(20)),
            Some(t0 + CFS_PERIOD)
        );
        // The next period refills the budget.
        assert_eq!(q.throttled_until(t0 + CFS_PERIOD), None);
        assert_eq!(q.throttling().0, 1);
    }

    #[test]
    fn an_overrun_is_paid_from_the_next_period_and_idle_time_does_not_accumulate() {
        let q = CpuQuota::from_millicores(200).unwrap();
        let t0 = Instant::now();
        assert_eq!(q.throttled_until(t0), None);
        // 50 ms used against a 20 ms quota: a 30 ms debt, paid by the next two periods.
        q.charge(50 * MS);
        assert_eq!(
            q.throttled_until(t0 + Duration::from_millis(50)),
            Some(t0 + CFS_PERIOD)
        );
        assert_eq!(
            q.throttled_until(t0 + CFS_PERIOD),
            Some(t0 + CFS_PERIOD * 2)
        );
        assert_eq!(q.throttled_until(t0 + CFS_PERIOD * 2), None);
        // A long idle stretch leaves one period's quota, not more.
        q.charge(10 * MS);
        assert_eq!(q.throttled_until(t0 + CFS_PERIOD * 20), None);
        q.charge(20 * MS);
        assert_eq!(
            q.throttled_until(t0 + CFS_PERIOD * 20 + Duration::from_millis(25)),
            Some(t0 + CFS_PERIOD * 21)
        );
    }
}
