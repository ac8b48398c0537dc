//! Which thresholds are met, for how long, and which pressure conditions they raise: the
//! kubelet eviction manager's bookkeeping, as pure functions of observations and time.
//!
//! [`ThresholdTracker::observe`] follows the kubelet's `synchronize`: a threshold is met when
//! the signal's available amount is below it; a threshold met last time stays met until the
//! signal recovers past it by `--eviction-minimum-reclaim`; a condition stays for
//! `--eviction-pressure-transition-period` after its last threshold stopped being met; a
//! threshold acts (evicts) only once it has been met for its grace period (zero when hard).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{EvictionSignal, ThresholdValue};

/// One eviction threshold as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub signal: EvictionSignal,
    pub value: ThresholdValue,
    /// Zero for a hard threshold.
    pub grace: Duration,
    pub hard: bool,
    pub min_reclaim: Option<ThresholdValue>,
}

impl Threshold {
    /// The threshold in the signal's units, given the capacity a percentage is taken of.
    pub fn quantity(&self, capacity: u64) -> u64 {
        self.value.absolute(capacity)
    }

    /// Whether `observed` meets this threshold; `enforce_min_reclaim` adds the minimum reclaim
    /// (a threshold already met stays met until the signal recovers past it by that much).
    pub fn met(&self, observed: Observation, enforce_min_reclaim: bool) -> bool {
        let mut limit = self.quantity(observed.capacity);
        if enforce_min_reclaim {
            limit = limit.saturating_add(
                self.min_reclaim
                    .map_or(0, |r| r.absolute(observed.capacity)),
            );
        }
        observed.available < limit
    }
}

/// A signal's measurement: what is available and the capacity percentages are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub available: u64,
    pub capacity: u64,
}

pub type Observations = BTreeMap<EvictionSignal, Observation>;

/// The node conditions the eviction manager owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PressureCondition {
    MemoryPressure,
    DiskPressure,
    PIDPressure,
}

impl PressureCondition {
    /// The condition a signal's thresholds raise.
    pub fn of(signal: EvictionSignal) -> Self {
        match signal {
            EvictionSignal::MemoryAvailable | EvictionSignal::AllocatableMemoryAvailable => {
                Self::MemoryPressure
            }
            EvictionSignal::NodefsAvailable
            | EvictionSignal::NodefsInodesFree
            | EvictionSignal::ImagefsAvailable
            | EvictionSignal::ImagefsInodesFree => Self::DiskPressure,
            EvictionSignal::PidAvailable => Self::PIDPressure,
        }
    }
}

/// What one observation decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Conditions to report, each with a detail for its message.
    pub conditions: BTreeMap<PressureCondition, String>,
    /// Indexes (into the configured thresholds) of those met for at least their grace period:
    /// these drive eviction.
    pub act_on: Vec<usize>,
    /// Indexes of thresholds newly met this time (for the EvictionThresholdMet event).
    pub newly_met: Vec<usize>,
}

/// The eviction manager's memory between observations.
#[derive(Debug, Default)]
pub struct ThresholdTracker {
    /// Thresholds that acted last time (their minimum reclaim applies now).
    met: BTreeSet<usize>,
    first_observed: BTreeMap<usize, Instant>,
    condition_last_observed: BTreeMap<PressureCondition, Instant>,
}

impl ThresholdTracker {
    /// One housekeeping pass over `observations` at `now`.
    pub fn observe(
        &mut self,
        thresholds: &[Threshold],
        observations: &Observations,
        transition: Duration,
        now: Instant,
    ) -> Decision {
        let met_now: BTreeSet<usize> = thresholds
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                observations
                    .get(&t.signal)
                    .is_some_and(|o| t.met(*o, false) || (self.met.contains(i) && t.met(*o, true)))
            })
            .map(|(i, _)| i)
            .collect();
        let newly_met: Vec<usize> = met_now
            .iter()
            .copied()
            .filter(|i| !self.first_observed.contains_key(i))
            .collect();
        self.first_observed.retain(|i, _| met_now.contains(i));
        for i in &met_now {
            self.first_observed.entry(*i).or_insert(now);
        }

        let mut details: BTreeMap<PressureCondition, String> = BTreeMap::new();
        for i in &met_now {
            let t = &thresholds[*i];
            let Some(o) = observations.get(&t.signal) else {
                continue;
            };
            let detail = format!(
                "{} is {} (threshold {})",
                t.signal.as_str(),
                show(t.signal, o.available),
                show(t.signal, t.quantity(o.capacity))
            );
            let condition = PressureCondition::of(t.signal);
            self.condition_last_observed.insert(condition, now);
            details.entry(condition).or_insert(detail);
        }
        // Observed now, or within the transition period.
        self.condition_last_observed.retain(|c, at| {
            details.contains_key(c) || now.saturating_duration_since(*at) < transition
        });
        let conditions = self
            .condition_last_observed
            .keys()
            .map(|c| {
                let detail = details.get(c).cloned().unwrap_or_else(|| {
                    format!(
                        "no threshold met now; clears {} after the last one",
                        show_duration(transition)
                    )
                });
                (*c, detail)
            })
            .collect();

        let act_on: Vec<usize> = met_now
            .iter()
            .copied()
            .filter(|i| {
                self.first_observed
                    .get(i)
                    .is_some_and(|at| now.saturating_duration_since(*at) >= thresholds[*i].grace)
            })
            .collect();
        self.met = act_on.iter().copied().collect();
        Decision {
            conditions,
            act_on,
            newly_met,
        }
    }
}

