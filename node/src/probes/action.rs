//! What one probe or one lifecycle hook does, once: [`Action::from_probe`] and
//! [`Action::from_handler`] turn the pod's spec into an [`Action`] (resolving a named port and
//! the default host, the pod IP), and [`Action::run`] runs it, returning `Ok` for success and
//! the kubelet's failure message otherwise.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use provider_api::{Provider, ProviderError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The User-Agent the kubelet's HTTP prober sends (`kube-probe/<major>.<minor>`); servers
/// that special-case probes look for this prefix.
const USER_AGENT: &str = "kube-probe/1.34";
/// The most of a response head read before giving up on finding the status line.
const MAX_STATUS_LINE: usize = 4096;

/// One check, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the command as a new instance of the container's module; exit 0 is success.
    Exec(Vec<String>),
    /// `GET http://host:port/path`; 200..=399 is success.
    HttpGet { host: String, port: u16, path: String, headers: Vec<(String, String)> },
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
            return http_action(http.scheme.as_deref(), http.host.as_deref(), &http.port, http.path.as_deref(), http.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())), container, pod_ip);
        }
        if let Some(tcp) = &probe.tcp_socket {
            return match resolve_port(&tcp.port, container) {
                Ok(port) => Action::TcpSocket { host: tcp.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| pod_ip.to_string()), port },
                Err(e) => Action::Invalid(e),
            };
        }
        if probe.grpc.is_some() {
            return Action::Invalid("gRPC probes are not supported by wasm-kubelet yet".into());
        }
        Action::Invalid("the probe names no handler (exec, httpGet, tcpSocket or grpc)".into())
    }

    /// The action of a lifecycle hook (`postStart`, `preStop`) of `container`.
    pub fn from_handler(handler: &LifecycleHandler, container: &Container, pod_ip: &str) -> Action {
        if let Some(exec) = &handler.exec {
            return Action::Exec(exec.command.clone().unwrap_or_default());
        }
        if let Some(http) = &handler.http_get {
            return http_action(http.scheme.as_deref(), http.host.as_deref(), &http.port, http.path.as_deref(), http.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())), container, pod_ip);
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
    pub async fn run(&self, provider: &Arc<dyn Provider>, container_id: &str, timeout: Duration) -> Result<(), String> {
        match self {
            Action::Exec(command) => match provider.exec_sync(container_id, command.clone(), timeout).await {
                Ok((0, _)) => Ok(()),
                Ok((code, output)) => {
                    let output = String::from_utf8_lossy(&output).trim_end().to_string();
                    Err(if output.is_empty() { format!("command {command:?} exited with {code}") } else { output })
                }
                Err(ProviderError::Timeout(_)) => Err(format!("command {command:?} timed out")),
                Err(e) => Err(e.to_string()),
            },
            Action::HttpGet { host, port, path, headers } => {
                let url = format!("http://{}{path}", host_port(host, *port));
                match tokio::time::timeout(timeout, http_get(host, *port, path, headers)).await {
                    Ok(Ok(status)) if http_success(status) => Ok(()),
                    Ok(Ok(status)) => Err(format!("HTTP probe failed with statuscode: {status}")),
                    Ok(Err(e)) => Err(format!("Get \"{url}\": {e}")),
                    Err(_) => Err(format!("Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)")),
                }
            }
            Action::TcpSocket { host, port } => {
                let addr = host_port(host, *port);
                match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                    Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
                }
            }
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
    if let Some(scheme) = scheme.filter(|s| !s.eq_ignore_ascii_case("HTTP")) {
        return Action::Invalid(format!("httpGet scheme {scheme} is not supported by wasm-kubelet yet (only HTTP)"));
    }
    let port = match resolve_port(port, container) {
        Ok(p) => p,
        Err(e) => return Action::Invalid(e),
    };
    let path = match path.filter(|p| !p.is_empty()) {
        Some(p) if p.starts_with('/') => p.to_string(),
        Some(p) => format!("/{p}"),
        None => "/".into(),
    };
    Action::HttpGet { host: host.filter(|h| !h.is_empty()).unwrap_or(pod_ip).to_string(), port, path, headers: headers.collect() }
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0).ok_or_else(|| format!("invalid port number: {n}")),
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

