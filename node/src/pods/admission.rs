//! Admission: whether this node can run a pod at all. A pod it cannot run is rejected with
//! phase Failed, a reason and a message naming the cause, and an Event; it never loops.
//!
//! [`admit`] checks what a Wasm node cannot honour; [`Ledger`] then checks that the pod's
//! requests fit: it is the only owner of the admitted pods' requests, and compares a new pod's
//! (see [`super::resources::pod_requests`]) with node allocatable less what the admitted,
//! not yet terminated pods request, as the kubelet's resource predicate does: `OutOfpods`,
//! `OutOfcpu`, `OutOfmemory`, `OutOfephemeral-storage`, with the kubelet's message.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, oneshot};

use super::resources::{pod_requests, Resources};
use crate::machine::Allocatable;

/// Why a pod was rejected: `reason` goes to status.reason, `message` to status.message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub message: String,
}

fn reject(reason: &str, message: String) -> Result<(), Rejection> {
    Err(Rejection {
        reason: reason.into(),
        message,
    })
}

/// Checks what a Wasm node cannot honour. Volume types are admitted only when
/// [`super::volumes`] can materialise them.
pub fn admit(pod: &Pod) -> Result<(), Rejection> {
    let Some(spec) = &pod.spec else {
        return reject("UnsupportedPodSpec", "the pod has no spec".into());
    };
    if spec.host_pid == Some(true) {
        return reject(
            "UnsupportedPodSpec",
            "hostPID is not supported: WebAssembly pods have no process namespace to share".into(),
        );
    }
    if spec.host_ipc == Some(true) {
        return reject(
            "UnsupportedPodSpec",
            "hostIPC is not supported: WebAssembly pods have no IPC namespace to share".into(),
        );
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        let sc = c.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            return reject(
                "UnsupportedPodSpec",
                format!(
                    "container {} asks to be privileged, which a WebAssembly sandbox cannot grant",
                    c.name
                ),
            );
        }
        if sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|caps| caps.add.as_ref())
            .is_some_and(|a| !a.is_empty())
        {
            return reject(
                "UnsupportedPodSpec",
                format!(
                    "container {} adds Linux capabilities, which WebAssembly pods do not have",
                    c.name
                ),
            );
        }
        if c.image.as_deref().unwrap_or("").is_empty() {
            return reject(
                "UnsupportedPodSpec",
                format!("container {} has no image", c.name),
            );
        }
    }
    if let Some(sysctls) = spec
        .security_context
        .as_ref()
        .and_then(|s| s.sysctls.as_ref())
    {
        if !sysctls.is_empty() {
            return reject(
                "SysctlForbidden",
                "sysctls are not supported: WebAssembly pods have no kernel parameters".into(),
            );
        }
    }
    for v in spec.volumes.iter().flatten() {
        if !super::volumes::supported(v) {
            return reject(
                "UnsupportedVolume",
                format!(
                    "volume {} is of type {}, which this node does not support",
                    v.name,
                    super::volumes::type_name(v)
                ),
            );
        }
    }
    // Ports, the outbound hosts annotation, the request bound (which pod holds a port is the
    // worker's claim on the node's table, after this).
    super::ports::validate(pod)?;
    Ok(())
}

/// The kubelet's reason for a pod refused under node pressure (the eviction manager's admit
/// handler gives the same reason as its evictions).
pub const PRESSURE_REASON: &str = "Evicted";
/// The taint the controller manager puts on a node under memory pressure.
const MEMORY_PRESSURE_TAINT: &str = "node.kubernetes.io/memory-pressure";

