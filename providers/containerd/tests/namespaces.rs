//! The pod-namespaces seam: a container of a sandbox made with [`SandboxNamespaces`] joins the
//! pod's network namespace by path (here one this test makes with `ip netns add`, with an
//! address on its own `lo`), and without it a container has a network namespace of its own.

mod common;

use std::process::Command;

use common::{busybox_image, cluster_var, connect, start_containerd, Cleanup};
use provider_api::conformance::{self, Case, Fixture};
use provider_api::{ContainerState, Provider, SandboxConfig};
use provider_containerd::{Namespace, ProviderOptions, SandboxNamespaces};

/// A network namespace of this test's own, deleted when dropped.
struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {args:?} failed");
}

#[tokio::test]
async fn containers_join_the_pods_network_namespace_by_path() {
    let registry = cluster_var("REGISTRY").expect("REGISTRY (set LOCAL_CLUSTER_DIR)");
    let image = busybox_image(&registry);
    let (socket, _containerd) = start_containerd();
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("ctd-ns-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("pod")).unwrap();
    let _work = common::TempDir(work.clone());
    let namespace = format!("netns-{pid}");
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    // The log driver containerd's shim runs, as the agent's `container-log` subcommand.
    options.log_driver = Some(env!("CARGO_BIN_EXE_container-log").into());
    let _cleanup = Cleanup(options.clone());
    let p = connect(&options).await;

    let netns = NetNs(format!("ctd-pod-{pid}"));
    ip(&["netns", "add", &netns.0]);
    ip(&["-n", &netns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &netns.0, "addr", "add", "10.254.77.1/32", "dev", "lo"]);

    let fx = Fixture {
        prints_and_exits: Box::new(|_| unreachable!()),
        ends_when_asked: None,
        term_exit_code: 0,
        ignores_stop: Case {
            image: image.clone(),
            command: vec![],
            args: vec![],
        },
        memory_hog: Case {
            image: image.clone(),
            command: vec![],
            args: vec![],
        },
        memory_limit: 0,
        auth: vec![],
        work_dir: work.clone(),
        name: "containerd".into(),
    };
    p.pull_image(&image, &[]).await.expect("pull");
    let show_lo = Case {
        image: image.clone(),
        command: vec![
            "ip".into(),
            "-o".into(),
            "addr".into(),
            "show".into(),
            "lo".into(),
        ],
        args: vec![],
    };
    let mut outputs = Vec::new();
    for (uid, namespaces) in [
        (
            "pod-joined",
            SandboxNamespaces {
                network: Namespace::Join(format!("/run/netns/{}", netns.0).into()),
                ..Default::default()
            },
        ),
        ("pod-private", SandboxNamespaces::default()),
    ] {
        let sandbox = p
            .run_pod_sandbox_in(
                &SandboxConfig {
                    pod_uid: uid.into(),
                    namespace: "t".into(),
                    name: uid.into(),
                    pod_dir: work.join("pod"),
                    runtime_handler: None,
                    host_network: false,
                },
                namespaces,
            )
            .await
            .expect("sandbox");
        let config = conformance::config(&fx, "show-lo", &show_lo);
        let log = config.log_path.clone();
        let id = conformance::run(&p, &fx, &sandbox, config).await;
        let state = conformance::wait_state(&p, &fx, &id, "Exited", |s| {
            matches!(s, ContainerState::Exited { .. })
        })
        .await;
        assert!(
            matches!(state, ContainerState::Exited { exit_code: 0, .. }),
            "{state:?}"
        );
        // The log is complete once both streams ended; wait for the line as a condition.
        let deadline = tokio::time::Instant::now() + conformance::WAIT;
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(" stdout F ") || tokio::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        outputs.push(text);
        p.remove_pod_sandbox(&sandbox, std::time::Duration::ZERO)
            .await
            .expect("remove sandbox");
    }
    assert!(
        outputs[0].contains("10.254.77.1"),
        "the joined namespace's lo: {}",
        outputs[0]
    );
    assert!(
        outputs[1].contains("127.0.0.1") && !outputs[1].contains("10.254.77.1"),
        "a private namespace's lo: {}",
        outputs[1]
    );
}
