//! Garbage collection of images and dead containers: one task, the only one that removes them.
//!
//! Start at [`GarbageCollector::run`]. As the kubelet:
//! - **images**, every `--image-gc-period` (the kubelet's fixed 5 minutes): when the image
//!   filesystem's usage reaches `--image-gc-high-threshold` percent, unused images are removed,
//!   least recently used first, until usage is at `--image-gc-low-threshold`. An image is used
//!   while any container the provider holds (running or dead) was created from it; one used
//!   within `--minimum-image-ttl-duration` is kept. Its compiled code goes with it.
//! - **containers**, every `--container-gc-period` (the kubelet's fixed minute): dead instances
//!   beyond `--maximum-dead-containers-per-container` (newest kept, so `kubectl logs --previous`
//!   still finds the last one) and beyond `--maximum-dead-containers` on the node (oldest first)
//!   are removed with their log files, once older than `--minimum-container-ttl-duration`.
//!   The log directories of pods the agent had and no longer has are removed (never those of
//!   pods it did not run: `--pod-logs-dir` may be shared with a kubelet).
//! - **on request** ([`GcHandle::reclaim`]), for the eviction manager under disk pressure:
//!   every unused image and every dead container not kept by the limits above.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use provider_api::{ContainerState, ContainerSummary, ImageRecord, Provider, SandboxConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::events::EventSink;
use crate::machine;
use crate::pods::manager::PodSet;

/// Asks the garbage collector to free what it can now; answered with the bytes freed.
#[derive(Clone)]
pub struct GcHandle {
    tx: mpsc::UnboundedSender<oneshot::Sender<u64>>,
}

impl GcHandle {
    /// Removes every unused image and every dead container beyond the limits; returns the
    /// bytes freed (0 when the collector has stopped).
    pub async fn reclaim(&self) -> u64 {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(reply).is_err() {
            return 0;
        }
        answer.await.unwrap_or(0)
    }
}

/// The limits image and container collection keep to.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    pub image_high_percent: u8,
    pub image_low_percent: u8,
    pub image_min_age: Duration,
    /// Negative: no limit.
    pub max_dead_per_container: i32,
    /// Negative: no limit.
    pub max_dead: i32,
    pub container_min_age: Duration,
}

impl GcPolicy {
    pub fn from_config(c: &Config) -> Self {
        Self {
            image_high_percent: c.image_gc_high_threshold,
            image_low_percent: c.image_gc_low_threshold,
            image_min_age: c.minimum_image_ttl_duration,
            max_dead_per_container: c.maximum_dead_containers_per_container,
            max_dead: c.maximum_dead_containers,
            container_min_age: c.minimum_container_ttl_duration,
        }
    }
}

pub struct GarbageCollector {
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    /// What the provider runs (the PLEG's snapshot): read, never listed here.
    runtime: crate::pods::pleg::RuntimeCache,
    events: EventSink,
    policy: GcPolicy,
    pods: Option<watch::Receiver<PodSet>>,
    requests: mpsc::UnboundedReceiver<oneshot::Sender<u64>>,
    /// Pods this agent has had: only their log directories are ever removed (`--pod-logs-dir`
    /// may be the kubelet's own `/var/log/pods`, shared with a kubelet on the same host).
    seen: HashSet<String>,
}