/// A minimal HTTP/1.1 GET: sends the request, reads the status line, returns the status code.
async fn http_get(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect((host, port)).await?;
    let mut all: Vec<(String, String)> =
        vec![("Host".into(), host_port(host, port)), ("User-Agent".into(), USER_AGENT.into()), ("Accept".into(), "*/*".into())];
    for (name, value) in headers {
        // The probe's own headers replace the defaults of the same name, as in the kubelet.
        match all.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(slot) => slot.1 = value.clone(),
            None => all.push((name.clone(), value.clone())),
        }
    }
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    for (name, value) in &all {
        if name.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid header {name:?}")));
        }
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&head[..end]);
        }
        if head.len() > MAX_STATUS_LINE {
            break;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "malformed HTTP response"))
}

fn parse_status_line(line: &[u8]) -> std::io::Result<u16> {
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("malformed HTTP status line {line:?}"))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn container() -> Container {
        serde_json::from_value(serde_json::json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}]})).unwrap()
    }

    #[test]
    fn ports_by_number_and_by_name() {
        let c = container();
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(resolve_port(&IntOrString::String("http".into()), &c), Ok(8080));
        assert_eq!(resolve_port(&IntOrString::String("8081".into()), &c), Ok(8081));
        assert!(resolve_port(&IntOrString::String("grpc".into()), &c).unwrap_err().contains("couldn't find port: grpc"));
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
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 500").unwrap(), 500);
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
    }

    #[test]
    fn http_action_defaults_and_named_port() {
        let probe: Probe = serde_json::from_value(serde_json::json!({"httpGet": {"port": "http", "path": "healthz", "httpHeaders": [{"name": "X-A", "value": "1"}]}})).unwrap();
        assert_eq!(
            Action::from_probe(&probe, &container(), "10.0.0.7"),
            Action::HttpGet { host: "10.0.0.7".into(), port: 8080, path: "/healthz".into(), headers: vec![("X-A".into(), "1".into())] }
        );
        let https: Probe = serde_json::from_value(serde_json::json!({"httpGet": {"port": 443, "scheme": "HTTPS"}})).unwrap();
        assert!(matches!(Action::from_probe(&https, &container(), "h"), Action::Invalid(_)));
        let grpc: Probe = serde_json::from_value(serde_json::json!({"grpc": {"port": 9090}})).unwrap();
        assert!(matches!(Action::from_probe(&grpc, &container(), "h"), Action::Invalid(m) if m.contains("gRPC")));
    }

    #[tokio::test]
    async fn http_get_against_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 2048];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await.unwrap();
            }
            seen
        });
        let provider: Arc<dyn Provider> = Arc::new(NoProvider);
        let action = Action::HttpGet { host: "127.0.0.1".into(), port, path: "/healthz".into(), headers: vec![("Host".into(), "probe.example".into())] };
        assert_eq!(action.run(&provider, "c", Duration::from_secs(5)).await, Ok(()));
        assert_eq!(action.run(&provider, "c", Duration::from_secs(5)).await, Err("HTTP probe failed with statuscode: 503".into()));
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("GET /healthz HTTP/1.1\r\n") && seen[0].contains("Host: probe.example\r\n") && seen[0].contains("User-Agent: kube-probe/"), "{}", seen[0]);
        // Nothing listens any more: a refused connection is a failure, and so is a refused TCP probe.
        assert!(action.run(&provider, "c", Duration::from_secs(5)).await.unwrap_err().starts_with("Get \"http://127.0.0.1:"));
        let tcp = Action::TcpSocket { host: "127.0.0.1".into(), port };
        assert!(tcp.run(&provider, "c", Duration::from_secs(5)).await.unwrap_err().starts_with("dial tcp 127.0.0.1:"));
    }

    /// A provider for actions that never reach it.
    pub(crate) struct NoProvider;

    #[async_trait::async_trait]
    impl Provider for NoProvider {
        fn runtime_info(&self) -> provider_api::RuntimeInfo {
            provider_api::RuntimeInfo { name: "none".into(), version: "0".into() }
        }
        async fn status(&self) -> provider_api::RuntimeStatus {
            provider_api::RuntimeStatus::Ready
        }
        async fn image_status(&self, _: &str) -> Option<provider_api::ImageInfo> {
            None
        }
        async fn pull_image(&self, r: &str, _: &[provider_api::RegistryAuth]) -> Result<provider_api::ImageInfo, ProviderError> {
            Err(ProviderError::Pull(r.into()))
        }
        async fn run_pod_sandbox(&self, c: &provider_api::SandboxConfig) -> Result<String, ProviderError> {
            Ok(c.pod_uid.clone())
        }
        async fn remove_pod_sandbox(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn create_container(&self, s: &str, _: provider_api::ContainerConfig) -> Result<String, ProviderError> {
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
        async fn list_containers(&self) -> Vec<provider_api::ContainerSummary> {
            Vec::new()
        }
    }
}
