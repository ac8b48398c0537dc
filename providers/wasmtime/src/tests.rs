//! Provider-level tests: real wasmtime, real WASI, modules written in WAT, no network.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use provider_api::{
    ContainerConfig, ContainerState, ExecIo, ExitReason, Mount, Provider, RuntimeStatus,
    SandboxConfig,
};

use super::*;

/// A fresh root directory per test, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wk-provider-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POD: &str = "pod-uid-1";

async fn provider_with(root: &Path, wat: &str) -> WasmtimeProvider {
    let provider = WasmtimeProvider::new(root.to_path_buf()).unwrap();
    provider
        .images
        .import("127.0.0.1:5000/test:v1", &wat::parse_str(wat).unwrap())
        .unwrap();
    provider
        .run_pod_sandbox(&SandboxConfig {
            pod_uid: POD.into(),
            namespace: "default".into(),
            name: "p".into(),
            pod_dir: root.join("pod"),
            runtime_handler: None,
            host_network: false,
        })
        .await
        .unwrap();
    provider
}

fn config(root: &Path, name: &str) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: "127.0.0.1:5000/test:v1".into(),
        command: vec![],
        args: vec![],
        env: vec![],
        working_dir: None,
        mounts: vec![],
        log_path: root.join(format!("logs/{name}/0.log")),
        memory_limit_bytes: None,
        cpu_limit_millicores: None,
        cpu_request_millicores: None,
        attempt: 0,
        network: Default::default(),
        stdin: false,
        stdin_once: false,
        annotations: Default::default(),
    }
}

async fn state_of(provider: &WasmtimeProvider, id: &str) -> ContainerState {
    provider
        .list_containers()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap()
        .state
}

/// Waits (up to 10 s) for the container to exit; returns exit code, reason, message.
async fn wait_exited(provider: &WasmtimeProvider, id: &str) -> (i32, ExitReason, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let ContainerState::Exited {
            exit_code,
            reason,
            message,
            ..
        } = state_of(provider, id).await
        {
            return (exit_code, reason, message);
        }
        assert!(Instant::now() < deadline, "container {id} did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run(
    provider: &WasmtimeProvider,
    config: ContainerConfig,
) -> (i32, ExitReason, Option<String>) {
    let id = provider.create_container(POD, config).await.unwrap();
    provider.start_container(&id).await.unwrap();
    wait_exited(provider, &id).await
}

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\nno newline")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

const EXIT3: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 3))))"#;

const TRAP: &str = r#"(module
  (memory (export "memory") 1)
  (func $boom unreachable)
  (func (export "_start") (call $boom)))"#;

const GROW: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (drop (memory.grow (i32.const 1))) (br $l))))"#;

const BUSY: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;

/// Exits with argc * 10 + envc.
const COUNTS: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $args (i32.const 0) (i32.const 4)))
    (drop (call $env (i32.const 8) (i32.const 12)))
    (call $exit (i32.add (i32.mul (i32.load (i32.const 0)) (i32.const 10)) (i32.load (i32.const 8))))))"#;

/// Creates `new.txt` in the first preopen (fd 3); exits with the errno (0 on success).
const CREATE: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "new.txt")
  (func (export "_start")
    ;; fd 3, no dirflags, path, oflags CREAT, rights FD_WRITE, fdflags 0, result at 64
    (call $exit (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 1)
      (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 64)))))"#;

#[test]
fn reports_the_pinned_wasmtime_version() {
    let root = Root::new("version");
    let provider = WasmtimeProvider::new(root.0.clone()).unwrap();
    let info = provider.runtime_info();
    assert_eq!(info.name, "wasmtime");
    assert!(
        info.version.starts_with("48."),
        "version from Cargo.lock, got {}",
        info.version
    );
}

#[tokio::test]
async fn a_working_engine_is_ready() {
    let root = Root::new("ready");
    let provider = WasmtimeProvider::new(root.0.clone()).unwrap();
    assert_eq!(provider.status().await, RuntimeStatus::Ready);
}

#[tokio::test]
async fn stdout_goes_to_the_cri_log_and_the_run_completes() {
    let root = Root::new("hello");
    let provider = provider_with(&root.0, HELLO).await;
    let cfg = config(&root.0, "hello");
    let log_path = cfg.log_path.clone();
    assert_eq!(run(&provider, cfg).await, (0, ExitReason::Completed, None));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    let (ts, rest) = lines[0].split_once(' ').unwrap();
    assert!(ts.parse::<jiff::Timestamp>().is_ok(), "timestamp {ts}");
    assert_eq!(rest, "stdout F hello");
    assert_eq!(lines[1].split_once(' ').unwrap().1, "stdout P no newline");
}