impl GarbageCollector {
    /// `pods`: the pods the node has (their logs are kept); `None` keeps every pod's logs.
    pub fn new(
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        runtime: crate::pods::pleg::RuntimeCache,
        events: EventSink,
        pods: Option<watch::Receiver<PodSet>>,
    ) -> (Self, GcHandle) {
        let (tx, requests) = mpsc::unbounded_channel();
        let policy = GcPolicy::from_config(&config);
        (
            Self {
                config,
                provider,
                runtime,
                events,
                policy,
                pods,
                requests,
                seen: HashSet::new(),
            },
            GcHandle { tx },
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(images_every = ?self.config.image_gc_period, containers_every = ?self.config.container_gc_period, "garbage collector started");
        let mut images = tokio::time::interval(self.config.image_gc_period);
        let mut containers = tokio::time::interval(self.config.container_gc_period);
        images.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        containers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = images.tick() => {
                    self.collect_images(false).await;
                }
                _ = containers.tick() => {
                    self.collect_containers(false).await;
                    self.collect_pod_logs().await;
                }
                Some(reply) = self.requests.recv() => {
                    let freed = self.collect_containers(true).await + self.collect_images(true).await;
                    let _ = reply.send(freed);
                }
            }
        }
    }

    fn node_ref(&self) -> ObjectReference {
        ObjectReference {
            kind: Some("Node".into()),
            name: Some(self.config.node_name.clone()),
            uid: Some(self.config.node_name.clone()),
            ..Default::default()
        }
    }

    /// Image collection; `all`: every unused image regardless of usage (disk pressure).
    async fn collect_images(&self, all: bool) -> u64 {
        let Some(fs) = self.provider.image_fs().await else {
            return 0;
        };
        let (capacity, available) =
            match (machine::capacity(&fs.path), machine::available(&fs.path)) {
                (Ok(c), Ok(a)) => (c.ephemeral_storage_bytes, a.nodefs_bytes),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, "image garbage collection: measuring the image filesystem");
                    return 0;
                }
            };
        let to_free = if all {
            u64::MAX
        } else {
            match bytes_to_free(
                capacity,
                available,
                self.policy.image_high_percent,
                self.policy.image_low_percent,
            ) {
                Some(bytes) => bytes,
                None => return 0,
            }
        };
        // Which images are in use is unknown while the runtime cannot be asked: remove none.
        // A fresh snapshot: a container created a moment ago holds its image too.
        let snapshot = self.runtime.fresh().await;
        let Some(listed) = snapshot.containers.as_ref() else {
            warn!("image garbage collection skipped: the container runtime cannot be listed");
            return 0;
        };
        let in_use: HashSet<String> = listed.iter().map(|c| c.image_digest.clone()).collect();
        let images = self.provider.list_images().await;
        let victims = images_to_remove(
            images,
            &in_use,
            SystemTime::now(),
            self.policy.image_min_age,
            to_free,
        );
        let mut freed = 0;
        for image in &victims.remove {
            match self.provider.remove_image(&image.reference).await {
                Ok(bytes) => {
                    info!(image = %image.reference, bytes, "image garbage-collected");
                    freed += bytes;
                }
                Err(e) => warn!(image = %image.reference, error = %e, "removing an image"),
            }
        }
        if !all && freed < to_free {
            let message = format!("Failed to garbage collect required amount of images. Attempted to free {to_free} bytes, but only found {freed} bytes eligible to free.");
            warn!("{message}");
            self.events
                .warning(&self.node_ref(), "FreeDiskSpaceFailed", message);
        }
        freed
    }

    /// Container collection; `all`: run now whatever the period (disk pressure).
    async fn collect_containers(&self, _all: bool) -> u64 {
        let snapshot = self.runtime.latest();
        let (Some(containers), Some(sandboxes)) =
            (snapshot.containers.as_ref(), snapshot.sandboxes.as_ref())
        else {
            debug!("container garbage collection skipped: the container runtime cannot be listed");
            return 0;
        };
        let sandboxes: HashMap<String, SandboxConfig> = sandboxes
            .iter()
            .map(|s| (s.pod_uid.clone(), s.clone()))
            .collect();
        let victims = dead_to_remove(containers, &self.policy, SystemTime::now());
        let mut freed = 0;
        for c in victims {
            if let Err(e) = self.provider.remove_container(&c.id).await {
                warn!(container = %c.name, id = %c.id, error = %e, "removing a dead container");
                continue;
            }
            if let Some(sandbox) = sandboxes.get(&c.pod_uid) {
                let dir = pod_log_dir(&self.config.pod_logs_dir, sandbox).join(&c.name);
                freed += remove_attempt_logs(&dir, c.attempt);
            }
            debug!(container = %c.name, id = %c.id, attempt = c.attempt, "dead container garbage-collected");
        }
        freed
    }

    /// Removes the log directories of pods this agent had and no longer has.
    async fn collect_pod_logs(&mut self) {
        let Some(pods) = &self.pods else { return };
        let mut known: HashSet<String> = pods.borrow().keys().cloned().collect();
        // A pod the runtime may still hold is never collected on a guess.
        match self.runtime.latest().sandboxes.as_ref() {
            Some(sandboxes) => known.extend(sandboxes.iter().map(|s| s.pod_uid.clone())),
            None => return,
        }
        let gone: Vec<String> = self.seen.difference(&known).cloned().collect();
        self.seen.extend(known);
        for uid in gone {
            self.seen.remove(&uid);
            for entry in std::fs::read_dir(&self.config.pod_logs_dir)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !crate::pods::layout::is_pod_log_dir_of(&name, &uid) {
                    continue;
                }
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => info!(dir = %name, "removed the logs of a deleted pod"),
                    Err(e) => warn!(dir = %name, error = %e, "removing the logs of a deleted pod"),
                }
            }
        }
    }
}

