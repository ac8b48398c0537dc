//! Node pressure while pods churn (tests/tests/chaos_pressure.rs): a background churn of small
//! BestEffort pods on one node, a recorder of the order in which pods are evicted, and the
//! end-of-test accounting of every pod the test created.
//!
//! The [`Churn`] creates one pod every [`CHURN_EVERY`] (a job that succeeds, a crash loop, a
//! ticker, in turn), bound to the node, and deletes the oldest live ones so a handful run at
//! once. It never waits on a pod: under pressure the node refuses or evicts them, and that is
//! what the test looks at afterwards through [`account`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use tokio::sync::watch;

use crate::{example_image, kubelet_get, phase, wait_for, Agent, TestNamespace};

/// How often the churn creates a pod: a few pods a second would be more than the shared 2-core
/// machine gives a debug agent beside the other test binaries; one a second keeps several
/// pods starting, running and stopping at every moment of a pressure cycle.
pub const CHURN_EVERY: Duration = Duration::from_secs(1);
/// Live (not yet terminal) churn pods kept; the oldest beyond this are deleted.
const LIVE: usize = 4;
/// How long deleted churn pods get to go (1 s grace each; a debug agent on a busy machine).
const CLEAR_TIMEOUT: Duration = Duration::from_secs(90);

/// Pod names the churn created and deleted, in order.
#[derive(Debug, Default, Clone)]
pub struct ChurnLog {
    pub created: Vec<String>,
    pub deleted: BTreeSet<String>,
    /// What a pod was when [`Churn::clear`] deleted it: its phase, `Failed/<reason>`.
    pub last_seen: BTreeMap<String, String>,
}

/// A churn running in the background until [`Churn::stop`].
pub struct Churn {
    pub log: Arc<Mutex<ChurnLog>>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The churn's pod `n`: a job, a crash loop or a ticker, BestEffort (no requests), bound to
/// `node`, tolerating every taint (a bound pod skips the scheduler: admission is the node's).
pub fn churn_pod(node: &str, n: usize) -> Pod {
    let (kind, image, restart) = match n % 3 {
        0 => ("job", "hello", "Never"),
        1 => ("crash", "crash-looper", "Always"),
        _ => ("ticker", "ticker", "Always"),
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("churn-{kind}-{n}"), "labels": {"churn": "yes"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": kind, "image": example_image(image)}],
        },
    }))
    .expect("a valid pod")
}

impl Churn {
    pub fn start(ns: &TestNamespace, node: &str) -> Churn {
        let api = ns.pods();
        let node = node.to_string();
        let log = Arc::new(Mutex::new(ChurnLog::default()));
        let (stop, mut stopped) = watch::channel(false);
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let log = log.clone();
            let paused = paused.clone();
            async move {
                let mut n = 0;
                let mut tick = tokio::time::interval(CHURN_EVERY);
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = tick.tick() => {}
                    }
                    if paused.load(std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    n += 1;
                    let pod = churn_pod(&node, n);
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if api.create(&PostParams::default(), &pod).await.is_ok() {
                        log.lock().expect("log").created.push(name);
                    }
                    // The oldest live churn pods beyond LIVE go (deleted as a user would).
                    let Ok(list) = api.list(&ListParams::default().labels("churn=yes")).await
                    else {
                        continue;
                    };
                    let mut live: Vec<&Pod> = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| !matches!(phase(p), "Succeeded" | "Failed"))
                        .collect();
                    live.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
                    for old in live.iter().take(live.len().saturating_sub(LIVE)) {
                        let name = old.metadata.name.clone().unwrap_or_default();
                        if api.delete(&name, &DeleteParams::default()).await.is_ok() {
                            log.lock().expect("log").deleted.insert(name);
                        }
                    }
                }
            }
        });
        Churn {
            log,
            paused,
            stop,
            task,
        }
    }

    /// Stops creating pods (and deleting old ones) until [`Churn::resume`].
    pub fn pause(&self) {
        self.paused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Pauses the churn and deletes every churn pod, until none is left in the API server and
    /// the agent runs no guest of one; the pods' last phases go to [`ChurnLog::last_seen`].
    pub async fn clear(&self, api: &Api<Pod>, agent: &Agent) -> Result<(), String> {
        self.pause();
        let log = self.log.clone();
        let cleared = wait_for("every churn pod deleted", CLEAR_TIMEOUT, || async {
            let list = api
                .list(&ListParams::default().labels("churn=yes"))
                .await
                .ok()?;
            for p in &list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                if p.metadata.deletion_timestamp.is_none() {
                    let outcome = match phase(p) {
                        "Failed" => format!("Failed/{}", reason(p)),
                        other => other.to_string(),
                    };
                    {
                        let mut log = log.lock().expect("log");
                        log.last_seen.insert(name.clone(), outcome);
                        log.deleted.insert(name.clone());
                    }
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            }
            let guests = running_guests(agent);
            let churn_guest = guests.values().any(|name| name.starts_with("churn-"));
            (list.items.is_empty() && !churn_guest).then_some(())
        })
        .await;
        cleared.map_err(|e| format!("{e}: guests {:?}", running_guests(agent)))
    }

    /// Pods created so far.
    pub fn created(&self) -> usize {
        self.log.lock().expect("log").created.len()
    }

    /// Stops creating and deleting; returns what was done.
    pub async fn stop(self) -> ChurnLog {
        self.stop.send_replace(true);
        let _ = self.task.await;
        self.log.lock().expect("log").clone()
    }
}

