//! The fast tier: a real pod worker (plan, execution, status) against the in-memory
//! `FakeProvider`, with a real PLEG and runtime cache, on paused time. The restart, backoff,
//! init and image-pull matrix that otherwise only the cluster tests reach, in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use provider_api::fake::FakeProvider;
use provider_api::ProviderError;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{PodDesire, PodWorker, WorkerContext};
use crate::pods::pleg;
use crate::pods::status::{StatusSender, StatusUpdate};

const UID: &str = "uid-1";

struct Harness {
    fake: Arc<FakeProvider>,
    statuses: mpsc::UnboundedReceiver<StatusUpdate>,
    latest: Option<PodStatus>,
    desire: watch::Sender<PodDesire>,
    shutdown: CancellationToken,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    spec.as_object_mut()
        .unwrap()
        .entry("terminationGracePeriodSeconds")
        .or_insert(serde_json::json!(1));
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": UID}, "spec": spec}),
    )
    .unwrap()
}

fn container(name: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "image": format!("registry.test/{name}:v1")})
}

impl Harness {
    async fn start(pod: Pod) -> Harness {
        Self::start_with(pod, |_| {}).await
    }

    /// As [`Harness::start`], with `prepare` run on the fake before the worker starts.
    async fn start_with(pod: Pod, prepare: impl FnOnce(&FakeProvider)) -> Harness {
        let fake = Arc::new(FakeProvider::new());
        prepare(&fake);
        Self::start_on(pod, fake).await
    }

    /// As [`Harness::start`], on a fake that already holds what a previous agent left.
    async fn start_on(pod: Pod, fake: Arc<FakeProvider>) -> Harness {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wk-worker-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let shutdown = CancellationToken::new();
        let (cache, publisher) = pleg::runtime_cache();
        let (pleg_tx, mut pleg_rx) = mpsc::unbounded_channel();
        tokio::spawn(pleg::run(
            fake.clone(),
            publisher,
            pleg_tx,
            shutdown.clone(),
        ));
        // The manager's part: a PLEG event for the pod nudges its worker.
        let nudge = Arc::new(Notify::new());
        let forward = nudge.clone();
        tokio::spawn(async move {
            while pleg_rx.recv().await.is_some() {
                forward.notify_one();
            }
        });
        let (status, statuses) = StatusSender::channel();
        let allocatable = crate::machine::Allocatable {
            milli_cpu: 4000,
            memory_bytes: 8 << 30,
            ephemeral_storage_bytes: 100 << 30,
        };
        let ctx = Arc::new(WorkerContext {
            provider: fake.clone(),
            runtime: cache,
            pods_view: crate::server::pods::PodsViewSender::disabled(),
            client: None,
            runtime_classes: crate::runtime::classes::RuntimeClasses::none(),
            status,
            events: crate::events::EventSink::disabled(),
            node_name: "node".into(),
            node_ip: "127.0.0.1".into(),
            pods_dir: dir.join("pods"),
            pod_logs_dir: dir.join("logs"),
            node_allocatable: (allocatable.milli_cpu, allocatable.memory_bytes),
            sync_frequency: Duration::from_secs(60),
            host_ports: Default::default(),
            admission: crate::pods::admission::Ledger::spawn(allocatable, 110),
            pressure: tokio::sync::watch::channel(Default::default()).1,
        });
        let (desire, desired) = watch::channel(PodDesire {
            pod: Arc::new(pod),
            removed: false,
            evict: None,
        });
        tokio::spawn(PodWorker::new(ctx, desired, nudge).run());
        Harness {
            fake,
            statuses,
            latest: None,
            desire,
            shutdown,
            _dir: TempDir(dir),
        }
    }

