//! Exec and usage beyond the conformance suite, as a hostile pod would probe them: an exec
//! process has exactly the container's privileges and cgroup (no more than its PID 1), a
//! timed-out exec leaves no process behind, and the usage the provider lists is the
//! container's own cgroup's.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    busybox_image, cluster_var, connect, one_case_fixture, start_containerd, Cleanup, OwnContainerd,
};
use provider_api::conformance::{self, Case, Fixture};
use provider_api::{ContainerState, Provider, ProviderError};
use provider_containerd::{ContainerdProvider, ProviderOptions};

struct Env {
    p: ContainerdProvider,
    fx: Fixture,
    image: String,
    options: ProviderOptions,
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
    // The log driver containerd's shim runs, as the agent's `container-log` subcommand.
    options.log_driver = Some(env!("CARGO_BIN_EXE_container-log").into());
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
        options,
        _cleanup: cleanup,
        _containerd: containerd,
        _work: common::TempDir(work),
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

async fn exec_ok(p: &dyn Provider, id: &str, command: Vec<String>) -> String {
    let (result, out, err) = conformance::exec_collect(p, id, command.clone(), None, None).await;
    assert_eq!(result, Ok(0), "exec {command:?}: stderr {err:?}");
    out
}

#[tokio::test]
async fn exec_has_the_containers_privileges_and_cgroup_and_a_timeout_leaves_nothing() {
    let e = env("exec-priv").await;
    let sandbox = conformance::sandbox(&e.p, &e.fx).await;
    let id = conformance::run(
        &e.p,
        &e.fx,
        &sandbox,
        conformance::config(&e.fx, "target", &e.fx.ignores_stop),
    )
    .await;
    conformance::wait_state(&e.p, &e.fx, &id, "Running", |s| {
        matches!(s, ContainerState::Running { .. })
    })
    .await;

    // What the kernel says of the exec's own process and of the container's PID 1.
    let fields = [
        "Uid:",
        "Gid:",
        "CapInh:",
        "CapPrm:",
        "CapEff:",
        "CapBnd:",
        "CapAmb:",
        "NoNewPrivs:",
        "Seccomp:",
    ];
    let status = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| fields.iter().any(|f| l.starts_with(f)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let own = status(&exec_ok(&e.p, &id, sh("cat /proc/self/status")).await);
    let init = status(&exec_ok(&e.p, &id, sh("cat /proc/1/status")).await);
    assert_eq!(own.len(), fields.len(), "{own:?}");
    assert_eq!(own, init, "the exec's privileges are the container's");
    assert!(
        own.contains(&"NoNewPrivs: 1".to_string()),
        "noNewPrivileges holds for execs: {own:?}"
    );
    let own_cgroup = exec_ok(&e.p, &id, sh("cat /proc/self/cgroup")).await;
    let init_cgroup = exec_ok(&e.p, &id, sh("cat /proc/1/cgroup")).await;
    assert_eq!(
        own_cgroup, init_cgroup,
        "the exec runs in the container's cgroup"
    );
    assert!(own_cgroup.contains(&id), "{own_cgroup}");
    // The container's env and working dir.
    let env = exec_ok(&e.p, &id, sh("env; pwd")).await;
    assert!(env.lines().any(|l| l == "CONFORMANCE=1"), "{env}");

    // A timed-out exec is killed: nothing of it is left in the container.
    let (result, _, _) = conformance::exec_collect(
        &e.p,
        &id,
        vec!["sleep".into(), "99999".into()],
        None,
        Some(Duration::from_secs(1)),
    )
    .await;
    assert!(
        matches!(result, Err(ProviderError::Timeout(_))),
        "{result:?}"
    );
    let left = exec_ok(&e.p, &id, sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")).await;
    assert!(
        !left.contains("99999"),
        "the timed-out exec still runs: {left:?}"
    );

    // A timed-out shell is killed with what it started (its process group).
    let (result, _, _) = conformance::exec_collect(
        &e.p,
        &id,
        sh("sleep 88888; echo never"),
        None,
        Some(Duration::from_secs(1)),
    )
    .await;
    assert!(
        matches!(result, Err(ProviderError::Timeout(_))),
        "{result:?}"
    );
    let left = exec_ok(&e.p, &id, sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")).await;
    assert!(
        !left.contains("88888"),
        "the timed-out exec's child still runs: {left:?}"
    );

    // A command that leaves a process holding its stdout still ends (its output is cut).
    let left_behind =
        conformance::exec_collect(&e.p, &id, sh("sleep 77777 & echo started"), None, None);
    let (result, out, _) = tokio::time::timeout(conformance::WAIT, left_behind)
        .await
        .expect("an exec whose background process holds its stdout returns");
    assert_eq!((result, out.as_str()), (Ok(0), "started\n"));

    // A command that cannot run is an Exec error naming it.
    let (result, _, _) =
        conformance::exec_collect(&e.p, &id, vec!["/no/such/program".into()], None, None).await;
    assert!(
        matches!(&result, Err(ProviderError::Exec(m)) if m.contains("/no/such/program")),
        "{result:?}"
    );

    e.p.remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .expect("remove sandbox");
}

fn cgroup_file(options: &ProviderOptions, controller: &str, id: &str, file: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(options.cgroup_parent.trim_start_matches('/'))
        .join(id)
        .join(file)
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn usage_is_the_containers_cgroup() {
    let e = env("usage").await;
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("cgroup v2: this check reads cgroup v1 files; skipped");
        return;
    }
    let sandbox = conformance::sandbox(&e.p, &e.fx).await;
    // 2^24 bytes in a shell variable, then a busy loop: 16 MiB and more in use, CPU time
    // growing.
    let case = Case {
        image: e.image.clone(),
        command: sh(
            r#"a=x; i=0; while [ $i -lt 24 ]; do a="$a$a"; i=$((i+1)); done; echo ready; while true; do :; done"#,
        ),
        args: vec![],
    };
    let config = conformance::config(&e.fx, "usage", &case);
    let log = config.log_path.clone();
    let id = conformance::run(&e.p, &e.fx, &sandbox, config).await;
    conformance::wait_log_line(&e.fx, &log, " stdout F ready").await;
    let cpu_file = cgroup_file(&e.options, "cpuacct", &id, "cpuacct.usage");
    let before = read_u64(&cpu_file);
    let listed = e.p.list_containers().await.expect("list");
    let after = read_u64(&cpu_file);
    let usage = listed
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.usage)
        .expect("listed");
    assert!(
        before <= usage.cpu_nanos && usage.cpu_nanos <= after,
        "the listed CPU time {} is the cgroup's (read {before} before and {after} after)",
        usage.cpu_nanos
    );
    let usage_in_bytes = read_u64(&cgroup_file(
        &e.options,
        "memory",
        &id,
        "memory.usage_in_bytes",
    ));
    assert!(
        usage.memory_bytes >= 16 << 20 && usage.memory_bytes <= usage_in_bytes + (16 << 20),
        "the working set {} holds the 16 MiB string and is near the cgroup's usage {usage_in_bytes}",
        usage.memory_bytes
    );
    e.p.stop_container(&id, Duration::ZERO).await.expect("stop");
    let listed = e.p.list_containers().await.expect("list");
    let stopped = listed.iter().find(|c| c.id == id).expect("listed");
    assert_eq!(
        stopped.usage,
        Default::default(),
        "an exited container uses nothing now"
    );
    e.p.remove_pod_sandbox(&sandbox, Duration::ZERO)
        .await
        .expect("remove sandbox");
}
