//! The kubelet API: HTTPS on `--address`:`--port` (10250), what `kubectl logs`, `exec`,
//! `attach`, `port-forward` and `top` (through metrics-server) reach, plus plain `/healthz` on
//! `127.0.0.1:--healthz-port` (10248). Endpoints: `/healthz`, `/containerLogs` ([`logs`]),
//! `/stats/summary` and `/metrics/resource` ([`stats`]), `/metrics` and `/metrics/probes`
//! ([`crate::metrics`]), `/pods`, `/runningpods/` and `/configz` ([`pods`]), and the upgraded
//! `/exec`, `/attach`, `/portForward` with `/run` ([`streams`]).
//!
//! Start at [`KubeletServer::bind`] (binds, loads or makes the serving certificate; every
//! problem there stops the agent before it runs) and [`KubeletServer::run`].
//!
//! Why warp under hand-made TLS: warp 0.4 dropped its `tls` feature and warp 0.3 sits on the
//! old hyper 0.14, so the routes are a warp filter turned into a hyper service
//! ([`warp::service`]) and each accepted connection is a tokio-rustls handshake followed by
//! hyper's HTTP/1.1 server `with_upgrades()` (the API server's kubelet client streams logs
//! and upgrades exec/attach/port-forward connections over HTTP/1.1). The connection service in
//! front of warp authenticates (the client certificate is known per connection, which a warp
//! filter cannot see) and authorizes every request, see [`auth`]. warp 0.4 also has no public
//! way to build a streamed body, so a streaming route ([`logs`]) returns an empty response
//! carrying its stream in a [`StreamedBody`] extension, and the connection service swaps it in.

pub mod auth;
pub mod logs;
pub mod pods;
pub mod stats;
pub mod streams;
pub mod tls;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use warp::Filter;

use crate::config::{one_line, AuthorizationMode, Config};
use auth::{Authenticator, Authorizer, Decision, Unauthenticated, User};

/// A client gets this long to finish the TLS handshake: a handshake is two round trips, so
/// 10 s is generous for any network a kubelet sits on, and short enough that a client which
/// opens connections and never speaks holds each for little time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gets this long to send a request's headers. hyper starts the timer whenever the
/// connection waits for a request head: on a new connection, and again after each response,
/// so it is also the keep-alive idle timeout (the API server's kubelet client and
/// metrics-server keep connections between scrapes of 15 s or more, and reconnect when one
/// was closed). 30 s is hyper's default and Go's net/http ReadHeaderTimeout in the kubelet.
/// An upgraded exec/attach/port-forward connection leaves hyper; it has
/// `--streaming-connection-idle-timeout` instead.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the kubelet API holds at once. Its clients are few: the API server (one
/// connection per `kubectl logs -f`/exec/attach/port-forward session, plus pooled ones for the
/// rest), metrics-server and a Prometheus scraper; 512 is far above what a node of 110 pods
/// sees, and far below the agent's open-file limit, which its pods' files and sockets share.
/// A connection over the cap is accepted and closed at once (not left in the listen backlog):
/// its file descriptor goes back at once and the client gets an immediate error it can retry,
/// instead of a hang it cannot tell from a dead node.
pub const MAX_CONNECTIONS: usize = 512;

/// Errors of the kubelet API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A port cannot be bound (in use, or not our address). Not retryable: fix the flags or
    /// stop the other owner.
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A certificate, key or CA file cannot be read, parsed or written. Not retryable.
    #[error("{path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    /// rustls refused the TLS configuration. Not retryable.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A TokenReview or SubjectAccessReview failed. Retryable: the request gets 500 and the
    /// client may ask again.
    #[error("{0}")]
    Api(String),
}

/// A failed request, answered as a Kubernetes `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// Extra response headers (a failed protocol negotiation lists the accepted ones). Boxed:
    /// errors travel in `Result`s, and a bare HeaderMap would make every one of them ~100 bytes.
    pub headers: Box<http::HeaderMap>,
}

