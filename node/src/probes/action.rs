//! What one probe or one lifecycle hook does, once: [`Action::from_probe`] and
//! [`Action::from_handler`] turn the pod's spec into an [`Action`] (resolving a named port and
//! the default host, the pod IP), and [`Action::run`] runs it, returning `Ok` for success and
//! the kubelet's failure message otherwise.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use provider_api::{Provider, ProviderError};
use tokio::net::TcpStream;

/// The User-Agent the kubelet's HTTP prober sends (`kube-probe/<major>.<minor>`); servers
/// that special-case probes look for this prefix.
const USER_AGENT: &str = "kube-probe/1.34";

/// One check, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the command as a new instance of the container's module; exit 0 is success.
    Exec(Vec<String>),
    /// `GET http(s)://host:port/path`; 200..=399 is success. HTTPS skips certificate
    /// verification, as the kubelet's prober does.
    HttpGet {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
        https: bool,
    },
    /// `grpc.health.v1.Health/Check` for `service` over plaintext HTTP/2; SERVING is success.
    Grpc {
        host: String,
        port: u16,
        service: String,
    },
    /// A TCP connection that opens is success.
    TcpSocket { host: String, port: u16 },
    /// `preStop` only: wait this long.
    Sleep(Duration),
    /// A spec that cannot be run as written (an unknown port name, an unsupported scheme or
    /// handler): every run fails with this message, so the user sees it in an Unhealthy event.
    Invalid(String),
}

impl Action {
    /// The action of a probe of `container`; `pod_ip` is the default host.
    pub fn from_probe(probe: &Probe, container: &Container, pod_ip: &str) -> Action {
        if let Some(exec) = &probe.exec {
            return Action::Exec(exec.command.clone().unwrap_or_default());
        }
        if let Some(http) = &probe.http_get {
            return http_action(
                http.scheme.as_deref(),
                http.host.as_deref(),
                &http.port,
                http.path.as_deref(),
                http.http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone())),
                container,
                pod_ip,
            );
        }
        if let Some(tcp) = &probe.tcp_socket {
            return match resolve_port(&tcp.port, container) {
                Ok(port) => Action::TcpSocket {
                    host: tcp
                        .host
                        .clone()
                        .filter(|h| !h.is_empty())
                        .unwrap_or_else(|| pod_ip.to_string()),
                    port,
                },
                Err(e) => Action::Invalid(e),
            };
        }
        if let Some(grpc) = &probe.grpc {
            return match u16::try_from(grpc.port).ok().filter(|p| *p > 0) {
                Some(port) => Action::Grpc {
                    host: pod_ip.to_string(),
                    port,
                    service: grpc.service.clone().unwrap_or_default(),
                },
                None => Action::Invalid(format!("invalid port number: {}", grpc.port)),
            };
        }
        Action::Invalid("the probe names no handler (exec, httpGet, tcpSocket or grpc)".into())
    }

    /// The action of a lifecycle hook (`postStart`, `preStop`) of `container`.
    pub fn from_handler(handler: &LifecycleHandler, container: &Container, pod_ip: &str) -> Action {
        if let Some(exec) = &handler.exec {
            return Action::Exec(exec.command.clone().unwrap_or_default());
        }
        if let Some(http) = &handler.http_get {
            return http_action(
                http.scheme.as_deref(),
                http.host.as_deref(),
                &http.port,
                http.path.as_deref(),
                http.http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone())),
                container,
                pod_ip,
            );
        }
        if let Some(sleep) = &handler.sleep {
            return Action::Sleep(Duration::from_secs(sleep.seconds.max(0) as u64));
        }
        if handler.tcp_socket.is_some() {
            // Deprecated in the API and never run by the kubelet either.
            return Action::Invalid("tcpSocket lifecycle hooks are not supported".into());
        }
        Action::Invalid("the hook names no handler (exec, httpGet or sleep)".into())
    }

    /// Runs the action once within `timeout` against the container instance `container_id`.
    pub async fn run(
        &self,
        provider: &Arc<dyn Provider>,
        container_id: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        match self {
            Action::Exec(command) => match provider
                .exec_sync(container_id, command.clone(), timeout)
                .await
            {
                Ok((0, _)) => Ok(()),
                Ok((code, output)) => {
                    let output = String::from_utf8_lossy(&output).trim_end().to_string();
                    Err(if output.is_empty() {
                        format!("command {command:?} exited with {code}")
                    } else {
                        output
                    })
                }
                Err(ProviderError::Timeout(_)) => Err(format!("command {command:?} timed out")),
                Err(e) => Err(e.to_string()),
            },
            Action::HttpGet {
                host,
                port,
                path,
                headers,
                https,
            } => {
                let url = format!(
                    "{}://{}{path}",
                    if *https { "https" } else { "http" },
                    host_port(host, *port)
                );
                match tokio::time::timeout(timeout, http_get(host, *port, path, headers, *https)).await {
                    Ok(Ok(status)) if http_success(status) => Ok(()),
                    Ok(Ok(status)) => Err(format!("HTTP probe failed with statuscode: {status}")),
                    Ok(Err(e)) => Err(format!("Get \"{url}\": {e}")),
                    Err(_) => Err(format!("Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)")),
                }
            }
            Action::TcpSocket { host, port } => {
                let addr = host_port(host, *port);
                match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
                    .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                    Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
                }
            }
            Action::Grpc {
                host,
                port,
                service,
            } => grpc_check(host, *port, service, timeout).await,
            Action::Sleep(d) => {
                tokio::time::sleep((*d).min(timeout)).await;
                Ok(())
            }
            Action::Invalid(message) => Err(message.clone()),
        }
    }
}

