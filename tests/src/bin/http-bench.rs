//! Benchmark: requests per second and latency of one Wasm HTTP pod (`http-health`, a
//! wasi:http/proxy component) served by the agent, against `wasmtime serve` on the same
//! component file in the same run. Prints figures; it never fails on timing.
//!
//!   cargo install wasmtime-cli --version 48.0.8 --locked --root ~/.cache/wasm-kubelet/wasmtime-cli
//!   cargo build --release -p wasm-kubelet -p integration-tests
//!   WASM_KUBELET_BIN=target/release/wasm-kubelet target/release/http-bench [CONNECTIONS] [SECONDS] [ROUNDS]
//!       [--also LABEL=HOST:PORT[@NETNS]]...
//!   http-bench component-path     prints the component file (deploy/bench pushes it for runwasi)
//!
//! `--also` adds a server serving the same component, measured the same way in each round
//! (deploy/bench --http: runwasi's shim on the peer node, reached inside the pod's network
//! namespace, whose address no host route covers). Each target's load runs on a thread of
//! its own with a runtime of its own, in the target's network namespace when it has one.
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

/// One server measured: a label, its address, and the network namespace to reach it from
/// (a peer pod's, for runwasi: its pod IP is only reachable inside its own namespace).
struct Target {
    label: String,
    addr: String,
    netns: Option<PathBuf>,
}

impl Target {
    /// `LABEL=HOST:PORT[@NETNS_PATH]` (the `--also` flag).
    fn parse(spec: &str) -> anyhow::Result<Target> {
        let (label, rest) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--also {spec}: want LABEL=HOST:PORT[@NETNS]"))?;
        let (addr, netns) = match rest.split_once('@') {
            Some((addr, netns)) => (addr, Some(PathBuf::from(netns))),
            None => (rest, None),
        };
        anyhow::ensure!(
            addr.parse::<std::net::SocketAddr>().is_ok(),
            "--also {spec}: {addr} is not HOST:PORT"
        );
        Ok(Target {
            label: label.into(),
            addr: addr.into(),
            netns,
        })
    }

    /// The load against this target, from a thread of its own (in the target's network
    /// namespace, when it has one) with a runtime of its own: every target is measured the
    /// same way.
    fn load(&self, connections: usize, warm_up: Duration, duration: Duration) -> Figures {
        let (addr, netns) = (self.addr.clone(), self.netns.clone());
        std::thread::spawn(move || {
            if let Some(netns) = &netns {
                let file = std::fs::File::open(netns)
                    .unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
                // SAFETY: setns on a namespace file descriptor we own, for this thread only;
                // the runtime's worker threads are created after it and inherit it.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(
                    rc,
                    0,
                    "setns {}: {}",
                    netns.display(),
                    std::io::Error::last_os_error()
                );
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(load(&addr, connections, warm_up, duration))
        })
        .join()
        .expect("the load thread")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut also = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--also" => also.push(Target::parse(
                &argv
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--also needs a value"))?,
            )?),
            "component-path" => {
                println!("{}", component_file().display());
                return Ok(());
            }
            _ => positional.push(arg),
        }
    }
    let mut args = positional.into_iter();
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
    let mut targets = vec![
        Target {
            label: "agent".into(),
            addr: agent_addr.clone(),
            netns: None,
        },
        Target {
            label: "wasmtime serve".into(),
            addr: serve_addr.clone(),
            netns: None,
        },
    ];
    targets.extend(also);
    let mut runs: Vec<Vec<Figures>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (target, runs) in targets.iter().zip(&mut runs) {
            let f = tokio::task::block_in_place(|| target.load(connections, warm_up, duration));
            f.print(&format!("{} #{round}", target.label));
            runs.push(f);
        }
    }
    let mean = |runs: &[Figures], f: &dyn Fn(&Figures) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len() as f64
    };
    let p99 = |r: &Figures| r.percentile(0.99).as_secs_f64() * 1000.0;
    let means: Vec<(f64, f64)> = runs
        .iter()
        .map(|r| (mean(r, &|f| f.rps()), mean(r, &p99)))
        .collect();
    for (target, (rps, p99)) in targets.iter().zip(&means) {
        println!("mean: {} {rps:.0} req/s p99 {p99:.2} ms", target.label);
    }
    let (a_rps, a_p99) = means[0];
    for (target, (rps, p99)) in targets.iter().zip(&means).skip(1) {
        let targets = if target.label == "wasmtime serve" {
            " (target >= 0.8x and <= 1.25x)"
        } else {
            ""
        };
        println!(
            "agent / {}: throughput {:.2}x, p99 {:.2}x{targets}",
            target.label,
            a_rps / rps,
            a_p99 / p99
        );
    }

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