/// The kubelet eviction manager's admit handler: while the node reports a pressure condition
/// (within its transition period too), a new pod is refused with reason `Evicted` and "The node
/// had condition: [..]. ", except a critical one (static, mirror, system-critical priority).
/// Under memory pressure alone only BestEffort pods are refused, and not those that tolerate
/// the memory-pressure NoSchedule taint.
pub fn pressure(pod: &Pod, pressure: &crate::eviction::Pressure) -> Result<(), Rejection> {
    let conditions: Vec<&str> = [
        ("MemoryPressure", pressure.memory.is_some()),
        ("DiskPressure", pressure.disk.is_some()),
        ("PIDPressure", pressure.pid.is_some()),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| name)
    .collect();
    if conditions.is_empty() || crate::eviction::is_critical(pod) {
        return Ok(());
    }
    if conditions == ["MemoryPressure"] {
        let spec = pod.spec.clone().unwrap_or_default();
        let best_effort = super::pod_status::qos_class(
            spec.init_containers.as_deref().unwrap_or_default(),
            &spec.containers,
        ) == "BestEffort";
        let tolerated = spec
            .tolerations
            .iter()
            .flatten()
            .any(|t| tolerates(t, MEMORY_PRESSURE_TAINT, "NoSchedule"));
        if !best_effort || tolerated {
            return Ok(());
        }
    }
    reject(
        PRESSURE_REASON,
        format!("The node had condition: [{}]. ", conditions.join(" ")),
    )
}

/// Whether a toleration tolerates a taint of `key` and `effect` with an empty value, as
/// Kubernetes' `Toleration.ToleratesTaint`.
fn tolerates(t: &k8s_openapi::api::core::v1::Toleration, key: &str, effect: &str) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == effect);
    let key_ok = t.key.as_deref().is_none_or(|k| k.is_empty() || k == key);
    let value_ok = match t.operator.as_deref() {
        Some("Exists") => true,
        None | Some("") | Some("Equal") => t.value.as_deref().unwrap_or("").is_empty(),
        Some(_) => false,
    };
    effect_ok && key_ok && value_ok
}

/// The admitted pods' requests, owned by one task; workers ask it over a channel.
#[derive(Clone)]
pub struct Ledger {
    requests: mpsc::UnboundedSender<LedgerRequest>,
}

enum LedgerRequest {
    Admit {
        uid: String,
        requests: Resources,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    Release {
        uid: String,
    },
}

/// A pod's place in the ledger: its requests count against allocatable until it is dropped
/// (the pod terminated, or its worker ended).
pub struct Admitted {
    uid: String,
    ledger: mpsc::UnboundedSender<LedgerRequest>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let _ = self.ledger.send(LedgerRequest::Release {
            uid: std::mem::take(&mut self.uid),
        });
    }
}

impl Ledger {
    /// Starts the ledger's task for a node with `allocatable` and room for `max_pods`; it ends
    /// when every handle and ticket is dropped.
    pub fn spawn(allocatable: Allocatable, max_pods: u32) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut book = Book {
            allocatable,
            max_pods,
            admitted: HashMap::new(),
        };
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                match request {
                    LedgerRequest::Admit {
                        uid,
                        requests,
                        reply,
                    } => {
                        let _ = reply.send(book.admit(&uid, requests));
                    }
                    LedgerRequest::Release { uid } => {
                        book.admitted.remove(&uid);
                    }
                }
            }
        });
        Self { requests: tx }
    }

    /// Admits `pod` if its requests fit what is left of allocatable; the ticket holds its place.
    pub async fn admit(&self, pod: &Pod) -> Result<Admitted, Rejection> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let requests = match pod.spec.as_ref().map(pod_requests) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return Err(Rejection {
                    reason: "UnsupportedPodSpec".into(),
                    message: format!("cannot read the pod's resources: {e}"),
                })
            }
            None => Resources::default(),
        };
        let (reply, answer) = oneshot::channel();
        let gone = || Rejection {
            reason: "UnexpectedAdmissionError".into(),
            message: "the admission ledger has stopped (the agent is shutting down)".into(),
        };
        self.requests
            .send(LedgerRequest::Admit {
                uid: uid.clone(),
                requests,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())??;
        Ok(Admitted {
            uid,
            ledger: self.requests.clone(),
        })
    }
}

/// The ledger's state: what each admitted pod requests.
struct Book {
    allocatable: Allocatable,
    max_pods: u32,
    admitted: HashMap<String, Resources>,
}