fn http_action(
    scheme: Option<&str>,
    host: Option<&str>,
    port: &IntOrString,
    path: Option<&str>,
    headers: impl Iterator<Item = (String, String)>,
    container: &Container,
    pod_ip: &str,
) -> Action {
    let https = match scheme.unwrap_or("HTTP") {
        s if s.eq_ignore_ascii_case("HTTP") => false,
        s if s.eq_ignore_ascii_case("HTTPS") => true,
        other => {
            return Action::Invalid(format!(
                "unsupported httpGet scheme {other:?} (HTTP or HTTPS)"
            ))
        }
    };
    let port = match resolve_port(port, container) {
        Ok(p) => p,
        Err(e) => return Action::Invalid(e),
    };
    let path = match path.filter(|p| !p.is_empty()) {
        Some(p) if p.starts_with('/') => p.to_string(),
        Some(p) => format!("/{p}"),
        None => "/".into(),
    };
    Action::HttpGet {
        host: host.filter(|h| !h.is_empty()).unwrap_or(pod_ip).to_string(),
        port,
        path,
        headers: headers.collect(),
        https,
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port number: {n}")),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<i32>() {
                return resolve_port(&IntOrString::Int(n), container);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("couldn't find port: {s} in container {}", container.name))
        }
    }
}

/// The kubelet's rule: any status from 200 up to 399 is success.
pub fn http_success(status: u16) -> bool {
    (200..400).contains(&status)
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One GET on hyper's client (a new connection each time, as the kubelet's prober disables
/// keep-alives), returning the status code. The body is never read: the status decides, and
/// dropping the response closes the connection. Redirects are not followed (a 3xx is success).
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    https: bool,
) -> Result<u16, String> {
    let url = format!(
        "{}://{}{path}",
        if https { "https" } else { "http" },
        host_port(host, port)
    );
    let mut request = http::Request::get(url.as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("invalid URL: {e}"))?;
    let all = [
        ("Host", host_port(host, port)),
        ("User-Agent", USER_AGENT.into()),
        ("Accept", "*/*".into()),
    ];
    let own = headers.iter().map(|(n, v)| (n.as_str(), v.clone()));
    // The probe's own headers replace the defaults of the same name, as in the kubelet.
    for (name, value) in all.into_iter().chain(own) {
        let invalid = || format!("invalid header {name:?}");
        let name = http::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let value = http::header::HeaderValue::from_str(&value).map_err(|_| invalid())?;
        request.headers_mut().insert(name, value);
    }
    request.headers_mut().insert(
        http::header::CONNECTION,
        http::header::HeaderValue::from_static("close"),
    );
    let response = http_client()
        .request(request)
        .await
        .map_err(|e| crate::http_client::failure(&e).message)?;
    Ok(response.status().as_u16())
}

