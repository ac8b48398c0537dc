//! `/exec`, `/attach` and `/portForward`: the upgraded (SPDY/3.1) endpoints behind `kubectl
//! exec`, `kubectl attach` and `kubectl port-forward`, and `/run`. They bypass warp: after
//! authorization, [`handle`] negotiates the protocol, answers 101, and hands the upgraded
//! connection to [`crate::streaming`] in a task of its own.
//!
//! Exec runs the container's module again as a new instance in the same sandbox (same env and
//! volumes) with argv = the command, through [`Provider::exec`]. Attach joins the running
//! instance's stdio through [`Provider::attach`] (output from now on; stdin only for a container
//! with `stdin: true`; a TTY's resize messages are read and dropped). `/run` (POST, `cmd=`
//! split on whitespace) is an exec without streams answering with the combined output, as the
//! kubelet's. Port-forward reaches only the pod's own listeners: the provider opens the
//! connection where the pod's localhost is ([`Provider::pod_connect`]: a container pod's
//! network namespace; for a Wasm pod, whose IP is the node IP, only a declared port one of its
//! containers is itself serving, never a port another process of the node holds). A refusal
//! goes on the pair's error stream.

use std::net::IpAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use provider_api::{ContainerState, Provider};
use tokio::io::DuplexStream;
use tracing::{debug, Instrument};

use super::{Body, BoxError, StatusError};
use crate::streaming::portforward::{self, PortForwardHandler, PortForwardTarget};
use crate::streaming::remotecommand::{self, ExecHandler, ExecIo, ExecOptions};
use crate::streaming::{handshake, idle, websocket, StreamingConfig};

/// What the streaming endpoints need.
pub struct StreamContext {
    pub provider: Arc<dyn Provider>,
    /// What the provider runs (the PLEG's snapshot): which instance an exec or attach targets.
    pub runtime: crate::pods::pleg::RuntimeCache,
    pub client: Option<kube::Client>,
    /// The pod IP (the node IP). Port-forward dials what the provider names, not this.
    pub pod_ip: IpAddr,
    /// `--streaming-connection-idle-timeout` (zero: none).
    pub idle_timeout: std::time::Duration,
}

/// Which upgraded endpoint a path names.
enum Endpoint {
    Exec {
        namespace: String,
        pod: String,
        uid: Option<String>,
        container: String,
    },
    Attach {
        namespace: String,
        pod: String,
        uid: Option<String>,
        container: String,
    },
    Run {
        namespace: String,
        pod: String,
        uid: Option<String>,
        container: String,
    },
    PortForward {
        namespace: String,
        pod: String,
        uid: Option<String>,
    },
}

/// `/exec/{ns}/{pod}[/{uid}]/{container}` or `/portForward/{ns}/{pod}[/{uid}]`, as the kubelet routes them.
fn endpoint(path: &str) -> Option<Endpoint> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let own = |s: &&str| s.to_string();
    match parts.as_slice() {
        ["exec", ns, pod, container] => Some(Endpoint::Exec {
            namespace: own(ns),
            pod: own(pod),
            uid: None,
            container: own(container),
        }),
        ["exec", ns, pod, uid, container] => Some(Endpoint::Exec {
            namespace: own(ns),
            pod: own(pod),
            uid: Some(own(uid)),
            container: own(container),
        }),
        ["attach", ns, pod, container] => Some(Endpoint::Attach {
            namespace: own(ns),
            pod: own(pod),
            uid: None,
            container: own(container),
        }),
        ["attach", ns, pod, uid, container] => Some(Endpoint::Attach {
            namespace: own(ns),
            pod: own(pod),
            uid: Some(own(uid)),
            container: own(container),
        }),
        ["run", ns, pod, container] => Some(Endpoint::Run {
            namespace: own(ns),
            pod: own(pod),
            uid: None,
            container: own(container),
        }),
        ["run", ns, pod, uid, container] => Some(Endpoint::Run {
            namespace: own(ns),
            pod: own(pod),
            uid: Some(own(uid)),
            container: own(container),
        }),
        ["portForward", ns, pod] => Some(Endpoint::PortForward {
            namespace: own(ns),
            pod: own(pod),
            uid: None,
        }),
        ["portForward", ns, pod, uid] => Some(Endpoint::PortForward {
            namespace: own(ns),
            pod: own(pod),
            uid: Some(own(uid)),
        }),
        _ => None,
    }
}

/// Whether this request is for an upgraded endpoint (handled here, not by warp).
pub fn is_stream_request(path: &str) -> bool {
    endpoint(path).is_some()
}

