//! The agent killed (SIGKILL) at chosen points and started again: in the middle of an image
//! pull, and while a guest logs as fast as it can. The agents run their guests in their own
//! process (`--wasm-runtime=in-agent`), so the kill lands on the pull and on the log writer.
//! What must hold: the image store stays consistent (the pull completes after the restart, a
//! second pod of the image starts from the store, no temporary blob is left, every blob is what
//! its name says), no duplicate container; every CRI log line written before the kill parses,
//! none torn (at most the last is a partial `P` entry) and none missing before the kill point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    example_wasm, kubelet_get, phase, push_wasm, test_node, wait_for, Agent, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;

/// How big the pulled image is: big enough that a pull from the loopback registry takes long
/// enough to be caught half-way (the blob streams into a temporary file first).
const BIG_IMAGE_PADDING: usize = 160 << 20;

/// The toolbox example with a custom section of `BIG_IMAGE_PADDING` bytes appended: a valid
/// module that runs as the toolbox does and weighs what we want.
fn big_toolbox() -> Vec<u8> {
    let mut wasm = std::fs::read(example_wasm("toolbox")).expect("toolbox.wasm");
    let name = b"padding";
    let mut payload = Vec::with_capacity(BIG_IMAGE_PADDING + 16);
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    // Bytes that do not repeat in short cycles, so no layer of the path can shrink them much.
    let mut x: u32 = 0x9e37_79b9;
    payload.extend((0..BIG_IMAGE_PADDING).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    wasm.push(0); // custom section
    leb128(&mut wasm, payload.len() as u64);
    wasm.extend_from_slice(&payload);
    wasm
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn blobs_dir(agent: &Agent) -> PathBuf {
    agent.dir.join("root/images/blobs/sha256")
}

fn temporary_blobs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp."))
                .collect()
        })
        .unwrap_or_default()
}

fn sole_container_running(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    phase(pod) == "Running"
        && statuses.len() == 1
        && statuses[0]
            .state
            .as_ref()
            .is_some_and(|s| s.running.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_an_image_pull_the_pull_completes_after_restart_and_the_store_is_consistent()
{
    let image = push_wasm("big-toolbox", &big_toolbox());
    let mut agent = test_node("chaos-pull", &["--wasm-runtime=in-agent"]).await;
    let ns = TestNamespace::new("chaos-pull").await;
    let spec = serde_json::json!({
        "containers": [{"name": "main", "image": image, "command": ["sleep", "3600"]}],
    });
    ns.create_bound_pod(&agent, "first", serde_json::json!({}), spec.clone())
        .await;

    // Kill the agent as soon as the blob is streaming into its temporary file.
    let blobs = blobs_dir(&agent);
    let caught = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + TEST_TIMEOUT;
        while Instant::now() < deadline {
            if !temporary_blobs(&blobs).is_empty() {
                agent.kill9();
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    });
    assert!(
        caught,
        "never saw the pull half-way (a temporary blob)\n{}",
        agent.log_tail()
    );
    let log_before = agent.log();
    assert!(
        !log_before.contains("image pulled"),
        "the kill came after the pull completed; the test did not interrupt it"
    );

    agent.spawn().unwrap();
    let first = ns
        .wait_pod(
            &agent,
            "first",
            "the pod to run after the restart",
            sole_container_running,
        )
        .await;
    let restarts = first.status.unwrap().container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 0, "the container started once");

    // The store holds the image: a second pod of it starts without pulling again.
    ns.create_bound_pod(&agent, "second", serde_json::json!({}), spec)
        .await;
    ns.wait_pod(
        &agent,
        "second",
        "the second pod to run",
        sole_container_running,
    )
    .await;
    ns.wait_events(&agent, "second", "the image found in the store", |events| {
        events
            .iter()
            .any(|(reason, message)| reason == "Pulled" && message.contains("already present"))
    })
    .await;

    // No temporary blob left, and every blob is what its name says.
    assert_eq!(temporary_blobs(&blobs), Vec::<String>::new());
    for entry in std::fs::read_dir(&blobs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let out = Command::new("sha256sum")
            .arg(entry.path())
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&out.stdout);
        assert_eq!(sum.split(' ').next(), Some(name.as_str()), "blob {name}");
    }

    // One container per pod in the runtime: none left over from the killed agent's attempt.
    let (code, body) = kubelet_get(&agent, "/runningpods/");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    for name in ["first", "second"] {
        let containers: Vec<_> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["name"] == name && p["metadata"]["namespace"] == ns.name)
            .flat_map(|p| {
                p["spec"]["containers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(containers.len(), 1, "{name}: {body}");
    }
}

/// A guest printing `0`, `1`, `2`, ... one line per write, as fast as it can, forever.
const COUNTER: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i64) (local $p i32) (local $v i64)
    (loop $forever
      (i32.store8 (i32.const 100) (i32.const 10))
      (local.set $p (i32.const 100))
      (local.set $v (local.get $n))
      (loop $digits
        (local.set $p (i32.sub (local.get $p) (i32.const 1)))
        (i32.store8 (local.get $p)
          (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
        (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
        (br_if $digits (i64.ne (local.get $v) (i64.const 0))))
      (i32.store (i32.const 0) (local.get $p))
      (i32.store (i32.const 4) (i32.sub (i32.const 101) (local.get $p)))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i64.add (local.get $n) (i64.const 1)))
      (br $forever))))"#;

