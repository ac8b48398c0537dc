//! A conformance suite generic over [`Provider`]: the same checks run against every provider
//! (providers/containerd/tests/conformance.rs runs them against containerd), each given the
//! images that behave as the check needs on that provider ([`Fixture`]).
//!
//! Each check makes its own sandbox (a fresh pod UID), waits on conditions (never fixed
//! sleeps, at most [`WAIT`]), removes what it made, and panics with a message naming the
//! provider and what it saw when the provider does not behave.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::{ContainerConfig, ContainerState, ExitReason, Provider, RegistryAuth, SandboxConfig};

/// The longest any condition is waited for: a pull of a small image or a container's run on
/// a loaded 2-core machine takes seconds; a minute means it is not happening.
pub const WAIT: Duration = Duration::from_secs(60);

/// One image and the command that makes it behave as a check needs.
#[derive(Debug, Clone)]
pub struct Case {
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
}

/// Makes the case that exits with a code (0 and 3 are asked for), and the line it writes on
/// stdout before.
pub type PrintsAndExits = Box<dyn Fn(i32) -> (Case, String) + Send + Sync>;

/// What the checks run, per provider.
pub struct Fixture {
    /// A case that writes a line on stdout and exits with a code.
    pub prints_and_exits: PrintsAndExits,
    /// A case that runs until it is asked to stop and then exits by itself with
    /// [`Fixture::term_exit_code`] (SIGTERM handled); `None` where the provider has no way to
    /// ask (WASI has no signals).
    pub ends_when_asked: Option<Case>,
    /// The exit code [`Fixture::ends_when_asked`] ends with.
    pub term_exit_code: i32,
    /// A case that runs until killed and ignores being asked to stop.
    pub ignores_stop: Case,
    /// A case that allocates memory without end; run with [`Fixture::memory_limit`].
    pub memory_hog: Case,
    pub memory_limit: u64,
    /// Credentials for the registry the images are in.
    pub auth: Vec<RegistryAuth>,
    /// A directory of the test's own: pod directories and log files go below it.
    pub work_dir: PathBuf,
    /// The provider's name in messages.
    pub name: String,
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}-{}", std::process::id())
}

/// A sandbox of a new pod; returns its id.
pub async fn sandbox(provider: &dyn Provider, fx: &Fixture) -> String {
    let uid = unique("pod");
    let pod_dir = fx.work_dir.join("pods").join(&uid);
    std::fs::create_dir_all(&pod_dir).expect("pod dir");
    provider
        .run_pod_sandbox(&SandboxConfig {
            pod_uid: uid.clone(),
            namespace: "conformance".into(),
            name: uid.clone(),
            pod_dir,
            runtime_handler: None,
            host_network: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{}: run_pod_sandbox: {e}", fx.name))
}

/// A container config for `case` whose log goes under the work dir.
pub fn config(fx: &Fixture, name: &str, case: &Case) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: case.image.clone(),
        command: case.command.clone(),
        args: case.args.clone(),
        env: vec![("CONFORMANCE".into(), "1".into())],
        working_dir: None,
        mounts: vec![],
        log_path: fx
            .work_dir
            .join("logs")
            .join(format!("{}.log", unique(name))),
        memory_limit_bytes: None,
        cpu_limit_millicores: None,
        cpu_request_millicores: None,
        attempt: 0,
        network: Default::default(),
        stdin: false,
        stdin_once: false,
        annotations: BTreeMap::from([("conformance/check".to_string(), name.to_string())]),
    }
}

/// Waits until `id`'s listed state satisfies `done`; returns it.
pub async fn wait_state(
    provider: &dyn Provider,
    fx: &Fixture,
    id: &str,
    what: &str,
    done: impl Fn(&ContainerState) -> bool,
) -> ContainerState {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        let listed = provider
            .list_containers()
            .await
            .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name));
        last = listed
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.state)
            .or(last);
        if let Some(state) = &last {
            if done(state) {
                return state.clone();
            }
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{}: container {id} did not become {what} within {WAIT:?}; last state {last:?}",
                fx.name
            );
        }
        // A poll interval, not a wait on time: the loop ends on the condition.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn exited(state: &ContainerState) -> bool {
    matches!(state, ContainerState::Exited { .. })
}