/// Answers an authorized exec or port-forward request: 101 and a task serving the session, or
/// an error status.
pub async fn handle(
    request: http::Request<Incoming>,
    ctx: Arc<StreamContext>,
) -> Result<http::Response<Body>, StatusError> {
    let Some(endpoint) = endpoint(request.uri().path()) else {
        return Err(StatusError::not_found(format!(
            "no such endpoint {}",
            request.uri().path()
        )));
    };
    match endpoint {
        Endpoint::Exec {
            namespace,
            pod,
            uid,
            container,
        } => {
            let options = ExecOptions::from_exec_query(request.uri().query().unwrap_or(""))
                .map_err(|e| StatusError::bad_request(e.to_string()))?;
            let uid = pod_uid(&ctx, &namespace, &pod, uid).await?;
            let container_id = running_container(&ctx, &uid, &container).await?;
            let handler = ProviderExec {
                provider: ctx.provider.clone(),
                container_id,
            };
            let span = tracing::debug_span!("exec", pod = %format!("{namespace}/{pod}"), container = %container);
            serve_stdio_session(request, options, handler, span, ctx.idle_timeout)
        }
        Endpoint::Attach {
            namespace,
            pod,
            uid,
            container,
        } => {
            let options = ExecOptions::from_attach_query(request.uri().query().unwrap_or(""))
                .map_err(|e| StatusError::bad_request(e.to_string()))?;
            let uid = pod_uid(&ctx, &namespace, &pod, uid).await?;
            let container_id = running_container(&ctx, &uid, &container).await?;
            let handler = ProviderAttach {
                provider: ctx.provider.clone(),
                container_id,
            };
            let span = tracing::debug_span!("attach", pod = %format!("{namespace}/{pod}"), container = %container);
            serve_stdio_session(request, options, handler, span, ctx.idle_timeout)
        }
        Endpoint::Run {
            namespace,
            pod,
            uid,
            container,
        } => {
            if request.method() != http::Method::POST {
                return Err(StatusError {
                    code: 405,
                    reason: "MethodNotAllowed",
                    message: "/run takes POST".into(),
                    headers: Box::default(),
                });
            }
            let query = remotecommand::parse_query(request.uri().query().unwrap_or(""));
            let command: Vec<String> = query
                .iter()
                .filter(|(k, _)| k == "cmd")
                .flat_map(|(_, v)| v.split_whitespace().map(str::to_string))
                .collect();
            if command.is_empty() {
                return Err(StatusError::bad_request(
                    "/run needs a command: ?cmd=<command and arguments>".into(),
                ));
            }
            let uid = pod_uid(&ctx, &namespace, &pod, uid).await?;
            let container_id = running_container(&ctx, &uid, &container).await?;
            Ok(run_in_container(ctx.provider.as_ref(), &container_id, command).await)
        }
        Endpoint::PortForward {
            namespace,
            pod,
            uid,
        } => {
            let uid = pod_uid(&ctx, &namespace, &pod, uid).await?;
            let (_, headers) = negotiate(&request, portforward::PROTOCOLS)?;
            let target = PortForwardTarget {
                pod: format!("{namespace}/{pod}"),
                uid: uid.clone(),
            };
            let handler = Arc::new(PodForward {
                provider: ctx.provider.clone(),
                pod_uid: uid,
            });
            upgrade(request, headers, ctx.idle_timeout, move |io| async move {
                if let Err(e) =
                    portforward::serve_portforward(io, target, handler, &StreamingConfig::default())
                        .await
                {
                    debug!(error = %e, "port-forward session ended with an error");
                }
            })
        }
    }
}

/// An exec or attach session: SPDY/3.1 remotecommand (what the API server speaks), or
/// WebSocket channel protocols for a direct client.
fn serve_stdio_session<H: ExecHandler + 'static>(
    request: http::Request<Incoming>,
    options: ExecOptions,
    handler: H,
    span: tracing::Span,
    idle_timeout: std::time::Duration,
) -> Result<http::Response<Body>, StatusError> {
    if websocket::is_websocket(request.headers()) {
        let (protocol, headers) = websocket::negotiate(request.headers())
            .map_err(|e| StatusError::bad_request(e.to_string()))?;
        return upgrade(request, headers, idle_timeout, move |io| {
            async move {
                if let Err(e) =
                    websocket::serve_remotecommand(io, protocol, options, &handler).await
                {
                    debug!(error = %e, "WebSocket session ended with an error");
                }
            }
            .instrument(span)
        });
    }
    let (protocol, headers) = negotiate(&request, remotecommand::PROTOCOLS)?;
    upgrade(request, headers, idle_timeout, move |io| {
        async move {
            if let Err(e) = remotecommand::serve_remotecommand(
                io,
                protocol,
                options,
                &handler,
                &StreamingConfig::default(),
            )
            .await
            {
                debug!(error = %e, "session ended with an error");
            }
        }
        .instrument(span)
    })
}