/// The container's log files of its first run, oldest first (rotated ones, then the live one).
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("0.log.")
        })
        .collect();
    rotated.sort();
    rotated.push(dir.join("0.log"));
    rotated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_a_guest_logs_heavily_no_line_is_torn_or_lost() {
    let image = integration_tests::push_wat("counter", COUNTER);
    let mut agent = test_node("chaos-log", &["--wasm-runtime=in-agent"]).await;
    let ns = TestNamespace::new("chaos-log").await;
    let pod = ns
        .create_bound_pod(
            &agent,
            "counter",
            serde_json::json!({}),
            serde_json::json!({"containers": [{"name": "count", "image": image}]}),
        )
        .await;
    let uid = pod.metadata.uid.unwrap();
    let dir = agent
        .dir
        .join("logs")
        .join(format!("{}_counter_{uid}", ns.name))
        .join("count");

    // Kill while the guest writes: once its log has grown past 2 MiB.
    let live = dir.join("0.log");
    wait_for("the guest to log heavily", TEST_TIMEOUT, || async {
        let size = std::fs::metadata(&live).map(|m| m.len()).unwrap_or(0);
        (size > 2 << 20).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    agent.kill9();
    let files = log_files(&dir);
    let at_kill: Vec<u8> = files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();

    agent.spawn().unwrap();
    // The new agent finds the container gone with the old process and says so.
    let after = ns
        .wait_pod(&agent, "counter", "the pod to end after the restart", |p| {
            phase(p) == "Failed"
        })
        .await;
    let statuses = after.status.unwrap().container_statuses.unwrap();
    assert_eq!(statuses.len(), 1, "one container: {statuses:?}");

    // Every line of every file of the run parses; only the very last may be partial (P) or
    // unterminated; the numbers run without a gap up to the kill.
    let files = log_files(&dir);
    let text: Vec<u8> = files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(
        text.starts_with(&at_kill),
        "the log as it was at the kill is still there after the restart"
    );
    let text = String::from_utf8(text).expect("the log is UTF-8");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    assert!(
        lines.len() > 1000,
        "the guest logged: {} lines",
        lines.len()
    );
    let mut expected: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let last = i == lines.len() - 1;
        let Some(body) = line.strip_suffix('\n') else {
            panic!("line {i} is torn (no newline) and is not allowed to be: {line:?}");
        };
        let mut fields = body.splitn(4, ' ');
        let (ts, stream, tag, content) = (
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next(),
        );
        assert!(
            ts.parse::<jiff::Timestamp>().is_ok(),
            "line {i}: timestamp {ts:?} in {body:?}"
        );
        assert_eq!(stream, "stdout", "line {i}: {body:?}");
        match tag {
            "F" => {}
            "P" if last => continue,
            _ => panic!("line {i}: tag {tag:?} in {body:?}"),
        }
        let n: u64 = content
            .unwrap_or_default()
            .parse()
            .unwrap_or_else(|_| panic!("line {i}: not a number: {body:?}"));
        if let Some(want) = expected {
            assert_eq!(n, want, "line {i}: a gap in the numbers before the kill");
        }
        expected = Some(n + 1);
    }
}

/// The containers of pod `name` in namespace `ns` the runtime holds, as the kubelet API's
/// `/runningpods/` lists them. Waits for the API to answer: a restarted agent's pods can
/// already look done in the API server (written by the agent before it) while the new one is
/// still starting its server.
async fn running_containers(agent: &Agent, ns: &str, name: &str) -> usize {
    let body = wait_for(
        "the kubelet API to answer /runningpods/",
        TEST_TIMEOUT,
        || async {
            let (code, body) = kubelet_get(agent, "/runningpods/");
            (code == 200).then_some(body)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["name"] == name && p["metadata"]["namespace"] == ns)
        .map(|p| p["spec"]["containers"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Killed while it writes a pod's volumes (three ConfigMaps of 600 KiB each, one Secret): the
/// next agent writes them whole, leaves no half-written generation behind, and starts the
/// container once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_volume_setup_the_volumes_are_whole_after_restart() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let image = integration_tests::example_image("toolbox");
    let mut agent = test_node("chaos-volumes", &["--wasm-runtime=in-agent"]).await;
    let ns = TestNamespace::new("chaos-volumes").await;
    // Content that tells keys apart: key i of map m is its own repeated line.
    let value = |m: usize, i: usize| format!("map {m} key {i}\n").repeat(6 << 10);
    for m in 0..3 {
        let data: std::collections::BTreeMap<String, String> =
            (0..8).map(|i| (format!("key-{i}"), value(m, i))).collect();
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("big-{m}")}, "data": data,
        }))
        .unwrap();
        kube::Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name)
            .create(&Default::default(), &cm)
            .await
            .unwrap();
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "token"}, "stringData": {"token": "s3cret"},
    }))
    .unwrap();
    kube::Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let mut volumes: Vec<serde_json::Value> = (0..3)
        .map(|m| serde_json::json!({"name": format!("big-{m}"), "configMap": {"name": format!("big-{m}")}}))
        .collect();
    volumes.push(serde_json::json!({"name": "token", "secret": {"secretName": "token"}}));
    let mounts: Vec<serde_json::Value> = volumes
        .iter()
        .map(|v| serde_json::json!({"name": v["name"], "mountPath": format!("/{}", v["name"].as_str().unwrap())}))
        .collect();
    let pod = ns
        .create_bound_pod(
            &agent,
            "volumes",
            serde_json::json!({}),
            serde_json::json!({
                "volumes": volumes,
                "containers": [{"name": "main", "image": image, "command": ["sleep", "3600"], "volumeMounts": mounts}],
            }),
        )
        .await;
    let uid = pod.metadata.uid.unwrap();
    let pod_volumes = agent.dir.join("root/pods").join(&uid).join("volumes");

    // Kill as soon as the pod's volume directory appears: its volumes are being written.
    let caught = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + TEST_TIMEOUT;
        while Instant::now() < deadline {
            if pod_volumes.exists() {
                agent.kill9();
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    });
    assert!(
        caught,
        "the pod's volumes never appeared\n{}",
        agent.log_tail()
    );
    assert_eq!(
        running_containers_before_kill(&agent),
        0,
        "the kill came after the container started; the test did not interrupt the set-up"
    );

    agent.spawn().unwrap();
    let after = ns
        .wait_pod(
            &agent,
            "volumes",
            "the pod to run after the restart",
            sole_container_running,
        )
        .await;
    assert_eq!(
        after.status.unwrap().container_statuses.unwrap()[0].restart_count,
        0,
        "the container started once"
    );
    assert_eq!(running_containers(&agent, &ns.name, "volumes").await, 1);
    // Every key whole, and one generation per volume: what ..data points at, nothing else.
    for m in 0..3 {
        let dir = pod_volumes
            .join("kubernetes.io~configmap")
            .join(format!("big-{m}"));
        for i in 0..8 {
            let got = std::fs::read_to_string(dir.join(format!("key-{i}"))).unwrap();
            assert!(got == value(m, i), "big-{m}/key-{i} is not whole");
        }
        let data = std::fs::read_link(dir.join("..data")).unwrap();
        let hidden: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != "..data" && Path::new(n) != data)
            .collect();
        assert_eq!(
            hidden,
            Vec::<String>::new(),
            "big-{m}: leftovers beside ..data"
        );
    }
    let token = pod_volumes.join("kubernetes.io~secret/token/token");
    assert_eq!(std::fs::read_to_string(token).unwrap(), "s3cret");
}