/// A signal's amount in its units: bytes in the kubelet's binary quantity form, else a count.
pub fn show(signal: EvictionSignal, amount: u64) -> String {
    match signal {
        EvictionSignal::MemoryAvailable
        | EvictionSignal::AllocatableMemoryAvailable
        | EvictionSignal::NodefsAvailable
        | EvictionSignal::ImagefsAvailable => binary_quantity(amount),
        _ => amount.to_string(),
    }
}

/// Bytes as a Kubernetes binary quantity: `100Mi`, `51200Ki`, or plain bytes.
pub fn binary_quantity(bytes: u64) -> String {
    for (suffix, unit) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn hard(signal: EvictionSignal, q: u64) -> Threshold {
        Threshold {
            signal,
            value: ThresholdValue::Quantity(q),
            grace: Duration::ZERO,
            hard: true,
            min_reclaim: None,
        }
    }

    fn obs(signal: EvictionSignal, available: u64) -> Observations {
        BTreeMap::from([(
            signal,
            Observation {
                available,
                capacity: 1000 * MI,
            },
        )])
    }

    #[tokio::test(start_paused = true)]
    async fn a_hard_threshold_acts_at_once_and_the_condition_outlasts_it_by_the_transition_period()
    {
        let thresholds = vec![hard(EvictionSignal::MemoryAvailable, 100 * MI)];
        let mut t = ThresholdTracker::default();
        let transition = Duration::from_secs(30);
        let d = t.observe(
            &thresholds,
            &obs(EvictionSignal::MemoryAvailable, 50 * MI),
            transition,
            Instant::now(),
        );
        assert_eq!(d.act_on, vec![0]);
        assert_eq!(d.newly_met, vec![0]);
        assert_eq!(
            d.conditions
                .get(&PressureCondition::MemoryPressure)
                .map(String::as_str),
            Some("memory.available is 50Mi (threshold 100Mi)")
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        let d = t.observe(
            &thresholds,
            &obs(EvictionSignal::MemoryAvailable, 500 * MI),
            transition,
            Instant::now(),
        );
        assert!(d.act_on.is_empty());
        assert!(
            d.conditions
                .contains_key(&PressureCondition::MemoryPressure),
            "kept during the transition period"
        );

        tokio::time::advance(Duration::from_secs(21)).await;
        let d = t.observe(
            &thresholds,
            &obs(EvictionSignal::MemoryAvailable, 500 * MI),
            transition,
            Instant::now(),
        );
        assert!(
            d.conditions.is_empty(),
            "cleared after the transition period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_soft_threshold_raises_the_condition_at_once_but_acts_after_its_grace_period() {
        let mut soft = hard(EvictionSignal::NodefsAvailable, 100 * MI);
        soft.hard = false;
        soft.grace = Duration::from_secs(60);
        let thresholds = vec![soft];
        let mut t = ThresholdTracker::default();
        let low = obs(EvictionSignal::NodefsAvailable, 10 * MI);
        let d = t.observe(&thresholds, &low, Duration::ZERO, Instant::now());
        assert!(d.conditions.contains_key(&PressureCondition::DiskPressure));
        assert!(d.act_on.is_empty());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(t
            .observe(&thresholds, &low, Duration::ZERO, Instant::now())
            .act_on
            .is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = t.observe(&thresholds, &low, Duration::ZERO, Instant::now());
        assert_eq!(d.act_on, vec![0]);
        assert!(d.newly_met.is_empty(), "met since the first observation");
    }

    #[tokio::test(start_paused = true)]
    async fn minimum_reclaim_keeps_an_acting_threshold_met_until_the_signal_recovers_past_it() {
        let mut th = hard(EvictionSignal::NodefsAvailable, 100 * MI);
        th.min_reclaim = Some(ThresholdValue::Quantity(50 * MI));
        let thresholds = vec![th];
        let mut t = ThresholdTracker::default();
        assert_eq!(
            t.observe(
                &thresholds,
                &obs(EvictionSignal::NodefsAvailable, 90 * MI),
                Duration::ZERO,
                Instant::now()
            )
            .act_on,
            vec![0]
        );
        assert_eq!(
            t.observe(
                &thresholds,
                &obs(EvictionSignal::NodefsAvailable, 120 * MI),
                Duration::ZERO,
                Instant::now()
            )
            .act_on,
            vec![0]
        );
        assert!(t
            .observe(
                &thresholds,
                &obs(EvictionSignal::NodefsAvailable, 150 * MI),
                Duration::ZERO,
                Instant::now()
            )
            .act_on
            .is_empty());
        // Without having acted, 120Mi is simply above the threshold.
        let mut fresh = ThresholdTracker::default();
        assert!(fresh
            .observe(
                &thresholds,
                &obs(EvictionSignal::NodefsAvailable, 120 * MI),
                Duration::ZERO,
                Instant::now()
            )
            .act_on
            .is_empty());
    }

    #[test]
    fn percentages_are_of_the_signal_capacity() {
        let t = Threshold {
            signal: EvictionSignal::NodefsAvailable,
            value: ThresholdValue::Percent(10.0),
            grace: Duration::ZERO,
            hard: true,
            min_reclaim: None,
        };
        assert!(t.met(
            Observation {
                available: 99,
                capacity: 1000
            },
            false
        ));
        assert!(!t.met(
            Observation {
                available: 100,
                capacity: 1000
            },
            false
        ));
    }

    #[test]
    fn quantities_read_as_the_kubelet_writes_them() {
        assert_eq!(binary_quantity(100 * MI), "100Mi");
        assert_eq!(binary_quantity(51_201 * 1024), "51201Ki");
        assert_eq!(binary_quantity(1000), "1000");
        assert_eq!(binary_quantity(0), "0");
        assert_eq!(show(EvictionSignal::PidAvailable, 1024), "1024");
    }
}