impl StatusError {
    pub fn bad_request(message: String) -> Self {
        StatusError {
            code: 400,
            reason: "BadRequest",
            message,
            headers: Box::default(),
        }
    }
    pub fn invalid(message: String) -> Self {
        StatusError {
            code: 422,
            reason: "Invalid",
            message,
            headers: Box::default(),
        }
    }
    pub fn not_found(message: String) -> Self {
        StatusError {
            code: 404,
            reason: "NotFound",
            message,
            headers: Box::default(),
        }
    }
    fn unauthorized(message: String) -> Self {
        StatusError {
            code: 401,
            reason: "Unauthorized",
            message,
            headers: Box::default(),
        }
    }
    pub(super) fn forbidden(message: String) -> Self {
        StatusError {
            code: 403,
            reason: "Forbidden",
            message,
            headers: Box::default(),
        }
    }
    fn internal(message: String) -> Self {
        StatusError {
            code: 500,
            reason: "InternalError",
            message,
            headers: Box::default(),
        }
    }
    fn method_not_allowed(message: String) -> Self {
        StatusError {
            code: 405,
            reason: "MethodNotAllowed",
            message,
            headers: Box::default(),
        }
    }

    fn body(&self) -> String {
        serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
        .to_string()
    }

    /// The error as the kubelet's container-log handler writes one: the message as plain text.
    /// The API server wraps a kubelet's non-2xx log body into its own Status as the message
    /// (`GenericHttpResponseChecker`), so a JSON body would reach `kubectl logs` as JSON text.
    fn into_plain_text(self) -> warp::reply::Response {
        let mut response = warp::reply::Response::new(self.message.into());
        *response.status_mut() = http::StatusCode::from_u16(self.code)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    fn into_warp(self) -> warp::reply::Response {
        let mut response = warp::reply::Response::new(self.body().into());
        *response.status_mut() = http::StatusCode::from_u16(self.code)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response.headers_mut().extend(*self.headers);
        response
    }
}

type Body = UnsyncBoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed response body, carried out of warp in the response's extensions (see the module
/// doc). Taken exactly once, by the connection service.
#[derive(Clone)]
pub struct StreamedBody(Arc<Mutex<Option<ByteStream>>>);

type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// What every request shares.
struct Shared {
    authn: Authenticator,
    authz: Authorizer,
    /// The warp filter; turned into a hyper-compatible service per request (cheap: a clone).
    routes: warp::filters::BoxedFilter<(warp::reply::Response,)>,
    /// exec and port-forward, which upgrade the connection instead of going through warp.
    streams: Arc<streams::StreamContext>,
}

/// The kubelet API, bound and ready to serve.
pub struct KubeletServer {
    sampler: stats::Sampler,
    listener: TcpListener,
    healthz: Option<TcpListener>,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    pods_sender: pods::PodsViewSender,
}

impl KubeletServer {
    /// Binds the ports and prepares TLS; `None` when `--enable-server=false`.
    /// `runtime`: the PLEG's snapshot of what the provider runs (`/runningpods/`, stats, exec targets).
    pub async fn bind(
        config: &Config,
        client: Option<kube::Client>,
        provider: Arc<dyn provider_api::Provider>,
        runtime: crate::pods::pleg::RuntimeCache,
    ) -> Result<Option<Self>, ServerError> {
        if !config.enable_server {
            info!("--enable-server=false: the kubelet API is off (kubectl logs/exec will not reach this node)");
            return Ok(None);
        }
        let tls = tls::server_config(&tls::TlsSettings {
            node_name: &config.node_name,
            node_ip: config.node_ip,
            cert_dir: &config.cert_dir,
            tls_cert_file: config.tls_cert_file.as_deref(),
            tls_private_key_file: config.tls_private_key_file.as_deref(),
            client_ca_file: config.client_ca_file.as_deref(),
        })?;
        let addr = SocketAddr::new(config.address, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let healthz = match config.healthz_port {
            0 => None,
            port => {
                let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind { addr, source })?,
                )
            }
        };
        crate::metrics::kubelet()
            .node_name
            .get_or_create(&crate::metrics::NodeLabels {
                node: config.node_name.clone(),
            })
            .set(1);
        let authn = Authenticator::new(
            client.clone(),
            config.authentication_token_webhook,
            config.anonymous_auth,
        );
        let authz = Authorizer::new(
            config.authorization_mode,
            client.clone(),
            config.node_name.clone(),
        );
        let streams = Arc::new(streams::StreamContext {
            provider,
            runtime: runtime.clone(),
            client: client.clone(),
            pod_ip: config.node_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            idle_timeout: config.streaming_connection_idle_timeout,
        });
        let (sampler, snapshots) = stats::Sampler::new(
            streams.provider.clone(),
            runtime.clone(),
            config.root_dir.clone(),
            config.housekeeping_interval,
        );
        let (pods_sender, pods_view) = pods::PodsView::start();
        let node_routes = NodeRoutes {
            runtime,
            pods: pods_view,
            configz: Arc::new(pods::configz(config)),
        };
        let routes = routes(
            config.pod_logs_dir.clone(),
            client,
            StatsView {
                node_name: config.node_name.clone(),
                boot: boot_time(),
                snapshots,
            },
            node_routes,
        );
        info!(
            %addr,
            client_ca = ?config.client_ca_file,
            token_webhook = config.authentication_token_webhook,
            anonymous = config.anonymous_auth,
            authorization = ?config.authorization_mode,
            "kubelet API listening"
        );
        if config.client_ca_file.is_none() && !config.authentication_token_webhook {
            let who = match (config.anonymous_auth, config.authorization_mode) {
                (true, AuthorizationMode::AlwaysAllow) => "every request, unauthenticated (--anonymous-auth, AlwaysAllow)",
                (true, AuthorizationMode::Webhook) => "anonymous requests, as the API server authorizes system:anonymous",
                (false, _) => "no request at all: give --client-ca-file (or --kubeconfig for bearer tokens) or --anonymous-auth",
            };
            warn!("the kubelet API has no client CA and no token webhook; it accepts {who}");
        }
        Ok(Some(KubeletServer {
            sampler,
            listener,
            healthz,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            shared: Arc::new(Shared {
                authn,
                authz,
                routes,
                streams,
            }),
            pods_sender,
        }))
    }