#[tokio::test]
async fn proc_exit_sets_the_exit_code() {
    let root = Root::new("exit3");
    let provider = provider_with(&root.0, EXIT3).await;
    assert_eq!(
        run(&provider, config(&root.0, "exit")).await,
        (3, ExitReason::Error, None)
    );
}

#[tokio::test]
async fn a_trap_is_an_error_with_its_message() {
    let root = Root::new("trap");
    let provider = provider_with(&root.0, TRAP).await;
    let (code, reason, message) = run(&provider, config(&root.0, "trap")).await;
    assert_eq!((code, reason), (1, ExitReason::Error));
    let message = message.unwrap();
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        message.contains("boom") && !message.contains('\n'),
        "{message}"
    );
}

/// Unbounded recursion: the guest's stack runs out (wasmtime's `max_wasm_stack`, inside the
/// fiber stack), which must end in a trap of this guest alone, the runtime unharmed.
const RECURSE: &str = r#"(module
  (memory (export "memory") 1)
  (func $deeper (param i64) (result i64)
    (i64.add (call $deeper (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
  (func (export "_start") (drop (call $deeper (i64.const 0)))))"#;

#[tokio::test]
async fn a_guest_that_recurses_without_end_traps_and_the_next_one_runs() {
    let root = Root::new("recurse");
    let provider = provider_with(&root.0, RECURSE).await;
    for round in 0..2 {
        let name = format!("recurse-{round}");
        let (code, reason, message) = run(&provider, config(&root.0, &name)).await;
        assert_eq!((code, reason), (1, ExitReason::Error), "round {round}");
        let message = message.unwrap();
        assert!(message.contains("call stack exhausted"), "{message}");
    }
}

#[tokio::test]
async fn growing_past_the_memory_limit_is_oomkilled() {
    let root = Root::new("oom");
    let provider = provider_with(&root.0, GROW).await;
    let mut cfg = config(&root.0, "grow");
    cfg.memory_limit_bytes = Some(1 << 20);
    let (code, reason, message) = run(&provider, cfg).await;
    assert_eq!((code, reason), (137, ExitReason::OomKilled), "{message:?}");
}

#[tokio::test]
async fn a_busy_loop_is_killed_after_the_grace_period() {
    let root = Root::new("busy");
    let provider = provider_with(&root.0, BUSY).await;
    let id = provider
        .create_container(POD, config(&root.0, "busy"))
        .await
        .unwrap();
    provider.start_container(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(
        state_of(&provider, &id).await,
        ContainerState::Running { .. }
    ));
    let started = Instant::now();
    provider
        .stop_container(&id, Duration::from_millis(200))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(1),
        "stop took {took:?}"
    );
    let (code, reason, _) = wait_exited(&provider, &id).await;
    assert_eq!((code, reason), (137, ExitReason::Killed));
    // Stopping again is a no-op; removing forgets it.
    provider.stop_container(&id, Duration::ZERO).await.unwrap();
    provider.remove_container(&id).await.unwrap();
    assert!(provider.list_containers().await.unwrap().is_empty());
}

#[tokio::test]
async fn usage_is_measured_cpu_while_busy_memory_while_alive() {
    let root = Root::new("usage");
    let provider = provider_with(&root.0, BUSY).await;
    let id = provider
        .create_container(POD, config(&root.0, "busy"))
        .await
        .unwrap();
    provider.start_container(&id).await.unwrap();
    let usage = || async {
        provider
            .list_containers()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.id == id)
            .unwrap()
            .usage
    };
    // Wait (not sleep-and-hope) for the spinning guest to accumulate 100 ms of CPU time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while usage().await.cpu_nanos < 100_000_000 {
        assert!(
            Instant::now() < deadline,
            "a busy loop accumulates CPU time: {:?}",
            usage().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        usage().await.memory_bytes,
        64 * 1024,
        "one Wasm page of linear memory"
    );
    provider.stop_container(&id, Duration::ZERO).await.unwrap();
    wait_exited(&provider, &id).await;
    let after = usage().await;
    assert_eq!(after.memory_bytes, 0, "an exited container holds no memory");
    assert!(after.cpu_nanos >= 100_000_000, "CPU time is cumulative");
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) with a valid clock id and out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Held by the tests that measure CPU rates, so their busy loops do not compete.
static CPU_MEASURE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_holds_a_busy_loop_to_its_quota() {
    let _alone = CPU_MEASURE.lock().await;
    let root = Root::new("cpu-quota");
    let provider = provider_with(&root.0, BUSY).await;
    let mut cfg = config(&root.0, "limited");
    cfg.cpu_limit_millicores = Some(200);
    let limited = provider.create_container(POD, cfg).await.unwrap();
    let free = provider
        .create_container(POD, config(&root.0, "free"))
        .await
        .unwrap();
    provider.start_container(&limited).await.unwrap();
    provider.start_container(&free).await.unwrap();
    let cpu = |id: String| {
        let provider = &provider;
        async move {
            provider
                .list_containers()
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.id == id)
                .unwrap()
                .usage
                .cpu_nanos
        }
    };
    let (l0, f0, t0) = (
        cpu(limited.clone()).await,
        cpu(free.clone()).await,
        Instant::now(),
    );
    // The measurement window: wall time has to pass. A native thread spins through it, to
    // measure what the machine offers a busy thread meanwhile (a fraction of a core when
    // other builds load it).
    let offer = std::thread::spawn(|| {
        let (c0, w0) = (thread_cpu_nanos(), Instant::now());
        let mut x = 0u64;
        while w0.elapsed() < Duration::from_secs(2) {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        (thread_cpu_nanos() - c0) as f64 / w0.elapsed().as_nanos() as f64
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (l1, f1, wall) = (
        cpu(limited.clone()).await,
        cpu(free.clone()).await,
        t0.elapsed().as_nanos() as f64,
    );
    let offered = offer.join().unwrap();
    let (limited_rate, free_rate) = ((l1 - l0) as f64 / wall, (f1 - f0) as f64 / wall);
    println!("200m limit: {limited_rate:.3} cores; unlimited: {free_rate:.3} cores; a native busy thread: {offered:.3}");
    // The quota is a ceiling whatever else runs; below it the loop gets at least half of what
    // the machine offered.
    assert!(
        limited_rate <= 0.35,
        "a 200m limit holds a busy loop to about 0.2 cores: {limited_rate:.3}"
    );
    assert!(
        limited_rate >= 0.5 * offered.min(0.2),
        "a 200m-limited loop runs up to its quota: {limited_rate:.3} of {offered:.3} offered"
    );
    // The quota, not a busy machine, held it: throttled in most periods, whenever the machine
    // offered clearly more than the quota (a loop offered less never reaches its quota, so it
    // cannot be throttled, and that says nothing about the quota). How much the unlimited loop
    // gets is printed, and compared in tests/tests/resources.rs.
    let quota = provider.state().containers[&limited]
        .meter
        .cpu_quota()
        .map(|q| q.throttling().0)
        .unwrap_or(0);
    // "Clearly more" is 2.5 times the quota: the loop, the unlimited loop and the native
    // thread compete for what is offered (at 0.31 offered the loop got 0.17 and was throttled
    // in 7 periods of 20 in a CI run under foreign load).
    if offered >= 0.5 {
        assert!(quota >= 10, "throttled in most periods of 2 s: {quota} (a native busy thread got {offered:.3} cores)");
    }
    provider
        .remove_pod_sandbox(POD, Duration::ZERO)
        .await
        .unwrap();
}

/// Busy loops on a runtime with one worker per core, two more loops than workers: the one that
/// requests a core gets clearly more than the others (ideally a core against a third each on
/// 2 cores; without weights all get the same, measured).
#[test]
fn requests_weight_the_cpu_under_contention() {
    let _alone = CPU_MEASURE.blocking_lock();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let root = Root::new("cpu-shares");
        let provider = provider_with(&root.0, BUSY).await;
        let mut ids = Vec::new();
        for i in 0..cores + 2 {
            let mut cfg = config(&root.0, &format!("loop-{i}"));
            cfg.cpu_request_millicores = (i == 0).then_some(1000);
            let id = provider.create_container(POD, cfg).await.unwrap();
            provider.start_container(&id).await.unwrap();
            ids.push(id);
        }
        let cpu = || async {
            provider
                .list_containers()
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.id, c.usage.cpu_nanos))
                .collect::<std::collections::HashMap<_, _>>()
        };
        // Let every loop start, then measure over a window (wall time has to pass).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (before, t0) = (cpu().await, Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (after, wall) = (cpu().await, t0.elapsed().as_nanos() as f64);
        let rates: Vec<f64> = ids
            .iter()
            .map(|id| (after[id] - before[id]) as f64 / wall)
            .collect();
        let small = rates[1..].iter().sum::<f64>() / (rates.len() - 1) as f64;
        println!(
            "{cores} cores: requesting 1000m {:.3} cores, the others {:?} (mean {small:.3})",
            rates[0],
            rates[1..]
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
        );
        assert!(
            rates[0] > 1.4 * small,
            "the loop that requests a core gets clearly more: {rates:?}"
        );
        provider
            .remove_pod_sandbox(POD, Duration::ZERO)
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_loop_does_not_starve_a_single_threaded_runtime() {
    let root = Root::new("starve");
    let provider = provider_with(&root.0, BUSY).await;
    let id = provider
        .create_container(POD, config(&root.0, "busy"))
        .await
        .unwrap();
    provider.start_container(&id).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    provider
        .remove_pod_sandbox(POD, Duration::from_millis(20))
        .await
        .unwrap();
    assert!(provider.list_containers().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_guest_sees_exactly_its_argv_and_env() {
    let root = Root::new("counts");
    let provider = provider_with(&root.0, COUNTS).await;
    let mut cfg = config(&root.0, "counts");
    cfg.command = vec!["tool".into(), "serve".into()];
    cfg.args = vec!["--port".into()];
    cfg.env = vec![("A".into(), "1".into()), ("B".into(), "2".into())];
    // argc 3 (tool serve --port), envc 2, nothing inherited from the host.
    assert_eq!(run(&provider, cfg).await.0, 32);
}

#[tokio::test]
async fn a_read_only_mount_cannot_be_written() {
    let root = Root::new("mounts");
    let provider = provider_with(&root.0, CREATE).await;
    for (read_only, name) in [(true, "ro"), (false, "rw")] {
        let host = root.0.join(name);
        std::fs::create_dir_all(&host).unwrap();
        let mut cfg = config(&root.0, name);
        cfg.mounts = vec![Mount {
            host_path: host.clone(),
            container_path: "/data".into(),
            read_only,
        }];
        let (code, _, _) = run(&provider, cfg).await;
        if read_only {
            assert_ne!(code, 0, "creating in a read-only mount succeeded");
            assert!(!host.join("new.txt").exists());
        } else {
            assert_eq!(
                code, 0,
                "creating in a read-write mount failed with errno {code}"
            );
            assert!(host.join("new.txt").exists());
        }
    }
}

#[tokio::test]
async fn a_module_is_compiled_once_and_reloaded_from_disk_after_a_restart() {
    let root = Root::new("cache");
    let provider = provider_with(&root.0, EXIT3).await;
    for name in ["a", "b"] {
        assert_eq!(run(&provider, config(&root.0, name)).await.0, 3);
    }
    assert_eq!(provider.compilations(), 1);
    drop(provider);
    let provider = provider_with(&root.0, EXIT3).await;
    assert_eq!(run(&provider, config(&root.0, "c")).await.0, 3);
    assert_eq!(provider.compilations(), 0, "the agent restart recompiled");
    let compiled: Vec<_> = std::fs::read_dir(root.0.join("compiled"))
        .unwrap()
        .collect();
    assert_eq!(compiled.len(), 1);
}

#[tokio::test]
async fn create_needs_the_image_and_a_module_that_compiles() {
    let root = Root::new("create");
    let provider = provider_with(&root.0, EXIT3).await;
    let mut cfg = config(&root.0, "x");
    cfg.image = "127.0.0.1:5000/absent:v1".into();
    assert!(matches!(
        provider.create_container(POD, cfg).await,
        Err(ProviderError::ImageNotPresent(_))
    ));
    provider
        .images
        .import("127.0.0.1:5000/bad:v1", b"\0asm\x01\0\0\0\x01\xff")
        .unwrap();
    let mut cfg = config(&root.0, "bad");
    cfg.image = "127.0.0.1:5000/bad:v1".into();
    match provider.create_container(POD, cfg).await {
        Err(ProviderError::Create(message)) => assert!(message.contains("compiling"), "{message}"),
        other => panic!("expected a Create error, got {other:?}"),
    }
    assert!(matches!(
        provider
            .create_container("no-such-pod", config(&root.0, "y"))
            .await,
        Err(ProviderError::NotFound(_))
    ));
}

/// A component exporting `wasi:cli/run` whose run returns `err` when the core function says 1.
fn component(result: i32) -> String {
    format!(
        r#"(component
  (core module $m (func (export "run") (result i32) i32.const {result}))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))"#
    )
}

#[tokio::test]
async fn components_exporting_wasi_cli_run_are_detected_and_run() {
    let root = Root::new("component");
    let provider = provider_with(&root.0, &component(0)).await;
    assert_eq!(
        run(&provider, config(&root.0, "ok")).await,
        (0, ExitReason::Completed, None)
    );
    provider
        .images
        .import(
            "127.0.0.1:5000/fails:v1",
            &wat::parse_str(component(1)).unwrap(),
        )
        .unwrap();
    let mut cfg = config(&root.0, "fails");
    cfg.image = "127.0.0.1:5000/fails:v1".into();
    assert_eq!(run(&provider, cfg).await.0, 1);
}

/// Against a real registry (plain http on loopback), e.g. your own `docker-registry` on
/// 127.0.0.1:5056: `WK_REGISTRY=127.0.0.1:5056 cargo test -p provider-wasmtime -- --ignored`.
/// Pushes a module, a component, a tar.gz container image and an index, then pulls them.
#[tokio::test]
#[ignore = "needs a registry: set WK_REGISTRY=host:port (loopback)"]
async fn pulls_from_a_real_registry() {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    use oci_client::manifest::{ImageIndexEntry, OciImageIndex, Platform};
    use oci_client::secrets::RegistryAuth as A;
    let reg = std::env::var("WK_REGISTRY").expect("WK_REGISTRY=host:port");
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let push = |tag: &str, data: Vec<u8>, media_type: &str| {
        let r: oci_client::Reference = format!("{reg}/wk-test:{tag}").parse().unwrap();
        let layers = vec![ImageLayer::new(data, media_type.into(), None)];
        let client = &client;
        async move {
            let config = Config::new(
                b"{}".to_vec(),
                "application/vnd.wasm.config.v0+json".into(),
                None,
            );
            client
                .push(&r, &layers, config, &A::Anonymous, None)
                .await
                .unwrap();
            let (raw, digest) = client
                .pull_manifest_raw(
                    &r,
                    &A::Anonymous,
                    &["application/vnd.oci.image.manifest.v1+json"],
                )
                .await
                .unwrap();
            (digest, raw.len() as i64)
        }
    };
    let hello = push("hello", wat::parse_str(HELLO).unwrap(), "application/wasm").await;
    push(
        "comp",
        wat::parse_str(component(0)).unwrap(),
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    )
    .await;
    let container = push(
        "container",
        vec![0x1f, 0x8b, 0, 0],
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )
    .await;
    let entry = |(digest, size): &(String, i64), os: &str, arch: &str| ImageIndexEntry {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: digest.clone(),
        size: *size,
        platform: Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            os_version: None,
            os_features: None,
            variant: None,
            features: None,
        }),
        annotations: None,
    };
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.index.v1+json".into()),
        manifests: vec![
            entry(&container, "linux", "amd64"),
            entry(&hello, "wasip1", "wasm32"),
        ],
        artifact_type: None,
        annotations: None,
    };
    client
        .push_manifest_list(
            &format!("{reg}/wk-test:multi").parse().unwrap(),
            &A::Anonymous,
            index,
        )
        .await
        .unwrap();

    let root = Root::new("registry");
    let provider = WasmtimeProvider::new(root.0.clone()).unwrap();
    for tag in ["hello", "comp", "multi"] {
        let info = provider
            .pull_image(&format!("{reg}/wk-test:{tag}"), &[])
            .await
            .unwrap();
        assert!(info.digest.starts_with("sha256:") && info.size > 0);
    }
    match provider
        .pull_image(&format!("{reg}/wk-test:container"), &[])
        .await
    {
        Err(ProviderError::UnsupportedImage(m)) => assert!(m.contains("tar+gzip"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        provider
            .pull_image(&format!("{reg}/wk-test:missing"), &[])
            .await,
        Err(ProviderError::ImageNotFound { .. })
    ));
    drop(provider);

    let provider = WasmtimeProvider::new(root.0.clone()).unwrap();
    assert!(
        provider
            .image_status(&format!("{reg}/wk-test:multi"))
            .await
            .is_some(),
        "the index survives a restart"
    );
    provider
        .run_pod_sandbox(&SandboxConfig {
            pod_uid: POD.into(),
            namespace: "default".into(),
            name: "p".into(),
            pod_dir: root.0.join("pod"),
            runtime_handler: None,
            host_network: false,
        })
        .await
        .unwrap();
    for tag in ["multi", "comp"] {
        let mut cfg = config(&root.0, tag);
        cfg.image = format!("{reg}/wk-test:{tag}");
        assert_eq!(run(&provider, cfg).await, (0, ExitReason::Completed, None));
    }
}

