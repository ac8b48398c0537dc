//! Many nodes (issue 15): five agents as five nodes of the shared cluster, and what the real
//! scheduler and controller manager do with them. The cluster is the distributed engine; what
//! is tested is that every node behaves as a kubelet under it:
//!
//! - a Deployment of 50 replicas spreads over the five nodes (each gets some, all Running);
//! - a node killed for good (its agent and runtime SIGKILLed, never restarted) goes
//!   NotReady/Unknown through the controller manager, its pods are evicted by taint eviction
//!   (they tolerate not-ready/unreachable for `TOLERATION_SECONDS` only) and recreated on the
//!   others;
//! - `kubectl cordon` keeps new pods off a node (a pod pinned there stays Pending, a scale-up
//!   lands elsewhere); `kubectl uncordon` lets them back;
//! - `kubectl drain` (the eviction API) of a node under a PodDisruptionBudget is refused by the
//!   budget while evicting all at once would break it, and the drained pods are stopped by
//!   their kubelet (a `Killing` event each) and recreated on other nodes.
//!
//! The cluster holds other tests' nodes: these five carry a label unique to the run and every
//! pod selects it, and a zone of their own (taint eviction is rated per zone, and stops in a
//! small zone that is mostly not ready: the shared cluster's leftover nodes must not count).
//! Each stage waits on conditions; none asserts a duration.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use integration_tests::{
    example_image, has_taint, node_condition, phase, test_node, unique_name, wait_for, Agent,
    Cluster, TestNamespace,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;

const NODES: usize = 5;
const REPLICAS: usize = 50;
/// How long the pods tolerate a not-ready or unreachable node before taint eviction removes
/// them (the default, added by admission, is 300 s).
const TOLERATION_SECONDS: i64 = 2;
/// Waits here cover 50 pods on five debug-build agents on a shared 2-core machine, and the
/// controller manager's 20 s node-monitor grace period (deploy/local-cluster).
const TIMEOUT: Duration = Duration::from_secs(400);
const LABEL: &str = "wasm-kubelet.io/many-nodes-test";

fn deployment(name: &str, run: &str, replicas: usize) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {LABEL: run},
                    "terminationGracePeriodSeconds": 2,
                    "tolerations": [
                        {"key": "wasm-kubelet.io/runtime", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION_SECONDS},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION_SECONDS},
                    ],
                    "containers": [{
                        "name": "c", "image": example_image("toolbox"),
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "3600"],
                    }],
                },
            },
        },
    }))
    .expect("a valid Deployment")
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn ready(pod: &Pod) -> bool {
    phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Pods of the Deployment that are not being deleted, by node ("" when not scheduled yet).
async fn live_pods_by_node(pods: &Api<Pod>, app: &str) -> BTreeMap<String, Vec<Pod>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in list.into_iter().filter(|p| !terminating(p)) {
        by_node
            .entry(node_of(&pod).unwrap_or("").to_string())
            .or_default()
            .push(pod);
    }
    by_node
}

/// Waits until `want` pods of `app` are live and Ready, none on a node of `not_on`; returns
/// them by node.
async fn wait_spread(
    pods: &Api<Pod>,
    app: &str,
    want: usize,
    not_on: &[&str],
    what: &str,
) -> BTreeMap<String, Vec<Pod>> {
    let result = wait_for(what, TIMEOUT, || async {
        let by_node = live_pods_by_node(pods, app).await;
        let total: usize = by_node.values().map(Vec::len).sum();
        let all_ready = by_node.values().flatten().all(ready);
        let avoided = not_on.iter().all(|n| !by_node.contains_key(*n));
        (total == want && all_ready && avoided).then_some(by_node)
    })
    .await;
    match result {
        Ok(by_node) => by_node,
        Err(e) => {
            let by_node = live_pods_by_node(pods, app).await;
            let summary: BTreeMap<&String, Vec<String>> = by_node
                .iter()
                .map(|(n, ps)| {
                    (
                        n,
                        ps.iter()
                            .map(|p| {
                                format!(
                                    "{}:{}",
                                    p.metadata.name.clone().unwrap_or_default(),
                                    phase(p)
                                )
                            })
                            .collect(),
                    )
                })
                .collect();
            panic!("{e}\nlive pods by node: {summary:#?}")
        }
    }
}

fn counts(by_node: &BTreeMap<String, Vec<Pod>>) -> BTreeMap<&str, usize> {
    by_node.iter().map(|(n, p)| (n.as_str(), p.len())).collect()
}

fn kubectl(args: &[&str]) -> std::process::Output {
    Cluster::get()
        .kubectl()
        .args(args)
        .output()
        .expect("kubectl runs")
}