    /// Where pod workers report their pods for `/pods`.
    pub fn pods_sender(&self) -> pods::PodsViewSender {
        self.pods_sender.clone()
    }

    /// Serves until `shutdown`; open connections are dropped then.
    pub async fn run(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        connections.spawn(self.sampler.run(shutdown.clone()));
        if let Some(healthz) = self.healthz {
            connections.spawn(serve_healthz(healthz, shutdown.clone()));
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut refused: u64 = 0;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        refused += 1;
                        // Once per 1024 refusals, so a flood cannot flood the log too.
                        if refused % 1024 == 1 {
                            warn!(%peer, max = MAX_CONNECTIONS, refused, "the kubelet API holds its most connections; closing new ones at once");
                        }
                        drop(stream);
                        continue;
                    };
                    let (acceptor, shared, shutdown) =
                        (self.acceptor.clone(), self.shared.clone(), shutdown.clone());
                    connections.spawn(
                        async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = serve_tls(stream, acceptor, shared, ConnectionSlot(Arc::new(slot))) => {}
                            }
                        }
                        .instrument(tracing::debug_span!("kubelet_api_connection", %peer)),
                    );
                }
                // Out of file descriptors and the like: say so, and do not spin on it.
                Err(e) => {
                    warn!(error = %e, "accepting a kubelet API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        connections.close();
        connections.wait().await;
    }
}

