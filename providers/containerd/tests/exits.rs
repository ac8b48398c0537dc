//! An exited container's status lives in its containerd container record and its task is
//! deleted (`src/exit.rs`): an agent that died after recording an exit but before deleting the
//! task leaves an exited task behind, which the next provider instance deletes at start-up,
//! keeping the exit that was recorded (not re-reading it).

mod common;

use std::time::{Duration, SystemTime};

use common::{
    busybox_image, cluster_var, connect, ctr, one_case_fixture, start_containerd, Cleanup, TempDir,
};
use provider_api::conformance::{self, Case, Fixture};
use provider_api::{ContainerState, ExitReason, Provider};
use provider_containerd::ProviderOptions;

fn fixture(image: &str, work: &std::path::Path) -> Fixture {
    let sleeper = Case {
        image: image.into(),
        command: vec!["sleep".into(), "100000".into()],
        args: vec![],
    };
    one_case_fixture(sleeper, work)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_recorded_before_a_crash_is_kept_and_its_task_deleted_at_the_next_start() {
    let registry = cluster_var("REGISTRY").expect("REGISTRY (set LOCAL_CLUSTER_DIR)");
    let image = busybox_image(&registry);
    let (socket, _containerd) = start_containerd();
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("ctd-exits-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let _work = TempDir(work.clone());
    let namespace = format!("exits-{pid}");
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    options.log_driver = Some(env!("CARGO_BIN_EXE_container-log").into());
    let _cleanup = Cleanup(options.clone());

    // The first instance runs a container, then goes with its runtime (its exit watcher too),
    // as with an agent killed.
    let (first_options, first_image, first_work) = (options.clone(), image.clone(), work.clone());
    let (id, sandbox) = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let p = connect(&first_options).await;
            let fx = fixture(&first_image, &first_work);
            p.pull_image(&first_image, &[]).await.expect("pull");
            let sandbox = conformance::sandbox(&p, &fx).await;
            let config = conformance::config(&fx, "recorded", &fx.ignores_stop);
            let id = conformance::run(&p, &fx, &sandbox, config).await;
            conformance::wait_state(&p, &fx, &id, "Running", |s| {
                matches!(s, ContainerState::Running { .. })
            })
            .await;
            (id, sandbox)
        })
    })
    .join()
    .unwrap();

    // It exits (SIGKILL: 137) with no provider watching; then the exit as a provider that died
    // between recording and deleting left it: recorded (a code and a time of the test's, so
    // it shows which one is reported), the task still there.
    ctr(&options, &["tasks", "kill", "-s", "SIGKILL", &id]);
    let deadline = tokio::time::Instant::now() + conformance::WAIT;
    while !ctr(&options, &["tasks", "list"])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
    {
        assert!(tokio::time::Instant::now() < deadline, "the task to stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finished = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    ctr(
        &options,
        &[
            "containers",
            "label",
            &id,
            "io.wasm-kubelet/exit-code=9",
            "io.wasm-kubelet/finished-at=1700000000000000000",
            "io.wasm-kubelet/oom=false",
        ],
    );

    let second = connect(&options).await;
    assert_eq!(
        ctr(&options, &["tasks", "list", "-q"]).trim(),
        "",
        "the exited task is deleted at start-up"
    );
    let listed = second.list_containers().await.expect("list");
    let state = listed
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.state)
        .expect("the container is listed");
    match state {
        ContainerState::Exited {
            exit_code,
            finished_at,
            reason,
            ..
        } => assert_eq!(
            (exit_code, finished_at, reason),
            (9, finished, ExitReason::Error),
            "the recorded exit, not the task's"
        ),
        other => panic!("{other:?}"),
    }
    // It ran: it is not started again.
    assert!(second.start_container(&id).await.is_err());
    second.remove_container(&id).await.expect("remove");
    second
        .remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .expect("remove sandbox");
}
