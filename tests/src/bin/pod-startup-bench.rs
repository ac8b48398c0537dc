//! Benchmark: pod create -> Running (as a watch sees it) for a cached Wasm image, and
//! create -> Succeeded for hello, through the real API server of deploy/local-cluster.
//! Prints figures; it never fails on timing.
//!
//!   cargo build --release -p wasm-kubelet
//!   WASM_KUBELET_BIN=target/release/wasm-kubelet cargo run --release -p integration-tests --bin pod-startup-bench -- [PODS] [AGENT FLAGS...]
//!
//! e.g. `-- 100 --wasm-runtime=in-agent` for the guests inside the agent; memory is the agent's
//! and its runtime process's together.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{example_image, push_examples, unique_name, wait_for, Agent, Cluster};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::Api;

fn pod(name: &str, node: &str, image: &str, restart: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node, "restartPolicy": restart, "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"}],
        }
    }))
    .expect("valid pod")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    if samples.is_empty() {
        println!("{what}: no samples");
        return;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: n={} p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Creates `names` one after another and returns, per pod, create -> first watch event where
/// `done` holds.
async fn measure(
    pods: &Api<Pod>,
    node: &str,
    image: &str,
    restart: &str,
    names: &[String],
    done: fn(&Pod) -> bool,
) -> Vec<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let mut stream = watcher::watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = stream.next().await {
            if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = event {
                if done(&p) {
                    let _ = tx.send((p.metadata.name.unwrap_or_default(), Instant::now()));
                }
            }
        }
    });
    let mut created = HashMap::new();
    for name in names {
        created.insert(name.clone(), Instant::now());
        pods.create(&PostParams::default(), &pod(name, node, image, restart))
            .await
            .expect("create pod");
    }
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < names.len() && Instant::now() < deadline {
        if let Ok(Some((name, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
        {
            if let Some(t0) = created.get(&name) {
                seen.entry(name).or_insert(at - *t0);
            }
        }
    }
    watch.abort();
    if seen.len() < names.len() {
        println!(
            "warning: only {} of {} pods reached the state within 300 s",
            seen.len(),
            names.len()
        );
    }
    seen.into_values().collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);
    let cluster = Cluster::get();
    push_examples();
    let client = cluster.admin().await;
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let mut flags = vec!["--max-pods=5000"];
    flags.extend(extra.iter().map(String::as_str));
    let agent = Agent::start(&unique_name("bench"), &flags)?;
    println!("agent flags: {}", extra.join(" "));
    let ns_name = unique_name("bench");
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
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);

    let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let succeeded =
        |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");

    // Warm-up: pull and compile both images once, so the figures are for a cached image.
    let warm: Vec<String> = vec!["warm-ticker".into()];
    measure(
        &pods,
        &agent.name,
        &example_image("ticker"),
        "Always",
        &warm,
        running,
    )
    .await;
    measure(
        &pods,
        &agent.name,
        &example_image("hello"),
        "Never",
        &["warm-hello".into()],
        succeeded,
    )
    .await;

    // The pods' memory is wherever the guests run: the agent, and the runtime process if any.
    let rss = || rss_kib(agent.pid().unwrap_or(0)) + agent.runtime_pid().map_or(0, rss_kib);
    let rss_before = rss();
    let names: Vec<String> = (0..n).map(|i| format!("ticker-{i}")).collect();
    let started = Instant::now();
    let samples = measure(
        &pods,
        &agent.name,
        &example_image("ticker"),
        "Always",
        &names,
        running,
    )
    .await;
    let wall = started.elapsed();
    report("create -> Running (ticker, cached image)", samples);
    println!("{n} pods Running in {:.2}s wall", wall.as_secs_f64());
    let rss_after = rss();
    println!(
        "agent + runtime RSS: {} KiB before, {} KiB with {} more running pods ({:.0} KiB per pod)",
        rss_before,
        rss_after,
        n,
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );

    let hello: Vec<String> = (0..n.min(50)).map(|i| format!("hello-{i}")).collect();
    report(
        "create -> Succeeded (hello)",
        measure(
            &pods,
            &agent.name,
            &example_image("hello"),
            "Never",
            &hello,
            succeeded,
        )
        .await,
    );

    let _ = Api::<Namespace>::all(client)
        .delete(&ns_name, &DeleteParams::default())
        .await;
    Ok(())
}