/// One TLS connection: handshake, then HTTP/1.1 with every request authenticated and
/// authorized before it reaches the routes.
/// One of the [`MAX_CONNECTIONS`] slots, held by a connection and by the exec/attach/
/// port-forward session it is upgraded to (requests carry it as an extension), so upgraded
/// sessions count against the cap too.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    slot: ConnectionSlot,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    let peer_user = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| tls::user_from_certificate(c));
    let peer_user = Arc::new(peer_user);
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(slot.clone());
        handle(request, shared.clone(), peer_user.clone())
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        debug!(error = %e, "kubelet API connection ended with an error");
    }
}

async fn handle(
    request: http::Request<Incoming>,
    shared: Arc<Shared>,
    peer: Arc<Option<User>>,
) -> Result<http::Response<Body>, Infallible> {
    let span = tracing::debug_span!("kubelet_api_request", method = %request.method(), path = %request.uri().path(), user = tracing::field::Empty);
    async move {
        let authorized = authorize(&request, &shared, peer.as_ref().as_ref()).await;
        if authorized.is_ok() {
            count_request(&request);
        }
        let response = match authorized {
            Ok(()) if streams::is_stream_request(request.uri().path()) => {
                match streams::handle(request, shared.streams.clone()).await {
                    Ok(upgraded) => {
                        debug!(status = upgraded.status().as_u16(), "answered");
                        return Ok(upgraded);
                    }
                    Err(status) => status.into_warp(),
                }
            }
            Ok(()) => {
                let mut routes = warp::service(shared.routes.clone());
                let Ok(response) = tower_call(&mut routes, request).await;
                response
            }
            Err(status) => status.into_warp(),
        };
        debug!(status = response.status().as_u16(), "answered");
        Ok(into_body(response))
    }
    .instrument(span)
    .await
}

/// `kubelet_http_requests_total`, labelled as the kubelet labels it: the path's first segment
/// (only known ones, so a client cannot make series up), and whether the request streams.
fn count_request(request: &http::Request<Incoming>) {
    const KNOWN: &[&str] = &[
        "healthz",
        "containerLogs",
        "stats",
        "metrics",
        "pods",
        "runningpods",
        "configz",
        "exec",
        "attach",
        "portForward",
        "run",
    ];
    let path = request.uri().path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let first = KNOWN
        .iter()
        .copied()
        .find(|k| *k == first)
        .unwrap_or("other");
    let follow = first == "containerLogs"
        && request.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "follow=true" || kv == "follow=1")
        });
    let long_running = follow || matches!(first, "exec" | "attach" | "portForward");
    let method = match *request.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let labels = crate::metrics::HttpRequestLabels {
        method,
        path: first,
        server_type: "readwrite",
        long_running: if long_running { "true" } else { "false" },
    };
    crate::metrics::kubelet()
        .http_requests
        .get_or_create(&labels)
        .inc();
}

/// warp's service is a tower service (always ready), not a hyper one.
async fn tower_call<S>(
    service: &mut S,
    request: http::Request<Incoming>,
) -> Result<warp::reply::Response, Infallible>
where
    S: tower_service::Service<
        http::Request<Incoming>,
        Response = warp::reply::Response,
        Error = Infallible,
    >,
{
    service.call(request).await
}

/// Authenticates and authorizes one request: `Err` is the 401/403/500 to answer with.
async fn authorize(
    request: &http::Request<Incoming>,
    shared: &Shared,
    peer: Option<&User>,
) -> Result<(), StatusError> {
    let user = match shared.authn.authenticate(peer, request.headers()).await {
        Ok(Ok(user)) => user,
        Ok(Err(Unauthenticated::NoCredentials)) => return Err(StatusError::unauthorized("Unauthorized: no client certificate or bearer token, and anonymous requests are refused".into())),
        Ok(Err(Unauthenticated::BadToken(why))) => return Err(StatusError::unauthorized(format!("Unauthorized: {why}"))),
        Err(e) => {
            warn!(error = %e, "authenticating a kubelet API request");
            return Err(StatusError::unauthorized(format!("Unauthorized: {e}")));
        }
    };
    tracing::Span::current().record("user", user.name.as_str());
    let attrs = auth::attributes(request.method(), request.uri().path());
    let described = format!(
        "user={}, verb={}, resource=nodes, subresource={}",
        user.name, attrs.verb, attrs.subresource
    );
    match shared.authz.authorize(&user, &attrs).await {
        Ok(Decision::Allow) => Ok(()),
        Ok(Decision::Deny(reason)) => {
            debug!(%reason, "forbidden");
            Err(StatusError::forbidden(format!("Forbidden ({described})")))
        }
        Err(e) => {
            warn!(error = %e, "authorizing a kubelet API request");
            Err(StatusError::internal(format!(
                "Authorization error ({described})"
            )))
        }
    }
}

