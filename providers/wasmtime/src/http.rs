//! `wasi:http/proxy` components served on their container's ports, and the network policy
//! every component's sockets and outgoing requests are held to.
//!
//! Start at [`serve`]: one hyper HTTP/1.1 server per declared TCP `containerPort`, bound at the
//! pod IP (the node IP) before the container counts as started ([`bind`]). Every request gets a
//! fresh instance of the component from one [`ProxyPre`] (linked once at create time), with what
//! the container is granted: argv, env, volumes, stdout/stderr to the container log, the
//! container's memory budget (shared by all its requests in flight and its execs, see
//! [`crate::memory`]) and CPU meter. At most
//! [`DEFAULT_MAX_CONCURRENT_REQUESTS`] (or the pod's bound) instances run at once; a request
//! over the bound is answered 503 at once with a body saying so, never queued without limit.
//! HTTP components run on an engine of their own ([`HttpEngine`]) with wasmtime's pooling
//! allocator, which reuses instance slots instead of mapping memory per request.
//!
//! Lifecycle: the container runs while its listeners are up. A stop first *drains*: the
//! listeners close at once (new connections are refused), idle keep-alive connections are
//! closed, and requests in flight finish; the container then exits 0. When the grace period
//! runs out first, the kill interrupts the instances still running (exit 137).
//!
//! Policy ([`OutboundHooks`]): outgoing `wasi:http` requests and `wasi:sockets` connections go
//! only where the pod's [`NetworkPolicy`] (crate::network) allows. The listeners bound here are
//! recorded as the pod's own, so port-forward and the pod's loopback reach them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use provider_api::{ContainerConfig, ContainerNetwork, ExitReason, Protocol};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime::component::ResourceTable;
use wasmtime::Engine;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::instance::{self, Exit, KILLED_EXIT_CODE};
use crate::log::{ContainerLog, Stream};
use crate::memory::Limiter;
use crate::network::{HttpDenied, NetworkPolicy};
use crate::sandbox::{self, UsageMeter};

/// Requests one HTTP container serves at once unless its pod says otherwise. Each in-flight
/// request holds an instance (a linear memory of a few MiB for a small Rust component), so
/// 1024 of them stay within a few GiB of a small host, and a burst of a thousand concurrent
/// clients is still served rather than turned away.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u32 = 1024;

/// How long a client of a pod port gets to send a request's headers. hyper starts this timer
/// whenever the connection waits for a request head (a new connection, and after each
/// response), so it is the keep-alive idle timeout too: a client that opens connections and
/// sends nothing (or trickles a header a byte at a time) holds each for at most this long.
/// 30 s is hyper's default and what Go's servers commonly set as ReadHeaderTimeout; clients
/// that pool connections reconnect when an idle one is closed.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connections one listener of an HTTP container holds at once: twice its bound of requests in
/// flight (so keep-alive clients between requests do not take slots from active ones, and the
/// descriptors one pod can make the agent hold grow with what it asked for), at least
/// [`MIN_CONNECTIONS_PER_LISTENER`] and at most [`MAX_CONNECTIONS_PER_LISTENER`]. A connection
/// over the cap is accepted, answered `503` (best effort, one non-blocking write) and closed at
/// once, rather than left in the listen backlog: the client learns at once and may retry, and
/// the descriptor goes back at once.
pub fn max_connections_per_listener(max_requests: u32) -> usize {
    (2 * max_requests as usize).clamp(MIN_CONNECTIONS_PER_LISTENER, MAX_CONNECTIONS_PER_LISTENER)
}
/// However small its request bound, a pod port takes this many connections, so a burst of
/// clients over a small bound still gets the request-level 503 that names the bound (which
/// needs the request read) rather than a closed connection.
pub const MIN_CONNECTIONS_PER_LISTENER: usize = 256;
/// Whatever the pod's annotation says: 4096 descriptors per port is a large share of a
/// typical open-file limit; past it, a pod's clients get 503 instead of the node's other pods
/// running out of descriptors.
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 4096;

/// What a connection over the cap reads before it is closed.
const OVER_CAP_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 39\r\nConnection: close\r\n\r\nthe pod holds its most open connections";

