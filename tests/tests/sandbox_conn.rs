//! The sandbox holds, connections and parsers (issue 11): what a hostile client of a pod port or
//! of the kubelet API can make the agent hold. A thousand idle connections to a pod's HTTP port
//! and to the kubelet API (the agent's descriptors stay within the per-listener caps, idle and
//! slowloris connections are closed by the header-read timeout, the node's Lease keeps
//! renewing); a SPDY header block built to blow up when decoded, sent to /exec with the admin's
//! certificate (the session is refused, the agent's peak RSS stays flat); and
//! `--streaming-connection-idle-timeout` closing an exec session without traffic.

use std::io::Write as _;
use std::time::Duration;

use integration_tests::{
    admin_cert, admin_tls, example_image, http_get, phase, test_node, wait_for, Agent, Cluster,
    TestNamespace, Tls, TEST_TIMEOUT,
};
use k8s_openapi::api::coordination::v1::Lease;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The kubelet API's connection cap (node/src/server/mod.rs `MAX_CONNECTIONS`).
const API_MAX_CONNECTIONS: usize = 512;
/// The pod's bound of requests in flight (annotation), hence its port's connection cap of twice
/// that, at least 256 (providers/wasmtime/src/http.rs `max_connections_per_listener`).
const POD_MAX_REQUESTS: usize = 200;
const POD_MAX_CONNECTIONS: usize = 2 * POD_MAX_REQUESTS;
/// Descriptors the agent may open besides the capped connections while the test runs (API
/// watches, log files, the pod's own files, tokio's internals).
const FD_MARGIN: usize = 64;
/// How many connections each flood opens.
const FLOOD: usize = 1000;
const PORT: u16 = 8080;