// --- exec -------------------------------------------------------------------------------------

/// One program, five behaviours chosen by argc, so a container (argc 1: sleeps an hour) can be
/// exec'd into with each of the others:
/// - argc 2: copies stdin to stdout, then `done` on stderr; exits argc * 10 + envc;
/// - argc 3: `tick` on stdout, then spins forever;
/// - argc 4: traps (`unreachable`);
/// - argc 5: grows its memory until it cannot.
const MULTI: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "tick\n")
  (data (i32.const 208) "done\n")
  ;; Writes len bytes at ptr to fd (iovec at 100).
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 100) (local.get $ptr))
    (i32.store (i32.const 104) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 100) (i32.const 1) (i32.const 112))))
  (func $sleep_an_hour
    ;; One clock subscription at 256 (monotonic, 3600 s relative); the event goes to 320.
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const 3600000000000))
    (drop (call $poll (i32.const 256) (i32.const 320) (i32.const 1) (i32.const 360))))
  (func $echo
    (block $done
      (loop $copy
        (i32.store (i32.const 120) (i32.const 1024))
        (i32.store (i32.const 124) (i32.const 4096))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 120) (i32.const 1) (i32.const 128)))
        (br_if $done (i32.eqz (i32.load (i32.const 128))))
        (call $write (i32.const 1) (i32.const 1024) (i32.load (i32.const 128)))
        (br $copy)))
    (call $write (i32.const 2) (i32.const 208) (i32.const 5)))
  (func $unreachable unreachable)
  (func (export "_start")
    (local $argc i32)
    (drop (call $args (i32.const 0) (i32.const 4)))
    (drop (call $env (i32.const 8) (i32.const 12)))
    (local.set $argc (i32.load (i32.const 0)))
    (if (i32.eq (local.get $argc) (i32.const 1)) (then (call $sleep_an_hour) (return)))
    (if (i32.eq (local.get $argc) (i32.const 2)) (then
      (call $echo)
      (call $exit (i32.add (i32.mul (local.get $argc) (i32.const 10)) (i32.load (i32.const 8))))))
    (if (i32.eq (local.get $argc) (i32.const 3)) (then
      (call $write (i32.const 1) (i32.const 200) (i32.const 5))
      (loop $spin (br $spin))))
    (if (i32.eq (local.get $argc) (i32.const 4)) (then (call $unreachable)))
    (loop $grow (drop (memory.grow (i32.const 1))) (br $grow))))"#;

