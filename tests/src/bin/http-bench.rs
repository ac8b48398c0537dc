//! Benchmark: requests per second and latency of one Wasm HTTP pod (`http-health`, a
//! wasi:http/proxy component) served by the agent, against `wasmtime serve` on the same
//! component file in the same run. Prints figures; it never fails on timing.
//!
//!   cargo install wasmtime-cli --version 48.0.8 --locked --root ~/.cache/wasm-kubelet/wasmtime-cli
//!   cargo build --release -p wasm-kubelet -p integration-tests
//!   WASM_KUBELET_BIN=target/release/wasm-kubelet target/release/http-bench [CONNECTIONS] [SECONDS] [ROUNDS]
//!
//! Method: CONNECTIONS (default 32) keep-alive HTTP/1.1 connections each send `GET /` back to
//! back for SECONDS (default 10) after a 2 s warm-up; every request's latency is recorded.
//! The two servers are measured in turn, ROUNDS (default 2) times each, agent first. Both run
//! one instance per request of the same component with the same grants (a preopened /data,
//! env); `wasmtime serve` gets `-Scli` (the component is built with std). `$WASMTIME` names the
//! wasmtime binary (default: the cargo install root above).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use integration_tests::{
    example_image, percentile, push_examples, unique_name, wait_for, workspace_root, Agent, Cluster,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::PostParams;
use kube::Api;

/// The containerPort of the benchmark pod (the agent has a node IP of its own).
const PORT: u16 = 8080;

struct Figures {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    /// `latencies` are sorted.
    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
    fn print(&self, what: &str) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{what:<16} {:>9.0} req/s  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  ({} requests, {} errors)",
            self.rps(),
            ms(self.percentile(0.5)),
            ms(self.percentile(0.9)),
            ms(self.percentile(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
            self.requests,
            self.errors
        );
    }
}

/// One keep-alive connection sending `GET /` until `until`; latencies of the answered requests.
async fn connection(addr: String, until: Instant) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    while Instant::now() < until {
        let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            let request = http::Request::get("/")
                .header("host", addr.as_str())
                .body(Empty::<bytes::Bytes>::new())
                .expect("a valid request");
            let began = Instant::now();
            let answered = match sender.send_request(request).await {
                Ok(response) => {
                    response.status() == 200 && response.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            };
            if !answered {
                errors += 1;
                break;
            }
            latencies.push(began.elapsed());
        }
    }
    (latencies, errors)
}

async fn load(addr: &str, connections: usize, warm_up: Duration, duration: Duration) -> Figures {
    let warm = Instant::now() + warm_up;
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(addr.to_string(), warm)))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let began = Instant::now();
    let until = began + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(addr.to_string(), until)))
        .collect();
    let mut figures = Figures {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for t in tasks {
        let (latencies, errors) = t.await.expect("a load task");
        figures.requests += latencies.len() as u64;
        figures.errors += errors;
        figures.latencies.extend(latencies);
    }
    figures.elapsed = began.elapsed();
    figures.latencies.sort();
    figures
}

/// `GET /` answered 200 on a fresh connection.
async fn answers(addr: &str) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", addr)
        .body(Empty::<bytes::Bytes>::new())
        .expect("a valid request");
    matches!(sender.send_request(request).await, Ok(r) if r.status() == 200)
}

fn wasmtime_binary() -> PathBuf {
    std::env::var_os("WASMTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/wasm-kubelet/wasmtime-cli/bin/wasmtime")
        })
}

/// The component file deploy/build-examples built (and push-examples pushed).
fn component_file() -> PathBuf {
    let out = Command::new(workspace_root().join("deploy/build-examples"))
        .stderr(Stdio::inherit())
        .output()
        .expect("deploy/build-examples runs");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .lines()
        .find_map(|l| l.strip_prefix("http-health "))
        .map(PathBuf::from)
        .expect("build-examples lists http-health")
}