/// warp's response with its body boxed, or the streamed body it carries.
fn into_body(mut response: warp::reply::Response) -> http::Response<Body> {
    let streamed = response
        .extensions_mut()
        .remove::<StreamedBody>()
        .and_then(|s| s.0.lock().ok()?.take());
    let (parts, body) = response.into_parts();
    let body: Body = match streamed {
        Some(stream) => {
            StreamBody::new(stream.map(|chunk| chunk.map(Frame::data).map_err(BoxError::from)))
                .boxed_unsync()
        }
        None => body.map_err(BoxError::from).boxed_unsync(),
    };
    http::Response::from_parts(parts, body)
}

/// The routes, after authentication and authorization.
/// What the stats routes read: the sampler's latest snapshot.
#[derive(Clone)]
struct StatsView {
    node_name: String,
    boot: std::time::SystemTime,
    snapshots: tokio::sync::watch::Receiver<Option<Arc<stats::Snapshot>>>,
}

impl StatsView {
    fn latest(&self) -> Result<Arc<stats::Snapshot>, StatusError> {
        self.snapshots.borrow().clone().ok_or_else(|| StatusError {
            code: 503,
            reason: "ServiceUnavailable",
            message: "no stats sampled yet".into(),
            headers: Box::default(),
        })
    }
}

/// When the machine booted: now minus /proc/uptime.
fn boot_time() -> std::time::SystemTime {
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    std::time::SystemTime::now() - Duration::from_secs_f64(uptime)
}

/// What `/pods`, `/runningpods/` and `/configz` read.
#[derive(Clone)]
struct NodeRoutes {
    runtime: crate::pods::pleg::RuntimeCache,
    pods: pods::PodsView,
    configz: Arc<serde_json::Value>,
}