    /// The next status (in virtual time) that passes `check`; panics after 30 virtual minutes.
    async fn wait(&mut self, what: &str, check: impl Fn(&PodStatus) -> bool) -> PodStatus {
        if let Some(s) = self.latest.as_ref().filter(|s| check(s)) {
            return s.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let update = tokio::time::timeout_at(deadline, self.statuses.recv()).await;
            match update {
                Ok(Some(StatusUpdate::Set(_, status))) => {
                    let status = *status;
                    self.latest = Some(status.clone());
                    if check(&status) {
                        return status;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!(
                    "no status where {what}; last: {:#?}\ncalls: {:?}",
                    self.latest,
                    self.fake.calls()
                ),
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn state_of<'a>(
    s: &'a PodStatus,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

fn running(s: &PodStatus, name: &str) -> bool {
    state_of(s, name).is_some_and(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
}

fn restarts(s: &PodStatus, name: &str) -> i32 {
    state_of(s, name).map_or(-1, |c| c.restart_count)
}

fn waiting_reason<'a>(s: &'a PodStatus, name: &str) -> Option<&'a str> {
    state_of(s, name)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .as_deref()
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_10_then_20_then_40_seconds() {
    let mut h = Harness::start(pod(
        serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]}),
    ))
    .await;
    h.wait("app runs", |s| running(s, "app")).await;
    let mut gaps = Vec::new();
    for run in 1..=3 {
        assert!(h.fake.exit(UID, "app", 1));
        let exited = Instant::now();
        let s = h
            .wait("CrashLoopBackOff", |s| {
                waiting_reason(s, "app") == Some("CrashLoopBackOff")
            })
            .await;
        assert_eq!(restarts(&s, "app"), run - 1);
        h.wait("app runs again", |s| {
            running(s, "app") && restarts(s, "app") == run
        })
        .await;
        gaps.push(exited.elapsed().as_secs());
    }
    // The kubelet's backoff: 10 s doubling (the PLEG's 1 s relist may add a second).
    for (gap, want) in gaps.iter().zip([10u64, 20, 40]) {
        assert!(
            (want..=want + 1).contains(gap),
            "restart gaps {gaps:?}, want about 10, 20, 40 s"
        );
    }
    assert_eq!(
        h.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("start app#"))
            .count(),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn restart_policies_follow_exit_codes() {
    // OnFailure: a success ends the pod Succeeded, with no restart.
    let mut h = Harness::start(pod(
        serde_json::json!({"restartPolicy": "OnFailure", "containers": [container("app")]}),
    ))
    .await;
    h.wait("app runs", |s| running(s, "app")).await;
    h.fake.exit(UID, "app", 0);
    let s = h
        .wait("Succeeded", |s| s.phase.as_deref() == Some("Succeeded"))
        .await;
    assert_eq!(restarts(&s, "app"), 0);

    // Never: a failure ends the pod Failed, with no restart.
    let mut h = Harness::start(pod(
        serde_json::json!({"restartPolicy": "Never", "containers": [container("app")]}),
    ))
    .await;
    h.wait("app runs", |s| running(s, "app")).await;
    h.fake.exit(UID, "app", 3);
    let s = h
        .wait("Failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let terminated = state_of(&s, "app")
        .unwrap()
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (3, Some("Error"))
    );
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_in_order_before_the_app() {
    let spec = serde_json::json!({"restartPolicy": "Always", "initContainers": [container("one"), container("two")], "containers": [container("app")]});
    let mut h = Harness::start(pod(spec)).await;
    h.wait("the first init container runs", |s| running(s, "one"))
        .await;
    assert!(
        !h.fake
            .calls()
            .iter()
            .any(|c| c.contains("two#") || c.contains("app#")),
        "{:?}",
        h.fake.calls()
    );
    h.fake.exit(UID, "one", 0);
    h.wait("the second runs", |s| running(s, "two")).await;
    // A failing init container runs again (Always) before anything after it.
    h.fake.exit(UID, "two", 1);
    h.wait("the second runs again", |s| {
        running(s, "two") && restarts(s, "two") == 1
    })
    .await;
    assert!(!h.fake.calls().iter().any(|c| c.contains("app#")));
    h.fake.exit(UID, "two", 0);
    let s = h.wait("the app runs", |s| running(s, "app")).await;
    assert_eq!(s.phase.as_deref(), Some("Running"));
    let order: Vec<String> = h
        .fake
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("start "))
        .collect();
    assert_eq!(
        order,
        ["start one#0", "start two#0", "start two#1", "start app#0"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_pull_backs_off_and_recovers() {
    let spec = serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]});
    let image = "registry.test/app:v1";
    let mut h = Harness::start_with(pod(spec), |fake| {
        fake.fail_pulls(image, ProviderError::Pull("manifest unknown".into()))
    })
    .await;
    h.wait("ErrImagePull", |s| {
        waiting_reason(s, "app") == Some("ErrImagePull")
    })
    .await;
    h.wait("ImagePullBackOff", |s| {
        waiting_reason(s, "app") == Some("ImagePullBackOff")
    })
    .await;
    h.fake.heal_pulls(image);
    let s = h
        .wait("the app runs once the registry answers", |s| {
            running(s, "app")
        })
        .await;
    assert_eq!(restarts(&s, "app"), 0, "pull failures are not restarts");
}

#[tokio::test(start_paused = true)]
async fn containers_the_runtime_lost_are_reported_and_restarted_without_backoff() {
    let mut h = Harness::start(pod(
        serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]}),
    ))
    .await;
    h.wait("app runs", |s| running(s, "app")).await;
    // The runtime dies a while later (after the PLEG has listed the container at least once).
    tokio::time::sleep(pleg::RELIST_PERIOD * 2).await;
    let before = Instant::now();
    h.fake.forget_all();
    let s = h
        .wait("app runs again", |s| {
            running(s, "app") && restarts(s, "app") == 1
        })
        .await;
    assert!(
        before.elapsed() < Duration::from_secs(5),
        "no crash-loop backoff for a lost container: {:?}",
        before.elapsed()
    );
    let last = state_of(&s, "app")
        .unwrap()
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap();
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (137, Some("ContainerStatusUnknown"))
    );
}