/// Bytes to free to bring usage from at/above `high` percent down to `low` percent; `None`
/// below `high`. (The kubelet's `capacity * (100 - low) / 100 - available`.)
pub fn bytes_to_free(capacity: u64, available: u64, high: u8, low: u8) -> Option<u64> {
    if capacity == 0 {
        return None;
    }
    let used = capacity.saturating_sub(available);
    let percent = used as u128 * 100 / capacity as u128;
    if percent < u128::from(high) {
        return None;
    }
    let target_available = capacity as u128 * u128::from(100 - low.min(100)) / 100;
    Some(target_available.saturating_sub(available as u128) as u64)
}

pub struct ImageChoice {
    pub remove: Vec<ImageRecord>,
}

/// The images to remove to free `to_free` bytes: unused ones (no container's image digest),
/// last used longer than `min_age` ago, least recently used first.
pub fn images_to_remove(
    mut images: Vec<ImageRecord>,
    in_use: &HashSet<String>,
    now: SystemTime,
    min_age: Duration,
    to_free: u64,
) -> ImageChoice {
    images.retain(|i| !in_use.contains(&i.digest));
    images.retain(|i| now.duration_since(i.last_used).unwrap_or_default() >= min_age);
    images.sort_by(|a, b| {
        a.last_used
            .cmp(&b.last_used)
            .then_with(|| a.reference.cmp(&b.reference))
    });
    let mut freed = 0u64;
    let mut remove = Vec::new();
    for image in images {
        if freed >= to_free {
            break;
        }
        freed = freed.saturating_add(image.size);
        remove.push(image);
    }
    ImageChoice { remove }
}

/// Dead instances beyond the limits, oldest first: per (pod, container) all but the newest
/// `max_dead_per_container`, then the oldest on the node beyond `max_dead`; only those that
/// finished at least `container_min_age` ago. A container's latest instance is its current one,
/// running or not, and is never collected: `kubectl logs` shows it, and `--previous` the dead
/// one before it.
pub fn dead_to_remove<'a>(
    containers: &'a [ContainerSummary],
    policy: &GcPolicy,
    now: SystemTime,
) -> Vec<&'a ContainerSummary> {
    let finished = |c: &ContainerSummary| match c.state {
        ContainerState::Exited { finished_at, .. } => Some(finished_at),
        _ => None,
    };
    let mut latest: HashMap<(&str, &str), u32> = HashMap::new();
    for c in containers {
        let attempt = latest
            .entry((c.pod_uid.as_str(), c.name.as_str()))
            .or_insert(c.attempt);
        *attempt = (*attempt).max(c.attempt);
    }
    let mut groups: BTreeMap<(&str, &str), Vec<&ContainerSummary>> = BTreeMap::new();
    let old_enough = |c: &ContainerSummary| {
        finished(c).is_some_and(|at| {
            now.duration_since(at).unwrap_or_default() >= policy.container_min_age
        })
    };
    let current = |c: &ContainerSummary| {
        latest.get(&(c.pod_uid.as_str(), c.name.as_str())) == Some(&c.attempt)
    };
    for c in containers.iter().filter(|c| old_enough(c) && !current(c)) {
        groups
            .entry((c.pod_uid.as_str(), c.name.as_str()))
            .or_default()
            .push(c);
    }
    let mut remove = Vec::new();
    let mut kept = Vec::new();
    for (_, mut dead) in groups {
        // Newest first.
        dead.sort_by_key(|c| std::cmp::Reverse(c.attempt));
        let keep = usize::try_from(policy.max_dead_per_container).unwrap_or(usize::MAX);
        let older = if keep < dead.len() {
            dead.split_off(keep)
        } else {
            Vec::new()
        };
        remove.extend(older);
        kept.extend(dead);
    }
    if let Ok(max) = usize::try_from(policy.max_dead) {
        if kept.len() > max {
            kept.sort_by_key(|c| finished(c));
            let excess = kept.len() - max;
            remove.extend(kept.into_iter().take(excess));
        }
    }
    remove.sort_by_key(|c| finished(c));
    remove
}

fn pod_log_dir(root: &Path, sandbox: &SandboxConfig) -> PathBuf {
    crate::pods::layout::pod_log_dir(root, &sandbox.namespace, &sandbox.name, &sandbox.pod_uid)
}

