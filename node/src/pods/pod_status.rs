//! The pod status as the kubelet computes it: a pure function of the pod (its spec, its
//! previous status), what the worker knows of each container (the runtime's latest state and
//! the history the worker keeps: runs, restarts, backoff, waiting reasons), the probes'
//! verdicts and the pod's outcome once terminal. The worker hands the result to the status
//! manager ([`super::status`]), which writes it.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    Container, ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{DateTime, Utc};
use provider_api::{ContainerState, ExitReason};

use super::plan;
use super::worker::{ContainerRecord, Terminal, BACKOFF_INITIAL};

/// Everything the status is computed from.
pub(super) struct Input<'a> {
    /// The pod as last seen: spec, name and UID, and its status for PodScheduled.
    pub pod: &'a Pod,
    /// What the worker knows of each container, by name (absent: not yet considered).
    pub containers: &'a super::worker::Records,
    /// The readiness and startup probes' verdicts for a running container.
    pub ready: &'a dyn Fn(&Container) -> bool,
    pub started: &'a dyn Fn(&Container) -> bool,
    /// The pod's outcome once nothing more will run (failed admission, deadline, eviction,
    /// every container done).
    pub terminal: Option<&'a Terminal>,
    /// The pod has a sandbox (PodReadyToStartContainers).
    pub sandbox_ready: bool,
    /// The status last computed (or the pod's own): conditions keep their transition times.
    pub previous: &'a PodStatus,
    /// A container's ID as the status shows it (`wasm://<id>`; the provider says, see
    /// `Provider::container_uri`).
    pub container_uri: &'a dyn Fn(&str) -> String,
    /// The node's IP: the host IP, and the pod IP unless `pod_ips` has some.
    pub node_ip: &'a str,
    /// The pod's own IPs from its sandbox (a container pod's network); empty: the node's IP.
    pub pod_ips: &'a [std::net::IpAddr],
    pub start_time: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// The pod status as the kubelet writes it (its `generateAPIPodStatus`), from `input` alone.
