//! One run of a container: a fresh store, the WASI context the pod grants, and the exit.
//!
//! Start at [`Instance::prepare`] (link-checks the program at create time) and
//! [`Instance::run`] (instantiates and calls `_start` / `wasi:cli/run#run`); exec runs the same
//! program through [`Instance::execute`] with [`granted_context`]. Deny by default:
//! the guest gets exactly argv, env, one preopen per mount, stdout/stderr to its log file, an
//! empty stdin; no inherited env, no host filesystem, and sockets only as the pod's
//! [`NetworkPolicy`] allows.
//!
//! The store is async (`call_async`): the epoch callback yields to tokio after every slice (one
//! tick, more for a container that requests more CPU: [`crate::cpu::slice_ticks`]), so a busy
//! guest shares the worker threads instead of pinning one, and a stop is seen within a slice.
//! Running each instance on a blocking thread instead would cost a thread per container.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use provider_api::{ContainerConfig, ExitReason, ProviderError};
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Linker, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::compile::Program;
use crate::cpu::{self, CpuQuota};
use crate::log::{ContainerLog, Stream};
use crate::memory::{Limiter, MemoryBudget, Refusal};
use crate::network::NetworkPolicy;

/// Exit code of a killed container (128 + SIGKILL), as a kubelet user expects.
pub const KILLED_EXIT_CODE: i32 = 137;
/// Exit code of a trap: there is no signal number for it, so the plain failure code 1.
pub const TRAP_EXIT_CODE: i32 = 1;
/// After a forced stop, how long a guest parked in a host call (a sleep) may take before its
/// future is dropped; a guest running Wasm is interrupted at the next epoch tick already.
const KILL_DROP_AFTER: Duration = Duration::from_millis(50);

/// How one run ended, in the node's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: i32,
    pub reason: ExitReason,
    pub message: Option<String>,
}

/// Linkers for both program kinds, built once per provider.
pub struct Linkers {
    module: Linker<P1State>,
    component: wasmtime::component::Linker<P2State>,
    /// For `wasi:http/proxy` components (see [`crate::http`]).
    http: wasmtime::component::Linker<crate::http::HttpState>,
}

impl Linkers {
    pub fn new(engine: &Engine) -> Result<Self, ProviderError> {
        let setup = |e: wasmtime::Error| ProviderError::Setup(format!("linking WASI: {e:#}"));
        let mut module = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, |s: &mut P1State| &mut s.wasi)
            .map_err(setup)?;
        let mut component = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component).map_err(setup)?;
        let http = crate::http::linker(engine).map_err(setup)?;
        Ok(Self {
            module,
            component,
            http,
        })
    }
}

/// A program linked against WASI, ready to instantiate any number of times.
#[derive(Clone)]
pub enum Instance {
    Module(wasmtime::InstancePre<P1State>),
    Component(CommandPre<P2State>),
    /// A `wasi:http/proxy` component: served, one instance per request ([`crate::http`]).
    Http(wasmtime_wasi_http::p2::bindings::ProxyPre<crate::http::HttpState>),
}

impl Instance {
    /// Links `program`: a module must import only WASI preview1 and export `_start`; a
    /// component must import only WASI preview2 and export `wasi:cli/run`.
    pub fn prepare(linkers: &Linkers, program: &Program) -> Result<Self, String> {
        match program {
            Program::Module(module) => {
                if module.get_export("_start").is_none() {
                    return Err("the module exports no `_start`: it is not a WASI command".into());
                }
                linkers
                    .module
                    .instantiate_pre(module)
                    .map(Instance::Module)
                    .map_err(|e| format!("linking the module: {e:#}"))
            }
            Program::Component(component) if crate::http::is_http_component(component) => {
                crate::http::prepare(&linkers.http, component).map(Instance::Http)
            }
            Program::Component(component) => {
                let pre = linkers
                    .component
                    .instantiate_pre(component)
                    .map_err(|e| format!("linking the component: {e:#}"))?;
                CommandPre::new(pre)
                    .map(Instance::Component)
                    .map_err(|e| format!("the component does not export wasi:cli/run: {e:#}"))
            }
        }
    }

    /// Runs the program to its end (or until `stop` is cancelled) and says how it ended.
    pub async fn run(
        &self,
        engine: &Engine,
        wasi: WasiCtxBuilder,
        stop: CancellationToken,
        meter: &Arc<UsageMeter>,
    ) -> Exit {
        let (result, refused) = self.execute(engine, wasi, stop.clone(), meter).await;
        classify(result, refused, stop.is_cancelled())
    }