/// Prefix of the export a `wasi:http/proxy` component has, whatever its 0.2.x minor version.
const INCOMING_HANDLER: &str = "wasi:http/incoming-handler@0.2";
/// Prefix of the export a command component has.
const CLI_RUN: &str = "wasi:cli/run@0.2";

/// Whether `component` is an HTTP component: it exports `wasi:http/incoming-handler` and not
/// `wasi:cli/run` (a command that also handles requests is run as a command).
pub fn is_http_component(component: &wasmtime::component::Component) -> bool {
    let ty = component.component_type();
    let engine = component.engine();
    let names: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    names.iter().any(|n| n.starts_with(INCOMING_HANDLER))
        && !names.iter().any(|n| n.starts_with(CLI_RUN))
}

/// Component instances (and memories, and fiber stacks) the HTTP engine's pool holds: enough for
/// two containers at the default bound of requests in flight. Each memory slot reserves its
/// address space (4 GiB plus guards, never touched until used), so 2048 slots take about 8 TiB of
/// the 128 TiB an x86-64 process may address; an instance over the pool is a 500 naming it.
const POOLED_INSTANCES: u32 = 2 * DEFAULT_MAX_CONCURRENT_REQUESTS;

/// The engine HTTP components run on, built on the first HTTP container: like the provider's
/// (epoch interruption, the component model) plus wasmtime's pooling instance allocator, which
/// is made for an instance per request (slots are reused instead of mapped and unmapped per
/// request), as `wasmtime serve` uses it. Where the host refuses the pool's address space it
/// falls back to the ordinary allocator. Its compiled code has a cache of its own.
pub struct HttpEngine {
    compiled: crate::compile::CompileCache,
    linker: wasmtime::component::Linker<HttpState>,
}

impl HttpEngine {
    pub fn new(root_dir: &std::path::Path) -> Result<Self, String> {
        let engine = match Engine::new(&engine_config(true)) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the pooling allocator is not available; HTTP components use the ordinary allocator");
                Engine::new(&engine_config(false)).map_err(|e| format!("{e:#}"))?
            }
        };
        crate::start_epoch_ticker(&engine).map_err(|e| e.to_string())?;
        let linker = linker(&engine).map_err(|e| format!("linking WASI and wasi:http: {e:#}"))?;
        let compiled = crate::compile::CompileCache::new(engine.clone(), root_dir);
        Ok(Self { compiled, linker })
    }

    /// The component of layer `digest` (bytes at `wasm`), compiled for this engine and linked.
    pub async fn prepare(
        &self,
        digest: &str,
        wasm: &std::path::Path,
    ) -> Result<ProxyPre<HttpState>, String> {
        match self.compiled.get(digest, wasm).await? {
            crate::compile::Program::Component(component) => prepare(&self.linker, &component),
            crate::compile::Program::Module(_) => {
                Err("a core module cannot be an HTTP component".into())
            }
        }
    }
}

/// The [`HttpEngine`], made when the first HTTP container is created (a node without HTTP pods
/// never reserves the pool).
pub struct LazyHttpEngine {
    root_dir: std::path::PathBuf,
    cell: std::sync::OnceLock<Result<HttpEngine, String>>,
}

impl LazyHttpEngine {
    pub fn new(root_dir: &std::path::Path) -> Self {
        Self {
            root_dir: root_dir.to_path_buf(),
            cell: std::sync::OnceLock::new(),
        }
    }

    /// As [`HttpEngine::prepare`], on the engine (made now if this is the first).
    pub async fn prepare(
        &self,
        digest: &str,
        wasm: &std::path::Path,
    ) -> Result<ProxyPre<HttpState>, String> {
        let engine = self
            .cell
            .get_or_init(|| HttpEngine::new(&self.root_dir))
            .as_ref()
            .map_err(|e| format!("the HTTP engine cannot be set up: {e}"))?;
        engine.prepare(digest, wasm).await
    }
}

fn engine_config(pooling: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true).wasm_component_model(true);
    if pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // A Rust wasip2 component is one component instance of a few core instances, one memory.
        pool.total_component_instances(POOLED_INSTANCES)
            .total_core_instances(4 * POOLED_INSTANCES)
            .total_memories(POOLED_INSTANCES)
            .total_tables(4 * POOLED_INSTANCES)
            .total_stacks(POOLED_INSTANCES);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Store data of one request's instance.