/// An `AsyncWrite` whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn argv_of(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Exec's streams: `stdin` if given, stdout and stderr captured.
fn exec_io(stdin: Option<&'static [u8]>, timeout: Option<Duration>) -> (ExecIo, Capture, Capture) {
    let (out, err) = (Capture::default(), Capture::default());
    let stdin = stdin.map(|bytes| {
        Box::pin(std::io::Cursor::new(bytes)) as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>
    });
    (
        ExecIo {
            stdin,
            stdout: Box::pin(out.clone()),
            stderr: Box::pin(err.clone()),
            timeout,
        },
        out,
        err,
    )
}

/// A provider with a running MULTI container (env A=1, optionally a memory limit); returns its id.
async fn running_multi(root: &Path, memory_limit: Option<u64>) -> (WasmtimeProvider, String) {
    let provider = provider_with(root, MULTI).await;
    let mut cfg = config(root, "multi");
    cfg.env = vec![("A".into(), "1".into())];
    cfg.memory_limit_bytes = memory_limit;
    let id = provider.create_container(POD, cfg).await.unwrap();
    provider.start_container(&id).await.unwrap();
    (provider, id)
}

#[tokio::test]
async fn exec_runs_a_new_instance_with_the_callers_stdio_and_exit_code() {
    let root = Root::new("exec-echo");
    let (provider, id) = running_multi(&root.0, None).await;
    let (io, out, err) = exec_io(Some(b"hello exec\n"), None);
    // argc 2 * 10 + the container's one env var.
    assert_eq!(
        provider
            .exec(&id, argv_of(&["echo", "x"]), io)
            .await
            .unwrap(),
        21
    );
    assert_eq!(out.text(), "hello exec\n");
    assert_eq!(err.text(), "done\n");
    // No stdin: the guest reads end of file at once.
    let (io, out, _) = exec_io(None, None);
    assert_eq!(
        provider
            .exec(&id, argv_of(&["echo", "x"]), io)
            .await
            .unwrap(),
        21
    );
    assert_eq!(out.text(), "");
    // The container still runs, and exec output never reached its log.
    assert!(matches!(
        state_of(&provider, &id).await,
        ContainerState::Running { .. }
    ));
    let log = std::fs::read_to_string(config(&root.0, "multi").log_path).unwrap_or_default();
    assert!(!log.contains("hello") && !log.contains("done"), "{log}");
}