/// How many containers the (killed) agent's log says it started.
fn running_containers_before_kill(agent: &Agent) -> usize {
    agent.log().matches("container started").count()
}

/// Killed again and again while it writes pod statuses (ten jobs that end at once, five pods
/// that keep running): each pod's status ends what it is, once: the jobs Succeeded with exit 0,
/// the runners Running and never restarted, one container each in the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_status_writes_every_pod_ends_in_its_state() {
    let hello = integration_tests::example_image("hello");
    let toolbox = integration_tests::example_image("toolbox");
    // The guests run in the runtime process (the default): they outlive each kill.
    let mut agent = test_node("chaos-status", &[]).await;
    let ns = TestNamespace::new("chaos-status").await;
    for i in 0..10 {
        ns.create_bound_pod(
            &agent,
            &format!("job-{i}"),
            serde_json::json!({}),
            serde_json::json!({"containers": [{"name": "main", "image": hello}]}),
        )
        .await;
    }
    for i in 0..5 {
        ns.create_bound_pod(
            &agent,
            &format!("runner-{i}"),
            serde_json::json!({}),
            serde_json::json!({"containers": [{"name": "main", "image": toolbox, "command": ["sleep", "3600"]}]}),
        )
        .await;
    }
    // Three kills, each once the agent has written a few more statuses since it started.
    for (round, writes) in [2usize, 6, 12].into_iter().enumerate() {
        let before = agent.log().matches("pod status written").count();
        let caught = tokio::task::block_in_place(|| {
            let deadline = Instant::now() + TEST_TIMEOUT;
            while Instant::now() < deadline {
                if agent.log().matches("pod status written").count() >= before + writes {
                    agent.kill9();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        });
        if !caught {
            // Everything was written already: nothing left to interrupt in this round.
            eprintln!("round {round}: fewer than {writes} status writes to interrupt");
            break;
        }
        agent.spawn().unwrap();
    }
    for i in 0..10 {
        let pod = ns
            .wait_pod(&agent, &format!("job-{i}"), "the job to end", |p| {
                matches!(phase(p), "Succeeded" | "Failed")
            })
            .await;
        assert_eq!(phase(&pod), "Succeeded", "job-{i}: {:#?}", pod.status);
        let statuses = pod.status.unwrap().container_statuses.unwrap();
        assert_eq!(statuses.len(), 1, "job-{i}");
        let terminated = statuses[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .unwrap();
        assert_eq!(terminated.exit_code, 0, "job-{i}");
    }
    for i in 0..5 {
        let name = format!("runner-{i}");
        let pod = ns
            .wait_pod(&agent, &name, "the runner to run", sole_container_running)
            .await;
        let statuses = pod.status.unwrap().container_statuses.unwrap();
        assert_eq!(statuses[0].restart_count, 0, "{name} never restarted");
        assert_eq!(
            running_containers(&agent, &ns.name, &name).await,
            1,
            "{name}"
        );
    }
}