pub struct HttpState {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundHooks,
    /// Charges the container's one memory budget, which its requests in flight share with
    /// each other (and with execs): see [`crate::memory`].
    limiter: Limiter,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The linker HTTP components are linked with: all of WASI 0.2 (env, filesystem, clocks,
/// sockets under the pod's [`NetworkPolicy`]) plus `wasi:http`.
pub fn linker(engine: &Engine) -> wasmtime::Result<wasmtime::component::Linker<HttpState>> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    Ok(linker)
}

/// Links an HTTP component for per-request instantiation.
pub fn prepare(
    linker: &wasmtime::component::Linker<HttpState>,
    component: &wasmtime::component::Component,
) -> Result<ProxyPre<HttpState>, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("linking the HTTP component: {e:#}"))?;
    ProxyPre::new(pre)
        .map_err(|e| format!("the component does not export wasi:http/incoming-handler: {e:#}"))
}

/// `wasi:http` hooks: an outgoing request is sent only where the pod's [`NetworkPolicy`]
/// allows (the allowed outbound hosts, then every address the host resolves to), else it fails
/// with `HTTP-request-denied` (not in the list) or `destination-IP-prohibited` (loopback outside
/// the pod, link-local, the node's deny list) before anything leaves the node. A plain-HTTP
/// request is then sent to the address that was checked (its Host header keeps the name), so a
/// second resolution cannot lead it elsewhere.
pub struct OutboundHooks {
    policy: NetworkPolicy,
}

type SendFuture =
    Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;
type Sent =
    Result<(http::Response<wasmtime_wasi_http::WasiBody>, SendFuture), wasmtime_wasi_http::Error>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: SendFuture,
    ) -> Box<dyn std::future::Future<Output = Sent> + Send> {
        // As the library's default hooks do: its plain sender, the request's own future unused.
        let _ = fut;
        let policy = self.policy.clone();
        Box::new(async move {
            let uri = request.uri().clone();
            let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let Some(authority) = uri.authority() else {
                return Err(wasmtime_wasi_http::Error::HttpRequestUriInvalid);
            };
            let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let checked = match policy.http_destination(authority.host(), port).await {
                Ok(addr) => addr,
                Err(denied) => {
                    tracing::debug!(uri = %uri, ?denied, "outgoing request denied by the pod network policy");
                    return Err(match denied {
                        HttpDenied::NotAllowed => wasmtime_wasi_http::Error::HttpRequestDenied,
                        HttpDenied::Prohibited(..) => {
                            wasmtime_wasi_http::Error::DestinationIpProhibited
                        }
                        HttpDenied::Unresolvable(_) => {
                            wasmtime_wasi_http::Error::DestinationNotFound
                        }
                    });
                }
            };
            if !tls {
                // TLS needs the name for SNI and the certificate; plain HTTP is pinned.
                let mut parts = uri.into_parts();
                parts.authority = http::uri::Authority::try_from(checked.to_string()).ok();
                if let Ok(pinned) = http::Uri::from_parts(parts) {
                    *request.uri_mut() = pinned;
                }
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as SendFuture,
            ))
        })
    }
}

/// The listeners of an HTTP container, bound before it counts as started so a port taken by
/// another process is a start error naming it.
#[derive(Debug)]
pub struct Listeners(Vec<std::net::TcpListener>);

/// Binds every declared TCP port at the pod IP, and records each as one of the pod's own
/// listeners (under `policy`'s container) once bound.
pub fn bind(network: &ContainerNetwork, policy: &NetworkPolicy) -> Result<Listeners, String> {
    let ip = network
        .pod_ip
        .ok_or("the node has no IP to serve the HTTP component's ports on")?;
    let ports: Vec<u16> = network
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| p.port)
        .collect();
    if ports.is_empty() {
        return Err("an HTTP component (wasi:http/incoming-handler) needs at least one TCP containerPort to serve on".into());
    }
    let mut listeners = Vec::with_capacity(ports.len());
    for port in ports {
        let addr = SocketAddr::new(ip, port);
        let listener = listen(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        listeners.push(listener);
    }
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            policy.record_listener(addr);
        }
    }
    Ok(Listeners(listeners))
}

/// How many connections may wait to be accepted: std's 128 would make a burst of a thousand
/// clients retry their SYNs; 1024 is tokio's default (the kernel caps it at `somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;