#[tokio::test]
async fn exec_output_streams_and_a_timeout_interrupts_the_instance() {
    let root = Root::new("exec-timeout");
    let (provider, id) = running_multi(&root.0, None).await;
    let (writer, mut reader) = tokio::io::duplex(64);
    let (err, timeout) = (Capture::default(), Duration::from_millis(300));
    let io = ExecIo {
        stdin: None,
        stdout: Box::pin(writer),
        stderr: Box::pin(err.clone()),
        timeout: Some(timeout),
    };
    let started = Instant::now();
    let exec = provider.exec(&id, argv_of(&["spin", "a", "b"]), io);
    let read_tick = async {
        use tokio::io::AsyncReadExt;
        let mut tick = [0u8; 5];
        reader.read_exact(&mut tick).await.unwrap();
        (tick, started.elapsed())
    };
    let (result, (tick, seen_after)) = tokio::join!(exec, read_tick);
    let took = started.elapsed();
    assert_eq!(&tick, b"tick\n");
    assert!(
        seen_after < timeout,
        "stdout arrived only after {seen_after:?}: not streamed"
    );
    match result {
        Err(ProviderError::Timeout(message)) => assert!(
            message.contains("timed out") && message.contains("spin"),
            "{message}"
        ),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "the timed-out exec took {took:?}"
    );
    assert!(
        matches!(
            state_of(&provider, &id).await,
            ContainerState::Running { .. }
        ),
        "the timeout hit the container"
    );
}

