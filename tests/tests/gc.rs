//! Garbage collection against the real control plane: image GC on a small tmpfs root whose
//! usage the test pushes over the high threshold, container GC of a crash-looping pod, and a
//! store that stays usable when the agent is killed in the middle of collecting many images.

use std::path::Path;
use std::time::Duration;

use integration_tests::{
    example_image, example_wasm, phase, test_node, test_node_on_tmpfs, wait_for, workspace_root,
    Agent, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;

async fn create_pod(
    ns: &TestNamespace,
    agent: &Agent,
    name: &str,
    image: &str,
    restart: &str,
) -> Pod {
    let spec = serde_json::json!({"restartPolicy": restart, "containers": [{"name": "c", "image": image}]});
    ns.create_bound_pod(agent, name, serde_json::json!({}), spec)
        .await
}

async fn delete_and_wait(ns: &TestNamespace, name: &str) {
    ns.pods()
        .delete(name, &DeleteParams::default())
        .await
        .expect("pod deleted");
    let pods = ns.pods();
    wait_for(&format!("pod {name} gone"), TEST_TIMEOUT, || async {
        pods.get_opt(name)
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .expect("pod gone");
}

/// The references in the agent's image index.
fn stored_images(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("images/index.json")).unwrap_or_default();
    let index: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_default();
    index.keys().cloned().collect()
}

fn holds(images: &[String], example: &str) -> bool {
    images
        .iter()
        .any(|r| r.contains(&format!("/wasm-examples/{example}:")))
}

#[tokio::test]
async fn image_gc_removes_the_least_recently_used_unused_image_and_keeps_the_one_in_use() {
    let (tmpfs, agent) = test_node_on_tmpfs(
        "gc-images",
        "64m",
        &[
            "--image-gc-period=1s",
            "--minimum-image-ttl-duration=0s",
            "--image-gc-high-threshold=90",
            "--image-gc-low-threshold=90",
            // Only image GC acts in this test, not disk-pressure eviction.
            "--eviction-hard=nodefs.available<1Mi",
        ],
    )
    .await;
    let ns = TestNamespace::new("gc-images").await;

    // Used in this order: the running ticker's image is the least recently used of all, then
    // hello's, then env-and-args'.
    create_pod(&ns, &agent, "running", &example_image("ticker"), "Always").await;
    ns.wait_pod(&agent, "running", "ticker running", |p| {
        phase(p) == "Running"
    })
    .await;
    for (name, example) in [("first", "hello"), ("second", "env-and-args")] {
        create_pod(&ns, &agent, name, &example_image(example), "Never").await;
        ns.wait_pod(&agent, name, "the pod done", |p| phase(p) == "Succeeded")
            .await;
        delete_and_wait(&ns, name).await;
    }
    let before = stored_images(&tmpfs.path);
    assert!(
        holds(&before, "ticker") && holds(&before, "hello") && holds(&before, "env-and-args"),
        "{before:?}"
    );

    // Usage to just over 90%: freeing 16 KiB more reaches the low threshold, so one image
    // (tens of KiB with its compiled code) is enough.
    let (size, available) = tmpfs.usage();
    let target_available = size / 10 - (16 << 10);
    let filler = tmpfs.path.join("filler");
    std::fs::write(
        &filler,
        vec![1u8; available.saturating_sub(target_available) as usize],
    )
    .expect("filler");

    let after = wait_for("hello's image collected", TEST_TIMEOUT, || async {
        let images = stored_images(&tmpfs.path);
        (!holds(&images, "hello")).then_some(images)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert!(holds(&after, "ticker"), "the image in use stays: {after:?}");
    assert!(
        holds(&after, "env-and-args"),
        "the more recently used unused image stays: {after:?}"
    );
    // The agent logs the collection after the index no longer holds the image: wait for it.
    wait_for("the agent to log the collection", TEST_TIMEOUT, || async {
        agent
            .log()
            .contains("image garbage-collected")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let _ = std::fs::remove_file(&filler);

    // The running pod is untouched, and a collected image is pulled again when needed.
    let running = ns.pods().get("running").await.expect("pod");
    assert_eq!(phase(&running), "Running");
    create_pod(&ns, &agent, "again", &example_image("hello"), "Never").await;
    ns.wait_pod(&agent, "again", "hello runs again", |p| {
        phase(p) == "Succeeded"
    })
    .await;
}

fn attempt_logs(dir: &Path) -> Vec<u32> {
    let mut runs: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    runs.sort();
    runs
}

#[tokio::test]
async fn container_gc_keeps_one_dead_instance_per_container() {
    let agent = test_node("gc-containers", &["--container-gc-period=1s"]).await;
    let ns = TestNamespace::new("gc-containers").await;
    let pod = create_pod(
        &ns,
        &agent,
        "looper",
        &example_image("crash-looper"),
        "Always",
    )
    .await;
    let uid = pod.metadata.uid.clone().expect("uid");
    let dir = agent
        .dir
        .join("logs")
        .join(format!("{}_looper_{uid}", ns.name))
        .join("c");

    // Three runs so far (the crash-loop backoff is 10 s, then 20 s).
    ns.wait_pod(&agent, "looper", "two restarts", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.restart_count >= 2)
    })
    .await;
    let runs = wait_for(
        "the oldest dead instance collected",
        TEST_TIMEOUT,
        || async {
            let runs = attempt_logs(&dir);
            (!runs.contains(&0) && !runs.is_empty()).then_some(runs)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nlogs: {:?}\nagent log:\n{}",
            attempt_logs(&dir),
            agent.log_tail()
        )
    });
    assert!(
        runs.len() <= 2,
        "the current instance and one dead one: {runs:?}"
    );

    // The previous instance's log is still there for kubectl logs --previous.
    let out = Cluster::get()
        .kubectl()
        .args(["logs", "-n", &ns.name, "looper", "--previous"])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl logs --previous: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("crash-looper: failing on purpose"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A deleted pod's logs go.
    delete_and_wait(&ns, "looper").await;
    let pod_dir = dir.parent().expect("pod log dir").to_path_buf();
    wait_for(
        "the deleted pod's logs removed",
        Duration::from_secs(120),
        || async { (!pod_dir.exists()).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}

/// How many distinct images the crash test collects.
const MANY: usize = 40;

/// `hello.wasm` made distinct by a custom section naming `i` (same program, its own digest).
fn variant(base: &[u8], i: usize) -> Vec<u8> {
    let name = format!("wasm-kubelet-gc-test-{i}");
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name.as_bytes());
    let mut out = base.to_vec();
    out.push(0); // custom section
    out.push(section.len() as u8); // a one-byte LEB128 size: the name is short
    out.extend_from_slice(&section);
    out
}

/// Every index entry's module is on disk, nothing else is (no blob without an entry, no
/// compiled code without a module), and the trash is empty.
fn assert_store_consistent(root: &Path) {
    let text =
        std::fs::read_to_string(root.join("images/index.json")).unwrap_or_else(|_| "{}".into());
    let index: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).expect("index.json parses");
    let layers: std::collections::HashSet<String> = index
        .values()
        .filter_map(|v| v["layer_digest"].as_str())
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    let blobs: std::collections::HashSet<String> =
        std::fs::read_dir(root.join("images/blobs/sha256"))
            .expect("blobs")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    assert_eq!(layers, blobs, "index entries and blobs differ");
    let trash: Vec<_> = std::fs::read_dir(root.join("images/trash"))
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(trash.is_empty(), "trash left: {trash:?}");
    for engine in std::fs::read_dir(root.join("compiled"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for artifact in std::fs::read_dir(engine.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = artifact.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".cwasm").unwrap_or(&name);
            assert!(
                layers.contains(hex),
                "compiled code {name} without its image"
            );
        }
    }
}

#[tokio::test]
async fn an_agent_killed_while_collecting_many_images_restarts_with_a_usable_store() {
    // Image GC off while the images are pulled (usage never reaches 100%).
    // The image store lives where the guests do: in the agent here, so killing the agent
    // interrupts a removal (with a runtime process apart, killing it would).
    let mut agent = test_node(
        "gc-crash",
        &[
            "--image-gc-period=1s",
            "--minimum-image-ttl-duration=0s",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=100",
            "--wasm-runtime=in-agent",
        ],
    )
    .await;
    let ns = TestNamespace::new("gc-crash").await;
    let registry = Cluster::get().var("REGISTRY").to_string();
    let base = std::fs::read(example_wasm("hello")).expect("hello.wasm built by push-examples");
    let dir = agent.dir.join("variants");
    std::fs::create_dir_all(&dir).expect("variants dir");
    let mut images = Vec::new();
    for i in 0..MANY {
        let file = dir.join(format!("hello-{i}.wasm"));
        std::fs::write(&file, variant(&base, i)).expect("variant written");
        let image = format!("{registry}/wasm-examples/gc-variant:{i}");
        let out = std::process::Command::new(workspace_root().join("deploy/push-wasm"))
            .arg(&file)
            .arg(&image)
            .output()
            .expect("push-wasm runs");
        assert!(
            out.status.success(),
            "push-wasm {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        images.push(image);
    }
    for (i, image) in images.iter().enumerate() {
        create_pod(&ns, &agent, &format!("v{i}"), image, "Never").await;
    }
    let pods = ns.pods();
    wait_for(
        "every variant pod done",
        Duration::from_secs(300),
        || async {
            let list = pods.list(&Default::default()).await.ok()?;
            (list.items.len() == MANY && list.items.iter().all(|p| phase(p) == "Succeeded"))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    for i in 0..MANY {
        pods.delete(&format!("v{i}"), &DeleteParams::default())
            .await
            .expect("pod deleted");
    }
    wait_for("every variant pod gone", TEST_TIMEOUT, || async {
        pods.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let root = agent.dir.join("root");
    assert!(stored_images(&root).len() >= MANY);

    // Restart with thresholds that collect every unused image at once, and kill the agent as
    // soon as the first image is gone.
    // Nothing runs, so the agent exits at once; the bound only tells "stops" from "hangs".
    agent
        .terminate(TEST_TIMEOUT)
        .expect("agent stops on SIGTERM");
    let log_before = agent.log().len();
    agent.set_flags(&["--image-gc-high-threshold=0", "--image-gc-low-threshold=0"]);
    agent.spawn().expect("agent restarts");
    // Polls only what the restarted agent appended (a few bytes per poll, not the whole -v=4
    // log), so the kill follows the first removal as closely as this loaded machine allows.
    let log_file = agent.dir.join("agent.log");
    let mut reader = std::fs::File::open(&log_file).expect("agent.log");
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(log_before as u64))
        .expect("seek in agent.log");
    let mut appended = Vec::new();
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    loop {
        std::io::Read::read_to_end(&mut reader, &mut appended).expect("reading agent.log");
        if appended
            .windows(b"image removed".len())
            .any(|w| w == b"image removed")
        {
            agent.kill9();
            break;
        }
        if let Some(status) = agent.exited() {
            panic!(
                "the agent exited ({status}) before removing an image\n{}",
                agent.log_tail()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no image removed within {TEST_TIMEOUT:?} of the restart\n{}",
            agent.log_tail()
        );
        // A poll, not a wait for time to pass: 2 ms keeps the reaction to the first removal short.
        std::thread::sleep(Duration::from_millis(2));
    }
    let removed_at_kill = agent.log()[log_before..].matches("image removed").count();
    let left = stored_images(&root).len();
    eprintln!(
        "killed after {removed_at_kill} of {MANY} images were removed; {left} left in the index"
    );
    assert!(left > 0, "the collection was interrupted before the end");

    // Start again, GC off: the store opens consistent, and images pull and run.
    agent.set_flags(&[
        "--image-gc-high-threshold=100",
        "--image-gc-low-threshold=100",
    ]);
    agent.spawn().expect("agent restarts after the kill");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(Cluster::get().admin().await);
    let log_mark = agent.log().len();
    wait_for("the agent up again", TEST_TIMEOUT, || async {
        let up = agent.log()[log_mark..].contains("registered")
            || agent.log()[log_mark..].contains("adopted");
        let node = nodes.get_opt(&agent.name).await.ok()??;
        (up && integration_tests::node_condition(&node, "Ready").as_deref() == Some("True"))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_store_consistent(&root);
    for (name, image) in [
        ("again-first", &images[0]),
        ("again-last", &images[MANY - 1]),
    ] {
        create_pod(&ns, &agent, name, image, "Never").await;
        ns.wait_pod(
            &agent,
            name,
            "the image pulled and run after the crash",
            |p| phase(p) == "Succeeded",
        )
        .await;
    }
    assert_store_consistent(&root);
}
