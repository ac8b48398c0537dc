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

/// Makes the command that writes its argument and a newline on stdout and exits 0.
pub type Echo = Box<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// What the exec checks run, per provider.
pub struct ExecFixture {
    /// A container that runs until stopped; the commands below are exec'd into it.
    pub target: Case,
    /// A command that writes its argument and a newline on stdout and exits 0.
    pub echo: Echo,
    /// A command that exits with a non-zero code, and that code.
    pub fails: (Vec<String>, i32),
    /// A command that copies its stdin to stdout until end of file, then exits 0.
    pub cat: Vec<String>,
    /// A command that runs far longer than any check waits (ended by the exec's timeout).
    pub sleeps: Vec<String>,
}

/// A writer for a stream of an exec or an attach, and what was written to it once every
/// handle of the writer is dropped.
fn collector() -> (
    std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    use tokio::io::AsyncReadExt;
    // A reader that keeps draining: a writer never waits on this end.
    let (writer, mut reader) = tokio::io::duplex(64 * 1024);
    let read = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out).await;
        out
    });
    (Box::pin(writer), read)
}

fn reader(bytes: &'static [u8]) -> Option<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>> {
    Some(Box::pin(bytes))
}

/// Runs `command` in `id` with `stdin`; returns the result and what it wrote on stdout and
/// stderr.
pub async fn exec_collect(
    provider: &dyn Provider,
    id: &str,
    command: Vec<String>,
    stdin: Option<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    timeout: Option<Duration>,
) -> (Result<i32, crate::ProviderError>, String, String) {
    let (stdout, out) = collector();
    let (stderr, err) = collector();
    let io = crate::ExecIo {
        stdin,
        stdout,
        stderr,
        timeout,
    };
    let result = provider.exec(id, command, io).await;
    let out = String::from_utf8_lossy(&out.await.unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err.await.unwrap_or_default()).into_owned();
    (result, out, err)
}

/// Waits until the log at `path` has a line ending with `want`.
pub async fn wait_log_line(fx: &Fixture, path: &std::path::Path, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l.ends_with(want)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {} has no line ending {want:?} within {WAIT:?}: {text:?}",
            fx.name,
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exec into a running container: the command's exit code, its stdout (never the container's
/// log), its stdin, `exec_sync`'s output; a timeout ends it as [`crate::ProviderError::Timeout`]
/// and leaves the container running; an empty command, an unknown container and a stopped
/// container are refused with the documented errors.
pub async fn check_exec(provider: &dyn Provider, fx: &Fixture, ex: &ExecFixture) {
    use crate::ProviderError;
    let sandbox = sandbox(provider, fx).await;
    let config = config(fx, "exec-target", &ex.target);
    let log_path = config.log_path.clone();
    let id = run(provider, fx, &sandbox, config).await;
    wait_state(provider, fx, &id, "Running", running).await;

    let (result, out, err) =
        exec_collect(provider, &id, (ex.echo)("exec says hello"), None, None).await;
    assert_eq!(
        result,
        Ok(0),
        "{}: exit code of an exec that echoes (stderr {err:?})",
        fx.name
    );
    assert_eq!(out, "exec says hello\n", "{}: stdout of the exec", fx.name);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !log.contains("exec says hello"),
        "{}: an exec's output went to the container's log: {log:?}",
        fx.name
    );

    let (result, _, err) = exec_collect(provider, &id, ex.fails.0.clone(), None, None).await;
    assert_eq!(
        result,
        Ok(ex.fails.1),
        "{}: exit code of an exec that fails (stderr {err:?})",
        fx.name
    );

    let (result, out, err) = exec_collect(
        provider,
        &id,
        ex.cat.clone(),
        reader(b"line one\nline two\n"),
        None,
    )
    .await;
    assert_eq!(
        (result, out.as_str()),
        (Ok(0), "line one\nline two\n"),
        "{}: an exec that copies its stdin (stderr {err:?})",
        fx.name
    );

    let synced = provider
        .exec_sync(&id, (ex.echo)("synced"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: exec_sync: {e}", fx.name));
    assert_eq!(
        (synced.0, String::from_utf8_lossy(&synced.1).as_ref()),
        (0, "synced\n"),
        "{}: exec_sync",
        fx.name
    );

    let (result, _, _) = exec_collect(
        provider,
        &id,
        ex.sleeps.clone(),
        None,
        Some(Duration::from_secs(1)),
    )
    .await;
    assert!(
        matches!(result, Err(ProviderError::Timeout(_))),
        "{}: an exec past its timeout should be a Timeout: {result:?}",
        fx.name
    );
    let listed = provider
        .list_containers()
        .await
        .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name));
    assert!(
        listed.iter().any(|c| c.id == id && running(&c.state)),
        "{}: the container should still run after an exec timed out",
        fx.name
    );

    let (result, _, _) = exec_collect(provider, &id, vec![], None, None).await;
    assert!(
        matches!(result, Err(ProviderError::Exec(_))),
        "{}: an empty command should be an Exec error: {result:?}",
        fx.name
    );
    let unknown = "0123456789abcdef0123456789abcdef";
    let (result, _, _) = exec_collect(provider, unknown, (ex.echo)("x"), None, None).await;
    assert!(
        matches!(result, Err(ProviderError::NotFound(_))),
        "{}: exec into an unknown container should be NotFound: {result:?}",
        fx.name
    );

    provider
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
    wait_state(provider, fx, &id, "Exited", exited).await;
    let (result, _, _) = exec_collect(provider, &id, (ex.echo)("x"), None, None).await;
    assert!(
        matches!(result, Err(ProviderError::Exec(_))),
        "{}: exec into a stopped container should be an Exec error: {result:?}",
        fx.name
    );
    remove(provider, fx, &id).await;
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}