/// The previous agent died between creating the container and starting it: the next one must
/// not adopt a container that will never run (the pod stayed Pending for good), but remove it
/// and start the same attempt, as the kubelet restarts a container in the created state.
#[tokio::test(start_paused = true)]
async fn a_container_created_but_never_started_is_started_anew() {
    use provider_api::{ContainerConfig, Provider, SandboxConfig};
    let fake = Arc::new(FakeProvider::new());
    let image = "registry.test/app:v1";
    fake.pull_image(image, &[]).await.unwrap();
    let sandbox = fake
        .run_pod_sandbox(&SandboxConfig {
            pod_uid: UID.into(),
            namespace: "ns".into(),
            name: "p".into(),
            pod_dir: std::env::temp_dir(),
            runtime_handler: None,
            host_network: false,
        })
        .await
        .unwrap();
    let left = fake
        .create_container(
            &sandbox,
            ContainerConfig {
                name: "app".into(),
                image: image.into(),
                command: Vec::new(),
                args: Vec::new(),
                env: Vec::new(),
                working_dir: None,
                mounts: Vec::new(),
                log_path: std::env::temp_dir().join("never-started.log"),
                memory_limit_bytes: None,
                cpu_limit_millicores: None,
                cpu_request_millicores: None,
                attempt: 0,
                network: Default::default(),
                stdin: false,
                stdin_once: false,
                annotations: Default::default(),
            },
        )
        .await
        .unwrap();
    let mut h = Harness::start_on(
        pod(serde_json::json!({"restartPolicy": "Never", "containers": [container("app")]})),
        fake,
    )
    .await;
    let s = h.wait("app runs", |s| running(s, "app")).await;
    assert_eq!(restarts(&s, "app"), 0, "the same attempt, not a restart");
    let held: Vec<String> = h
        .fake
        .list_containers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(held.len(), 1, "one container, the new one: {held:?}");
    assert_ne!(held[0], left, "the never-started container is removed");
}

#[tokio::test(start_paused = true)]
async fn a_changed_image_replaces_the_running_container() {
    let mut h = Harness::start(pod(
        serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]}),
    ))
    .await;
    h.wait("app runs", |s| running(s, "app")).await;
    let changed = pod(
        serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "app", "image": "registry.test/app:v2"}]}),
    );
    h.desire.send_replace(PodDesire {
        pod: Arc::new(changed),
        removed: false,
        evict: None,
    });
    h.wait("the new definition runs", |s| {
        running(s, "app") && restarts(s, "app") == 1
    })
    .await;
    let calls = h.fake.calls();
    assert!(
        calls.contains(&"stop app#0".to_string())
            && calls.contains(&"pull registry.test/app:v2".to_string()),
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_image_name_that_does_not_parse_waits_without_pulling_again() {
    let bad = "registry.test/App:v1";
    let spec = serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "app", "image": bad}]});
    let mut h = Harness::start_with(pod(spec), |fake| {
        fake.fail_pulls(
            bad,
            ProviderError::InvalidImageName(
                "couldn't parse image name: invalid reference format".into(),
            ),
        )
    })
    .await;
    let s = h
        .wait("InvalidImageName", |s| {
            waiting_reason(s, "app") == Some("InvalidImageName")
        })
        .await;
    assert!(state_of(&s, "app")
        .unwrap()
        .state
        .as_ref()
        .unwrap()
        .waiting
        .as_ref()
        .unwrap()
        .message
        .as_deref()
        .unwrap()
        .contains(bad));
    // Ten minutes of syncs later: still one pull, still waiting (no ImagePullBackOff).
    tokio::time::sleep(Duration::from_secs(600)).await;
    let pulls = h
        .fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("pull "))
        .count();
    assert_eq!(pulls, 1, "{:?}", h.fake.calls());
    // The pod names another image: it is pulled and runs.
    let fixed =
        pod(serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]}));
    h.desire.send_replace(PodDesire {
        pod: Arc::new(fixed),
        removed: false,
        evict: None,
    });
    h.wait("the app runs", |s| running(s, "app")).await;
}

