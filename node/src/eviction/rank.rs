//! Which pod goes first, and what its eviction says: the kubelet's ranking and messages.
//!
//! Memory and disk pressure rank the same way (the kubelet's `rankMemoryPressure` and
//! `rankDiskPressureFunc`): pods whose usage exceeds their requests first, then lower priority
//! first, then the largest usage above requests. PID pressure ranks by priority only (a Wasm
//! pod has no processes to count).

use std::cmp::Ordering;

use super::thresholds::binary_quantity;

/// The resource an eviction reclaims, in the kubelet's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    EphemeralStorage,
    Pids,
}

impl Resource {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::EphemeralStorage => "ephemeral-storage",
            Self::Pids => "pids",
        }
    }
}

/// One container's use of the resource being ranked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUse {
    pub name: String,
    pub usage: u64,
    pub request: u64,
}

/// A pod that may be evicted, with its use of the resource being ranked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub uid: String,
    /// `namespace/name`, for logs.
    pub name: String,
    pub priority: i32,
    /// Static, mirror and system-critical pods are never evicted (the kubelet's rule).
    pub critical: bool,
    pub containers: Vec<ContainerUse>,
    /// Usage that belongs to the pod rather than a container (emptyDir volumes).
    pub pod_usage: u64,
}

impl Candidate {
    pub fn usage(&self) -> u64 {
        self.containers.iter().map(|c| c.usage).sum::<u64>() + self.pod_usage
    }

    pub fn request(&self) -> u64 {
        self.containers.iter().map(|c| c.request).sum()
    }

    fn exceeds_requests(&self) -> bool {
        self.usage() > self.request()
    }

    fn above_requests(&self) -> i128 {
        i128::from(self.usage()) - i128::from(self.request())
    }
}

/// Orders `pods` so the first is the one to evict; critical pods are dropped.
pub fn rank(pods: &mut Vec<Candidate>, resource: Resource) {
    pods.retain(|p| !p.critical);
    pods.sort_by(|a, b| match resource {
        Resource::Pids => a.priority.cmp(&b.priority),
        _ => b
            .exceeds_requests()
            .cmp(&a.exceeds_requests())
            .then(a.priority.cmp(&b.priority))
            .then_with(|| b.above_requests().cmp(&a.above_requests()))
            .then(Ordering::Equal),
    });
}

/// The evicted pod's status message and Event, as the kubelet words it: "The node was low on
/// resource: memory. Threshold quantity: 100Mi, available: 50Mi. Container x was using 200Mi,
/// request is 0, has larger consumption of memory."
pub fn message(resource: Resource, threshold: Option<(String, String)>, pod: &Candidate) -> String {
    let mut text = format!("The node was low on resource: {}. ", resource.as_str());
    if let Some((quantity, available)) = threshold {
        text.push_str(&format!(
            "Threshold quantity: {quantity}, available: {available}. "
        ));
    }
    if resource != Resource::Pids {
        for c in pod.containers.iter().filter(|c| c.usage > c.request) {
            text.push_str(&format!(
                "Container {} was using {}, request is {}, has larger consumption of {}. ",
                c.name,
                binary_quantity(c.usage),
                binary_quantity(c.request),
                resource.as_str()
            ));
        }
    }
    text.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn pod(name: &str, priority: i32, usage: u64, request: u64) -> Candidate {
        Candidate {
            uid: name.into(),
            name: format!("ns/{name}"),
            priority,
            critical: false,
            containers: vec![ContainerUse {
                name: name.into(),
                usage,
                request,
            }],
            pod_usage: 0,
        }
    }

    fn order(mut pods: Vec<Candidate>, resource: Resource) -> Vec<String> {
        rank(&mut pods, resource);
        pods.into_iter().map(|p| p.uid).collect()
    }

    #[test]
    fn pods_over_their_requests_go_before_higher_usage_within_requests() {
        let guaranteed = pod("guaranteed", 0, 60 * MI, 64 * MI);
        let best_effort = pod("best-effort", 0, 10 * MI, 0);
        let burstable = pod("burstable", 0, 60 * MI, 30 * MI);
        assert_eq!(
            order(vec![guaranteed, best_effort, burstable], Resource::Memory),
            ["burstable", "best-effort", "guaranteed"]
        );
    }

    #[test]
    fn among_pods_over_requests_lower_priority_goes_first() {
        let important = pod("important", 1000, 500 * MI, 0);
        let ordinary = pod("ordinary", 0, 10 * MI, 0);
        assert_eq!(
            order(vec![important, ordinary], Resource::EphemeralStorage),
            ["ordinary", "important"]
        );
    }

    #[test]
    fn critical_pods_are_never_candidates() {
        let mut static_pod = pod("static", 0, 900 * MI, 0);
        static_pod.critical = true;
        assert_eq!(
            order(vec![static_pod, pod("other", 0, MI, 0)], Resource::Memory),
            ["other"]
        );
    }

    #[test]
    fn emptydir_usage_counts_for_the_pod() {
        let mut writer = pod("writer", 0, 0, 10 * MI);
        writer.pod_usage = 20 * MI;
        let logger = pod("logger", 0, 5 * MI, 10 * MI);
        assert_eq!(
            order(vec![logger, writer], Resource::EphemeralStorage),
            ["writer", "logger"]
        );
    }

    #[test]
    fn the_message_names_the_threshold_and_the_containers_over_their_requests() {
        let mut p = pod("hog", 0, 200 * MI, 0);
        p.containers.push(ContainerUse {
            name: "quiet".into(),
            usage: MI,
            request: 64 * MI,
        });
        let text = message(Resource::Memory, Some(("100Mi".into(), "50Mi".into())), &p);
        assert_eq!(
            text,
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. Container hog was using 200Mi, request is 0, has larger consumption of memory."
        );
    }
}
