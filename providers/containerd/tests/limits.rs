//! Limits are the kernel's: a container reads its own cgroup's memory limit, CFS quota, CPU
//! shares and pids limit as the ContainerConfig set them (cgroup v1 as on these machines, or
//! v2), and a container without limits reads none.

mod common;

use common::{busybox_image, cluster_var, connect, one_case_fixture, start_containerd, Cleanup};
use provider_api::conformance::{self, Case};
use provider_api::{ContainerState, Provider};
use provider_containerd::ProviderOptions;

/// The script a container runs to print its cgroup limits, one `name value` line each.
const SHOW_LIMITS: &str = r#"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  echo "memory $(cat /sys/fs/cgroup/memory.max)"
  echo "cpu $(cat /sys/fs/cgroup/cpu.max)"
  echo "weight $(cat /sys/fs/cgroup/cpu.weight)"
  echo "pids $(cat /sys/fs/cgroup/pids.max)"
else
  echo "memory $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
  echo "cpu $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
  echo "shares $(cat /sys/fs/cgroup/cpu/cpu.shares)"
  echo "pids $(cat /sys/fs/cgroup/pids/pids.max)"
fi
"#;

#[tokio::test]
async fn containers_read_their_limits_from_their_cgroup() {
    let registry = cluster_var("REGISTRY").expect("REGISTRY (set LOCAL_CLUSTER_DIR)");
    let image = busybox_image(&registry);
    let (socket, _containerd) = start_containerd();
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("ctd-limits-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let _work = common::TempDir(work.clone());
    let namespace = format!("limits-{pid}");
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    // The log driver containerd's shim runs, as the agent's `container-log` subcommand.
    options.log_driver = Some(env!("CARGO_BIN_EXE_container-log").into());
    let _cleanup = Cleanup(options.clone());
    let p = connect(&options).await;
    let case = Case {
        image: image.clone(),
        command: vec!["sh".into(), "-c".into(), SHOW_LIMITS.into()],
        args: vec![],
    };
    let fx = one_case_fixture(case.clone(), &work);
    p.pull_image(&image, &[]).await.expect("pull");
    let sandbox = conformance::sandbox(&p, &fx).await;
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mut outputs = Vec::new();
    for limited in [true, false] {
        let mut config = conformance::config(&fx, "limits", &case);
        if limited {
            config.memory_limit_bytes = Some(48 << 20);
            config.cpu_limit_millicores = Some(250);
            config.cpu_request_millicores = Some(500);
        }
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
        let deadline = tokio::time::Instant::now() + conformance::WAIT;
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(" pids ") || tokio::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let lines: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once(" stdout F ").map(|(_, c)| c.to_string()))
            .collect();
        outputs.push(lines);
    }
    let limited = &outputs[0];
    let want: Vec<String> = if v2 {
        vec![
            format!("memory {}", 48u64 << 20),
            "cpu 25000 100000".into(),
            // cpu.shares 512 as runc converts it to a cgroup v2 weight.
            "weight 20".into(),
            "pids 4096".into(),
        ]
    } else {
        vec![
            format!("memory {}", 48u64 << 20),
            "cpu 25000 100000".into(),
            // 500 millicores: 512 shares, the kubelet's conversion.
            "shares 512".into(),
            "pids 4096".into(),
        ]
    };
    assert_eq!(limited, &want, "the limited container's cgroup");
    let unlimited = &outputs[1];
    assert!(
        unlimited
            .iter()
            .any(|l| l == "cpu -1 100000" || l == "cpu max 100000"),
        "no CPU quota without a limit: {unlimited:?}"
    );
    assert!(
        unlimited.iter().any(|l| l == "shares 2" || l == "weight 1"),
        "the minimum share without a request: {unlimited:?}"
    );
    p.remove_pod_sandbox(&sandbox, std::time::Duration::ZERO)
        .await
        .expect("remove sandbox");
}