/// The one client of HTTP probes and hooks, made once.
fn http_client() -> &'static crate::http_client::OneShotClient {
    static CLIENT: std::sync::OnceLock<crate::http_client::OneShotClient> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| crate::http_client::one_shot(&insecure_tls()))
}

/// The TLS client of HTTPS probes: any certificate is accepted (the kubelet's prober sets
/// `InsecureSkipVerify`), but the handshake's signatures are still checked.
fn insecure_tls() -> rustls::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = std::sync::Arc::new(AnyCertificate(provider.clone()));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        })
        // The ring provider supports the default versions; this cannot fail.
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}

#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `grpc.health.v1.Health/Check` over h2c (the kubelet's gRPC prober speaks plaintext HTTP/2),
/// with the kubelet's failure messages. The messages are tiny, so they are encoded by hand:
/// the request is `{service: string = 1}`, the response `{status: enum = 1}`.
///
/// Why not tonic and tonic-health: the HTTP/2 here is hyper's (no framing is hand-written),
/// only the two messages and the 5-byte gRPC prefix are, and tonic (with prost and its code
/// generation) is not a dependency yet. It arrives with the containerd provider (CRI over
/// gRPC, issue 14); this probe moves to tonic-health's generated client then.
/// The largest gRPC health reply read (grpc-go's default receive limit).
const GRPC_MAX_REPLY: usize = 4 << 20;

async fn grpc_check(host: &str, port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    use http_body_util::BodyExt;
    let addr = host_port(host, port);
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await?;
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .map_err(std::io::Error::other)
    };
    let (mut sender, connection) = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(format!(
                "timeout: failed to connect service {addr:?} within {}s: {e}",
                timeout.as_secs()
            ))
        }
        Err(_) => {
            return Err(format!(
                "timeout: failed to connect service {addr:?} within {}s",
                timeout.as_secs()
            ))
        }
    };
    let driver = tokio::spawn(connection);
    let result = tokio::time::timeout(timeout, async {
        let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", USER_AGENT)
            .body(http_body_util::Full::new(bytes::Bytes::from(grpc_frame(&health_request(service)))))
            .map_err(|e| format!("error: health rpc probe failed: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("error: health rpc probe failed: {e}"))?;
        let (head, body) = response.into_parts();
        // At most 4 MiB of reply, as the kubelet's gRPC client receives: a pod streaming data
        // for the whole timeout holds no more of the agent's memory than that.
        let collected = http_body_util::Limited::new(body, GRPC_MAX_REPLY).collect().await.map_err(|e| format!("error: health rpc probe failed: {e}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let message = collected.to_bytes();
        // A trailers-only response carries grpc-status in the headers.
        let status = trailers.get("grpc-status").or_else(|| head.headers.get("grpc-status")).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
        let detail = trailers.get("grpc-message").or_else(|| head.headers.get("grpc-message")).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        match status {
            Some(0) => {}
            // UNIMPLEMENTED
            Some(12) => return Err(format!("error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {detail}")),
            Some(code) => return Err(format!("error: health rpc probe failed: rpc error: code = {} desc = {detail}", grpc_code_name(code))),
            None if !head.status.is_success() => return Err(format!("error: health rpc probe failed: unexpected HTTP status {}", head.status)),
            None => return Err("error: health rpc probe failed: no grpc-status in the response".into()),
        }
        match health_status(&message) {
            Some(1) => Ok(()),
            Some(other) => Err(format!("service unhealthy (responded with {:?})", serving_status_name(other))),
            None => Err("error: health rpc probe failed: malformed HealthCheckResponse".into()),
        }
    })
    .await;
    driver.abort();
    result.unwrap_or_else(|_| {
        Err(format!(
            "timeout: health rpc did not complete within {}s",
            timeout.as_secs()
        ))
    })
}

/// `HealthCheckRequest { service }`: field 1, length-delimited (omitted when empty).
fn health_request(service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if !service.is_empty() {
        out.push(0x0a);
        put_varint(&mut out, service.len() as u64);
        out.extend_from_slice(service.as_bytes());
    }
    out
}

/// A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a framed `HealthCheckResponse` (0, UNKNOWN, when the field is absent, as
/// proto3 omits a zero); `None` when the bytes do not parse.
fn health_status(framed: &[u8]) -> Option<u64> {
    let len = u32::from_be_bytes(framed.get(1..5)?.try_into().ok()?) as usize;
    let message = framed.get(5..5 + len)?;
    let (mut at, mut status) = (0, 0);
    while at < message.len() {
        let key = get_varint(message, &mut at)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(message, &mut at)?,
            (_, 0) => drop(get_varint(message, &mut at)?),
            // The length is the pod's to choose: one past the message ends the parse (checked,
            // so a length near 2^64 cannot wrap the offset).
            (_, 2) => {
                at = usize::try_from(get_varint(message, &mut at)?)
                    .ok()
                    .and_then(|n| at.checked_add(n))?
            }
            (_, 1) => at += 8,
            (_, 5) => at += 4,
            _ => return None,
        }
    }
    (at == message.len()).then_some(status)
}

fn serving_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        other => other.to_string(),
    }
}

