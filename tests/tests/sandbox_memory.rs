//! The memory part of "the sandbox holds", against the real control plane: `limits.memory`
//! bounds everything a container's guests allocate together (every linear memory, every table,
//! its instance and its execs), and is read as the API server writes it. Hostile guests are
//! WAT in this file. One agent and one namespace per test.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;

use integration_tests::{
    push_wat, test_node, wait_for, Agent, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

const MIB: u64 = 1 << 20;

/// WASI imports and a `$sleep_forever` (poll_oneoff on a 1 s monotonic clock, in a loop) that
/// every guest here shares; memory 0 is WASI's, exported as "memory".
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory $wasi (export "memory") 1)
  (data (memory $wasi) (i32.const 16) "grown\nready\n")
  (func $sleep_forever
    ;; One clock subscription at 256: tag 0 (clock) at 264, id 1 (monotonic) at 272, timeout 1 s at 280.
    (i32.store $wasi (i32.const 272) (i32.const 1))
    (i64.store $wasi (i32.const 280) (i64.const 1000000000))
    (loop $again
      (drop (call $poll_oneoff (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
      (br $again)))
  ;; Writes `len` bytes at `at` to stdout.
  (func $say (param $at i32) (param $len i32)
    (i32.store $wasi (i32.const 32) (local.get $at))
    (i32.store $wasi (i32.const 36) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40))))
"#;

/// The agent's resident and peak resident memory (VmRSS, VmHWM), in bytes.
fn agent_rss(agent: &Agent) -> (u64, u64) {
    let pid = agent.pid().expect("the agent runs");
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        line.split_whitespace()
            .nth(1)
            .and_then(|kb| kb.parse::<u64>().ok())
            .expect("a number of kB")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .clone()
}

/// A pod of one container running `image` under `limits.memory`.
async fn create(
    ns: &TestNamespace,
    agent: &Agent,
    name: &str,
    image: &str,
    memory: &str,
    args: &[&str],
) {
    let container = serde_json::json!({"name": "guest", "image": image, "args": args, "resources": {"limits": {"memory": memory}}});
    ns.create_bound_pod(
        agent,
        name,
        serde_json::json!({}),
        serde_json::json!({"containers": [container]}),
    )
    .await;
}

async fn assert_oomkilled(ns: &TestNamespace, agent: &Agent, name: &str) {
    let pod = ns
        .wait_pod(agent, name, "the guest to be OOMKilled", |p| {
            terminated(p).is_some()
        })
        .await;
    let t = terminated(&pod).unwrap();
    assert_eq!(
        (t.exit_code, t.reason.as_deref()),
        (137, Some("OOMKilled")),
        "{t:?}"
    );
}

/// Five linear memories of 62 MiB each (multi-memory is on in wasmtime 48): each is under a
/// 64Mi limit on its own, together they are five times over it. The pod is OOMKilled, and the
/// agent's memory never grows by more than the limit.
#[tokio::test]
async fn five_memories_share_one_limit() {
    const PAGES: u32 = 62 * 16; // 62 MiB in 64 KiB pages
    let mut wat = format!("(module {PRELUDE}");
    for m in 1..=5 {
        wat.push_str(&format!(
            r#"
  (memory $m{m} 0)
  (func $fill{m} (local $i i32)
    (if (i32.eq (memory.grow $m{m} (i32.const {PAGES})) (i32.const -1)) (then unreachable))
    ;; Touch every page, so the host really holds it.
    (loop $touch
      (i32.store $m{m} (local.get $i) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 4096)))
      (br_if $touch (i32.lt_u (local.get $i) (i32.const {bytes})))))"#,
            bytes = PAGES * 65536
        ));
    }
    wat.push_str("\n  (func (export \"_start\") (call $fill1) (call $fill2) (call $fill3) (call $fill4) (call $fill5) (call $say (i32.const 22) (i32.const 6)) (call $sleep_forever)))");
    let image = push_wat("multi-memory", &wat);

    let agent = &test_node("mem-multi", &[]).await;
    let ns = TestNamespace::new("mem-multi").await;
    // A first pod of the image under 1Mi (OOMKilled at once) pulls and compiles it, so what
    // the agent does for the measured pod is the guest's memory and a pod start, not a
    // compilation.
    create(&ns, agent, "warm-up", &image, "1Mi", &[]).await;
    ns.wait_pod(agent, "warm-up", "the warm-up pod to end", |p| {
        terminated(p).is_some()
    })
    .await;
    // Reset the agent's peak RSS (VmHWM) to its RSS now: `5` in clear_refs (proc(5)).
    std::fs::write(format!("/proc/{}/clear_refs", agent.pid().unwrap()), "5")
        .expect("reset the agent's VmHWM");
    let (before, _) = agent_rss(agent);
    create(&ns, agent, "many-memories", &image, "64Mi", &[]).await;
    // Either the pod ends, or the agent holds more than the limit on its behalf.
    let pods = ns.pods();
    let grew_past = wait_for(
        "the pod to end or the agent to grow past the limit",
        TEST_TIMEOUT,
        || async {
            let pod = pods.get_opt("many-memories").await.ok()??;
            let (_, peak) = agent_rss(agent);
            (terminated(&pod).is_some() || peak.saturating_sub(before) > 80 * MIB)
                .then_some(peak.saturating_sub(before))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let (after, peak) = agent_rss(agent);
    eprintln!(
        "agent RSS before {} MiB, after {} MiB, peak {} MiB (grew {} MiB at most)",
        before / MIB,
        after / MIB,
        peak / MIB,
        grew_past / MIB
    );
    // The limit, and 16 MiB for the agent's own work on a pod start (watch events, status
    // patches, the log file, the store): without the fix the growth is five times the limit.
    assert!(
        peak.saturating_sub(before) <= 80 * MIB,
        "the agent grew by {} MiB for a pod limited to 64 MiB",
        peak.saturating_sub(before) / MIB
    );
    assert_oomkilled(&ns, agent, "many-memories").await;
}

/// A table grown to 100M funcref elements (800 MB of host memory) under a 16Mi limit.
#[tokio::test]
async fn a_table_counts_against_the_limit() {
    let wat = format!(
        r#"(module {PRELUDE}
  (table $t 0 funcref)
  (func (export "_start")
    (if (i32.eq (table.grow $t (ref.null func) (i32.const 100000000)) (i32.const -1)) (then unreachable))
    (call $say (i32.const 22) (i32.const 6))
    (call $sleep_forever)))"#
    );
    let image = push_wat("table-grow", &wat);
    let agent = &test_node("mem-table", &[]).await;
    let ns = TestNamespace::new("mem-table").await;
    create(&ns, agent, "big-table", &image, "16Mi", &[]).await;
    assert_oomkilled(&ns, agent, "big-table").await;
}