fn open_fds(agent: &Agent) -> usize {
    let pid = agent.pid().expect("the agent runs");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(agent: &Agent, field: &str) -> u64 {
    let pid = agent.pid().expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The largest descriptor count seen over `window`, sampled every 50 ms: connections the agent
/// took and still holds show up within it.
async fn peak_fds(agent: &Agent, window: Duration) -> usize {
    let until = tokio::time::Instant::now() + window;
    let mut peak = 0;
    while tokio::time::Instant::now() < until {
        peak = peak.max(open_fds(agent));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

/// Opens `n` TCP connections to `addr` that send nothing.
async fn idle_connections(addr: (&str, u16), n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    out
}

/// Whether the peer has closed this connection (EOF or reset); never blocks.
fn closed_by_peer(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

async fn lease_renew_time(client: &kube::Client, node: &str) -> Option<String> {
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "kube-node-lease");
    let lease = leases.get_opt(node).await.ok()??;
    Some(
        serde_json::to_value(lease.spec?.renew_time?)
            .ok()?
            .as_str()?
            .to_string(),
    )
}

#[tokio::test]
async fn a_thousand_idle_connections_stay_within_the_caps_and_are_closed() {
    let agent = &test_node("conn-flood", &[]).await;
    let ns = TestNamespace::new("conn-flood").await;
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "annotations": {"wasm-kubelet.io/max-concurrent-requests": POD_MAX_REQUESTS.to_string()}},
        "spec": {
            "nodeName": agent.name, "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{
                "name": "web", "image": example_image("http-health"),
                "ports": [{"name": "http", "containerPort": PORT}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
        }
    }))
    .unwrap();
    ns.pods().create(&Default::default(), &pod).await.unwrap();
    ns.wait_pod(agent, "web", "the HTTP pod to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let ip = agent.node_ip.clone();
    let admin = Cluster::get().admin().await;
    let renewed_before = lease_renew_time(&admin, &agent.name)
        .await
        .expect("the node has a Lease");

    // The pod port: a thousand connections that never send a byte, and one slowloris that
    // sends a header a byte a second (which must not reset the header-read timer).
    let baseline = open_fds(agent);
    let pod_conns = idle_connections((&ip, PORT), FLOOD).await;
    let peak = peak_fds(agent, Duration::from_secs(2)).await;
    let refused_at_once = pod_conns.iter().filter(|c| closed_by_peer(c)).count();
    eprintln!("pod port: baseline {baseline} fds, peak {peak} with {FLOOD} connections open; {refused_at_once} closed at once");
    assert!(
        peak <= baseline + POD_MAX_CONNECTIONS + FD_MARGIN,
        "the pod port's {FLOOD} idle connections took the agent from {baseline} to {peak} descriptors (cap {POD_MAX_CONNECTIONS} + margin {FD_MARGIN})\n{}",
        agent.log_tail()
    );
    assert!(
        refused_at_once >= FLOOD - POD_MAX_CONNECTIONS - FD_MARGIN,
        "only {refused_at_once} connections over the cap were closed at once"
    );
    // The pod still answers meanwhile on a fresh connection once slots free up; first, every
    // idle connection and the slowloris are closed by the header-read timeout.
    let mut slowloris = tokio::net::TcpStream::connect((ip.as_str(), PORT))
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if slowloris.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if closed_by_peer(&slowloris) {
                return true;
            }
        }
        false
    });
    let conns = &pod_conns;
    wait_for(
        "the pod port to close every idle connection",
        TEST_TIMEOUT,
        || async move { conns.iter().all(closed_by_peer).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} of {FLOOD} still open\n{}",
            pod_conns.iter().filter(|c| !closed_by_peer(c)).count(),
            agent.log_tail()
        )
    });
    let slow_closed = tokio::time::timeout(TEST_TIMEOUT, trickle)
        .await
        .expect("the slowloris connection is closed")
        .unwrap();
    assert!(
        slow_closed,
        "the slowloris connection was closed by the agent"
    );
    drop(pod_conns);
    let (status, body) = http_get(&ip, PORT, "/")
        .await
        .expect("the pod answers after the flood");
    assert_eq!(status, 200, "{body}");

    // The kubelet API: a thousand TCP connections that never start TLS.
    let baseline = open_fds(agent);
    let api_conns = idle_connections((&ip, 10250), FLOOD).await;
    let peak = peak_fds(agent, Duration::from_secs(2)).await;
    let refused_at_once = api_conns.iter().filter(|c| closed_by_peer(c)).count();
    eprintln!("kubelet API: baseline {baseline} fds, peak {peak} with {FLOOD} connections open; {refused_at_once} closed at once");
    assert!(
        peak <= baseline + API_MAX_CONNECTIONS + FD_MARGIN,
        "the kubelet API's {FLOOD} idle connections took the agent from {baseline} to {peak} descriptors (cap {API_MAX_CONNECTIONS} + margin {FD_MARGIN})\n{}",
        agent.log_tail()
    );
    assert!(
        refused_at_once >= FLOOD - API_MAX_CONNECTIONS - FD_MARGIN,
        "only {refused_at_once} connections over the cap were closed at once"
    );
    let conns = &api_conns;
    wait_for(
        "the kubelet API to close every idle connection",
        TEST_TIMEOUT,
        || async move { conns.iter().all(closed_by_peer).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    drop(api_conns);
    // Served again once the flood is gone.
    let (crt, key) = admin_cert();
    let healthz = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--cert"])
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .arg(format!("https://{ip}:10250/healthz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&healthz.stdout), "200");

    // The heartbeat went on through both floods.
    let (admin, before) = (&admin, &renewed_before);
    wait_for(
        "the node's Lease to be renewed",
        TEST_TIMEOUT,
        || async move {
            let now = lease_renew_time(admin, &agent.name).await?;
            (now != *before).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

/// Sends the upgrade request and reads the response head; returns its status.
async fn upgrade(tls: &mut Tls, path_and_query: &str, upgrade: &str, extra: &str) -> u16 {
    let request = format!("POST {path_and_query} HTTP/1.1\r\nHost: node\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{extra}\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tls.read(&mut byte).await.unwrap(),
            1,
            "the response head ended early: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// A SYN_STREAM for stream 1 whose header block is `raw` (an uncompressed SPDY name/value
/// block), compressed with zlib (no dictionary, which a SPDY inflater accepts).
fn syn_stream(raw: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(raw).unwrap();
    z.flush().unwrap();
    let block = z.finish().unwrap();
    let len = 10 + block.len();
    assert!(len < 1 << 24);
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0x80, 0x03, 0x00, 0x01]);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame[4] = 0; // flags
    frame.extend_from_slice(&1u32.to_be_bytes()); // stream id
    frame.extend_from_slice(&0u32.to_be_bytes()); // associated-to
    frame.extend_from_slice(&[0, 0]); // priority, slot
    frame.extend_from_slice(&block);
    frame
}

/// An uncompressed name/value block of one name with `value` (NUL bytes split values).
fn name_value_block(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&1u32.to_be_bytes());
    raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
    raw.extend_from_slice(name);
    raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
    raw.extend_from_slice(value);
    raw
}

/// Reads SPDY frames until the connection ends; returns the control frame types seen (GOAWAY
/// is 7, RST_STREAM 3).
async fn read_until_closed(tls: &mut Tls, agent: &Agent) -> Vec<u16> {
    let mut types = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 8];
            if tls.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[0] & 0x80 != 0 {
                types.push(u16::from_be_bytes([head[2], head[3]]));
            }
        }
    };
    tokio::time::timeout(TEST_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("the session was not closed\n{}", agent.log_tail()));
    types
}

async fn toolbox_pod(ns: &TestNamespace, agent: &Agent, name: &str, command: &[&str]) {
    ns.create_bound_pod(
        agent,
        name,
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": name, "image": example_image("toolbox"), "command": command, "stdin": true}]}),
    )
    .await;
    ns.wait_pod(agent, name, "the toolbox to run", |p| phase(p) == "Running")
        .await;
}

#[tokio::test]
async fn an_oversized_spdy_header_block_is_refused_and_memory_stays_flat() {
    let agent = &test_node("conn-spdy", &[]).await;
    let ns = TestNamespace::new("conn-spdy").await;
    toolbox_pod(&ns, agent, "box", &["sleep", "3600"]).await;
    let path = format!("/exec/{}/box/box?command=cat&stdin=1&stdout=1", ns.name);
    let spdy = "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n";

    // A zlib bomb: 16 KiB on the wire that inflate to 16 MiB.
    let hwm_before = status_kib(agent, "VmHWM");
    let mut tls = admin_tls(agent).await;
    assert_eq!(upgrade(&mut tls, &path, "SPDY/3.1", spdy).await, 101);
    let bomb = syn_stream(&name_value_block(b"streamtype", &vec![b'a'; 16 << 20]));
    eprintln!("zlib bomb: {} bytes on the wire", bomb.len());
    tls.write_all(&bomb).await.unwrap();
    let types = read_until_closed(&mut tls, agent).await;
    assert!(
        types.contains(&7),
        "the session ends with GOAWAY, got control frames {types:?}"
    );

    // Within the inflate cap, but a long name with a quarter of a million NUL-separated empty
    // values: decoded naively, the name is copied once per value (over 100 MiB).
    let mut tls = admin_tls(agent).await;
    assert_eq!(upgrade(&mut tls, &path, "SPDY/3.1", spdy).await, 101);
    let split_bomb = syn_stream(&name_value_block(&[b'n'; 512], &vec![0u8; 255 * 1024]));
    eprintln!("NUL-split bomb: {} bytes on the wire", split_bomb.len());
    tls.write_all(&split_bomb).await.unwrap();
    let types = read_until_closed(&mut tls, agent).await;
    let hwm_after = status_kib(agent, "VmHWM");
    eprintln!(
        "agent peak RSS: {hwm_before} KiB before, {hwm_after} KiB after; control frames {types:?}"
    );
    assert!(
        types.contains(&7) || types.contains(&3),
        "the stream or session is refused, got control frames {types:?}"
    );
    assert!(
        hwm_after <= hwm_before + 32 * 1024,
        "the agent's peak RSS grew from {hwm_before} KiB to {hwm_after} KiB\n{}",
        agent.log_tail()
    );

    // The node still serves exec afterwards (a fresh session is not affected).
    let out = Cluster::get()
        .kubectl()
        .args(["exec", "-n", &ns.name, "box", "--", "echo", "still", "here"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("still here"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_tail()
    );
}

#[tokio::test]
async fn an_exec_session_without_traffic_is_closed_after_the_streaming_idle_timeout() {
    let agent = &test_node("conn-idle", &["--streaming-connection-idle-timeout=3s"]).await;
    let ns = TestNamespace::new("conn-idle").await;
    toolbox_pod(&ns, agent, "box", &["sleep", "3600"]).await;

    // `kubectl exec -i box -- cat` with nothing typed: the session (through the API server,
    // SPDY to the node) ends by itself once the node closes it.
    let mut child = Cluster::get()
        .kubectl()
        .args(["exec", "-i", "-n", &ns.name, "box", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Traffic keeps it open: a line typed now comes back.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "kubectl exec did not end after the idle timeout\n{}",
                agent.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ping"),
        "the typed line came back before the session went idle: {stdout:?}"
    );
    assert!(
        agent.log().contains("--streaming-connection-idle-timeout"),
        "the agent says why it closed the session\n{}",
        agent.log_tail()
    );

    // A direct SPDY session (no API server in between) that sends nothing after the upgrade is
    // closed too.
    let mut tls = admin_tls(agent).await;
    let path = format!("/exec/{}/box/box?command=cat&stdin=1&stdout=1", ns.name);
    assert_eq!(
        upgrade(
            &mut tls,
            &path,
            "SPDY/3.1",
            "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
        )
        .await,
        101
    );
    read_until_closed(&mut tls, agent).await;
}