/// Deletes `<attempt>.log` and its rotated siblings in `dir`; returns the bytes freed.
fn remove_attempt_logs(dir: &Path, attempt: u32) -> u64 {
    let base = format!("{attempt}.log");
    let mut freed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == base || name.starts_with(&format!("{base}.")) {
            freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = std::fs::remove_file(entry.path());
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::{ContainerUsage, ExitReason};

    fn image(reference: &str, digest: &str, size: u64, used_secs_ago: u64) -> ImageRecord {
        ImageRecord {
            reference: reference.into(),
            digest: digest.into(),
            size,
            last_used: SystemTime::now() - Duration::from_secs(used_secs_ago),
        }
    }

    #[test]
    fn usage_above_the_high_threshold_frees_down_to_the_low_one() {
        assert_eq!(
            bytes_to_free(1000, 200, 85, 80),
            None,
            "80% used is under 85%"
        );
        assert_eq!(
            bytes_to_free(1000, 100, 85, 80),
            Some(100),
            "90% used: free to 80%"
        );
        assert_eq!(bytes_to_free(0, 0, 85, 80), None);
    }

    #[test]
    fn unused_images_go_least_recently_used_first_and_in_use_or_young_ones_stay() {
        let images = vec![
            image("new", "d1", 10, 10),
            image("old", "d2", 10, 1000),
            image("older-in-use", "d3", 10, 5000),
            image("mid", "d4", 10, 500),
        ];
        let in_use = HashSet::from(["d3".to_string()]);
        let choice = images_to_remove(
            images.clone(),
            &in_use,
            SystemTime::now(),
            Duration::from_secs(120),
            15,
        );
        let names: Vec<&str> = choice.remove.iter().map(|i| i.reference.as_str()).collect();
        assert_eq!(names, ["old", "mid"]);
        let all = images_to_remove(
            images,
            &in_use,
            SystemTime::now(),
            Duration::from_secs(120),
            u64::MAX,
        );
        assert_eq!(
            all.remove.len(),
            2,
            "the young and the in-use image are never candidates"
        );
    }

    fn dead(pod: &str, name: &str, attempt: u32, finished_secs_ago: u64) -> ContainerSummary {
        let at = SystemTime::now() - Duration::from_secs(finished_secs_ago);
        ContainerSummary {
            id: format!("{pod}-{name}-{attempt}"),
            pod_uid: pod.into(),
            name: name.into(),
            attempt,
            image_digest: "d".into(),
            state: ContainerState::Exited {
                started_at: None,
                finished_at: at,
                exit_code: 1,
                reason: ExitReason::Error,
                message: None,
            },
            usage: ContainerUsage::default(),
            annotations: Default::default(),
        }
    }

    fn policy(per_container: i32, max: i32, min_age_secs: u64) -> GcPolicy {
        GcPolicy {
            image_high_percent: 85,
            image_low_percent: 80,
            image_min_age: Duration::ZERO,
            max_dead_per_container: per_container,
            max_dead: max,
            container_min_age: Duration::from_secs(min_age_secs),
        }
    }

    #[test]
    fn one_dead_instance_per_container_is_kept_the_newest() {
        let mut running = dead("p", "c", 3, 0);
        running.state = ContainerState::Running {
            started_at: SystemTime::now(),
        };
        let list = vec![
            dead("p", "c", 0, 30),
            dead("p", "c", 2, 10),
            dead("p", "c", 1, 20),
            running,
            dead("q", "c", 0, 5),
        ];
        let ids: Vec<&str> = dead_to_remove(&list, &policy(1, -1, 0), SystemTime::now())
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["p-c-0", "p-c-1"]);
    }

    #[test]
    fn the_current_instance_is_kept_even_when_dead() {
        let list = vec![
            dead("p", "c", 0, 30),
            dead("p", "c", 1, 20),
            dead("p", "c", 2, 10),
        ];
        let ids: Vec<&str> = dead_to_remove(&list, &policy(1, -1, 0), SystemTime::now())
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["p-c-0"], "2 is current, 1 the one dead instance kept");
    }

    #[test]
    fn the_node_limit_removes_the_oldest_kept_and_young_ones_wait() {
        let list = vec![
            dead("p", "c", 0, 30),
            dead("p", "c", 1, 1),
            dead("q", "c", 0, 20),
            dead("q", "c", 1, 1),
            dead("r", "c", 0, 10),
            dead("r", "c", 1, 1),
        ];
        let ids: Vec<&str> = dead_to_remove(&list, &policy(1, 1, 0), SystemTime::now())
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["p-c-0", "q-c-0"]);
        assert!(
            dead_to_remove(&list, &policy(0, -1, 60), SystemTime::now()).is_empty(),
            "younger than the minimum age"
        );
        assert_eq!(
            dead_to_remove(&list, &policy(-1, -1, 0), SystemTime::now()).len(),
            0,
            "no limits"
        );
    }

    #[test]
    fn attempt_logs_and_their_rotations_are_removed_and_others_kept() {
        let dir = std::env::temp_dir().join(format!("wasm-kubelet-gc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for f in ["0.log", "0.log.20260101-000000", "1.log", "10.log"] {
            std::fs::write(dir.join(f), b"x").expect("file");
        }
        assert_eq!(remove_attempt_logs(&dir, 0), 2);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, ["1.log", "10.log"]);
    }
}
