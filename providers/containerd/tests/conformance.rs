//! The provider conformance suite (provider-api's `conformance` feature) against a real
//! containerd and runc, with busybox images deploy/build-images pushes to the local cluster's
//! registry.
//!
//! containerd: the cluster's (`LC_CONTAINERD_SOCKET`, from the environment or the cluster's env
//! file) in a namespace of this test's own, or, when there is none, one this test starts under
//! a temporary directory and stops by PID. Needs root (containerd and runc do).

mod common;

use common::{busybox_image, cluster_var, connect, start_containerd, Cleanup, Setup, TempDir};
use provider_api::conformance::{self, Case, Fixture};
use provider_api::Provider;
use provider_containerd::ProviderOptions;

fn setup(test: &str) -> Setup {
    let registry = cluster_var("REGISTRY").expect(
        "the local cluster's registry: set LOCAL_CLUSTER_DIR (its env file names REGISTRY) or REGISTRY",
    );
    let image = busybox_image(&registry);
    let (socket, containerd) = start_containerd();
    let work = std::env::temp_dir().join(format!("ctd-conf-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let namespace = format!("conformance-{test}-{}", std::process::id());
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    // The log driver containerd's shim runs, as the agent's `container-log` subcommand.
    options.log_driver = Some(env!("CARGO_BIN_EXE_container-log").into());
    let sh = |script: &str, args: &[&str]| Case {
        image: image.clone(),
        command: ["sh", "-c", script]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect(),
        args: vec![],
    };
    let prints = {
        let image = image.clone();
        move |code: i32| {
            let line = format!("conformance says {code}");
            let case = Case {
                image: image.clone(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    r#"echo "$0"; exit "$1""#.into(),
                    line.clone(),
                    code.to_string(),
                ],
                args: vec![],
            };
            (case, line)
        }
    };
    let fixture = Fixture {
        prints_and_exits: Box::new(prints),
        ends_when_asked: Some(sh("trap 'exit 42' TERM; while true; do sleep 1; done", &[])),
        term_exit_code: 42,
        // PID 1 of its namespace with no handler: the kernel drops SIGTERM for it.
        ignores_stop: Case {
            image: image.clone(),
            command: vec!["sleep".into(), "100000".into()],
            args: vec![],
        },
        // Doubles a shell string until the limit ends it.
        memory_hog: sh(r#"a=x; while true; do a="$a$a"; done"#, &[]),
        memory_limit: 32 << 20,
        auth: vec![],
        work_dir: work.clone(),
        name: "containerd".into(),
    };
    Setup {
        cleanup: Cleanup(options.clone()),
        options,
        fixture,
        containerd,
        work: TempDir(work),
    }
}

#[tokio::test]
async fn pull() {
    let s = setup("pull");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
}

#[tokio::test]
async fn exit_codes_and_logs() {
    let s = setup("exit");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_exit_codes_and_logs(&p, &s.fixture).await;
}

#[tokio::test]
async fn stop_with_grace() {
    let s = setup("stop");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_stop_with_grace(&p, &s.fixture).await;
}

#[tokio::test]
async fn memory_limit() {
    let s = setup("oom");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_memory_limit(&p, &s.fixture).await;
}

#[tokio::test]
async fn list_after_restart() {
    let s = setup("restart");
    let first = connect(&s.options).await;
    conformance::check_pull(&first, &s.fixture).await;
    let reopen = || async { Box::new(connect(&s.options).await) as Box<dyn Provider> };
    conformance::check_list_after_restart(&first, reopen, &s.fixture).await;
}

fn exec_fixture(s: &Setup) -> conformance::ExecFixture {
    conformance::ExecFixture {
        target: s.fixture.ignores_stop.clone(),
        echo: Box::new(|line| vec!["echo".into(), line.into()]),
        fails: (vec!["sh".into(), "-c".into(), "exit 3".into()], 3),
        cat: vec!["cat".into()],
        sleeps: vec!["sleep".into(), "100000".into()],
    }
}

fn busybox(s: &Setup, command: &[&str]) -> Case {
    Case {
        image: s.fixture.ignores_stop.image.clone(),
        command: command.iter().map(|c| c.to_string()).collect(),
        args: vec![],
    }
}

#[tokio::test]
async fn exec() {
    let s = setup("exec");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_exec(&p, &s.fixture, &exec_fixture(&s)).await;
}

#[tokio::test]
async fn attach() {
    let s = setup("attach");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_attach(&p, &s.fixture, &busybox(&s, &["cat"])).await;
}

#[tokio::test]
async fn usage() {
    let s = setup("usage");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    let busy = busybox(&s, &["sh", "-c", "while true; do :; done"]);
    conformance::check_usage(&p, &s.fixture, &busy).await;
}
