//! The sandbox every guest of a container runs in, whatever runs it (the container's own run,
//! an exec, a probe or hook, one request to an HTTP component): one owner for what the pod
//! grants and what it is held to, so the callers ([`crate::instance`], [`crate::exec`],
//! [`crate::http`]) cannot drift apart.
//!
//! - Grants: [`granted_context`] builds the WASI context from the pod spec and nothing else
//!   (argv, env, one preopen per mount, sockets under the pod's [`NetworkPolicy`]).
//! - Limits: [`store`] makes every store charge the container's memory budget and yield (or
//!   stop) at the epoch deadline its CPU request sets; [`Metered`] charges the CPU time of
//!   every poll to the container's [`UsageMeter`] and holds it to its CPU quota.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use provider_api::ContainerConfig;
use tokio_util::sync::CancellationToken;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::cpu::{self, CpuQuota};
use crate::memory::{Limiter, MemoryBudget};
use crate::network::NetworkPolicy;

/// After a forced stop, how long a guest parked in a host call (a sleep) may take before its
/// future is dropped; a guest running Wasm is interrupted at the next epoch tick already.
const KILL_DROP_AFTER: Duration = Duration::from_millis(50);

/// A fresh store for one of the container's guests (its run, an exec, a probe, an HTTP
/// request), sandboxed as every store of the container is: memory growth charged to the
/// container's budget (`meter`), and an epoch deadline at which the guest yields to tokio every
/// slice (the container's CPU request decides the slice, see `cpu::slice_ticks`) or is
/// interrupted once `stop` is cancelled. `state` gets the store's [`Limiter`] to keep; `limiter`
/// finds it again.
pub(crate) fn store<T: Send + 'static>(
    engine: &Engine,
    meter: &UsageMeter,
    stop: &CancellationToken,
    state: impl FnOnce(Limiter) -> T,
    limiter: impl Fn(&mut T) -> &mut Limiter + Send + Sync + 'static,
) -> Store<T> {
    let mut store = Store::new(engine, state(Limiter::new(meter.budget().clone())));
    store.limiter(move |s| limiter(s) as &mut dyn ResourceLimiter);
    let stop = stop.clone();
    let ticks = meter.slice_ticks.max(1);
    // tokio's `yield_now` (not wasmtime's plain `Yield`) defers the wake-up until the runtime
    // has polled its timers and I/O, so a busy guest cannot delay those by 61 scheduler ticks.
    store.epoch_deadline_callback(move |_| {
        if stop.is_cancelled() {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            ticks,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    store.set_epoch_deadline(1);
    store
}

/// Runs `call`, dropping it shortly after `stop` is cancelled if it has not ended by then (a
/// guest waiting in a host call never reaches an epoch check).
pub(crate) async fn until_stopped(
    stop: &CancellationToken,
    call: impl std::future::Future<Output = wasmtime::Result<()>>,
) -> wasmtime::Result<()> {
    tokio::select! {
        result = call => result,
        () = async { stop.cancelled().await; tokio::time::sleep(KILL_DROP_AFTER).await } => Err(wasmtime::Error::msg("stopped")),
    }
}

/// The guest's argv with Kubernetes semantics: `command` replaces the entrypoint and `args` the
/// default arguments; a Wasm artifact has neither, so argv[0] is `command[0]` or else the
/// container's name.
pub fn argv(config: &ContainerConfig) -> Vec<String> {
    let mut argv = Vec::with_capacity(1 + config.command.len() + config.args.len());
    match config.command.split_first() {
        Some((first, rest)) => {
            argv.push(first.clone());
            argv.extend(rest.iter().cloned());
        }
        None => argv.push(config.name.clone()),
    }
    argv.extend(config.args.iter().cloned());
    argv
}

/// What the pod grants a run of the container's program, whatever its stdio: `argv`, the
/// container's env, one preopen per mount and its working dir, sockets under the pod's
/// [`NetworkPolicy`]. Stdin is empty and stdout and stderr discard until the caller wires them.
pub fn granted_context(
    config: &ContainerConfig,
    network: &NetworkPolicy,
    argv: &[String],
) -> Result<WasiCtxBuilder, String> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(argv).envs(&config.env);
    network.grant(&mut wasi);
    for mount in &config.mounts {
        let perms = if mount.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        wasi.preopened_dir(&mount.host_path, &mount.container_path, perms)
            .map_err(|e| {
                format!(
                    "mount {} at {}: {e:#}",
                    mount.host_path.display(),
                    mount.container_path
                )
            })?;
    }
    // A working dir means something only inside a preopen; preview1 has no cwd at all, so this
    // reaches components (`wasi:cli/environment.initial-cwd`) only.
    if let Some(dir) = &config.working_dir {
        if config.mounts.iter().any(|m| within(dir, &m.container_path)) {
            wasi.initial_cwd(dir);
        }
    }
    Ok(wasi)
}

fn within(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir
        || dir.is_empty()
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A container's measured usage, shared by its instance and its execs: the CPU quota they
/// share (see [`crate::cpu`]) and the memory budget they share (see [`crate::memory`]).
#[derive(Debug)]
pub struct UsageMeter {
    cpu_nanos: AtomicU64,
    budget: Arc<MemoryBudget>,
    cpu_quota: Option<CpuQuota>,
    /// Epoch ticks between yields, from the container's CPU request (see [`crate::cpu`]).
    slice_ticks: u64,
}

impl Default for UsageMeter {
    fn default() -> Self {
        Self {
            cpu_nanos: AtomicU64::new(0),
            budget: MemoryBudget::standalone(None),
            cpu_quota: None,
            slice_ticks: 1,
        }
    }
}

impl UsageMeter {
    /// A meter for a container limited to `cpu_limit_millicores` (`None` or 0: unlimited).
    pub fn with_cpu_limit(cpu_limit_millicores: Option<u64>) -> Self {
        Self {
            cpu_quota: cpu_limit_millicores.and_then(CpuQuota::from_millicores),
            ..Default::default()
        }
    }

    /// A container requesting `cpu_request_millicores` runs this many ticks between yields.
    pub fn with_cpu_request(mut self, cpu_request_millicores: Option<u64>) -> Self {
        self.slice_ticks = cpu::slice_ticks(cpu::shares(cpu_request_millicores.unwrap_or(0)));
        self
    }

    /// Every store of the container charges `budget`.
    pub fn with_memory(mut self, budget: Arc<MemoryBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// The container's CPU quota, if it has a limit.
    pub fn cpu_quota(&self) -> Option<&CpuQuota> {
        self.cpu_quota.as_ref()
    }

    /// The container's memory budget.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    pub fn usage(&self) -> provider_api::ContainerUsage {
        provider_api::ContainerUsage {
            cpu_nanos: self.cpu_nanos.load(Ordering::Relaxed),
            memory_bytes: self.budget.used(),
        }
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A future whose polls are charged to a meter: the guest runs only inside these polls (it
/// yields to tokio at every epoch tick), so the thread CPU time they take is the guest's. With
/// a CPU quota, a container that spent its period's budget is not polled until the period
/// ends: its task sleeps on a timer and holds no thread.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    meter: Arc<UsageMeter>,
    throttled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F> Metered<F> {
    pub(crate) fn new(meter: Arc<UsageMeter>, inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
            meter,
            throttled: None,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        if let Some(quota) = this.meter.cpu_quota() {
            loop {
                if let Some(sleep) = this.throttled.as_mut() {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    this.throttled = None;
                }
                match quota.throttled_until(tokio::time::Instant::now()) {
                    Some(until) => this.throttled = Some(Box::pin(tokio::time::sleep_until(until))),
                    None => break,
                }
            }
        }
        let before = thread_cpu_nanos();
        let result = this.inner.as_mut().poll(cx);
        let used = thread_cpu_nanos().saturating_sub(before);
        this.meter.cpu_nanos.fetch_add(used, Ordering::Relaxed);
        if let Some(quota) = this.meter.cpu_quota() {
            quota.charge(used);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(command: &[&str], args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            name: "app".into(),
            image: "img".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            working_dir: None,
            mounts: vec![],
            log_path: "/dev/null".into(),
            memory_limit_bytes: None,
            cpu_limit_millicores: None,
            cpu_request_millicores: None,
            attempt: 0,
            network: Default::default(),
            stdin: false,
            stdin_once: false,
            annotations: Default::default(),
        }
    }

    #[test]
    fn argv_follows_kubernetes_semantics() {
        assert_eq!(argv(&config(&[], &[])), ["app"]);
        assert_eq!(argv(&config(&[], &["-v", "x"])), ["app", "-v", "x"]);
        assert_eq!(
            argv(&config(&["/bin/tool", "serve"], &[])),
            ["/bin/tool", "serve"]
        );
        assert_eq!(
            argv(&config(&["tool", "serve"], &["--port", "80"])),
            ["tool", "serve", "--port", "80"]
        );
    }

    #[test]
    fn working_dir_counts_only_inside_a_mount() {
        assert!(within("/data", "/data"));
        assert!(within("/data/x", "/data/"));
        assert!(!within("/database", "/data"));
        assert!(within("/anything", "/"));
    }
}