pub(super) fn compute(input: &Input<'_>) -> PodStatus {
    let spec = input.pod.spec.clone().unwrap_or_default();
    let (init, app) = (spec.init_containers.unwrap_or_default(), spec.containers);
    let policy = plan::RestartPolicy::of(spec.restart_policy.as_deref());
    let now = Time(input.now);
    let previous = input.previous;
    let meta = &input.pod.metadata;
    let (name, namespace, uid) = (
        meta.name.as_deref().unwrap_or_default(),
        meta.namespace.as_deref().unwrap_or("default"),
        meta.uid.as_deref().unwrap_or_default(),
    );
    let will_restart = |r: &ContainerRecord, policy: plan::RestartPolicy| {
        input.terminal.is_none()
            && policy.restarts_after(r.last_terminated.as_ref().map_or(0, |t| t.exit_code))
    };

    let status_of = |c: &Container, is_init: bool| -> ContainerStatus {
        // An init container that succeeded is done whatever the pod's policy; one that
        // failed runs again unless the policy is Never (as OnFailure).
        let policy = if is_init && policy != plan::RestartPolicy::Never {
            plan::RestartPolicy::OnFailure
        } else {
            policy
        };
        let record = input.containers.get(&c.name);
        let image = c.image.clone().unwrap_or_default();
        let (state, last_state) = match record {
            None => (waiting("ContainerCreating", None), None),
            Some(r) => {
                let last = r.last_terminated.clone().map(|t| K8sState {
                    terminated: Some(t),
                    ..Default::default()
                });
                match (&r.current, &r.waiting) {
                    (Some(ContainerState::Running { started_at }), _) => (
                        K8sState {
                            running: Some(ContainerStateRunning {
                                started_at: Some(Time((*started_at).into())),
                            }),
                            ..Default::default()
                        },
                        // While running, lastState is the previous run's termination.
                        if r.restart_count > 0 { last } else { None },
                    ),
                    (_, Some((reason, message))) => (waiting(reason, Some(message.clone())), last),
                    (Some(ContainerState::Exited { .. }), None) if will_restart(r, policy) => {
                        let msg = format!(
                            "back-off {}s restarting failed container={} pod={}_{}({})",
                            r.backoff.max(BACKOFF_INITIAL).as_secs(),
                            c.name,
                            name,
                            namespace,
                            uid
                        );
                        (waiting("CrashLoopBackOff", Some(msg)), last)
                    }
                    (Some(ContainerState::Exited { .. }), None) | (None, None)
                        if r.last_terminated.is_some() && !will_restart(r, policy) =>
                    {
                        (
                            K8sState {
                                terminated: r.last_terminated.clone(),
                                ..Default::default()
                            },
                            None,
                        )
                    }
                    _ => (
                        waiting(
                            if input.terminal.is_some() {
                                "PodInitializing"
                            } else {
                                "ContainerCreating"
                            },
                            None,
                        ),
                        last,
                    ),
                }
            }
        };
        let running = state.running.is_some();
        ContainerStatus {
            name: c.name.clone(),
            image,
            image_id: record.map(|r| r.image_id.clone()).unwrap_or_default(),
            // The current run's ID; with none (an agent restart restores a finished run only
            // from the pod's status, or the run was lost), the last finished run's, as the
            // kubelet reports the latest container it knows of.
            container_id: record.and_then(|r| {
                r.id.as_deref().map(input.container_uri).or_else(|| {
                    r.last_terminated
                        .as_ref()
                        .and_then(|t| t.container_id.clone())
                })
            }),
            ready: running && (input.ready)(c),
            started: Some(running && (input.started)(c)),
            restart_count: record.map_or(0, |r| r.restart_count),
            state: Some(state),
            last_state: Some(last_state.unwrap_or_default()),
            ..Default::default()
        }
    };
    let init_statuses: Vec<ContainerStatus> = init.iter().map(|c| status_of(c, true)).collect();
    let app_statuses: Vec<ContainerStatus> = app.iter().map(|c| status_of(c, false)).collect();

    let init_done = init_statuses.iter().all(|s| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0)
    });
    let init_failed = init_statuses.iter().any(|s| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
    });
    let phase = match input.terminal {
        Some(t) => t.phase,
        None => pod_phase(policy, init_done, init_failed, &app_statuses),
    };

    let unready: Vec<&str> = app_statuses
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    let incomplete: Vec<&str> = init_statuses
        .iter()
        .filter(|s| {
            s.state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .is_none_or(|t| t.exit_code != 0)
        })
        .map(|s| s.name.as_str())
        .collect();
    let completed = phase == PodPhase::Succeeded;
    let condition = |kind: &str, ok: bool, reason: Option<String>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        let transition = previous
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            reason,
            message,
            last_transition_time: Some(transition),
            last_probe_time: None,
            observed_generation: None,
        }
    };
    let not_ready = |reason: &str| {
        if completed {
            (Some("PodCompleted".to_string()), None)
        } else {
            (
                Some(reason.to_string()),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        }
    };
    let sandbox_ready = input.sandbox_ready && input.terminal.is_none();
    let (cr_reason, cr_msg) = if unready.is_empty() {
        (None, None)
    } else {
        not_ready("ContainersNotReady")
    };
    let mut conditions = vec![
        condition("PodReadyToStartContainers", sandbox_ready, None, None),
        if incomplete.is_empty() || completed {
            condition(
                "Initialized",
                true,
                completed
                    .then(|| "PodCompleted".to_string())
                    .filter(|_| !init.is_empty()),
                None,
            )
        } else {
            condition(
                "Initialized",
                false,
                Some("ContainersNotInitialized".into()),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                )),
            )
        },
        condition(
            "ContainersReady",
            unready.is_empty(),
            cr_reason.clone(),
            cr_msg.clone(),
        ),
        condition("Ready", unready.is_empty(), cr_reason, cr_msg),
    ];
    // As the kubelet marks a pod it evicts for node pressure or stops for a node shutdown.
    if let Some(t) = input
        .terminal
        .filter(|t| t.disruption && matches!(t.reason.as_deref(), Some("Evicted" | "Terminated")))
    {
        conditions.push(condition(
            "DisruptionTarget",
            true,
            Some("TerminationByKubelet".into()),
            t.message.clone(),
        ));
    }
    if let Some(scheduled) = previous
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")
    {
        conditions.push(scheduled.clone());
    } else {
        conditions.push(condition("PodScheduled", true, None, None));
    }

    let ip = input.node_ip.to_string();
    let pod_ips: Vec<String> = if input.pod_ips.is_empty() {
        vec![ip.clone()]
    } else {
        input.pod_ips.iter().map(ToString::to_string).collect()
    };
    PodStatus {
        phase: Some(phase.as_str().into()),
        reason: input.terminal.and_then(|t| t.reason.clone()),
        message: input.terminal.and_then(|t| t.message.clone()),
        conditions: Some(conditions),
        host_ip: Some(ip.clone()),
        host_ips: Some(vec![HostIP { ip }]),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: Some(pod_ips.into_iter().map(|ip| PodIP { ip }).collect()),
        start_time: Some(Time(input.start_time)),
        qos_class: Some(qos_class(&init, &app).into()),
        init_container_statuses: if init.is_empty() {
            None
        } else {
            Some(init_statuses)
        },
        container_statuses: Some(app_statuses),
        ..Default::default()
    }
}