fn running(state: &ContainerState) -> bool {
    matches!(state, ContainerState::Running { .. })
}

/// Creates and starts `config` in `sandbox`; returns the container id.
pub async fn run(
    provider: &dyn Provider,
    fx: &Fixture,
    sandbox: &str,
    config: ContainerConfig,
) -> String {
    let name = config.name.clone();
    let id = provider
        .create_container(sandbox, config)
        .await
        .unwrap_or_else(|e| panic!("{}: create_container {name}: {e}", fx.name));
    provider
        .start_container(&id)
        .await
        .unwrap_or_else(|e| panic!("{}: start_container {name}: {e}", fx.name));
    id
}

/// Removes the container and checks it is no longer listed.
pub async fn remove(provider: &dyn Provider, fx: &Fixture, id: &str) {
    provider
        .remove_container(id)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_container {id}: {e}", fx.name));
    let listed = provider
        .list_containers()
        .await
        .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name));
    assert!(
        listed.iter().all(|c| c.id != id),
        "{}: container {id} is still listed after remove_container",
        fx.name
    );
}

/// Pulls every image of the fixture: each is then present with the digest the pull reported,
/// and listed for image GC.
pub async fn check_pull(provider: &dyn Provider, fx: &Fixture) {
    let mut images: Vec<String> = vec![
        (fx.prints_and_exits)(0).0.image,
        fx.ignores_stop.image.clone(),
        fx.memory_hog.image.clone(),
    ];
    images.extend(fx.ends_when_asked.iter().map(|c| c.image.clone()));
    images.sort();
    images.dedup();
    for image in images {
        let info = provider
            .pull_image(&image, &fx.auth)
            .await
            .unwrap_or_else(|e| panic!("{}: pull_image {image}: {e}", fx.name));
        assert!(
            info.digest.starts_with("sha256:"),
            "{}: digest {}",
            fx.name,
            info.digest
        );
        let status = provider.image_status(&image).await;
        assert_eq!(
            status.as_ref().map(|s| &s.digest),
            Some(&info.digest),
            "{}: image_status of {image} after its pull",
            fx.name
        );
        let listed = provider.list_images().await;
        assert!(
            listed.iter().any(|i| i.digest == info.digest),
            "{}: {image} ({}) is not in list_images: {listed:?}",
            fx.name,
            info.digest
        );
    }
}

/// A container that prints and exits: its exit code and reason are reported, and its output
/// is in its CRI log file (`<time> stdout F <line>`).
pub async fn check_exit_codes_and_logs(provider: &dyn Provider, fx: &Fixture) {
    let sandbox = sandbox(provider, fx).await;
    for (code, reason) in [(0, ExitReason::Completed), (3, ExitReason::Error)] {
        let (case, line) = (fx.prints_and_exits)(code);
        let config = config(fx, &format!("exit-{code}"), &case);
        let log_path = config.log_path.clone();
        let id = run(provider, fx, &sandbox, config).await;
        let state = wait_state(provider, fx, &id, "Exited", exited).await;
        match state {
            ContainerState::Exited {
                exit_code,
                reason: got,
                ..
            } => {
                assert_eq!(exit_code, code, "{}: exit code of exit-{code}", fx.name);
                assert_eq!(got, reason, "{}: reason of exit-{code}", fx.name);
            }
            other => panic!("{}: {other:?}", fx.name),
        }
        // The output is written by the time the exit is reported, or shortly after (a reader
        // drains the pipe); wait for it as a condition.
        let want = format!(" stdout F {line}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.lines().any(|l| l.ends_with(&want)) {
                let first = text.lines().next().unwrap_or("");
                let stamp = first.split(' ').next().unwrap_or("");
                assert!(
                    stamp.ends_with('Z') && stamp.contains('T'),
                    "{}: log line {first:?} does not start with an RFC 3339 UTC time",
                    fx.name
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {} has no line ending {want:?}: {text:?}",
                fx.name,
                log_path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        remove(provider, fx, &id).await;
    }
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}

/// Stop with grace: a container that ends when asked exits with its own code (it was not
/// killed, the grace period being far longer than it needs); one that ignores the request is
/// killed when a short grace period runs out.
pub async fn check_stop_with_grace(provider: &dyn Provider, fx: &Fixture) {
    let sandbox = sandbox(provider, fx).await;
    if let Some(case) = &fx.ends_when_asked {
        let id = run(provider, fx, &sandbox, config(fx, "ends-when-asked", case)).await;
        wait_state(provider, fx, &id, "Running", running).await;
        provider
            .stop_container(&id, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
        let state = wait_state(provider, fx, &id, "Exited", exited).await;
        assert!(
            matches!(state, ContainerState::Exited { exit_code, .. } if exit_code == fx.term_exit_code),
            "{}: a container that ends when asked should exit with {}: {state:?}",
            fx.name,
            fx.term_exit_code
        );
        remove(provider, fx, &id).await;
    }
    let id = run(
        provider,
        fx,
        &sandbox,
        config(fx, "ignores-stop", &fx.ignores_stop),
    )
    .await;
    wait_state(provider, fx, &id, "Running", running).await;
    provider
        .stop_container(&id, Duration::from_millis(500))
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
    // stop_container returns once the container has ended.
    let listed = provider
        .list_containers()
        .await
        .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name));
    let state = listed
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.state)
        .unwrap_or_else(|| panic!("{}: stopped container {id} is not listed", fx.name));
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 137, .. }),
        "{}: a container that ignores the stop should be killed (137) when the grace period ends: {state:?}",
        fx.name
    );
    // Stopping an exited container again is fine.
    provider
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: second stop_container: {e}", fx.name));
    remove(provider, fx, &id).await;
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}

