//! The log driver containerd's shim runs per container (`binary://`, `src/log_driver.rs`), as
//! the provider uses it: it is the shim's child (so it outlives the agent) and goes with the
//! task; an attached client of a container without stdin follows the log it writes; and a log
//! path that is a symbolic link is refused before anything is written through it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    busybox_image, cluster_var, connect, one_case_fixture, start_containerd, Cleanup, OwnContainerd,
};
use provider_api::conformance::{self, Case, Fixture};
use provider_api::{AttachIo, ContainerState, Provider};
use provider_containerd::{ContainerdProvider, ProviderOptions};
use tokio::io::AsyncReadExt;

/// How long a condition below is waited for before the test fails.
const WAIT: Duration = Duration::from_secs(60);

const DRIVER: &str = env!("CARGO_BIN_EXE_container-log");

struct Env {
    p: ContainerdProvider,
    fx: Fixture,
    image: String,
    _cleanup: Cleanup,
    _containerd: Option<OwnContainerd>,
    _work: common::TempDir,
}

async fn env(test: &str) -> Env {
    let registry = cluster_var("REGISTRY").expect("REGISTRY (set LOCAL_CLUSTER_DIR)");
    let image = busybox_image(&registry);
    let (socket, containerd) = start_containerd();
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("ctd-{test}-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let namespace = format!("{test}-{pid}");
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    options.log_driver = Some(DRIVER.into());
    let cleanup = Cleanup(options.clone());
    let p = connect(&options).await;
    let sleeper = Case {
        image: image.clone(),
        command: vec!["sleep".into(), "100000".into()],
        args: vec![],
    };
    let fx = one_case_fixture(sleeper, &work);
    p.pull_image(&image, &[]).await.expect("pull");
    Env {
        p,
        fx,
        image,
        _cleanup: cleanup,
        _containerd: containerd,
        _work: common::TempDir(work),
    }
}

fn sh(image: &str, script: &str) -> Case {
    Case {
        image: image.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        args: vec![],
    }
}

/// Polls `check` until it is `Some` or [`WAIT`] passes (then panics naming `what`).
async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        // A poll interval: the loop ends on the condition.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processes whose environment holds `CONTAINER_ID=<id>` (what the shim gives the
/// driver): (pid, argv, parent pid).
fn drivers_of(id: &str) -> Vec<(u32, Vec<String>, u32)> {
    let want = format!("CONTAINER_ID={id}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            continue;
        }
        let argv = std::fs::read(entry.path().join("cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        found.push((pid, argv, parent_of(pid)));
    }
    found
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test]
async fn the_driver_is_the_shims_child_and_goes_with_the_task() {
    let e = env("logdrv-owner").await;
    let sandbox = conformance::sandbox(&e.p, &e.fx).await;
    let config = conformance::config(
        &e.fx,
        "owned",
        &sh(&e.image, "echo started; exec sleep 100000"),
    );
    let log = config.log_path.clone();
    let id = conformance::run(&e.p, &e.fx, &sandbox, config).await;
    conformance::wait_log_line(&e.fx, &log, " stdout F started").await;
    let drivers = drivers_of(&id);
    assert_eq!(drivers.len(), 1, "one driver per container: {drivers:?}");
    let (pid, argv, parent) = &drivers[0];
    assert_eq!(
        argv,
        &vec![
            DRIVER.to_string(),
            "container-log".to_string(),
            log.display().to_string()
        ],
        "the shim runs `<driver> container-log <log path>`"
    );
    assert!(
        comm_of(*parent).starts_with("containerd-shim"),
        "driver {pid}'s parent {parent} is {:?}, not the shim: it would not outlive the agent",
        comm_of(*parent)
    );
    assert_ne!(*parent, std::process::id());

    e.p.stop_container(&id, Duration::from_secs(1))
        .await
        .unwrap();
    conformance::remove(&e.p, &e.fx, &id).await;
    wait_until("the driver to end with the task", || {
        drivers_of(&id).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn attach_without_stdin_follows_the_log_until_the_exit() {
    let e = env("logdrv-attach").await;
    let sandbox = conformance::sandbox(&e.p, &e.fx).await;
    let config = conformance::config(
        &e.fx,
        "ticker",
        &sh(
            &e.image,
            "i=0; while [ ! -e /tmp/stop ]; do echo tick $i; echo tock $i >&2; \
             i=$((i+1)); sleep 0.1; done; echo bye",
        ),
    );
    let log = config.log_path.clone();
    let id = conformance::run(&e.p, &e.fx, &sandbox, config).await;
    conformance::wait_state(&e.p, &e.fx, &id, "Running", |s| {
        matches!(s, ContainerState::Running { .. })
    })
    .await;

    // Each stream into a buffer the test can look at while the attach goes on.
    let seen =
        |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let mut writers = Vec::new();
    let mut buffers = Vec::new();
    for _ in 0..2 {
        let (writer, mut reader) = tokio::io::duplex(64 * 1024);
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 4096];
            while let Ok(n) = reader.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        writers.push(writer);
        buffers.push(buf);
    }
    let (err_w, out_w) = (writers.pop().unwrap(), writers.pop().unwrap());
    let (err, out) = (buffers.pop().unwrap(), buffers.pop().unwrap());
    let attach = e.p.attach(
        &id,
        AttachIo {
            stdin: None,
            stdout: Some(Box::pin(out_w)),
            stderr: Some(Box::pin(err_w)),
        },
    );
    let stop = async {
        wait_until(
            "ticks on the attached stdout and tocks on its stderr",
            || {
                (seen(&out).matches("tick ").count() >= 2 && seen(&err).contains("tock "))
                    .then_some(())
            },
        )
        .await;
        let (result, _, stderr) = conformance::exec_collect(
            &e.p,
            &id,
            vec!["touch".into(), "/tmp/stop".into()],
            None,
            None,
        )
        .await;
        assert_eq!(result, Ok(0), "{stderr}");
    };
    let (attached, ()) = tokio::join!(tokio::time::timeout(WAIT * 2, attach), stop);
    attached
        .expect("the attach ends by itself after the container's exit")
        .expect("attach");
    // The copies into the buffers see the writers' end.
    wait_until("the attached streams to end", || {
        (Arc::strong_count(&out) == 1 && Arc::strong_count(&err) == 1).then_some(())
    })
    .await;

    let (out, err) = (seen(&out), seen(&err));
    let out_lines: Vec<&str> = out.lines().collect();
    assert_eq!(out_lines.last(), Some(&"bye"), "stdout to the end: {out:?}");
    let ticks: Vec<u32> = out_lines[..out_lines.len() - 1]
        .iter()
        .map(|l| {
            l.strip_prefix("tick ")
                .expect("only ticks")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "every tick from the attach on, in order, none on stderr: {ticks:?}"
    );
    let tocks: Vec<u32> = err
        .lines()
        .map(|l| {
            l.strip_prefix("tock ")
                .expect("only tocks")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        !tocks.is_empty() && tocks.windows(2).all(|w| w[1] == w[0] + 1),
        "stderr, in order: {tocks:?}"
    );
    conformance::wait_log_line(&e.fx, &log, " stdout F bye").await;
}

#[tokio::test]
async fn a_symlink_as_the_log_is_refused() {
    let e = env("logdrv-symlink").await;
    let sandbox = conformance::sandbox(&e.p, &e.fx).await;
    let target: PathBuf = e.fx.work_dir.join("not-a-log");
    std::fs::write(&target, b"").unwrap();
    let config = conformance::config(&e.fx, "linked", &sh(&e.image, "echo through"));
    std::fs::create_dir_all(config.log_path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &config.log_path).unwrap();
    let id = e.p.create_container(&sandbox, config).await.unwrap();
    let started = e.p.start_container(&id).await;
    let message = format!("{:?}", started.expect_err("a symlinked log is refused"));
    assert!(
        message.contains("opening log"),
        "the error names the log: {message}"
    );
    assert!(drivers_of(&id).is_empty(), "no task, no driver");
    assert_eq!(
        std::fs::read(Path::new(&target)).unwrap(),
        b"",
        "nothing written through the link"
    );
}
