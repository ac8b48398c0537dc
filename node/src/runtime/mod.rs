//! The Wasm runtime process: where the guests run, apart from the agent, so that restarting or
//! upgrading the agent leaves every pod running, and a guest can never take the agent down.
//!
//! `wasm-kubelet runtime <flags>` is the runtime (main.rs): the same binary, serving the
//! [`provider_api::Provider`] seam on `--wasm-runtime-endpoint` (provider-remote), from its own
//! memory cgroup ([`cgroup`]). The agent reaches it through a
//! [`provider_remote::RemoteProvider`]:
//! - [`connect`] at start-up: a runtime that answers is adopted as it runs; with
//!   `--wasm-runtime=spawn` one is started when none answers ([`spawn`]);
//! - [`supervise`]: when the runtime goes away it is started again (spawn mode), after a
//!   restart backoff, and each change is an Event on the Node (see [`report`]) while the node's
//!   Ready condition says the runtime is down (the remote provider's status).
//!
//! Containers of a runtime that died are gone with it: the pod workers find them missing and
//! report them as the kubelet reports containers its runtime lost (`ContainerStatusUnknown`),
//! then restart them per policy.

pub mod cgroup;
pub mod classes;
pub mod instrumented;
pub mod routing;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use provider_api::{Provider, ProviderError};
use provider_remote::{RemoteProvider, RuntimeIdentity};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, WasmRuntimeMode};
use crate::events::EventSink;

/// How long a spawned runtime may take to answer (opening the image store, sweeping compiled
/// code of removed images) before the agent gives up starting.
const SPAWN_DEADLINE: Duration = Duration::from_secs(30);
/// How often the agent knocks while it waits for a runtime.
const CONNECT_POLL: Duration = Duration::from_millis(20);
/// The restart backoff after the runtime goes away: 1 s doubling to 30 s, as systemd's
/// `Restart=` with a capped `RestartSec=` would; a runtime that stayed up for 60 s starts over.
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

/// Why the agent could not reach a runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("starting the Wasm runtime ({program}): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "the Wasm runtime did not answer on {socket} within {deadline:?} (its log: {log}): {last}"
    )]
    NoAnswer {
        socket: String,
        deadline: Duration,
        log: String,
        last: ProviderError,
    },
}

/// Files of the runtime beside its socket.
pub fn pid_file(config: &Config) -> PathBuf {
    runtime_dir(config).join("wasm-runtime.pid")
}

/// The runtime's own log (its stderr when the agent spawned it).
pub fn log_file(config: &Config) -> PathBuf {
    runtime_dir(config).join("wasm-runtime.log")
}

/// The lock a runtime holds while it serves (one runtime per root dir).
pub fn lock_file(config: &Config) -> PathBuf {
    runtime_dir(config).join("wasm-runtime.lock")
}

fn runtime_dir(config: &Config) -> PathBuf {
    config
        .wasm_runtime_endpoint
        .parent()
        .map_or_else(|| config.root_dir.join("runtime"), Path::to_path_buf)
}

/// The runtime for this agent: the one answering on the endpoint, else (spawn mode) a new one.
/// In external mode it waits, saying so every 10 s, until `shutdown`.
pub async fn connect(
    config: &Config,
    argv: &[OsString],
    shutdown: &CancellationToken,
) -> Result<Option<Arc<RemoteProvider>>, RuntimeError> {
    let socket = config.wasm_runtime_endpoint.clone();
    match RemoteProvider::connect(socket.clone()).await {
        Ok(provider) => {
            let identity = provider.identity().borrow().clone();
            info!(socket = %socket.display(), pid = identity.as_ref().map(|i| i.pid), "adopting the Wasm runtime that answers");
            return Ok(Some(Arc::new(provider)));
        }
        Err(e) if config.wasm_runtime == WasmRuntimeMode::External => {
            warn!(socket = %socket.display(), error = %e, "waiting for the Wasm runtime (--wasm-runtime=external)");
        }
        Err(e) => {
            info!(socket = %socket.display(), reason = %e, "no Wasm runtime answers; starting one")
        }
    }
    let deadline = if config.wasm_runtime == WasmRuntimeMode::Spawn {
        spawn(config, argv)?;
        Some(tokio::time::Instant::now() + SPAWN_DEADLINE)
    } else {
        None
    };
    let mut last_said = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(CONNECT_POLL) => {}
        }
        match RemoteProvider::connect(socket.clone()).await {
            Ok(provider) => return Ok(Some(Arc::new(provider))),
            Err(last) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                return Err(RuntimeError::NoAnswer {
                    socket: socket.display().to_string(),
                    deadline: SPAWN_DEADLINE,
                    log: log_file(config).display().to_string(),
                    last,
                });
            }
            Err(e) if last_said.elapsed() >= Duration::from_secs(10) => {
                warn!(socket = %socket.display(), error = %e, "still waiting for the Wasm runtime");
                last_said = tokio::time::Instant::now();
            }
            Err(_) => {}
        }
    }
}

