//! A real Prometheus (Debian's `prometheus` package, installed by deploy/setup-host) scrapes a
//! test node's `/metrics`, `/metrics/resource` and `/metrics/probes` over HTTPS with the admin's
//! client certificate, verifying the node's serving certificate, while a Wasm pod runs; then
//! every series docs/metrics.md marks `served` (the series the kubelet dashboards query) must be
//! in Prometheus with the labels listed there, and every other row must give its reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use integration_tests::{
    admin_cert, example_image, http_get, phase, test_node, wait_for, workspace_root, Agent,
    TestNamespace, TEST_TIMEOUT,
};

/// One row of docs/metrics.md's table.
#[derive(Debug)]
struct Row {
    series: String,
    labels: Vec<String>,
    status: String,
}

fn dashboard_rows() -> Vec<Row> {
    let text = std::fs::read_to_string(workspace_root().join("docs/metrics.md")).unwrap();
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 5, "five cells in {l}");
            Row {
                series: cells[0].trim_matches('`').to_string(),
                labels: cells[1]
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                status: cells[4].to_string(),
            }
        })
        .collect();
    assert!(rows.len() >= 20, "the table has its rows: {rows:?}");
    rows
}

/// A Prometheus server of this test's own: its config and TSDB in `dir`, its web API on a
/// free loopback port; stopped by PID when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, agent: &Agent) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let (crt, key) = admin_cert();
        // The node's self-signed serving certificate (its SANs: node name and IP) is the CA:
        // Prometheus verifies the node it scrapes, as a deployment would.
        let serving = agent.dir.join("root/pki/kubelet.crt");
        let target = format!("{}:10250", agent.node_ip);
        let job = |name: &str, path: &str| {
            format!(
                "- job_name: {name}\n  metrics_path: {path}\n  scheme: https\n  tls_config:\n    \
                 ca_file: {ca}\n    cert_file: {crt}\n    key_file: {key}\n  static_configs:\n  \
                 - targets: [\"{target}\"]\n",
                ca = serving.display(),
                crt = crt.display(),
                key = key.display(),
            )
        };
        // 1 s scrapes: the test waits on the first scrapes that see the pod, not on a clock.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}{}{}",
            job("kubelet", "/metrics"),
            job("kubelet-resource", "/metrics/resource"),
            job("kubelet-probes", "/metrics/probes"),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus runs (deploy/setup-host installs Debian's prometheus)");
        Prometheus { child, port, log }
    }

    /// The instant vector of `query`: each element's `metric` labels and value.
    async fn query(&self, query: &str) -> Option<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", percent_encode(query));
        let (status, body) = http_get("127.0.0.1", self.port, &path).await.ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned())?
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Query-string encoding: everything but unreserved characters as `%XX`.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_series_the_kubelet_dashboards_use() {
    let rows = dashboard_rows();
    // No silent gaps: a row is served, or says why not.
    for row in &rows {
        assert!(
            row.status == "served"
                || row
                    .status
                    .strip_prefix("not served: ")
                    .is_some_and(|why| why.len() > 10),
            "{}: status must be `served` or `not served: <reason>`: {:?}",
            row.series,
            row.status
        );
    }

    let agent = test_node("prom", &[]).await;
    let ns = TestNamespace::new("prom").await;
    ns.create_bound_pod(
        &agent,
        "ticker",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "tick", "image": example_image("ticker")}]}),
    )
    .await;
    ns.wait_pod(&agent, "ticker", "the ticker running", |p| {
        phase(p) == "Running"
    })
    .await;

    let dir = workspace_root()
        .join("target/it")
        .join(&agent.name)
        .join("prometheus");
    let prom = Prometheus::start(&dir, &agent);

    // Every job is up: Prometheus reached the node over TLS, was authenticated and authorized.
    for job in ["kubelet", "kubelet-resource", "kubelet-probes"] {
        let q = format!("up{{job=\"{job}\"}} == 1");
        if let Err(e) = wait_for(&q, TEST_TIMEOUT, || async {
            prom.query(&q).await.filter(|r| !r.is_empty())
        })
        .await
        {
            let targets = http_get("127.0.0.1", prom.port, "/api/v1/targets").await;
            panic!("{e}\ntargets: {targets:?}\nprometheus log:\n{}", prom.log());
        }
    }

    // The pod's series carry the kubelet's labels and this pod's values.
    let pod_cpu = format!(
        "container_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"ticker\",container=\"tick\"}}",
        ns.name
    );
    let node_name = format!("kubelet_node_name{{node=\"{}\"}} == 1", agent.name);
    for q in [
        pod_cpu.as_str(),
        node_name.as_str(),
        "kubelet_running_pods >= 1",
    ] {
        wait_for(q, TEST_TIMEOUT, || async {
            prom.query(q).await.filter(|r| !r.is_empty())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nprometheus log:\n{}", prom.log()));
    }

    // Every served row at once (one scrape has them all once the pod has run and the PLEG has
    // relisted twice); on time-out, the rows still missing.
    let served: Vec<&Row> = rows.iter().filter(|r| r.status == "served").collect();
    let missing = || async {
        let mut missing = Vec::new();
        for row in &served {
            let q = format!("{{__name__=\"{}\"}}", row.series);
            let result = prom.query(&q).await.unwrap_or_default();
            if !result
                .iter()
                .any(|s| row.labels.iter().all(|l| s["metric"].get(l).is_some()))
            {
                missing.push(format!("{} {:?}: {result:?}", row.series, row.labels));
            }
        }
        missing
    };
    if wait_for(
        "every served series of docs/metrics.md",
        TEST_TIMEOUT,
        || async { missing().await.is_empty().then_some(()) },
    )
    .await
    .is_err()
    {
        panic!(
            "served rows of docs/metrics.md Prometheus does not have (with their labels):\n{}",
            missing().await.join("\n")
        );
    }
}