/// A non-blocking listening socket on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as std
/// and tokio set it), so a restarted container binds again while old connections linger.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Registered with the reactor here, handed on as a std listener (non-blocking) that serve
    // registers again.
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// What every request of one container shares.
struct Shared {
    engine: Engine,
    pre: ProxyPre<HttpState>,
    config: ContainerConfig,
    network: NetworkPolicy,
    argv: Vec<String>,
    log: ContainerLog,
    meter: Arc<UsageMeter>,
    /// Cancelled by a kill: running instances are interrupted at their next epoch tick.
    kill: CancellationToken,
    slots: Arc<Semaphore>,
    max: u32,
    rejected: AtomicU64,
}

/// Serves the container until `drain` (graceful: stop accepting, finish what is in flight) or
/// `kill` (interrupt everything); returns how it ended. Instances run on `pre`'s engine.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    pre: ProxyPre<HttpState>,
    config: ContainerConfig,
    network: NetworkPolicy,
    listeners: Listeners,
    log: ContainerLog,
    meter: Arc<UsageMeter>,
    drain: CancellationToken,
    kill: CancellationToken,
) -> Exit {
    let max = config
        .network
        .max_concurrent_requests
        .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS)
        .max(1);
    let argv = sandbox::argv(&config);
    let shared = Arc::new(Shared {
        engine: pre.engine().clone(),
        pre,
        config,
        network,
        argv,
        log,
        meter,
        kill: kill.clone(),
        slots: Arc::new(Semaphore::new(max as usize)),
        max,
        rejected: AtomicU64::new(0),
    });
    let connections = TaskTracker::new();
    let mut accepting = Vec::new();
    for listener in listeners.0 {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                return Exit {
                    exit_code: 1,
                    reason: ExitReason::Error,
                    message: Some(format!("listening: {e}")),
                }
            }
        };
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), max_concurrent = max, "serving HTTP");
        accepting.push(tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            connections.clone(),
            drain.clone(),
        )));
    }
    tokio::select! {
        () = drain.cancelled() => {}
        () = kill.cancelled() => {}
    }
    // The accept loops end with the drain (dropping their listeners); what is in flight ends next.
    for task in accepting {
        task.abort();
    }
    connections.close();
    let exit = tokio::select! {
        () = connections.wait() => Exit { exit_code: 0, reason: ExitReason::Completed, message: None },
        () = kill.cancelled() => {
            // Give interrupted instances a moment to unwind, then report the kill.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), connections.wait()).await;
            Exit { exit_code: KILLED_EXIT_CODE, reason: ExitReason::Killed, message: Some("stopped: the grace period ran out with requests in flight".into()) }
        }
    };
    let rejected = shared.rejected.load(Ordering::Relaxed);
    if rejected > 0 {
        tracing::info!(rejected, "requests answered 503 over the concurrency bound");
    }
    exit
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    drain: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections_per_listener(shared.max)));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            () = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            // Once per 1024 refusals: a flood must not flood the agent's log as well.
            if refused % 1024 == 1 {
                tracing::warn!(%peer, max = max_connections_per_listener(shared.max), refused, "the pod port holds its most connections; answering 503 and closing new ones");
            }
            let _ = stream.try_write(OVER_CAP_RESPONSE);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let drain = drain.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(shared, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(wasmtime_wasi_http::io::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = drain.cancelled() => {
                    // Finish the request in flight, then close (idle connections close at once).
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

fn text_response(status: u16, body: String) -> hyper::Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Why a request's instance did not answer.
enum Failure {
    /// The container's memory (or the node's memory for pods) was taken by its other
    /// requests and execs before this one could instantiate: a 503, like the concurrency
    /// bound, with the reason.
    Busy(String),
    /// A trap, or the memory limit during the request: a 500 with the reason.
    Failed(String),
}

/// One request: a slot under the bound, a fresh instance, the guest's response (or a 5xx that
/// says what went wrong).
async fn handle(
    shared: Arc<Shared>,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        return text_response(503, format!("wasm-kubelet: container {} is already serving its limit of {} concurrent requests; retry later\n", shared.config.name, shared.max));
    };
    let mut wasi = match sandbox::granted_context(&shared.config, &shared.network, &shared.argv) {
        Ok(w) => w,
        Err(e) => {
            return text_response(
                500,
                format!("wasm-kubelet: container {}: {e}\n", shared.config.name),
            )
        }
    };
    wasi.stdout(shared.log.pipe(Stream::Stdout))
        .stderr(shared.log.pipe(Stream::Stderr));
    let state = |limiter| HttpState {
        ctx: wasi.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        hooks: OutboundHooks {
            policy: shared.network.clone(),
        },
        limiter,
    };
    // The container's sandbox, as its run has it: memory budget, CPU slice, the kill.
    let mut store = sandbox::store(&shared.engine, &shared.meter, &shared.kill, state, |s| {
        &mut s.limiter
    });
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let prepared = (|| -> wasmtime::Result<_> {
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        Ok((req, out))
    })();
    let (req, out) = match prepared {
        Ok(x) => x,
        Err(e) => return text_response(400, format!("wasm-kubelet: bad request: {e:#}\n")),
    };
    let pre = shared.pre.clone();
    let meter = shared.meter.clone();
    let log = shared.log.clone();
    // The instance runs in its own task: it may keep writing the body after the head is sent.
    // The slot is held until the instance is done.
    let task = tokio::spawn(async move {
        let mut instantiated = false;
        let result = sandbox::Metered::new(meter, async {
            let proxy = pre.instantiate_async(&mut store).await?;
            instantiated = true;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        })
        .await;
        let refused = store.data().limiter.refused();
        // The store (and the memory it holds) goes before the slot is given back.
        drop(store);
        drop(permit);
        if let Err(e) = &result {
            if refused.is_some() && !instantiated {
                return Err(Failure::Busy(
                    refused.map(|r| r.to_string()).unwrap_or_default(),
                ));
            }
            let why = match refused {
                Some(refusal) => {
                    format!("out of memory: {refusal} ({})", instance::trap_message(e))
                }
                None => instance::trap_message(e),
            };
            log.write(
                Stream::Stderr,
                format!("wasm-kubelet: request failed: {why}\n").as_bytes(),
            );
            return Err(Failure::Failed(why));
        }
        Ok(())
    });
    match receiver.await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => text_response(
            500,
            format!("wasm-kubelet: the component answered with an error: {code:?}\n"),
        ),
        Err(_) => match task.await {
            Ok(Ok(())) => text_response(
                500,
                "wasm-kubelet: the component returned without setting a response\n".into(),
            ),
            Ok(Err(Failure::Failed(why))) => {
                text_response(500, format!("wasm-kubelet: the component failed: {why}\n"))
            }
            Ok(Err(Failure::Busy(why))) => {
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                text_response(503, format!("wasm-kubelet: container {} has no memory left for another request ({why}): its requests in flight hold it; retry later\n", shared.config.name))
            }
            Err(e) => text_response(
                500,
                format!("wasm-kubelet: the request's task failed: {e}\n"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::PortMapping;

    #[tokio::test]
    async fn binding_needs_a_tcp_port_and_an_ip() {
        let mut network = ContainerNetwork::default();
        let policy = NetworkPolicy::new(network.clone(), Arc::default(), Arc::default(), "c1");
        let bind = |network: &ContainerNetwork| bind(network, &policy);
        assert!(bind(&network).unwrap_err().contains("no IP"));
        network.pod_ip = Some("127.0.0.1".parse().unwrap());
        assert!(bind(&network)
            .unwrap_err()
            .contains("at least one TCP containerPort"));
        network.ports = vec![PortMapping {
            port: 53,
            protocol: Protocol::Udp,
        }];
        assert!(bind(&network)
            .unwrap_err()
            .contains("at least one TCP containerPort"));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        network.ports = vec![PortMapping {
            port: taken.local_addr().unwrap().port(),
            protocol: Protocol::Tcp,
        }];
        assert!(bind(&network)
            .unwrap_err()
            .starts_with("binding 127.0.0.1:"));
        assert_eq!(
            policy.listeners_dial(network.ports[0].port),
            None,
            "a port another socket holds is never the pod's"
        );
        let port = taken.local_addr().unwrap().port();
        drop(taken);
        let listeners = bind(&network).expect("the port is free now");
        assert_eq!(
            policy.listeners_dial(port),
            Some(SocketAddr::from(([127, 0, 0, 1], port))),
            "bound, so recorded as the pod's own"
        );
        drop(listeners);
    }
}