fn negotiate(
    request: &http::Request<Incoming>,
    supported: &[&'static str],
) -> Result<(&'static str, http::HeaderMap), StatusError> {
    handshake::negotiate(request.headers(), supported).map_err(|e| {
        let status = e.http_status().unwrap_or(400);
        let mut error = if status == 403 {
            StatusError::forbidden(e.to_string())
        } else {
            StatusError::bad_request(e.to_string())
        };
        error.headers = Box::new(handshake::rejection_headers(&e));
        error
    })
}

/// The upgraded connection a session runs on: hyper's, watched for traffic so an idle session
/// is closed (see [`idle::serve_until_idle`]).
type UpgradedIo = idle::Watched<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers 101 with `headers` and runs `serve` on the upgraded connection once hyper hands it
/// over; a session without traffic for `idle_timeout` (zero: never) is dropped, which closes it.
fn upgrade<F, Fut>(
    request: http::Request<Incoming>,
    headers: http::HeaderMap,
    idle_timeout: std::time::Duration,
    serve: F,
) -> Result<http::Response<Body>, StatusError>
where
    F: FnOnce(UpgradedIo) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // The upgraded session keeps its connection's slot (see `ConnectionSlot`).
    let slot = request.extensions().get::<super::ConnectionSlot>().cloned();
    tokio::spawn(async move {
        let _slot = slot;
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                if idle::serve_until_idle(TokioIo::new(upgraded), Some(idle_timeout), serve).await
                    == idle::Ended::Idle
                {
                    tracing::info!(?idle_timeout, "closed a streaming session without traffic for --streaming-connection-idle-timeout");
                }
            }
            Err(e) => debug!(error = %e, "connection upgrade failed"),
        }
    });
    let mut response = http::Response::new(
        Full::new(bytes::Bytes::new())
            .map_err(|never| -> BoxError { match never {} })
            .boxed_unsync(),
    );
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    Ok(response)
}

/// The pod's UID: given in the path, or looked up (a Node may read pods bound to it).
async fn pod_uid(
    ctx: &StreamContext,
    namespace: &str,
    pod: &str,
    given: Option<String>,
) -> Result<String, StatusError> {
    if let Some(uid) = given {
        return Ok(uid);
    }
    let client = ctx.client.clone().ok_or_else(|| {
        StatusError::not_found(format!("pod {namespace}/{pod} is unknown to this node"))
    })?;
    let api: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
    match api.get_opt(pod).await {
        Ok(Some(p)) => p
            .metadata
            .uid
            .ok_or_else(|| StatusError::not_found(format!("pod {namespace}/{pod} has no uid"))),
        Ok(None) => Err(StatusError::not_found(format!(
            "pod {namespace}/{pod} not found"
        ))),
        Err(e) => Err(StatusError::not_found(format!(
            "pod {namespace}/{pod}: {}",
            crate::config::one_line(&e)
        ))),
    }
}

/// The id of the running instance of `container` in pod `uid`.
async fn running_container(
    ctx: &StreamContext,
    uid: &str,
    container: &str,
) -> Result<String, StatusError> {
    // Fresh: a container that restarted a moment ago is targeted in its new instance.
    let snapshot = ctx.runtime.fresh().await;
    let containers = snapshot.of_pod(uid).ok_or_else(|| StatusError {
        code: 503,
        reason: "ServiceUnavailable",
        message: "the container runtime cannot be listed".into(),
        headers: Box::default(),
    })?;
    let mut of_pod = containers
        .iter()
        .filter(|c| c.name == container)
        .collect::<Vec<_>>();
    if of_pod.is_empty() {
        return Err(StatusError::not_found(format!(
            "container {container} not found in the pod"
        )));
    }
    of_pod.sort_by_key(|c| c.attempt);
    match of_pod.pop() {
        Some(c) if matches!(c.state, ContainerState::Running { .. }) => Ok(c.id.clone()),
        _ => Err(StatusError::bad_request(format!(
            "container {container} is not running"
        ))),
    }
}