/// Records, by polling the namespace, the order in which pods end Failed with reason Evicted
/// (an eviction, not an admission refusal: the refused ones never ran).
pub struct EvictionOrder {
    pub order: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EvictionOrder {
    /// Polls every 100 ms: the eviction manager evicts at most one pod per housekeeping pass
    /// and waits for its containers to stop, so two evictions are farther apart than that.
    pub fn start(ns: &TestNamespace) -> EvictionOrder {
        let api = ns.pods();
        let order = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let order = order.clone();
            async move {
                loop {
                    if let Ok(list) = api.list(&ListParams::default()).await {
                        let mut seen = order.lock().expect("order");
                        for p in &list.items {
                            let name = p.metadata.name.clone().unwrap_or_default();
                            if evicted_by_pressure(p) && !seen.contains(&name) {
                                seen.push(name);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        EvictionOrder { order, task }
    }

    pub fn seen(&self) -> Vec<String> {
        self.order.lock().expect("order").clone()
    }
}

impl Drop for EvictionOrder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn reason(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.reason.as_deref())
        .unwrap_or("")
}

pub fn message(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.message.as_deref())
        .unwrap_or("")
}

/// Failed, reason Evicted, by the eviction manager (the node was low on a resource), not
/// refused at admission.
pub fn evicted_by_pressure(pod: &Pod) -> bool {
    phase(pod) == "Failed"
        && reason(pod) == "Evicted"
        && message(pod).starts_with("The node was low on resource: ")
}

/// Refused at admission because of a node condition, as the kubelet's eviction admit handler
/// words it (`rejectPod`: "Pod was rejected: " + "The node had condition: [..]. ").
pub fn refused_for(pod: &Pod, condition: &str) -> bool {
    phase(pod) == "Failed"
        && reason(pod) == "Evicted"
        && message(pod) == format!("Pod was rejected: The node had condition: [{condition}]. ")
}

/// UIDs of the pods the runtime holds a running container of (the kubelet API's
/// `/runningpods/`): the guests that run, whatever the API says.
pub fn running_guests(agent: &Agent) -> BTreeMap<String, String> {
    let (code, body) = kubelet_get(agent, "/runningpods/");
    assert_eq!(code, 200, "/runningpods/: {body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("/runningpods/ is JSON");
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|p| {
                    (
                        p["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                        p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What became of every pod: each created pod is Running, Succeeded, Failed with a reason, or
/// was deleted (and is gone); none Pending; the runtime runs a guest only for a pod the API
/// has Running. Waits (up to `timeout`) for pods still starting or stopping to settle, then
/// returns the counts by outcome, or the pods that did not settle.
pub async fn account(
    api: &Api<Pod>,
    agent: &Agent,
    created: &[String],
    deleted: &BTreeSet<String>,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>, String> {
    let settled = wait_for("every pod created accounted for", timeout, || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let by_name: BTreeMap<String, &Pod> = list
            .items
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let mut outcomes = BTreeMap::new();
        for name in created {
            let outcome = match by_name.get(name) {
                None if deleted.contains(name) => "deleted".to_string(),
                None => return None,
                // Deleted but still stopping: not settled yet.
                Some(p) if p.metadata.deletion_timestamp.is_some() => return None,
                Some(p) => match phase(p) {
                    "Running" | "Succeeded" => phase(p).to_string(),
                    "Failed" if !reason(p).is_empty() || failed_container(p) => {
                        format!("Failed/{}", reason(p))
                    }
                    _ => return None,
                },
            };
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        // No guest for a pod the API does not have Running.
        let running: BTreeSet<String> = list
            .items
            .iter()
            .filter(|p| phase(p) == "Running")
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        let guests = running_guests(agent);
        guests
            .keys()
            .all(|uid| running.contains(uid))
            .then_some(outcomes)
    })
    .await;
    match settled {
        Ok(outcomes) => Ok(outcomes),
        Err(e) => {
            let list = api
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let unsettled: Vec<String> = list
                .iter()
                .filter(|p| {
                    !matches!(phase(p), "Running" | "Succeeded" | "Failed")
                        || p.metadata.deletion_timestamp.is_some()
                })
                .map(|p| {
                    format!(
                        "{} {}",
                        p.metadata.name.clone().unwrap_or_default(),
                        phase(p)
                    )
                })
                .collect();
            let guests = running_guests(agent);
            Err(format!(
                "{e}: unsettled {unsettled:?}; guests the runtime runs {guests:?}"
            ))
        }
    }
}

/// A restartPolicy Never pod whose container failed has phase Failed without a pod reason; its
/// container's terminated state carries the reason (Error) instead.
fn failed_container(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .is_some_and(|t| t.reason.is_some())
            })
        })
}