#[tokio::test]
async fn a_timeout_ends_an_exec_blocked_on_a_caller_that_does_not_read() {
    let root = Root::new("exec-stuck");
    let (provider, id) = running_multi(&root.0, None).await;
    // The echo copies 1 MiB of stdin into a 64-byte pipe nobody reads: its write blocks.
    let (writer, _unread) = tokio::io::duplex(64);
    let stdin = Box::pin(std::io::Cursor::new(vec![b'x'; 1 << 20]));
    let timeout = Duration::from_millis(200);
    let io = ExecIo {
        stdin: Some(stdin),
        stdout: Box::pin(writer),
        stderr: Box::pin(Capture::default()),
        timeout: Some(timeout),
    };
    let started = Instant::now();
    assert!(matches!(
        provider.exec(&id, argv_of(&["echo", "x"]), io).await,
        Err(ProviderError::Timeout(_))
    ));
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "took {took:?}"
    );
}

#[tokio::test]
async fn exec_maps_traps_and_the_memory_limit_like_the_container() {
    let root = Root::new("exec-trap");
    let (provider, id) = running_multi(&root.0, Some(1 << 20)).await;
    let (io, _, err) = exec_io(None, Some(Duration::from_secs(10)));
    assert_eq!(
        provider
            .exec(&id, argv_of(&["trap", "a", "b", "c"]), io)
            .await
            .unwrap(),
        1
    );
    let line = err.text();
    assert!(
        line.contains("unreachable") && line.ends_with('\n') && line.lines().count() == 1,
        "{line:?}"
    );
    let (io, _, err) = exec_io(None, Some(Duration::from_secs(10)));
    assert_eq!(
        provider
            .exec(&id, argv_of(&["grow", "a", "b", "c", "d"]), io)
            .await
            .unwrap(),
        137
    );
    assert!(
        err.text()
            .contains("memory limit of 1048576 bytes exceeded"),
        "{}",
        err.text()
    );
}