/// Exec through the provider: a new instance of the container's module.
struct ProviderExec {
    provider: Arc<dyn Provider>,
    container_id: String,
}

impl ExecHandler for ProviderExec {
    async fn exec(&self, io: ExecIo) -> Result<i32, String> {
        fn writer(
            stream: Option<DuplexStream>,
        ) -> std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>> {
            match stream {
                Some(s) => Box::pin(s),
                None => Box::pin(tokio::io::sink()),
            }
        }
        let provider_io = provider_api::ExecIo {
            stdin: io
                .stdin
                .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>),
            stdout: writer(io.stdout),
            stderr: writer(io.stderr),
            timeout: None,
        };
        self.provider
            .exec(&self.container_id, io.command, provider_io)
            .await
            .map_err(|e| e.to_string())
    }
}

/// How much of `/run`'s output is kept: the CRI's message size limit (16 MiB), which bounds
/// the kubelet's `RunInContainer` the same way.
const RUN_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// `/run`: the command's stdout and stderr as written, 200 on exit code 0; otherwise 500 with
/// the error as plain text, as the kubelet's `RunInContainer` answers.
async fn run_in_container(
    provider: &dyn Provider,
    container_id: &str,
    command: Vec<String>,
) -> http::Response<Body> {
    let output = RunOutput::default();
    let io = provider_api::ExecIo {
        stdin: None,
        stdout: Box::pin(output.clone()),
        stderr: Box::pin(output.clone()),
        timeout: None,
    };
    let argv = command.join(" ");
    let (status, body) = match provider.exec(container_id, command, io).await {
        Ok(0) => (http::StatusCode::OK, output.take()),
        Ok(code) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "command '{argv}' exited with {code}: {}",
                String::from_utf8_lossy(&output.take())
            )
            .into_bytes(),
        ),
        Err(e) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string().into_bytes(),
        ),
    };
    let mut response = http::Response::new(
        Full::new(bytes::Bytes::from(body))
            .map_err(|never| -> BoxError { match never {} })
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `/run`'s stdout and stderr, interleaved as written, up to [`RUN_OUTPUT_LIMIT`].
#[derive(Clone, Default)]
struct RunOutput(Arc<std::sync::Mutex<Vec<u8>>>);

impl RunOutput {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl tokio::io::AsyncWrite for RunOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = RUN_OUTPUT_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..buf.len().min(room)]);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Attach through the provider: the running instance's stdio.
struct ProviderAttach {
    provider: Arc<dyn Provider>,
    container_id: String,
}

impl ExecHandler for ProviderAttach {
    async fn exec(&self, io: ExecIo) -> Result<i32, String> {
        // A TTY's resizes mean nothing to a Wasm guest (it has no terminal): dropping the
        // receiver discards them.
        drop(io.resize);
        let provider_io = provider_api::AttachIo {
            stdin: io
                .stdin
                .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>),
            stdout: io
                .stdout
                .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>),
            stderr: io
                .stderr
                .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>),
        };
        self.provider
            .attach(&self.container_id, provider_io)
            .await
            .map(|()| 0)
            .map_err(|e| e.to_string())
    }
}

/// Port-forward into the pod: a TCP connection per stream pair, to the pod's own listener on
/// the port (as the provider names it), or a refusal in the words of the kubelet's runtimes.
struct PodForward {
    provider: Arc<dyn Provider>,
    pod_uid: String,
}

impl PortForwardHandler for PodForward {
    async fn forward(&self, port: u16, mut stream: DuplexStream) -> std::io::Result<()> {
        let mut tcp = self
            .provider
            .pod_connect(&self.pod_uid, port)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!(
                        "failed to connect to localhost:{port} inside namespace {:?}: {e}",
                        self.pod_uid
                    ),
                )
            })?;
        tokio::io::copy_bidirectional(&mut stream, &mut tcp).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_like_the_kubelet() {
        assert!(matches!(
            endpoint("/exec/ns/p/c"),
            Some(Endpoint::Exec { uid: None, .. })
        ));
        assert!(matches!(
            endpoint("/exec/ns/p/u/c"),
            Some(Endpoint::Exec { uid: Some(_), .. })
        ));
        assert!(matches!(
            endpoint("/portForward/ns/p"),
            Some(Endpoint::PortForward { uid: None, .. })
        ));
        assert!(endpoint("/exec/ns").is_none());
        assert!(endpoint("/containerLogs/ns/p/c").is_none());
    }
}