/// A limit in milli-bytes, as the API server accepts it (with a warning) and stores it:
/// `67108864001m` is 64 MiB and a byte (rounded up), not "no limit".
#[tokio::test]
async fn a_milli_byte_limit_still_limits() {
    let wat = format!(
        r#"(module {PRELUDE}
  (func (export "_start")
    ;; 80 MiB, one MiB at a time.
    (loop $more
      (if (i32.eq (memory.grow $wasi (i32.const 16)) (i32.const -1)) (then unreachable))
      (br_if $more (i32.lt_u (memory.size $wasi) (i32.const 1280))))
    (call $say (i32.const 22) (i32.const 6))
    (call $sleep_forever)))"#
    );
    let image = push_wat("grow-80mib", &wat);
    let agent = &test_node("mem-milli", &[]).await;
    let ns = TestNamespace::new("mem-milli").await;
    create(&ns, agent, "milli", &image, "67108864001m", &[]).await;
    let pod = ns.pods().get("milli").await.unwrap();
    let limit = pod.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap()["memory"]
        .0
        .clone();
    assert_eq!(limit, "67108864001m", "the API server keeps the milli form");
    assert_oomkilled(&ns, agent, "milli").await;
}

/// The container grows to 16 MiB and sleeps; each exec grows by 20 MiB, says "grown" and
/// holds it until its stdin closes. Under one 64Mi limit only two execs fit beside the
/// container: five at once cannot all succeed, and the others fail clearly.
#[tokio::test]
async fn concurrent_execs_share_the_containers_limit() {
    let wat = format!(
        r#"(module {PRELUDE}
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (if (i32.eq (i32.load $wasi (i32.const 0)) (i32.const 1))
      (then
        ;; An exec (argv = ["grow"]): 20 MiB, "grown", then hold it until stdin ends.
        (if (i32.eq (memory.grow $wasi (i32.const 320)) (i32.const -1)) (then unreachable))
        (call $say (i32.const 16) (i32.const 6))
        (i32.store $wasi (i32.const 48) (i32.const 1024))
        (i32.store $wasi (i32.const 52) (i32.const 512))
        (block $eof
          (loop $read
            (br_if $eof (call $fd_read (i32.const 0) (i32.const 48) (i32.const 1) (i32.const 56)))
            (br_if $eof (i32.eqz (i32.load $wasi (i32.const 56))))
            (br $read))))
      (else
        ;; The container (argv = [name, "serve"]): 16 MiB, "ready", sleep.
        (if (i32.eq (memory.grow $wasi (i32.const 256)) (i32.const -1)) (then unreachable))
        (call $say (i32.const 22) (i32.const 6))
        (call $sleep_forever)))))"#
    );
    let image = push_wat("exec-grow", &wat);
    let agent = &test_node("mem-exec", &[]).await;
    let ns = TestNamespace::new("mem-exec").await;
    create(&ns, agent, "greedy", &image, "64Mi", &["serve"]).await;
    ns.wait_pod(agent, "greedy", "the pod to run", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await;
    let logs = || {
        let out = Cluster::get()
            .kubectl()
            .args(["logs", "-n", &ns.name, "greedy"])
            .output()
            .expect("kubectl logs runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the container to hold its 16 MiB", TEST_TIMEOUT, || async {
        logs().contains("ready").then_some(())
    })
    .await
    .unwrap();

    const EXECS: usize = 5;
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::new();
    for i in 0..EXECS {
        let mut child = Cluster::get()
            .kubectl()
            .args(["exec", "-i", "-n", &ns.name, "greedy", "--", "grow"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let stdout = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let grown =
                BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim() == "grown";
            let _ = tx.send((i, grown));
        });
        children.push(child);
    }
    // Every exec has grown (and holds its memory) or has ended: only then are stdins closed.
    let mut grown = 0;
    for _ in 0..EXECS {
        let (_, ok) = rx
            .recv_timeout(TEST_TIMEOUT)
            .unwrap_or_else(|_| panic!("an exec neither grew nor ended\n{}", agent.log_tail()));
        grown += usize::from(ok);
    }
    let mut outcomes = Vec::new();
    for mut child in children {
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl ends");
        outcomes.push((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    eprintln!("{grown} of {EXECS} execs grew; outcomes: {outcomes:?}");
    let succeeded = outcomes.iter().filter(|(code, _)| *code == 0).count();
    assert!(
        succeeded <= 2,
        "{succeeded} execs of 20 MiB ran beside a container of 16 MiB under 64Mi: {outcomes:?}"
    );
    assert!(succeeded >= 1, "no exec ran at all: {outcomes:?}");
    for (code, stderr) in outcomes.iter().filter(|(code, _)| *code != 0) {
        assert_eq!(*code, 137, "{stderr}");
        assert!(
            stderr.contains("out of memory")
                && stderr.contains("memory limit of 67108864 bytes exceeded"),
            "{stderr}"
        );
    }
    // The container itself runs on: a failed exec is the exec's failure.
    let pod = ns.pods().get("greedy").await.unwrap();
    assert!(terminated(&pod).is_none(), "{:?}", pod.status);
}