#[tokio::test]
async fn exec_needs_a_command_and_a_running_container() {
    let root = Root::new("exec-state");
    let (provider, running) = running_multi(&root.0, None).await;
    assert!(
        matches!(provider.exec(&running, vec![], exec_io(None, None).0).await, Err(ProviderError::Exec(m)) if m.contains("empty"))
    );
    assert!(matches!(
        provider
            .exec("no-such-id", argv_of(&["x"]), exec_io(None, None).0)
            .await,
        Err(ProviderError::NotFound(_))
    ));
    let created = provider
        .create_container(POD, config(&root.0, "created"))
        .await
        .unwrap();
    match provider
        .exec(&created, argv_of(&["echo", "x"]), exec_io(None, None).0)
        .await
    {
        Err(ProviderError::Exec(m)) => assert!(m.contains("Created, not Running"), "{m}"),
        other => panic!("{other:?}"),
    }
    provider
        .stop_container(&running, Duration::ZERO)
        .await
        .unwrap();
    match provider
        .exec(&running, argv_of(&["echo", "x"]), exec_io(None, None).0)
        .await
    {
        Err(ProviderError::Exec(m)) => assert!(m.contains("Exited, not Running"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn stopping_the_container_ends_its_execs() {
    let root = Root::new("exec-stop");
    let (provider, id) = running_multi(&root.0, None).await;
    let (io, _, err) = exec_io(None, None);
    let exec = provider.exec(&id, argv_of(&["spin", "a", "b"]), io);
    let stop = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        provider.stop_container(&id, Duration::ZERO).await
    };
    let (code, stopped) = tokio::join!(exec, stop);
    stopped.unwrap();
    assert_eq!(code.unwrap(), 137);
    assert!(err.text().contains("container stopped"), "{}", err.text());
}

#[tokio::test]
async fn exec_sync_returns_the_code_and_the_capped_output() {
    let root = Root::new("exec-sync");
    let (provider, id) = running_multi(&root.0, None).await;
    assert_eq!(
        provider
            .exec_sync(&id, argv_of(&["echo", "x"]), Duration::from_secs(10))
            .await
            .unwrap(),
        (21, b"done\n".to_vec())
    );
    let started = Instant::now();
    assert!(matches!(
        provider
            .exec_sync(
                &id,
                argv_of(&["spin", "a", "b"]),
                Duration::from_millis(100)
            )
            .await,
        Err(ProviderError::Timeout(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// The toolbox example as a pod would run it: the container sleeps, execs are its applets.
/// Build it first: `deploy/build-examples`, then
/// `cargo test -p provider-wasmtime -- --ignored toolbox`.
#[tokio::test]
#[ignore = "needs target/wasm-examples/wasm32-wasip1/release/toolbox.wasm (deploy/build-examples)"]
async fn exec_into_the_toolbox_example() {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm-examples/wasm32-wasip1/release/toolbox.wasm");
    let bytes = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e}; run deploy/build-examples", wasm.display()));
    let root = Root::new("exec-toolbox");
    let provider = WasmtimeProvider::new(root.0.clone()).unwrap();
    provider
        .images
        .import("127.0.0.1:5000/test:v1", &bytes)
        .unwrap();
    provider
        .run_pod_sandbox(&SandboxConfig {
            pod_uid: POD.into(),
            namespace: "default".into(),
            name: "p".into(),
            pod_dir: root.0.join("pod"),
            runtime_handler: None,
            host_network: false,
        })
        .await
        .unwrap();
    let (data, config_dir) = (root.0.join("data"), root.0.join("config"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("key"), "value\n").unwrap();
    let mut cfg = config(&root.0, "toolbox");
    cfg.command = argv_of(&["sleep", "3600"]);
    cfg.env = vec![("GREETING".into(), "hi".into())];
    cfg.mounts = vec![
        Mount {
            host_path: data.clone(),
            container_path: "/data".into(),
            read_only: false,
        },
        Mount {
            host_path: config_dir,
            container_path: "/config".into(),
            read_only: true,
        },
    ];
    let id = provider.create_container(POD, cfg).await.unwrap();
    provider.start_container(&id).await.unwrap();
    let exec = |words: &'static [&'static str]| {
        provider.exec_sync(&id, argv_of(words), Duration::from_secs(10))
    };

    assert_eq!(exec(&["echo", "hi"]).await.unwrap(), (0, b"hi\n".to_vec()));
    assert_eq!(
        exec(&["toolbox", "echo", "a", "b"]).await.unwrap(),
        (0, b"a b\n".to_vec())
    );
    assert_eq!(exec(&["test", "-e", "/nonexistent"]).await.unwrap().0, 1);
    assert_eq!(exec(&["test", "-d", "/data"]).await.unwrap().0, 0);
    assert_eq!(
        exec(&["write", "/data/note", "written", "by", "exec"])
            .await
            .unwrap(),
        (0, vec![])
    );
    assert_eq!(
        std::fs::read_to_string(data.join("note")).unwrap(),
        "written by exec\n"
    );
    assert_eq!(
        exec(&["ls", "/data"]).await.unwrap(),
        (0, b"note\n".to_vec())
    );
    assert_eq!(
        exec(&["cat", "/config/key", "/data/note"]).await.unwrap(),
        (0, b"value\nwritten by exec\n".to_vec())
    );
    let (code, output) = exec(&["write", "/config/key", "x"]).await.unwrap();
    let output = String::from_utf8_lossy(&output);
    assert!(
        code == 1 && output.starts_with("toolbox: write: cannot write /config/key: "),
        "{code} {output}"
    );
    assert_eq!(
        std::fs::read_to_string(root.0.join("config/key")).unwrap(),
        "value\n"
    );
    assert_eq!(
        exec(&["env"]).await.unwrap(),
        (0, b"GREETING=hi\n".to_vec())
    );
    assert_eq!(exec(&["false"]).await.unwrap().0, 1);
    let (code, usage) = exec(&["nope"]).await.unwrap();
    assert!(
        code == 2 && String::from_utf8_lossy(&usage).contains("usage: toolbox APPLET"),
        "{code}"
    );
    assert_eq!(
        exec(&["/bin/true"]).await.unwrap().0,
        0,
        "argv[0] is dispatched on its basename"
    );
    // The exec streams stdin too: cat with no file copies it.
    let (io, out, _) = exec_io(Some(b"from stdin\n"), Some(Duration::from_secs(10)));
    assert_eq!(provider.exec(&id, argv_of(&["cat"]), io).await.unwrap(), 0);
    assert_eq!(out.text(), "from stdin\n");
    let started = Instant::now();
    assert!(matches!(exec(&["sleep", "0.05"]).await, Ok((0, _))));
    assert!(started.elapsed() >= Duration::from_millis(50));
}