/// Starts `wasm-kubelet runtime <the agent's own flags>` in a session of its own (so it
/// outlives the agent and its process group), stdin from /dev/null, stdout and stderr appended
/// to [`log_file`]. The child is reaped by a task; once the agent is gone, init reaps it.
pub fn spawn(config: &Config, argv: &[OsString]) -> Result<u32, RuntimeError> {
    let program = std::env::current_exe().map_err(|source| RuntimeError::Spawn {
        program: "current executable".into(),
        source,
    })?;
    let err = |source| RuntimeError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let dir = runtime_dir(config);
    std::fs::create_dir_all(&dir).map_err(err)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(config))
        .map_err(err)?;
    let mut command = tokio::process::Command::new(&program);
    command
        .arg("runtime")
        .args(argv.iter().skip(1))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(err)?)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(err)?;
    let pid = child.id().unwrap_or(0);
    info!(pid, log = %log_file(config).display(), "Wasm runtime started");
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => info!(pid, %status, "Wasm runtime process ended"),
            Err(e) => warn!(pid, error = %e, "waiting for the Wasm runtime process"),
        }
    });
    Ok(pid)
}

/// Keeps a runtime up in spawn mode: when the one answering goes away, starts another after
/// the restart backoff (unless one answers meanwhile, e.g. started by hand). Ends at `shutdown`.
pub async fn supervise(
    config: Arc<Config>,
    argv: Vec<OsString>,
    provider: Arc<RemoteProvider>,
    shutdown: CancellationToken,
) {
    if config.wasm_runtime != WasmRuntimeMode::Spawn {
        return;
    }
    let mut identity = provider.identity();
    let mut backoff = RESTART_FIRST;
    let mut up_since = tokio::time::Instant::now();
    loop {
        // Wait until the runtime is gone.
        while identity.borrow_and_update().is_some() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = identity.changed() => if changed.is_err() { return },
            }
        }
        if up_since.elapsed() >= RESTART_RESET_AFTER {
            backoff = RESTART_FIRST;
        }
        warn!(restart_in = ?backoff, "the Wasm runtime is gone");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_MAX);
        // Knock first: the provider reconnects only when asked, and another runtime may answer.
        let _ = provider.status().await;
        if identity.borrow_and_update().is_none() {
            if let Err(e) = spawn(&config, &argv) {
                warn!(error = %e, "restarting the Wasm runtime");
                continue;
            }
            let deadline = tokio::time::Instant::now() + SPAWN_DEADLINE;
            while identity.borrow_and_update().is_none() && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(CONNECT_POLL) => {}
                }
                let _ = provider.status().await;
            }
        }
        up_since = tokio::time::Instant::now();
    }
}

/// Tells the Node's Events what happened to the runtime: `ContainerRuntimeDown` (Warning) when
/// it stops answering, `ContainerRuntimeRestarted` (Warning: its containers were lost) when a
/// different runtime process answers again, `ContainerRuntimeUp` when the same one does.
pub async fn report(
    mut identity: watch::Receiver<Option<RuntimeIdentity>>,
    events: EventSink,
    node_name: String,
    shutdown: CancellationToken,
) {
    let node = ObjectReference {
        kind: Some("Node".into()),
        name: Some(node_name.clone()),
        uid: Some(node_name),
        ..Default::default()
    };
    let mut last_seen: Option<RuntimeIdentity> = identity.borrow_and_update().clone();
    let mut up = last_seen.is_some();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = identity.changed() => if changed.is_err() { return },
        }
        let now = identity.borrow_and_update().clone();
        match (&now, up) {
            (None, true) => {
                up = false;
                events.warning(&node, "ContainerRuntimeDown", "The Wasm runtime stopped answering; its containers' state is unknown until it is back".into());
            }
            (Some(new), _)
                if last_seen
                    .as_ref()
                    .is_some_and(|old| old.instance != new.instance) =>
            {
                up = true;
                let old_pid = last_seen.as_ref().map_or(0, |o| o.pid);
                events.warning(&node, "ContainerRuntimeRestarted", format!("The Wasm runtime restarted (pid {old_pid} -> {}): the containers it ran were lost and are restarted per their pods' restart policy", new.pid));
                last_seen = now.clone();
            }
            (Some(_), false) => {
                up = true;
                events.normal(
                    &node,
                    "ContainerRuntimeUp",
                    "The Wasm runtime answers again".into(),
                );
                last_seen = now.clone();
            }
            _ => last_seen = now.clone().or(last_seen),
        }
    }
}