/// A container that allocates past its memory limit ends OOMKilled with 137.
pub async fn check_memory_limit(provider: &dyn Provider, fx: &Fixture) {
    let sandbox = sandbox(provider, fx).await;
    let mut config = config(fx, "memory-hog", &fx.memory_hog);
    config.memory_limit_bytes = Some(fx.memory_limit);
    let id = run(provider, fx, &sandbox, config).await;
    let state = wait_state(provider, fx, &id, "Exited", exited).await;
    assert!(
        matches!(
            state,
            ContainerState::Exited {
                exit_code: 137,
                reason: ExitReason::OomKilled,
                ..
            }
        ),
        "{}: a container past its memory limit should be OOMKilled (137): {state:?}",
        fx.name
    );
    remove(provider, fx, &id).await;
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}

/// A container started by one provider instance is listed by a new instance on the same state
/// (an agent restart; `reopen` makes it once the container runs), Running, with the pod UID,
/// name, attempt and annotations it was created with, and the new instance can stop and
/// remove it.
pub async fn check_list_after_restart<F, Fut>(first: &dyn Provider, reopen: F, fx: &Fixture)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Box<dyn Provider>>,
{
    let sandbox = sandbox(first, fx).await;
    let mut config = config(fx, "survivor", &fx.ignores_stop);
    config.attempt = 2;
    let annotations = config.annotations.clone();
    let id = run(first, fx, &sandbox, config).await;
    wait_state(first, fx, &id, "Running", running).await;
    let second = reopen().await;
    let second = second.as_ref();
    let listed = second
        .list_containers()
        .await
        .unwrap_or_else(|e| panic!("{}: list_containers (new instance): {e}", fx.name));
    let found = listed
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{}: a new provider instance does not list {id}", fx.name));
    assert!(running(&found.state), "{}: {:?}", fx.name, found.state);
    assert_eq!(
        (
            found.pod_uid.as_str(),
            found.name.as_str(),
            found.attempt,
            &found.annotations
        ),
        (sandbox.as_str(), "survivor", 2, &annotations),
        "{}: what the new instance lists",
        fx.name
    );
    assert!(
        second
            .list_pod_sandboxes()
            .await
            .unwrap_or_default()
            .iter()
            .any(|s| s.pod_uid == sandbox),
        "{}: the new instance does not list the sandbox",
        fx.name
    );
    second
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container (new instance): {e}", fx.name));
    wait_state(second, fx, &id, "Exited", exited).await;
    remove(second, fx, &id).await;
    second
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}