async fn scale(deployments: &Api<Deployment>, name: &str, replicas: usize) {
    deployments
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scaled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_spreads_and_survives_a_dead_node_cordon_and_drain() {
    let run = unique_name("fleet");
    // A zone of their own too: the node lifecycle controller rates evictions per zone and
    // stops them in a small zone where most nodes are not ready ("PartialDisruption"), which
    // the shared cluster's zone-less leftover nodes of other tests would make it.
    let label_flag = format!("--node-labels={LABEL}={run},topology.kubernetes.io/zone={run}");
    let mut agents: Vec<Agent> = Vec::new();
    for _ in 0..NODES {
        agents.push(test_node("fleet", &[&label_flag]).await);
    }
    let admin = Cluster::get().admin().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    // Ready, and untainted by the node lifecycle controller (a new node carries
    // node.kubernetes.io/not-ready:NoSchedule until the controller sees it Ready): the
    // scheduler places nothing on a node before that.
    wait_for("all five nodes Ready and schedulable", TIMEOUT, || async {
        for a in &agents {
            let node = nodes.get_opt(&a.name).await.ok()??;
            if node_condition(&node, "Ready").as_deref() != Some("True")
                || has_taint(&node, "node.kubernetes.io/not-ready")
                || has_taint(&node, "node.kubernetes.io/unreachable")
            {
                return None;
            }
        }
        Some(())
    })
    .await
    .expect("the nodes become Ready");
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();

    let ns = TestNamespace::new("fleet").await;
    let pods = ns.pods();
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns.name);
    let app = "spread";
    deployments
        .create(&PostParams::default(), &deployment(app, &run, REPLICAS))
        .await
        .expect("Deployment created");

    // 1. The scheduler spreads 50 replicas over the five nodes: each gets some.
    let by_node = wait_spread(&pods, app, REPLICAS, &[], "50 replicas Running").await;
    eprintln!("spread: {:?}", counts(&by_node));
    for name in &names {
        assert!(
            by_node.get(name).is_some_and(|p| !p.is_empty()),
            "node {name} got no replica: {:?}",
            counts(&by_node)
        );
    }
    assert!(
        by_node.keys().all(|n| names.contains(n)),
        "a replica ran outside the test's nodes: {:?}",
        counts(&by_node)
    );

    // 2. A node killed for good: NotReady through the controller manager, its pods evicted by
    // taint eviction and recreated on the others.
    let dead = names[0].clone();
    let dead_pods: Vec<String> = by_node[&dead]
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    agents[0].kill9();
    agents[0].kill_runtime();
    let node = wait_for(
        "the dead node NotReady or Unknown and tainted NoExecute",
        TIMEOUT,
        || async {
            let node = nodes.get_opt(&dead).await.ok()??;
            let not_ready = node_condition(&node, "Ready").is_some_and(|s| s != "True");
            let tainted = has_taint(&node, "node.kubernetes.io/unreachable")
                || has_taint(&node, "node.kubernetes.io/not-ready");
            (not_ready && tainted).then_some(node)
        },
    )
    .await
    .expect("the controller manager marks the dead node");
    eprintln!(
        "dead node {dead}: Ready={:?}",
        node_condition(&node, "Ready")
    );
    let by_node = wait_spread(
        &pods,
        app,
        REPLICAS,
        &[&dead],
        "the dead node's replicas recreated on the other nodes",
    )
    .await;
    eprintln!("after the dead node: {:?}", counts(&by_node));
    // Its pods were evicted (deleted by the taint manager), not left as if running.
    for name in &dead_pods {
        let pod = pods.get_opt(name).await.expect("get pod");
        assert!(
            pod.as_ref().is_none_or(terminating),
            "pod {name} on the dead node was not evicted"
        );
    }
    let evicted = wait_for("a TaintManagerEviction event", TIMEOUT, || async {
        for name in &dead_pods {
            if ns
                .event_reasons(name)
                .await
                .iter()
                .any(|r| r == "TaintManagerEviction")
            {
                return Some(name.clone());
            }
        }
        None
    })
    .await;
    assert!(
        evicted.is_ok(),
        "no pod of the dead node has a TaintManagerEviction event"
    );

    // 3. Cordon keeps new pods off; uncordon lets them back.
    let cordoned = names[1].clone();
    let out = kubectl(&["cordon", &cordoned]);
    assert!(
        out.status.success(),
        "cordon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = live_pods_by_node(&pods, app).await;
    let on_cordoned: BTreeSet<String> = before
        .get(&cordoned)
        .map(|ps| ps.iter().filter_map(|p| p.metadata.name.clone()).collect())
        .unwrap_or_default();
    scale(&deployments, app, REPLICAS + 10).await;
    let by_node = wait_spread(&pods, app, REPLICAS + 10, &[], "the scale-up Running").await;
    let now_on_cordoned: BTreeSet<String> = by_node
        .get(&cordoned)
        .map(|ps| ps.iter().filter_map(|p| p.metadata.name.clone()).collect())
        .unwrap_or_default();
    assert_eq!(
        now_on_cordoned, on_cordoned,
        "a new replica landed on the cordoned node {cordoned}"
    );
    // A pod that may only run there stays Pending, unschedulable, while the node is cordoned.
    let pinned: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pinned"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": cordoned},
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"key": "wasm-kubelet.io/runtime", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "c", "image": example_image("toolbox"), "command": ["sleep", "3600"]}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pinned)
        .await
        .expect("pinned pod created");
    ns.wait_pod(
        &agents[1],
        "pinned",
        "the pinned pod unschedulable on the cordoned node",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await;
    let out = kubectl(&["uncordon", &cordoned]);
    assert!(
        out.status.success(),
        "uncordon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = ns
        .wait_pod(
            &agents[1],
            "pinned",
            "the pinned pod Running once uncordoned",
            |p| phase(p) == "Running",
        )
        .await;
    assert_eq!(node_of(&pod), Some(cordoned.as_str()));
    pods.delete("pinned", &DeleteParams::default())
        .await
        .expect("pinned pod deleted");

    // 4. Drain under a PodDisruptionBudget: the budget refuses evicting all at once, the
    // drained pods are stopped by their kubelet and recreated on other nodes.
    scale(&deployments, app, REPLICAS).await;
    let by_node = wait_spread(&pods, app, REPLICAS, &[&dead], "back to 50 replicas").await;
    let drained = names
        .iter()
        .skip(2)
        .max_by_key(|n| by_node.get(*n).map_or(0, Vec::len))
        .expect("a node to drain")
        .clone();
    let drained_pods: Vec<String> = by_node[&drained]
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        drained_pods.len() >= 2,
        "the node to drain holds {} replicas; the budget needs two to refuse one",
        drained_pods.len()
    );
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns.name);
    let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "spread"},
        "spec": {"minAvailable": REPLICAS - 1, "selector": {"matchLabels": {"app": app}}},
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb)
        .await
        .expect("PDB created");
    wait_for("the budget to allow one disruption", TIMEOUT, || async {
        let pdb = pdbs.get("spread").await.ok()?;
        let status = pdb.status?;
        (status.disruptions_allowed == 1 && status.observed_generation == pdb.metadata.generation)
            .then_some(())
    })
    .await
    .expect("the disruption controller computes the budget");
    let out = tokio::task::spawn_blocking({
        let drained = drained.clone();
        move || {
            kubectl(&[
                "drain",
                &drained,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout=390s",
            ])
        }
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "drain failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("disruption budget") || stdout.contains("disruption budget"),
        "the budget never refused an eviction:\n{stdout}\n{stderr}"
    );
    let by_node = wait_spread(
        &pods,
        app,
        REPLICAS,
        &[&dead, &drained],
        "the drained replicas recreated on other nodes",
    )
    .await;
    eprintln!("after the drain of {drained}: {:?}", counts(&by_node));
    // Evicted, not killed by force: each drained pod was stopped by its kubelet and is gone.
    for name in &drained_pods {
        assert!(
            pods.get_opt(name).await.expect("get pod").is_none(),
            "drained pod {name} is still there"
        );
        ns.wait_events(&agents[0], name, "the kubelet's Killing event", |events| {
            events.iter().any(|(reason, _)| reason == "Killing")
        })
        .await;
    }
    let node = nodes.get(&drained).await.expect("drained node");
    assert_eq!(
        node.spec.and_then(|s| s.unschedulable),
        Some(true),
        "a drained node is cordoned"
    );

    // Cleanup: the Deployment, the budget and the namespace (its drop), the nodes (the agents'
    // drop deletes each Node; pods left bound to the dead node go with it, by pod GC).
    deployments
        .delete(app, &DeleteParams::default())
        .await
        .expect("Deployment deleted");
    pdbs.delete("spread", &DeleteParams::default())
        .await
        .expect("PDB deleted");
    wait_for(
        "the Deployment's pods gone from the live nodes",
        TIMEOUT,
        || async {
            let left = live_pods_by_node(&pods, app).await;
            left.keys().all(|n| *n == dead).then_some(())
        },
    )
    .await
    .expect("the pods go");
    drop(ns);
    drop(agents);
}