/// The `terminated.reason` the kubelet reports for how a container ended. CRI runtimes report
/// "Completed" for exit 0, "OOMKilled" for an OOM kill and "Error" for every other end
/// (containerd's `errorExitReason`), a container the kubelet stopped (exit 137 after SIGKILL)
/// included: the kubelet shows such a container as Error, and so does this node.
pub(super) fn exit_reason(reason: ExitReason) -> &'static str {
    match reason {
        ExitReason::Completed => "Completed",
        ExitReason::OomKilled => "OOMKilled",
        ExitReason::Error | ExitReason::Killed => "Error",
    }
}

pub(super) fn waiting(reason: &str, message: Option<String>) -> K8sState {
    K8sState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

pub(super) fn terminated(
    container_uri: String,
    started: Option<SystemTime>,
    finished: SystemTime,
    code: i32,
    reason: ExitReason,
    message: Option<String>,
) -> ContainerStateTerminated {
    ContainerStateTerminated {
        container_id: Some(container_uri),
        exit_code: code,
        reason: Some(exit_reason(reason).into()),
        message,
        started_at: started.map(|t| Time(t.into())),
        finished_at: Some(Time(finished.into())),
        signal: None,
    }
}

/// The kubelet's getPhase, for a pod that is not already terminal.
/// A pod's phase, `status.phase` (the API's `Unknown` is the control plane's, never ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// The phase a status names; `None` for none, or `Unknown`.
    pub fn of(phase: Option<&str>) -> Option<Self> {
        match phase? {
            "Pending" => Some(Self::Pending),
            "Running" => Some(Self::Running),
            "Succeeded" => Some(Self::Succeeded),
            "Failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// Succeeded or Failed: nothing more runs.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

pub(super) fn pod_phase(
    policy: plan::RestartPolicy,
    init_done: bool,
    init_failed: bool,
    app: &[ContainerStatus],
) -> PodPhase {
    if init_failed && policy == plan::RestartPolicy::Never {
        return PodPhase::Failed;
    }
    if !init_done {
        return PodPhase::Pending;
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in app {
        let state = s.state.clone().unwrap_or_default();
        if state.running.is_some() {
            running += 1;
        } else if let Some(t) = &state.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if let Some(t) = s.last_state.as_ref().and_then(|l| l.terminated.as_ref()) {
            // Waiting to restart after a run: counts as stopped, as in the kubelet.
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return PodPhase::Pending;
    }
    if running > 0 {
        return PodPhase::Running;
    }
    if stopped > 0 {
        if policy == plan::RestartPolicy::Always {
            return PodPhase::Running;
        }
        if stopped == succeeded {
            return PodPhase::Succeeded;
        }
        if policy == plan::RestartPolicy::Never {
            return PodPhase::Failed;
        }
        return PodPhase::Running;
    }
    PodPhase::Pending
}

/// Guaranteed, Burstable or BestEffort, as the API server and kubelet compute it.
pub fn qos_class(init: &[Container], app: &[Container]) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in init.iter().chain(app) {
        let res = c.resources.clone().unwrap_or_default();
        let limits = res.limits.unwrap_or_default();
        let requests = res.requests.unwrap_or_default();
        // Only cpu and memory decide the QoS class (the API server's rule; it rejects a status
        // whose class differs from the one it computed).
        if ["cpu", "memory"]
            .iter()
            .any(|r| limits.contains_key(*r) || requests.contains_key(*r))
        {
            any = true;
        }
        for r in ["cpu", "memory"] {
            match (limits.get(r), requests.get(r)) {
                (Some(l), Some(q)) if l == q => {}
                (Some(_), None) => {} // requests default to limits
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cs(state: K8sState, last: Option<ContainerStateTerminated>) -> ContainerStatus {
        ContainerStatus {
            state: Some(state),
            last_state: Some(K8sState {
                terminated: last,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn exited(code: i32) -> K8sState {
        K8sState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let running = K8sState {
            running: Some(Default::default()),
            ..Default::default()
        };
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Never,
                true,
                false,
                &[cs(exited(0), None)]
            ),
            PodPhase::Succeeded
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Never,
                true,
                false,
                &[cs(exited(3), None)]
            ),
            PodPhase::Failed
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Always,
                true,
                false,
                &[cs(exited(0), None)]
            ),
            PodPhase::Running
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::OnFailure,
                true,
                false,
                &[cs(
                    waiting("CrashLoopBackOff", None),
                    Some(ContainerStateTerminated {
                        exit_code: 1,
                        ..Default::default()
                    })
                )]
            ),
            PodPhase::Running
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Never,
                true,
                false,
                &[cs(running, None)]
            ),
            PodPhase::Running
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Never,
                true,
                false,
                &[cs(waiting("ContainerCreating", None), None)]
            ),
            PodPhase::Pending
        );
        assert_eq!(
            pod_phase(
                plan::RestartPolicy::Never,
                false,
                false,
                &[cs(waiting("PodInitializing", None), None)]
            ),
            PodPhase::Pending
        );
        assert_eq!(
            pod_phase(plan::RestartPolicy::Never, false, true, &[]),
            PodPhase::Failed
        );
    }

    #[test]
    fn qos_classes() {
        let c = |limits: &[(&str, &str)], requests: &[(&str, &str)]| -> Container {
            serde_json::from_value(serde_json::json!({
                "name": "c",
                "resources": {
                    "limits": limits.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>(),
                    "requests": requests.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>(),
                }
            }))
            .unwrap()
        };
        assert_eq!(qos_class(&[], &[c(&[], &[])]), "BestEffort");
        assert_eq!(
            qos_class(
                &[],
                &[c(
                    &[("ephemeral-storage", "2Ki")],
                    &[("ephemeral-storage", "1Ki")]
                )]
            ),
            "BestEffort"
        );
        assert_eq!(
            qos_class(&[], &[c(&[("cpu", "1"), ("memory", "1Gi")], &[])]),
            "Guaranteed"
        );
        assert_eq!(qos_class(&[], &[c(&[("memory", "1Gi")], &[])]), "Burstable");
        assert_eq!(qos_class(&[], &[c(&[], &[("cpu", "100m")])]), "Burstable");
    }

    // ------------------------------------------------------------------ compute, table-tested

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn spec(policy: &str, init: &[&str], app: &[&str]) -> Pod {
        let c = |n: &&str| serde_json::json!({"name": n, "image": format!("r/{n}:v1")});
        pod(serde_json::json!({
            "restartPolicy": policy,
            "initContainers": init.iter().map(c).collect::<Vec<_>>(),
            "containers": app.iter().map(c).collect::<Vec<_>>(),
        }))
    }

    fn run() -> ContainerRecord {
        let mut r = ContainerRecord::default();
        r.id = Some("c1".into());
        r.current = Some(ContainerState::Running {
            started_at: SystemTime::UNIX_EPOCH,
        });
        r
    }

    fn ended(code: i32, reason: ExitReason) -> ContainerRecord {
        let mut r = ContainerRecord::default();
        r.id = Some("c1".into());
        let at = SystemTime::UNIX_EPOCH;
        r.current = Some(ContainerState::Exited {
            started_at: Some(at),
            finished_at: at,
            exit_code: code,
            reason,
            message: None,
        });
        r.last_terminated = Some(terminated(
            "wasm://c1".into(),
            Some(at),
            at,
            code,
            reason,
            None,
        ));
        r
    }

    fn waits(reason: &str) -> ContainerRecord {
        let mut r = ContainerRecord::default();
        r.waiting = Some((reason.into(), format!("{reason} because")));
        r
    }

    /// The status of `pod` with these records; probes say ready when `ready`.
    fn compute_for(
        pod: &Pod,
        records: Vec<(&str, ContainerRecord)>,
        ready: bool,
        terminal: Option<&Terminal>,
        previous: &PodStatus,
    ) -> PodStatus {
        let containers: crate::pods::worker::Records = records
            .into_iter()
            .map(|(n, r)| (n.to_string(), Box::new(r)))
            .collect();
        compute(&Input {
            pod,
            containers: &containers,
            ready: &|_| ready,
            started: &|_| true,
            terminal,
            sandbox_ready: true,
            previous,
            container_uri: &|id| format!("wasm://{id}"),
            node_ip: "10.0.0.1",
            pod_ips: &[],
            start_time: DateTime::<Utc>::UNIX_EPOCH,
            now: DateTime::<Utc>::UNIX_EPOCH + k8s_openapi::chrono::Duration::seconds(100),
        })
    }

    fn condition<'a>(s: &'a PodStatus, kind: &str) -> (&'a str, Option<&'a str>) {
        let c = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .unwrap_or_else(|| panic!("no {kind} condition: {s:#?}"));
        (c.status.as_str(), c.reason.as_deref())
    }

    /// `waiting:<reason>`, `running` or `terminated:<reason>:<code>` for the named container.
    fn state(s: &PodStatus, name: &str) -> String {
        let c = s
            .container_statuses
            .iter()
            .flatten()
            .chain(s.init_container_statuses.iter().flatten())
            .find(|c| c.name == name)
            .unwrap();
        let st = c.state.clone().unwrap();
        if let Some(w) = st.waiting {
            format!("waiting:{}", w.reason.unwrap_or_default())
        } else if st.running.is_some() {
            "running".into()
        } else {
            let t = st.terminated.unwrap();
            format!(
                "terminated:{}:{}",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        }
    }

    #[test]
    fn phases_conditions_and_container_states_follow_the_kubelet() {
        struct Case {
            what: &'static str,
            pod: Pod,
            records: Vec<(&'static str, ContainerRecord)>,
            ready: bool,
            phase: &'static str,
            states: &'static [(&'static str, &'static str)],
            // (Initialized, ContainersReady, Ready) statuses.
            conditions: (&'static str, &'static str, &'static str),
        }
        let cases = vec![
            Case {
                what: "nothing started yet",
                pod: spec("Always", &[], &["app"]),
                records: vec![],
                ready: false,
                phase: "Pending",
                states: &[("app", "waiting:ContainerCreating")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "running and ready",
                pod: spec("Always", &[], &["app"]),
                records: vec![("app", run())],
                ready: true,
                phase: "Running",
                states: &[("app", "running")],
                conditions: ("True", "True", "True"),
            },
            Case {
                what: "running, readiness probe failing",
                pod: spec("Always", &[], &["app"]),
                records: vec![("app", run())],
                ready: false,
                phase: "Running",
                states: &[("app", "running")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "an init container runs",
                pod: spec("Always", &["init"], &["app"]),
                records: vec![("init", run())],
                ready: true,
                phase: "Pending",
                states: &[("init", "running"), ("app", "waiting:ContainerCreating")],
                conditions: ("False", "False", "False"),
            },
            Case {
                what: "init done, app runs",
                pod: spec("Always", &["init"], &["app"]),
                records: vec![("init", ended(0, ExitReason::Completed)), ("app", run())],
                ready: true,
                phase: "Running",
                states: &[("init", "terminated:Completed:0"), ("app", "running")],
                conditions: ("True", "True", "True"),
            },
            Case {
                what: "an init container failed under Never",
                pod: spec("Never", &["init"], &["app"]),
                records: vec![("init", ended(1, ExitReason::Error))],
                ready: true,
                phase: "Failed",
                states: &[("init", "terminated:Error:1")],
                conditions: ("False", "False", "False"),
            },
            Case {
                what: "a crash under Always backs off",
                pod: spec("Always", &[], &["app"]),
                records: vec![("app", ended(1, ExitReason::Error))],
                ready: true,
                phase: "Running",
                states: &[("app", "waiting:CrashLoopBackOff")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "a failure under Never",
                pod: spec("Never", &[], &["app"]),
                records: vec![("app", ended(3, ExitReason::Error))],
                ready: true,
                phase: "Failed",
                states: &[("app", "terminated:Error:3")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "success under OnFailure",
                pod: spec("OnFailure", &[], &["app"]),
                records: vec![("app", ended(0, ExitReason::Completed))],
                ready: true,
                phase: "Succeeded",
                states: &[("app", "terminated:Completed:0")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "stopped by the node: exit 137, reason Error as the kubelet reports it",
                pod: spec("Never", &[], &["app"]),
                records: vec![("app", ended(137, ExitReason::Killed))],
                ready: true,
                phase: "Failed",
                states: &[("app", "terminated:Error:137")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "OOM-killed",
                pod: spec("Never", &[], &["app"]),
                records: vec![("app", ended(137, ExitReason::OomKilled))],
                ready: true,
                phase: "Failed",
                states: &[("app", "terminated:OOMKilled:137")],
                conditions: ("True", "False", "False"),
            },
            Case {
                what: "a pull failure waits with its reason",
                pod: spec("Always", &[], &["app", "side"]),
                records: vec![("app", waits("ErrImagePull")), ("side", run())],
                ready: true,
                phase: "Pending",
                states: &[("app", "waiting:ErrImagePull"), ("side", "running")],
                conditions: ("True", "False", "False"),
            },
        ];
        for case in cases {
            let s = compute_for(
                &case.pod,
                case.records,
                case.ready,
                None,
                &PodStatus::default(),
            );
            assert_eq!(s.phase.as_deref(), Some(case.phase), "{}", case.what);
            for (name, want) in case.states {
                assert_eq!(state(&s, name), *want, "{}: {name}", case.what);
            }
            let got = (
                condition(&s, "Initialized").0,
                condition(&s, "ContainersReady").0,
                condition(&s, "Ready").0,
            );
            assert_eq!(got, case.conditions, "{}", case.what);
            assert_eq!(condition(&s, "PodScheduled").0, "True", "{}", case.what);
            assert_eq!(s.pod_ip.as_deref(), Some("10.0.0.1"));
        }
    }

    #[test]
    fn a_sandbox_with_its_own_ips_reports_them_and_the_node_ip_as_host_ip() {
        let pod = pod(serde_json::json!({"containers": [{"name": "c", "image": "i"}]}));
        let containers = BTreeMap::new();
        let ips: Vec<std::net::IpAddr> =
            vec!["10.42.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let s = compute(&Input {
            pod: &pod,
            containers: &containers,
            ready: &|_| true,
            started: &|_| true,
            terminal: None,
            sandbox_ready: true,
            previous: &PodStatus::default(),
            container_uri: &|id| format!("containerd://{id}"),
            node_ip: "192.0.2.2",
            pod_ips: &ips,
            start_time: DateTime::<Utc>::UNIX_EPOCH,
            now: DateTime::<Utc>::UNIX_EPOCH,
        });
        assert_eq!(s.pod_ip.as_deref(), Some("10.42.0.7"));
        let pod_ips: Vec<_> = s.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
        assert_eq!(pod_ips, ["10.42.0.7", "fd00::7"]);
        assert_eq!(s.host_ip.as_deref(), Some("192.0.2.2"));
    }

    #[test]
    fn condition_reasons_messages_and_transition_times() {
        let p = spec("Always", &["init"], &["a", "b"]);
        let s = compute_for(
            &p,
            vec![("init", run())],
            false,
            None,
            &PodStatus::default(),
        );
        let ready = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [a b]")
        );
        assert_eq!(
            condition(&s, "Initialized"),
            ("False", Some("ContainersNotInitialized"))
        );
        // The crash-loop message names the backoff, the container and the pod.
        let mut crashed = ended(1, ExitReason::Error);
        crashed.backoff = std::time::Duration::from_secs(20);
        let s = compute_for(
            &spec("Always", &[], &["app"]),
            vec![("app", crashed)],
            true,
            None,
            &PodStatus::default(),
        );
        let c = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            c.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .message
                .as_deref(),
            Some("back-off 20s restarting failed container=app pod=p_ns(u)")
        );
        // A condition whose status did not change keeps its transition time; PodScheduled is
        // kept as the scheduler wrote it.
        let earlier = Time(DateTime::<Utc>::UNIX_EPOCH + k8s_openapi::chrono::Duration::seconds(5));
        let previous = PodStatus {
            conditions: Some(vec![
                PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(earlier.clone()),
                    ..Default::default()
                },
                PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    reason: Some("Scheduled".into()),
                    last_transition_time: Some(earlier.clone()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let p = spec("Always", &[], &["app"]);
        let s = compute_for(&p, vec![("app", run())], true, None, &previous);
        let find = |kind: &str| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == kind)
                .unwrap()
                .clone()
        };
        assert_eq!(find("Ready").last_transition_time, Some(earlier.clone()));
        assert_eq!(find("PodScheduled").reason.as_deref(), Some("Scheduled"));
        let s = compute_for(&p, vec![("app", run())], false, None, &previous);
        assert_ne!(
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .last_transition_time,
            Some(earlier)
        );
    }

    #[test]
    fn a_terminal_pod_keeps_its_outcome_and_an_evicted_one_is_a_disruption_target() {
        let evicted = Terminal {
            phase: PodPhase::Failed,
            reason: Some("Evicted".into()),
            message: Some("The node was low on resource: memory.".into()),
            disruption: true,
        };
        let s = compute_for(
            &spec("Always", &[], &["app"]),
            vec![("app", ended(137, ExitReason::Killed))],
            true,
            Some(&evicted),
            &PodStatus::default(),
        );
        assert_eq!(
            (s.phase.as_deref(), s.reason.as_deref()),
            (Some("Failed"), Some("Evicted"))
        );
        // Nothing restarts once terminal: the last run stays terminated.
        assert_eq!(state(&s, "app"), "terminated:Error:137");
        assert_eq!(
            condition(&s, "DisruptionTarget"),
            ("True", Some("TerminationByKubelet"))
        );
        assert_eq!(condition(&s, "PodReadyToStartContainers").0, "False");
        // Refused at admission under node pressure (same reason, never ran): no disruption.
        let refused = Terminal {
            phase: PodPhase::Failed,
            reason: Some("Evicted".into()),
            message: Some("Pod was rejected: The node had condition: [DiskPressure]. ".into()),
            disruption: false,
        };
        let s = compute_for(
            &spec("Always", &[], &["app"]),
            vec![],
            true,
            Some(&refused),
            &PodStatus::default(),
        );
        assert!(
            !s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "DisruptionTarget"),
            "{:?}",
            s.conditions
        );
    }

    #[test]
    fn a_finished_run_known_only_from_the_status_keeps_its_container_id() {
        // After an agent restart a finished run is restored from the pod's status alone: no
        // current ID, only the last terminated state (with its ID).
        let mut restored = ended(3, ExitReason::Error);
        restored.id = None;
        restored.current = None;
        let s = compute_for(
            &spec("Never", &[], &["job"]),
            vec![("job", restored)],
            true,
            None,
            &PodStatus::default(),
        );
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(state(&s, "job"), "terminated:Error:3");
        assert_eq!(cs.container_id.as_deref(), Some("wasm://c1"));
        // A container that never ran has none.
        let s = compute_for(
            &spec("Never", &[], &["job"]),
            vec![],
            true,
            None,
            &PodStatus::default(),
        );
        assert_eq!(s.container_statuses.as_ref().unwrap()[0].container_id, None);
    }
}