fn json_response(value: &serde_json::Value) -> warp::reply::Response {
    let mut response = warp::reply::Response::new(value.to_string().into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn routes(
    pod_logs_dir: PathBuf,
    client: Option<kube::Client>,
    stats_view: StatsView,
    node: NodeRoutes,
) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let pods_node = node.clone();
    let pods = warp::path!("pods")
        .and(warp::get())
        .map(move || json_response(&pods::pod_list(&pods_node.pods)));
    let running_node = node.clone();
    // `/runningpods/` as the kubelet registers it; `/runningpods` too.
    let running = warp::path("runningpods")
        .and(warp::path::tail())
        .and_then(|tail: warp::path::Tail| async move {
            if tail.as_str().is_empty() {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::get())
        .then(move || {
            let node = running_node.clone();
            async move {
                match pods::running_pod_list(&node.runtime.latest(), &node.pods) {
                    Ok(list) => json_response(&list),
                    Err(e) => StatusError {
                        code: 503,
                        reason: "ServiceUnavailable",
                        message: e.to_string(),
                        headers: Box::default(),
                    }
                    .into_warp(),
                }
            }
        });
    let configz = warp::path!("configz")
        .and(warp::get())
        .map(move || json_response(&node.configz));
    let summary_view = stats_view.clone();
    let summary = warp::path!("stats" / "summary")
        .and(warp::get())
        .map(move || match summary_view.latest() {
            Ok(s) => {
                let mut response = warp::reply::Response::new(
                    stats::summary(&summary_view.node_name, summary_view.boot, &s)
                        .to_string()
                        .into(),
                );
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(e) => e.into_warp(),
        });
    let resource =
        warp::path!("metrics" / "resource")
            .and(warp::get())
            .map(move || match stats_view.latest() {
                Ok(s) => {
                    let mut response =
                        warp::reply::Response::new(stats::resource_metrics(&s).into());
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    response
                }
                Err(e) => e.into_warp(),
            });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .map(|| metrics_response(crate::metrics::render()));
    let probe_metrics = warp::path!("metrics" / "probes")
        .and(warp::get())
        .map(|| metrics_response(crate::metrics::render_probes()));
    let healthz = warp::path!("healthz")
        .and(warp::get().or(warp::head()).unify())
        .map(healthz_response);
    let logs = warp::path!("containerLogs" / String / String / String)
        .and(warp::get())
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::any().map(move || (pod_logs_dir.clone(), client.clone())))
        .then(
            |ns: String,
             pod: String,
             container: String,
             query: Vec<(String, String)>,
             (dir, client): (PathBuf, Option<kube::Client>)| async move {
                container_logs(&dir, client, &ns, &pod, &container, &query)
                    .await
                    .unwrap_or_else(StatusError::into_plain_text)
            },
        );
    healthz
        .or(logs)
        .unify()
        .or(summary)
        .unify()
        .or(resource)
        .unify()
        .or(metrics)
        .unify()
        .or(probe_metrics)
        .unify()
        .or(pods)
        .unify()
        .or(running)
        .unify()
        .or(configz)
        .unify()
        .recover(rejection)
        .unify()
        .boxed()
}

/// A Prometheus text exposition (`/metrics`, `/metrics/probes`).
fn metrics_response(text: String) -> warp::reply::Response {
    let mut response = warp::reply::Response::new(text.into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

fn healthz_response() -> warp::reply::Response {
    let mut response = warp::reply::Response::new("ok".into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn container_logs(
    dir: &std::path::Path,
    client: Option<kube::Client>,
    namespace: &str,
    pod: &str,
    container: &str,
    query: &[(String, String)],
) -> Result<warp::reply::Response, StatusError> {
    let options = logs::LogOptions::parse(query, jiff::Timestamp::now())?;
    let found = logs::open(
        dir,
        client.as_ref(),
        namespace,
        pod,
        container,
        options.previous,
    )
    .await?;
    debug!(files = ?found.files, "serving container log");
    let stream = logs::LogStream::new(found, options, client)
        .into_stream()
        .boxed();
    let mut response = warp::reply::Response::new(Bytes::new().into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
        .extensions_mut()
        .insert(StreamedBody(Arc::new(Mutex::new(Some(stream)))));
    Ok(response)
}

/// warp's rejections (no route, wrong method, a query that does not decode) as Status bodies.
async fn rejection(rejection: warp::Rejection) -> Result<warp::reply::Response, Infallible> {
    let status = if rejection.is_not_found() {
        StatusError::not_found("the server could not find the requested resource".into())
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        StatusError::bad_request("the query string could not be decoded".into())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        StatusError::method_not_allowed("the method is not allowed on this path".into())
    } else {
        StatusError::bad_request(format!("bad request: {rejection:?}"))
    };
    Ok(status.into_warp())
}

/// Plain HTTP `/healthz` on loopback, unauthenticated, for local health checks.
async fn serve_healthz(listener: TcpListener, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(|request: http::Request<Incoming>| async move {
                let response = if request.uri().path() == "/healthz" {
                    http::Response::new(Full::new(Bytes::from_static(b"ok")))
                } else {
                    let mut r = http::Response::new(Full::new(Bytes::from_static(b"404 page not found")));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    r
                };
                Ok::<_, Infallible>(response)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = connection => if let Err(e) = result { debug!(error = %one_line(&e), "healthz connection") },
            }
        });
    }
    connections.close();
    connections.wait().await;
}