/// Attach (`kubectl attach`): `cat` is a case that copies its stdin to stdout until end of
/// file and then exits 0.
///
/// - With `stdin` and `stdinOnce`, what the attached client types reaches the container, the
///   echo reaches the client's stdout and the log file, and the end of the client's stdin is
///   the end of the container's (it exits 0, and the attach returns).
/// - Without `stdinOnce`, two clients attach stdin one after the other: the first one's end
///   does not close the container's stdin.
/// - Attaching stdin to a container created without `stdin`, or anything to an exited one,
///   is an Exec error.
pub async fn check_attach(provider: &dyn Provider, fx: &Fixture, cat: &Case) {
    use crate::{AttachIo, ProviderError};
    let sandbox = sandbox(provider, fx).await;

    let mut once = config(fx, "attach-once", cat);
    once.stdin = true;
    once.stdin_once = true;
    let once_log = once.log_path.clone();
    let id = run(provider, fx, &sandbox, once).await;
    wait_state(provider, fx, &id, "Running", running).await;
    let (stdout, out) = collector();
    let attached = provider.attach(
        &id,
        AttachIo {
            stdin: reader(b"attached line\n"),
            stdout: Some(stdout),
            stderr: None,
        },
    );
    tokio::time::timeout(WAIT, attached)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: attach with stdinOnce did not return within {WAIT:?} of its stdin's end",
                fx.name
            )
        })
        .unwrap_or_else(|e| panic!("{}: attach: {e}", fx.name));
    let out = String::from_utf8_lossy(&out.await.unwrap_or_default()).into_owned();
    assert_eq!(
        out, "attached line\n",
        "{}: what the attached client read",
        fx.name
    );
    let state = wait_state(provider, fx, &id, "Exited", exited).await;
    assert!(
        matches!(state, ContainerState::Exited { exit_code: 0, .. }),
        "{}: with stdinOnce the container's stdin ends with the client's: {state:?}",
        fx.name
    );
    wait_log_line(fx, &once_log, " stdout F attached line").await;
    let (stdout, _) = collector();
    let result = provider
        .attach(
            &id,
            AttachIo {
                stdin: None,
                stdout: Some(stdout),
                stderr: None,
            },
        )
        .await;
    assert!(
        matches!(result, Err(ProviderError::Exec(_))),
        "{}: attaching to an exited container should be an Exec error: {result:?}",
        fx.name
    );
    remove(provider, fx, &id).await;

    let mut kept = config(fx, "attach-kept", cat);
    kept.stdin = true;
    let kept_log = kept.log_path.clone();
    let id = run(provider, fx, &sandbox, kept).await;
    wait_state(provider, fx, &id, "Running", running).await;
    for line in [&b"first client\n"[..], &b"second client\n"[..]] {
        let attached = provider.attach(
            &id,
            AttachIo {
                stdin: reader(line),
                stdout: None,
                stderr: None,
            },
        );
        tokio::time::timeout(WAIT, attached)
            .await
            .unwrap_or_else(|_| panic!("{}: a stdin-only attach did not return", fx.name))
            .unwrap_or_else(|e| panic!("{}: attach: {e}", fx.name));
        let text = String::from_utf8_lossy(line);
        wait_log_line(fx, &kept_log, &format!(" stdout F {}", text.trim_end())).await;
    }
    let listed = provider
        .list_containers()
        .await
        .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name));
    assert!(
        listed.iter().any(|c| c.id == id && running(&c.state)),
        "{}: without stdinOnce the container's stdin stays open after a client ends",
        fx.name
    );
    provider
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
    remove(provider, fx, &id).await;

    let id = run(
        provider,
        fx,
        &sandbox,
        config(fx, "attach-no-stdin", &fx.ignores_stop),
    )
    .await;
    wait_state(provider, fx, &id, "Running", running).await;
    let result = provider
        .attach(
            &id,
            AttachIo {
                stdin: reader(b"refused\n"),
                stdout: None,
                stderr: None,
            },
        )
        .await;
    assert!(
        matches!(result, Err(ProviderError::Exec(_))),
        "{}: attaching stdin to a container without `stdin` should be an Exec error: {result:?}",
        fx.name
    );
    provider
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
    remove(provider, fx, &id).await;
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}

/// Usage (for /stats/summary, /metrics/resource, `kubectl top`): a running container that
/// keeps a CPU busy is listed with memory in use and a CPU time that grows between listings.
pub async fn check_usage(provider: &dyn Provider, fx: &Fixture, busy: &Case) {
    let sandbox = sandbox(provider, fx).await;
    let id = run(provider, fx, &sandbox, config(fx, "busy", busy)).await;
    let usage = || async {
        provider
            .list_containers()
            .await
            .unwrap_or_else(|e| panic!("{}: list_containers: {e}", fx.name))
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.usage)
            .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        let u = usage().await;
        if u.cpu_nanos > 0 && u.memory_bytes > 0 {
            break u;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: a busy container shows no CPU time or no memory within {WAIT:?}: {u:?}",
            fx.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    loop {
        let u = usage().await;
        if u.cpu_nanos > first.cpu_nanos {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: a busy container's CPU time does not grow: {first:?} then {u:?}",
            fx.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    provider
        .stop_container(&id, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: stop_container: {e}", fx.name));
    remove(provider, fx, &id).await;
    provider
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{}: remove_pod_sandbox: {e}", fx.name));
}