    /// Runs the program in a fresh store to its end (or until `stop` is cancelled); returns the
    /// raw result and why a memory growth was refused, if one was. The store charges the
    /// container's memory budget (on `meter`), which its other stores share. [`Instance::run`]
    /// and exec (which map the result each their own way) share it.
    pub async fn execute(
        &self,
        engine: &Engine,
        wasi: WasiCtxBuilder,
        stop: CancellationToken,
        meter: &Arc<UsageMeter>,
    ) -> (wasmtime::Result<()>, Option<Refusal>) {
        let limiter = Limiter::new(meter.budget().clone());
        let slice_ticks = meter.slice_ticks;
        match self {
            Instance::Module(pre) => {
                let mut wasi = wasi;
                let mut store = Store::new(engine, P1State { wasi: wasi.build_p1(), limiter });
                arm(&mut store, &stop, slice_ticks, |s| &mut s.limiter);
                let result = until_stopped(&stop, Metered::new(meter.clone(), async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await
                }))
                .await;
                (result, store.data().limiter.refused())
            }
            Instance::Component(pre) => {
                let mut wasi = wasi;
                let state = P2State { ctx: wasi.build(), table: ResourceTable::new(), limiter };
                let mut store = Store::new(engine, state);
                arm(&mut store, &stop, slice_ticks, |s| &mut s.limiter);
                let result = until_stopped(&stop, Metered::new(meter.clone(), async {
                    let command = pre.instantiate_async(&mut store).await?;
                    match command.wasi_cli_run().call_run(&mut store).await? {
                        Ok(()) => Ok(()),
                        Err(()) => Err(I32Exit(1).into()),
                    }
                }))
                .await;
                (result, store.data().limiter.refused())
            }
            Instance::Http(_) => (Err(wasmtime::Error::msg("an HTTP component (wasi:http/proxy) has no command to run: it only answers requests")), None),
        }
    }
}

/// Sets the memory limiter and the epoch deadline: every `slice_ticks` ticks (see
/// `cpu::slice_ticks`) the guest yields to tokio, or is interrupted once `stop` is cancelled.
pub(crate) fn arm<T: Send + 'static>(
    store: &mut Store<T>,
    stop: &CancellationToken,
    slice_ticks: u64,
    limiter: impl Fn(&mut T) -> &mut Limiter + Send + Sync + 'static,
) {
    store.limiter(move |s| limiter(s) as &mut dyn ResourceLimiter);
    let stop = stop.clone();
    let ticks = slice_ticks.max(1);
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
}

/// Runs `call`, dropping it shortly after `stop` is cancelled if it has not ended by then (a
/// guest waiting in a host call never reaches an epoch check).
async fn until_stopped(
    stop: &CancellationToken,
    call: impl std::future::Future<Output = wasmtime::Result<()>>,
) -> wasmtime::Result<()> {
    tokio::select! {
        result = call => result,
        () = async { stop.cancelled().await; tokio::time::sleep(KILL_DROP_AFTER).await } => Err(wasmtime::Error::msg("stopped")),
    }
}

/// Maps a run's result to an exit: the guest's own exit code wins, then a stop, then a refused
/// memory growth (the container's limit, or the node's memory for pods), then any other trap.
pub fn classify(result: wasmtime::Result<()>, refused: Option<Refusal>, stopped: bool) -> Exit {
    let error = match result {
        Ok(()) => {
            return Exit {
                exit_code: 0,
                reason: ExitReason::Completed,
                message: None,
            }
        }
        Err(e) => e,
    };
    if let Some(I32Exit(code)) = error.downcast_ref::<I32Exit>() {
        let reason = if *code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        return Exit {
            exit_code: *code,
            reason,
            message: None,
        };
    }
    if stopped {
        return Exit {
            exit_code: KILLED_EXIT_CODE,
            reason: ExitReason::Killed,
            message: Some("stopped: the grace period ran out".into()),
        };
    }
    if let Some(refusal) = refused {
        return Exit {
            exit_code: KILLED_EXIT_CODE,
            reason: ExitReason::OomKilled,
            message: Some(refusal.to_string()),
        };
    }
    Exit {
        exit_code: TRAP_EXIT_CODE,
        reason: ExitReason::Error,
        message: Some(trap_message(&error)),
    }
}

/// One line: the root cause (e.g. "wasm trap: wasm `unreachable` instruction executed") and,
/// when there is a wasm backtrace, its innermost frame.
pub fn trap_message(error: &wasmtime::Error) -> String {
    let cause = error.root_cause().to_string();
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().first())
        .map(|f| {
            let func = f
                .func_name()
                .map(str::to_string)
                .unwrap_or_else(|| format!("function #{}", f.func_index()));
            match f.module().name() {
                Some(module) => format!(" (in {module}!{func})"),
                None => format!(" (in {func})"),
            }
        });
    format!("{cause}{}", frame.unwrap_or_default()).replace('\n', " ")
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

/// The WASI context the container is granted, and nothing more (see the module docs).
pub fn wasi_context(
    config: &ContainerConfig,
    network: &NetworkPolicy,
    log: &ContainerLog,
) -> Result<WasiCtxBuilder, String> {
    let mut wasi = granted_context(config, network, &argv(config))?;
    wasi.stdout(log.pipe(Stream::Stdout))
        .stderr(log.pipe(Stream::Stderr));
    Ok(wasi)
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

/// Store data of a preview1 module.
pub struct P1State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
}

/// Store data of a preview2 component.
pub struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
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

    #[test]
    fn a_guest_exit_code_wins_over_everything() {
        let exit = classify(
            Err(I32Exit(3).into()),
            Some(Refusal::Container { limit: 1 }),
            true,
        );
        assert_eq!((exit.exit_code, exit.reason), (3, ExitReason::Error));
        let exit = classify(Err(I32Exit(0).into()), None, false);
        assert_eq!((exit.exit_code, exit.reason), (0, ExitReason::Completed));
    }
}