/// A free port on 127.0.0.1 for `wasmtime serve`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let (warm_up, duration) = (Duration::from_secs(2), Duration::from_secs(seconds));
    let wasmtime = wasmtime_binary();
    anyhow::ensure!(wasmtime.exists(), "{} is missing: cargo install wasmtime-cli --version 48.0.8 --locked --root ~/.cache/wasm-kubelet/wasmtime-cli (or set WASMTIME)", wasmtime.display());
    let component = component_file();
    push_examples();

    // The agent, as its own node, serving one http-health pod.
    let cluster = Cluster::get();
    let client = cluster.admin().await;
    let node = unique_name("http-bench");
    let agent = Agent::start(
        &node,
        &[
            "--pod-logs-dir",
            workspace_root()
                .join("target/it")
                .join(&node)
                .join("logs")
                .to_str()
                .expect("utf-8 path"),
        ],
    )?;
    let ns_name = unique_name("http-bench");
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns_name);
    wait_for(
        "the default service account",
        Duration::from_secs(60),
        || async { sas.get_opt("default").await.ok()? },
    )
    .await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "nodeName": node, "terminationGracePeriodSeconds": 1, "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{"name": "web", "image": example_image("http-health"), "ports": [{"containerPort": PORT}], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        }
    }))?;
    Api::<Pod>::namespaced(client.clone(), &ns_name)
        .create(&PostParams::default(), &pod)
        .await?;
    let agent_addr = format!("{}:{PORT}", agent.node_ip);
    wait_for("the pod to answer", Duration::from_secs(120), || async {
        answers(&agent_addr).await.then_some(())
    })
    .await?;

    // wasmtime serve on the same file, with the same grants.
    let data = workspace_root()
        .join("target/it")
        .join(&node)
        .join("serve-data");
    std::fs::create_dir_all(&data)?;
    let serve_addr = format!("127.0.0.1:{}", free_port());
    let mut serve = Command::new(&wasmtime)
        .args(["serve", "--addr", &serve_addr, "-Scli"])
        .arg("--dir")
        .arg(format!("{}::/data", data.display()))
        .arg(&component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_for(
        "wasmtime serve to answer",
        Duration::from_secs(60),
        || async { answers(&serve_addr).await.then_some(()) },
    )
    .await?;

    println!("{connections} connections, {seconds} s per measurement after a {} s warm-up, {rounds} rounds; wasmtime {}", warm_up.as_secs(), provider_version(&wasmtime));
    let mut agent_runs = Vec::new();
    let mut serve_runs = Vec::new();
    for round in 1..=rounds {
        let a = load(&agent_addr, connections, warm_up, duration).await;
        a.print(&format!("agent #{round}"));
        let s = load(&serve_addr, connections, warm_up, duration).await;
        s.print(&format!("wasmtime serve #{round}"));
        agent_runs.push(a);
        serve_runs.push(s);
    }
    let mean = |runs: &[Figures], f: &dyn Fn(&Figures) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len() as f64
    };
    let p99 = |r: &Figures| r.percentile(0.99).as_secs_f64() * 1000.0;
    let (a_rps, s_rps) = (
        mean(&agent_runs, &|r| r.rps()),
        mean(&serve_runs, &|r| r.rps()),
    );
    let (a_p99, s_p99) = (mean(&agent_runs, &p99), mean(&serve_runs, &p99));
    println!("mean: agent {a_rps:.0} req/s p99 {a_p99:.2} ms; wasmtime serve {s_rps:.0} req/s p99 {s_p99:.2} ms");
    println!(
        "agent / wasmtime serve: throughput {:.2}x (target >= 0.8x), p99 {:.2}x (target <= 1.25x)",
        a_rps / s_rps,
        a_p99 / s_p99
    );

    let _ = serve.kill();
    let _ = serve.wait();
    drop(agent);
    let _ = cluster
        .kubectl()
        .args(["delete", "namespace", &ns_name, "--wait=false"])
        .output();
    Ok(())
}

fn provider_version(wasmtime: &PathBuf) -> String {
    Command::new(wasmtime)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