fn waiting_message(s: &PodStatus, name: &str) -> String {
    state_of(s, name)
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn each_kind_of_pull_failure_is_err_image_pull_then_backoff_and_says_which() {
    let image = "registry.test/app:v1";
    let cause = || provider_api::Cause::from("fetching the manifest: the registry answered");
    let reference = || image.to_string();
    for (error, words) in [
        (
            ProviderError::ImageNotFound {
                reference: reference(),
                source: cause(),
            },
            "not found",
        ),
        (
            ProviderError::Unauthorized {
                reference: reference(),
                source: cause(),
            },
            "unauthorized",
        ),
        (
            ProviderError::RegistryUnavailable {
                reference: reference(),
                source: cause(),
            },
            "the registry is unavailable",
        ),
    ] {
        let spec = serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]});
        let mut h =
            Harness::start_with(pod(spec), |fake| fake.fail_pulls(image, error.clone())).await;
        let s = h
            .wait("ErrImagePull", |s| {
                waiting_reason(s, "app") == Some("ErrImagePull")
            })
            .await;
        let message = waiting_message(&s, "app");
        assert!(
            message.contains(words) && message.contains(image),
            "{message}"
        );
        let s = h
            .wait("ImagePullBackOff", |s| {
                waiting_reason(s, "app") == Some("ImagePullBackOff")
            })
            .await;
        let message = waiting_message(&s, "app");
        assert!(message.contains(words), "{message}");
        let pulls = h
            .fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("pull "))
            .count();
        assert!(pulls >= 2, "retried: {:?}", h.fake.calls());
    }
}

#[tokio::test(start_paused = true)]
async fn an_image_that_is_not_wasm_fails_the_pod() {
    let image = "registry.test/app:v1";
    let spec = serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]});
    let mut h = Harness::start_with(pod(spec), |fake| {
        fake.fail_pulls(
            image,
            ProviderError::UnsupportedImage(format!("image {image} holds no Wasm layer")),
        )
    })
    .await;
    let s = h
        .wait("the pod fails", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    assert_eq!(s.reason.as_deref(), Some("UnsupportedImage"));
    assert!(s.message.unwrap_or_default().contains("no Wasm layer"));
}

/// Waits (in virtual time, at most 30 minutes) for the status manager to be told to remove the
/// pod object; returns the statuses set before.
async fn wait_finalized(h: &mut Harness) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        match tokio::time::timeout_at(deadline, h.statuses.recv()).await {
            Ok(Some(StatusUpdate::Finalize(_))) => return,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the pod was never finalized; calls: {:?}", h.fake.calls()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_delete_interrupts_a_pull_that_never_completes() {
    let image = "registry.test/app:v1";
    let spec = serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]});
    let mut h = Harness::start_with(pod(spec.clone()), |fake| fake.hang_pulls(image)).await;
    // The pull is under way (and will never end).
    while !h.fake.calls().iter().any(|c| c == &format!("pull {image}")) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let began = Instant::now();
    let mut deleted = pod(spec);
    deleted.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::chrono::Utc::now()),
    );
    h.desire.send_replace(PodDesire {
        pod: Arc::new(deleted),
        removed: false,
        evict: None,
    });
    wait_finalized(&mut h).await;
    // The grace period is the pod's (1 s here); nothing waited for the pull.
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "finalized after {:?}",
        began.elapsed()
    );
    let calls = h.fake.calls();
    assert!(
        calls.contains(&format!("remove-sandbox {UID}")),
        "the sandbox is removed: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("create ")),
        "nothing created: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_eviction_interrupts_a_pull_that_never_completes() {
    let image = "registry.test/app:v1";
    let spec = serde_json::json!({"restartPolicy": "Always", "containers": [container("app")]});
    let mut h = Harness::start_with(pod(spec.clone()), |fake| fake.hang_pulls(image)).await;
    while !h.fake.calls().iter().any(|c| c == &format!("pull {image}")) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.desire.send_replace(PodDesire {
        pod: Arc::new(pod(spec)),
        removed: false,
        evict: Some(crate::eviction::Eviction {
            reason: "Evicted",
            message: "The node was low on resource: memory.".into(),
            grace: Duration::ZERO,
        }),
    });
    let s = h
        .wait("the pod is evicted", |s| {
            s.reason.as_deref() == Some("Evicted")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Failed"));
}
