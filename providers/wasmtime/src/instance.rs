//! One run of a container: a fresh store, the WASI context the pod grants, and the exit.
//!
//! Start at [`Instance::prepare`] (link-checks the program at create time) and
//! [`Instance::run`] (instantiates and calls `_start` / `wasi:cli/run#run`); exec runs the same
//! program through [`Instance::execute`] with [`sandbox::granted_context`]. Deny by default:
//! the guest gets exactly argv, env, one preopen per mount, stdout/stderr to its log file, an
//! empty stdin; no inherited env, no host filesystem, and sockets only as the pod's
//! [`NetworkPolicy`] allows.
//!
//! The store is async (`call_async`): the epoch callback yields to tokio after every slice (one
//! tick, more for a container that requests more CPU: [`crate::cpu::slice_ticks`]), so a busy
//! guest shares the worker threads instead of pinning one, and a stop is seen within a slice.
//! Running each instance on a blocking thread instead would cost a thread per container.

use std::sync::Arc;

use provider_api::{ContainerConfig, ExitReason, ProviderError};
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::compile::Program;
use crate::log::{ContainerLog, Stream};
use crate::memory::{Limiter, Refusal};
use crate::network::NetworkPolicy;
use crate::sandbox::{self, argv, granted_context, until_stopped, Metered, UsageMeter};

/// Exit code of a killed container (128 + SIGKILL), as a kubelet user expects.
pub const KILLED_EXIT_CODE: i32 = 137;
/// Exit code of a trap: there is no signal number for it, so the plain failure code 1.
pub const TRAP_EXIT_CODE: i32 = 1;

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
        match self {
            Instance::Module(pre) => {
                let mut wasi = wasi;
                let state = |limiter| P1State { wasi: wasi.build_p1(), limiter };
                let mut store = sandbox::store(engine, meter, &stop, state, |s| &mut s.limiter);
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
                let state = |limiter| P2State {
                    ctx: wasi.build(),
                    table: ResourceTable::new(),
                    limiter,
                };
                let mut store = sandbox::store(engine, meter, &stop, state, |s| &mut s.limiter);
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

#[cfg(test)]
mod tests {
    use super::*;

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