impl Book {
    /// The kubelet's order of checks: pods, cpu, memory, ephemeral-storage; the first that does
    /// not fit is the reason.
    fn admit(&mut self, uid: &str, requests: Resources) -> Result<(), Rejection> {
        if self.admitted.contains_key(uid) {
            return Ok(());
        }
        let used = self
            .admitted
            .values()
            .fold(Resources::default(), |a, r| a.saturating_add(*r));
        let short = |resource: &str, requested: u64, used: u64, capacity: u64| {
            Rejection {
            reason: format!("OutOf{resource}"),
            message: format!("Node didn't have enough resource: {resource}, requested: {requested}, used: {used}, capacity: {capacity}"),
        }
        };
        let pods = self.admitted.len() as u64;
        if pods + 1 > u64::from(self.max_pods) {
            return Err(short("pods", 1, pods, u64::from(self.max_pods)));
        }
        let a = &self.allocatable;
        if requests.milli_cpu > 0 && requests.milli_cpu > a.milli_cpu.saturating_sub(used.milli_cpu)
        {
            return Err(short(
                "cpu",
                requests.milli_cpu,
                used.milli_cpu,
                a.milli_cpu,
            ));
        }
        if requests.memory > 0 && requests.memory > a.memory_bytes.saturating_sub(used.memory) {
            return Err(short(
                "memory",
                requests.memory,
                used.memory,
                a.memory_bytes,
            ));
        }
        if requests.ephemeral_storage > 0
            && requests.ephemeral_storage
                > a.ephemeral_storage_bytes
                    .saturating_sub(used.ephemeral_storage)
        {
            return Err(short(
                "ephemeral-storage",
                requests.ephemeral_storage,
                used.ephemeral_storage,
                a.ephemeral_storage_bytes,
            ));
        }
        self.admitted.insert(uid.to_string(), requests);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn under(memory: bool, disk: bool) -> crate::eviction::Pressure {
        crate::eviction::Pressure {
            memory: memory.then(|| "m".to_string()),
            disk: disk.then(|| "d".to_string()),
            pid: None,
        }
    }

    fn pod_json(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("a valid pod")
    }

    #[test]
    fn pressure_refuses_as_the_kubelets_eviction_admit_handler() {
        let best_effort = pod_json(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        );
        let guaranteed = pod_json(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {"cpu": "1", "memory": "1Mi"}}}]}}),
        );
        let tolerating = pod_json(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}], "tolerations": [{"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"}]}}),
        );
        let critical = pod_json(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}], "priority": 2_000_001_000}}),
        );
        // No condition: everything in.
        assert!(pressure(&best_effort, &under(false, false)).is_ok());
        // Disk pressure: every pod but a critical one out.
        let r = pressure(&guaranteed, &under(false, true)).unwrap_err();
        assert_eq!(
            (r.reason.as_str(), r.message.as_str()),
            ("Evicted", "The node had condition: [DiskPressure]. ")
        );
        assert!(pressure(&tolerating, &under(false, true)).is_err());
        assert!(pressure(&critical, &under(false, true)).is_ok());
        // Memory pressure alone: BestEffort out unless it tolerates the taint.
        let r = pressure(&best_effort, &under(true, false)).unwrap_err();
        assert_eq!(r.message, "The node had condition: [MemoryPressure]. ");
        assert!(pressure(&guaranteed, &under(true, false)).is_ok());
        assert!(pressure(&tolerating, &under(true, false)).is_ok());
        // Both: everything but critical out.
        let r = pressure(&guaranteed, &under(true, true)).unwrap_err();
        assert_eq!(
            r.message,
            "The node had condition: [MemoryPressure DiskPressure]. "
        );
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({ "metadata": {"name": "p"}, "spec": spec }))
            .unwrap()
    }

    #[test]
    fn plain_wasm_pod_is_admitted() {
        assert!(admit(&pod(
            serde_json::json!({"containers": [{"name": "c", "image": "r/hello:v1"}]})
        ))
        .is_ok());
    }

    #[test]
    fn host_namespaces_privilege_and_unknown_volumes_are_rejected_with_reasons() {
        let r = admit(&pod(
            serde_json::json!({"hostPID": true, "containers": [{"name": "c", "image": "i"}]}),
        ))
        .unwrap_err();
        assert!(r.message.contains("hostPID"));
        let r = admit(&pod(serde_json::json!({"containers": [{"name": "c", "image": "i", "securityContext": {"privileged": true}}]}))).unwrap_err();
        assert!(r.message.contains("privileged"));
        let r = admit(&pod(serde_json::json!({"volumes": [{"name": "v", "nfs": {"server": "s", "path": "/"}}], "containers": [{"name": "c", "image": "i"}]})))
            .unwrap_err();
        assert_eq!(r.reason, "UnsupportedVolume");
        assert_eq!(
            r.message,
            "volume v is of type nfs, which this node does not support"
        );
    }

    fn book() -> Book {
        Book {
            allocatable: Allocatable {
                milli_cpu: 2000,
                memory_bytes: 1 << 30,
                ephemeral_storage_bytes: 10 << 30,
            },
            max_pods: 3,
            admitted: HashMap::new(),
        }
    }

    #[test]
    fn requests_must_fit_what_admitted_pods_left() {
        let mut b = book();
        assert!(b
            .admit(
                "a",
                Resources {
                    milli_cpu: 1500,
                    memory: 512 << 20,
                    ephemeral_storage: 0
                }
            )
            .is_ok());
        assert!(
            b.admit(
                "a",
                Resources {
                    milli_cpu: 1500,
                    memory: 512 << 20,
                    ephemeral_storage: 0
                }
            )
            .is_ok(),
            "admitting the same pod again is a no-op"
        );
        let r = b
            .admit(
                "b",
                Resources {
                    milli_cpu: 600,
                    memory: 0,
                    ephemeral_storage: 0,
                },
            )
            .unwrap_err();
        assert_eq!(r.reason, "OutOfcpu");
        assert_eq!(
            r.message,
            "Node didn't have enough resource: cpu, requested: 600, used: 1500, capacity: 2000"
        );
        let r = b
            .admit(
                "b",
                Resources {
                    milli_cpu: 500,
                    memory: 600 << 20,
                    ephemeral_storage: 0,
                },
            )
            .unwrap_err();
        assert_eq!(r.reason, "OutOfmemory");
        assert_eq!(
            r.message,
            format!(
                "Node didn't have enough resource: memory, requested: {}, used: {}, capacity: {}",
                600 << 20,
                512 << 20,
                1 << 30
            )
        );
        assert!(
            b.admit(
                "b",
                Resources {
                    milli_cpu: 500,
                    memory: 512 << 20,
                    ephemeral_storage: 0
                }
            )
            .is_ok(),
            "exactly what is left fits"
        );
        let r = b
            .admit(
                "c",
                Resources {
                    ephemeral_storage: 11 << 30,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!((r.reason.as_str(), r.message.as_str()), ("OutOfephemeral-storage", format!("Node didn't have enough resource: ephemeral-storage, requested: {}, used: 0, capacity: {}", 11u64 << 30, 10u64 << 30).as_str()));
        assert!(
            b.admit("c", Resources::default()).is_ok(),
            "a pod without requests always fits"
        );
        assert_eq!(
            b.admit("d", Resources::default()).unwrap_err().reason,
            "OutOfpods"
        );
    }

    #[tokio::test]
    async fn a_released_ticket_gives_its_requests_back() {
        let ledger = Ledger::spawn(
            Allocatable {
                milli_cpu: 1000,
                memory_bytes: 1 << 30,
                ephemeral_storage_bytes: 0,
            },
            110,
        );
        let greedy = |uid: &str| {
            pod_with(
                uid,
                serde_json::json!({"containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": "800m"}}}]}),
            )
        };
        let first = ledger.admit(&greedy("one")).await.unwrap();
        assert_eq!(
            ledger.admit(&greedy("two")).await.err().unwrap().reason,
            "OutOfcpu"
        );
        drop(first);
        assert!(ledger.admit(&greedy("two")).await.is_ok());
    }

    fn pod_with(uid: &str, spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            serde_json::json!({ "metadata": {"name": uid, "uid": uid}, "spec": spec }),
        )
        .unwrap()
    }
}