fn grpc_code_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES
        .get(code as usize)
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("Code({code})"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn container() -> Container {
        serde_json::from_value(serde_json::json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}]})).unwrap()
    }

    #[test]
    fn ports_by_number_and_by_name() {
        let c = container();
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Ok(8080)
        );
        assert_eq!(
            resolve_port(&IntOrString::String("8081".into()), &c),
            Ok(8081)
        );
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c)
            .unwrap_err()
            .contains("couldn't find port: grpc"));
        assert!(resolve_port(&IntOrString::Int(0), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    #[test]
    fn http_status_classes() {
        assert!(!http_success(199));
        assert!(http_success(200));
        assert!(http_success(302));
        assert!(http_success(399));
        assert!(!http_success(400));
        assert!(!http_success(500));
    }

    #[test]
    fn http_action_defaults_and_named_port() {
        let probe: Probe = serde_json::from_value(serde_json::json!({"httpGet": {"port": "http", "path": "healthz", "httpHeaders": [{"name": "X-A", "value": "1"}]}})).unwrap();
        assert_eq!(
            Action::from_probe(&probe, &container(), "10.0.0.7"),
            Action::HttpGet {
                host: "10.0.0.7".into(),
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("X-A".into(), "1".into())],
                https: false
            }
        );
        let https: Probe = serde_json::from_value(
            serde_json::json!({"httpGet": {"port": 443, "scheme": "HTTPS"}}),
        )
        .unwrap();
        assert!(matches!(
            Action::from_probe(&https, &container(), "h"),
            Action::HttpGet {
                port: 443,
                https: true,
                ..
            }
        ));
        let grpc: Probe =
            serde_json::from_value(serde_json::json!({"grpc": {"port": 9090, "service": "db"}}))
                .unwrap();
        assert_eq!(
            Action::from_probe(&grpc, &container(), "h"),
            Action::Grpc {
                host: "h".into(),
                port: 9090,
                service: "db".into()
            }
        );
        let grpc: Probe = serde_json::from_value(serde_json::json!({"grpc": {"port": 0}})).unwrap();
        assert!(
            matches!(Action::from_probe(&grpc, &container(), "h"), Action::Invalid(m) if m.contains("invalid port"))
        );
    }

    #[tokio::test]
    async fn http_get_against_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in [
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.0 500\r\n\r\n",
                "SSH-2.0-OpenSSH\r\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 2048];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let provider: Arc<dyn Provider> = Arc::new(NoProvider);
        let action = Action::HttpGet {
            host: "127.0.0.1".into(),
            port,
            path: "/healthz".into(),
            headers: vec![("Host".into(), "probe.example".into())],
            https: false,
        };
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Ok(())
        );
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Err("HTTP probe failed with statuscode: 503".into())
        );
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Ok(())
        );
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Err("HTTP probe failed with statuscode: 500".into())
        );
        let not_http = action
            .run(&provider, "c", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            not_http.starts_with("Get \"http://127.0.0.1:"),
            "{not_http}"
        );
        let seen = server.await.unwrap();
        assert!(
            seen[0].starts_with("GET /healthz HTTP/1.1\r\n")
                && seen[0].contains("Host: probe.example\r\n")
                && seen[0].contains("User-Agent: kube-probe/"),
            "{}",
            seen[0]
        );
        // Nothing listens any more: a refused connection is a failure, and so is a refused TCP probe.
        assert!(action
            .run(&provider, "c", Duration::from_secs(5))
            .await
            .unwrap_err()
            .starts_with("Get \"http://127.0.0.1:"));
        let tcp = Action::TcpSocket {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(tcp
            .run(&provider, "c", Duration::from_secs(5))
            .await
            .unwrap_err()
            .starts_with("dial tcp 127.0.0.1:"));
    }

    #[tokio::test]
    async fn https_get_accepts_a_self_signed_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for status in ["204 No Content", "500 Internal Server Error"] {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = vec![0u8; 2048];
                let _ = tls.read(&mut buf).await.unwrap();
                tls.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let _ = tls.shutdown().await;
            }
        });
        let provider: Arc<dyn Provider> = Arc::new(NoProvider);
        let action = Action::HttpGet {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
            headers: vec![],
            https: true,
        };
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Ok(())
        );
        assert_eq!(
            action.run(&provider, "c", Duration::from_secs(5)).await,
            Err("HTTP probe failed with statuscode: 500".into())
        );
        // Plain HTTP to a TLS port (or the reverse) is a failure, not a hang.
        let refused = action
            .run(&provider, "c", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            refused.starts_with(&format!("Get \"https://127.0.0.1:{port}/\"")),
            "{refused}"
        );
    }

    /// A grpc.health.v1 server over h2c answering each Check with the next of `statuses`
    /// (a serving status, or `Err(grpc code)`); returns its port.
    async fn health_server(statuses: Vec<Result<u64, u32>>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let statuses = Arc::new(std::sync::Mutex::new(statuses.into_iter()));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let statuses = statuses.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let next = statuses.lock().unwrap().next();
                            async move {
                                use http_body_util::BodyExt;
                                assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                assert_eq!(&body[..], &grpc_frame(&health_request("db"))[..]);
                                let (message, code) = match next.unwrap_or(Err(14)) {
                                    Ok(0) => (grpc_frame(&[]), 0),
                                    Ok(s) => (grpc_frame(&[0x08, s as u8]), 0),
                                    Err(code) => (Vec::new(), code),
                                };
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", code.to_string().parse().unwrap());
                                trailers.insert("grpc-message", "nope".parse().unwrap());
                                let body =
                                    http_body_util::StreamBody::new(futures::stream::iter(vec![
                                        Ok::<_, std::convert::Infallible>(
                                            hyper::body::Frame::data(bytes::Bytes::from(message)),
                                        ),
                                        Ok(hyper::body::Frame::trailers(trailers)),
                                    ]));
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn grpc_health_check_over_h2c() {
        let port = health_server(vec![Ok(1), Ok(2), Ok(0), Err(12), Err(5)]).await;
        let provider: Arc<dyn Provider> = Arc::new(NoProvider);
        let action = Action::Grpc {
            host: "127.0.0.1".into(),
            port,
            service: "db".into(),
        };
        let run = || action.run(&provider, "c", Duration::from_secs(5));
        assert_eq!(run().await, Ok(()));
        assert_eq!(
            run().await,
            Err("service unhealthy (responded with \"NOT_SERVING\")".into())
        );
        assert_eq!(
            run().await,
            Err("service unhealthy (responded with \"UNKNOWN\")".into())
        );
        assert_eq!(run().await, Err("error: this server does not implement the grpc health protocol (grpc.health.v1.Health): nope".into()));
        assert_eq!(
            run().await,
            Err("error: health rpc probe failed: rpc error: code = NotFound desc = nope".into())
        );
        let closed = Action::Grpc {
            host: "127.0.0.1".into(),
            port: 1,
            service: String::new(),
        };
        assert!(closed
            .run(&provider, "c", Duration::from_secs(5))
            .await
            .unwrap_err()
            .starts_with("timeout: failed to connect service \"127.0.0.1:1\""));
    }

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(grpc_frame(&health_request("")), vec![0, 0, 0, 0, 0]);
        assert_eq!(health_request("ab"), vec![0x0a, 2, b'a', b'b']);
        assert_eq!(health_status(&grpc_frame(&[0x08, 0x01])), Some(1));
        assert_eq!(health_status(&grpc_frame(&[])), Some(0));
        // Unknown fields are skipped; a truncated message does not parse.
        assert_eq!(
            health_status(&grpc_frame(&[0x12, 0x01, b'x', 0x08, 0x02])),
            Some(2)
        );
        assert_eq!(health_status(&grpc_frame(&[0x08])), None);
        assert_eq!(health_status(&[0, 0, 0]), None);
    }

    /// A provider for actions that never reach it.
    pub(crate) struct NoProvider;

    #[async_trait::async_trait]
    impl Provider for NoProvider {
        fn runtime_info(&self) -> provider_api::RuntimeInfo {
            provider_api::RuntimeInfo {
                name: "none".into(),
                version: "0".into(),
            }
        }
        async fn status(&self) -> provider_api::RuntimeStatus {
            provider_api::RuntimeStatus::Ready
        }
        async fn image_status(&self, _: &str) -> Option<provider_api::ImageInfo> {
            None
        }
        async fn pull_image(
            &self,
            r: &str,
            _: &[provider_api::RegistryAuth],
        ) -> Result<provider_api::ImageInfo, ProviderError> {
            Err(ProviderError::Pull(r.into()))
        }
        async fn run_pod_sandbox(
            &self,
            c: &provider_api::SandboxConfig,
        ) -> Result<String, ProviderError> {
            Ok(c.pod_uid.clone())
        }
        async fn remove_pod_sandbox(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn create_container(
            &self,
            s: &str,
            _: provider_api::ContainerConfig,
        ) -> Result<String, ProviderError> {
            Err(ProviderError::NotFound(s.into()))
        }
        async fn start_container(&self, id: &str) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn stop_container(&self, id: &str, _: Duration) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn remove_container(&self, id: &str) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn list_containers(
            &self,
        ) -> Result<Vec<provider_api::ContainerSummary>, provider_api::ProviderError> {
            Ok(Vec::new())
        }
    }
}

/// The gRPC health reply decoder against arbitrary bytes (what a pod's gRPC server answers is
/// the pod's to choose): never a panic or a hang, and what [`grpc_frame`] frames decodes back.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn health_reply_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = health_status(&bytes);
        }

        /// Plausible replies: a frame header with the right length around arbitrary fields.
        #[test]
        fn health_reply_fields_never_panic(message in prop::collection::vec(prop_oneof![any::<u8>(), Just(0xffu8), Just(0x08u8), Just(0x12u8)], 0..48)) {
            let _ = health_status(&grpc_frame(&message));
        }

        /// A length-delimited field whose length is near 2^64 must not overflow the offset
        /// (a panic in debug builds, a wrapped offset and a loop in release ones).
        #[test]
        fn health_reply_huge_lengths_never_panic(wire in prop_oneof![Just(1u64), Just(2u64), Just(5u64)], len in (u64::MAX - 64)..=u64::MAX) {
            let mut message = Vec::new();
            put_varint(&mut message, (3 << 3) | wire);
            if wire == 2 {
                put_varint(&mut message, len);
            }
            prop_assert_eq!(health_status(&grpc_frame(&message)), None);
        }

        #[test]
        fn health_reply_round_trips(status in any::<u64>(), skipped in any::<u64>()) {
            let mut message = vec![0x10];
            put_varint(&mut message, skipped);
            if status != 0 {
                message.push(0x08);
                put_varint(&mut message, status);
            }
            prop_assert_eq!(health_status(&grpc_frame(&message)), Some(status));
        }
    }
}
