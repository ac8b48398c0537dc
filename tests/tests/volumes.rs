//! Volumes end to end against the real control plane: ConfigMaps, Secrets, PVs and PVCs made
//! through the real API server, pods bound to a test node, what the Wasm guest saw read from
//! its CRI log, what the node made read from the node's root dir. One namespace per test.

use std::path::{Path, PathBuf};

use integration_tests::{
    example_image, phase, test_node, unique_name, wait_for, workspace_root, Agent, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;

type Ns = TestNamespace;

/// A pod bound to the test's node; `spec` is merged over the defaults.
async fn create_pod(ns: &Ns, agent: &Agent, name: &str, spec: serde_json::Value) -> Pod {
    ns.create_bound_pod(
        agent,
        name,
        serde_json::json!({"labels": {"app": "v1"}}),
        spec,
    )
    .await
}

async fn create<K>(ns: &Ns, object: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let object: K = serde_json::from_value(object).unwrap();
    Api::<K>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &object)
        .await
        .unwrap()
}

/// What the guest wrote to stdout in container `container`'s first run (CRI prefixes removed).
fn output(agent: &Agent, ns: &Ns, pod: &Pod, container: &str) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap();
    let name = pod.metadata.name.as_deref().unwrap();
    let path = agent
        .dir
        .join("logs")
        .join(format!("{}_{name}_{uid}", ns.name))
        .join(container)
        .join("0.log");
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let mut out = String::new();
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, stream, tag, text) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next().unwrap_or(""),
        );
        if stream == Some("stdout") {
            out.push_str(text);
            if tag == Some("F") {
                out.push('\n');
            }
        }
    }
    out
}

fn pod_dir(agent: &Agent, pod: &Pod) -> PathBuf {
    agent
        .dir
        .join("root/pods")
        .join(pod.metadata.uid.as_deref().unwrap())
}

fn finished(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

fn exit_code(pod: &Pod, container: &str) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    Some(
        statuses
            .iter()
            .find(|s| s.name == container)?
            .state
            .as_ref()?
            .terminated
            .as_ref()?
            .exit_code,
    )
}

/// Whether `dir` is a tmpfs mount point (the test runs in the agent's mount namespace).
fn tmpfs_at(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (Path::new(fields.get(4)?) == dir && fields.get(sep + 1) == Some(&"tmpfs"))
            .then(|| fields.get(sep + 3).unwrap_or(&"").to_string())
    })
}

async fn wait_event(ns: &Ns, agent: &Agent, pod: &str, reason: &str, text: &str) -> String {
    let found = wait_for(
        &format!("a {reason} event containing {text:?}"),
        TEST_TIMEOUT,
        || async {
            ns.events(pod)
                .await
                .into_iter()
                .find(|(r, m)| r == reason && m.contains(text))
                .map(|(_, m)| m)
        },
    )
    .await;
    match found {
        Ok(message) => message,
        Err(e) => panic!(
            "{e}\nevents: {:#?}\nagent log:\n{}",
            ns.events(pod).await,
            agent.log_tail()
        ),
    }
}

#[tokio::test]
async fn configmap_secret_and_downward_api_are_written_atomically_with_modes_and_cleaned_up() {
    let agent = &test_node("vol-atomic", &[]).await;
    let ns = Ns::new("vol-atomic").await;
    let _: ConfigMap = create(&ns, serde_json::json!({"metadata": {"name": "settings"}, "data": {"mode": "fast", "level": "3"}})).await;
    let _: Secret = create(
        &ns,
        serde_json::json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
    )
    .await;
    create_pod(
        &ns,
        agent,
        "reader",
        serde_json::json!({
            "containers": [{
                "name": "reader", "image": example_image("file-reader"),
                "args": ["/cfg", "/cfg/renamed/mode", "/sec/password", "/info/labels", "/info/name", "/info/mem"],
                "resources": {"limits": {"memory": "64Mi"}},
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/cfg"},
                    {"name": "sec", "mountPath": "/sec"},
                    {"name": "info", "mountPath": "/info"},
                ],
            }],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "mode", "path": "renamed/mode", "mode": 0o600}]}},
                {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                {"name": "info", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                    {"path": "mem", "resourceFieldRef": {"containerName": "reader", "resource": "limits.memory", "divisor": "1Mi"}},
                ]}},
            ],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "reader", "the reader to finish", finished)
        .await;
    let out = output(agent, &ns, &pod, "reader");
    assert_eq!(
        phase(&pod),
        "Succeeded",
        "guest output:\n{out}\nagent log:\n{}",
        agent.log_tail()
    );
    // The guest follows `renamed -> ..data/renamed` and `..data -> ..<timestamp>` inside its preopen.
    assert!(
        out.contains("/cfg/..data"),
        "the ..data link is listed: {out}"
    );
    assert!(out.contains("/cfg/renamed"), "{out}");
    assert!(!out.contains("/cfg/level"), "only the listed item: {out}");
    assert!(out.contains("fast"), "{out}");
    assert!(out.contains("s3cret"), "{out}");
    assert!(out.contains("app=\"v1\""), "{out}");
    assert!(out.contains("reader"), "{out}");
    assert!(out.trim_end().ends_with("64"), "limits.memory in Mi: {out}");

    // On the node: the kubelet's layout and modes.
    let dir = pod_dir(agent, &pod);
    let cfg = dir.join("volumes/kubernetes.io~configmap/cfg");
    let data = std::fs::read_link(cfg.join("..data")).unwrap();
    assert!(
        data.to_string_lossy().starts_with("..20"),
        "..data points at a timestamped dir: {data:?}"
    );
    assert_eq!(
        std::fs::read_link(cfg.join("renamed")).unwrap(),
        Path::new("..data/renamed")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(cfg.join("renamed/mode")), 0o600, "per-item mode");
    let sec = dir.join("volumes/kubernetes.io~secret/sec");
    assert_eq!(mode(sec.join("password")), 0o400, "defaultMode");
    let secret_tmpfs = tmpfs_at(&sec);
    assert!(
        secret_tmpfs.is_some(),
        "the secret volume is a tmpfs (the tests run as root)"
    );

    // Deleting the pod unmounts and removes its directory.
    ns.pods()
        .delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the pod directory to be removed", TEST_TIMEOUT, || async {
        (!dir.exists()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert!(tmpfs_at(&sec).is_none(), "the tmpfs is unmounted");
}

#[tokio::test]
async fn a_configmap_update_and_a_label_change_reach_a_running_pod() {
    let agent = &test_node("vol-live", &["--sync-frequency", "2s"]).await;
    let ns = Ns::new("vol-live").await;
    let _: ConfigMap = create(
        &ns,
        serde_json::json!({"metadata": {"name": "live"}, "data": {"greeting": "hello-v1"}}),
    )
    .await;
    create_pod(
        &ns,
        agent,
        "watcher",
        serde_json::json!({
            "restartPolicy": "Always",
            "containers": [{
                "name": "watcher", "image": example_image("file-reader"),
                "args": ["--every", "0.5", "/cfg/greeting", "/info/labels"],
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}, {"name": "info", "mountPath": "/info"}],
            }],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "live"}},
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            ],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "watcher", "the watcher to run", |p| {
            phase(p) == "Running"
        })
        .await;
    wait_for("the first content", TEST_TIMEOUT, || async {
        output(agent, &ns, &pod, "watcher")
            .contains("hello-v1")
            .then_some(())
    })
    .await
    .unwrap();

    let patch = serde_json::json!({"data": {"greeting": "hello-v2"}});
    Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name)
        .patch("live", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let labels = serde_json::json!({"metadata": {"labels": {"app": "v2"}}});
    ns.pods()
        .patch("watcher", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    wait_for(
        "the running guest to see the new content",
        TEST_TIMEOUT,
        || async {
            let out = output(agent, &ns, &pod, "watcher");
            (out.contains("hello-v2") && out.contains("app=\"v2\"")).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\noutput tail: {}\nagent log:\n{}",
            tail(&output(agent, &ns, &pod, "watcher")),
            agent.log_tail()
        )
    });
    let pod = ns.pods().get("watcher").await.unwrap();
    let restarts = pod
        .status
        .and_then(|s| s.container_statuses)
        .map(|c| c[0].restart_count);
    assert_eq!(restarts, Some(0), "seen live, without a restart");
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(400)..]
}

#[tokio::test]
async fn a_missing_secret_fails_mount_until_created_and_a_missing_optional_configmap_is_empty() {
    let agent = &test_node("vol-later", &[]).await;
    let ns = Ns::new("vol-later").await;
    create_pod(
        &ns,
        agent,
        "patient",
        serde_json::json!({
            "containers": [{
                "name": "reader", "image": example_image("file-reader"),
                "args": ["/sec/token", "/opt"],
                "volumeMounts": [{"name": "sec", "mountPath": "/sec"}, {"name": "opt", "mountPath": "/opt"}],
            }],
            "volumes": [
                {"name": "sec", "secret": {"secretName": "later"}},
                {"name": "opt", "configMap": {"name": "absent", "optional": true}},
            ],
        }),
    )
    .await;
    let message = wait_event(&ns, agent, "patient", "FailedMount", "later").await;
    assert!(
        message.starts_with("MountVolume.SetUp failed for volume \"sec\""),
        "{message}"
    );
    let pod = ns.pods().get("patient").await.unwrap();
    assert_eq!(phase(&pod), "Pending");

    let _: Secret = create(
        &ns,
        serde_json::json!({"metadata": {"name": "later"}, "stringData": {"token": "arrived"}}),
    )
    .await;
    let pod = ns
        .wait_pod(
            agent,
            "patient",
            "the pod to start once the secret exists",
            finished,
        )
        .await;
    let out = output(agent, &ns, &pod, "reader");
    assert_eq!(phase(&pod), "Succeeded", "{out}\n{}", agent.log_tail());
    assert!(out.starts_with("arrived"), "the secret: {out}");
    // The optional volume is empty but for the atomic writer's own `..data` and timestamped dir.
    let listed: Vec<&str> = out.lines().filter(|l| l.starts_with("/opt/")).collect();
    assert!(
        listed.iter().all(|l| l.starts_with("/opt/..")),
        "an empty volume: {listed:?}"
    );
}

#[tokio::test]
async fn host_path_types_are_checked_and_a_host_directory_is_written() {
    let agent = &test_node("vol-host", &[]).await;
    let ns = Ns::new("vol-host").await;
    let base = workspace_root()
        .join("target/it")
        .join(&agent.name)
        .join("host");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let missing = base.join("missing");
    create_pod(
        &ns,
        agent,
        "mismatch",
        serde_json::json!({
            "containers": [{"name": "c", "image": example_image("hello"), "volumeMounts": [{"name": "h", "mountPath": "/h"}]}],
            "volumes": [{"name": "h", "hostPath": {"path": missing, "type": "Directory"}}],
        }),
    )
    .await;
    let made = base.join("made/here");
    create_pod(
        &ns,
        agent,
        "writer",
        serde_json::json!({
            "containers": [
                {"name": "writer", "image": example_image("toolbox"), "command": ["write", "/h/out.txt", "from", "the", "guest"], "volumeMounts": [{"name": "h", "mountPath": "/h"}]},
                {"name": "ro", "image": example_image("toolbox"), "command": ["write", "/h/denied.txt", "x"], "volumeMounts": [{"name": "h", "mountPath": "/h", "readOnly": true}]},
            ],
            "volumes": [{"name": "h", "hostPath": {"path": made, "type": "DirectoryOrCreate"}}],
        }),
    )
    .await;
    let message = wait_event(
        &ns,
        agent,
        "mismatch",
        "FailedMount",
        "hostPath type check failed",
    )
    .await;
    assert!(
        message.ends_with(&format!(
            "hostPath type check failed: {} is not a directory",
            missing.display()
        )),
        "{message}"
    );

    let pod = ns
        .wait_pod(agent, "writer", "the writers to finish", finished)
        .await;
    assert_eq!(exit_code(&pod, "writer"), Some(0), "{}", agent.log_tail());
    assert_eq!(
        std::fs::read_to_string(made.join("out.txt")).unwrap(),
        "from the guest\n"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&made).unwrap().permissions().mode() & 0o777,
        0o755,
        "DirectoryOrCreate makes 0755"
    );
    assert_eq!(
        exit_code(&pod, "ro"),
        Some(1),
        "a readOnly mount refuses writes"
    );
    assert!(!made.join("denied.txt").exists());
}

/// A PersistentVolume pre-bound to claim `claim` in the test's namespace, of `source`
/// (`hostPath` or `local`); deleted by the caller.
async fn pre_bound_volume(
    ns: &Ns,
    agent: &Agent,
    claim: &str,
    source: serde_json::Value,
) -> String {
    let name = unique_name("pv");
    let mut spec = serde_json::json!({
        "capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
        "persistentVolumeReclaimPolicy": "Retain",
        "claimRef": {"namespace": ns.name, "name": claim},
        // A local volume must say which node has it.
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [agent.name]}]}]}},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(source.as_object().unwrap().clone());
    let pv: PersistentVolume =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "spec": spec}))
            .unwrap();
    Api::<PersistentVolume>::all(ns.client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let _: PersistentVolumeClaim = create(
        ns,
        serde_json::json!({"metadata": {"name": claim}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": name, "resources": {"requests": {"storage": "1Mi"}}}}),
    )
    .await;
    name
}

#[tokio::test]
async fn claims_bound_to_host_path_and_local_volumes_are_mounted_and_an_unbound_one_waits() {
    let agent = &test_node("vol-pvc", &[]).await;
    let ns = Ns::new("vol-pvc").await;
    let base = workspace_root().join("target/it").join(&agent.name);
    let (host, local) = (base.join("pv-host"), base.join("pv-local"));
    for dir in [&host, &local] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(host.join("seed.txt"), "seeded\n").unwrap();
    std::fs::write(local.join("local.txt"), "on the local volume\n").unwrap();
    let pv_host = pre_bound_volume(
        &ns,
        agent,
        "data",
        serde_json::json!({"hostPath": {"path": host, "type": "Directory"}}),
    )
    .await;
    let pv_local = pre_bound_volume(
        &ns,
        agent,
        "fast",
        serde_json::json!({"local": {"path": local}}),
    )
    .await;
    let _: PersistentVolumeClaim = create(
        &ns,
        serde_json::json!({"metadata": {"name": "unbound"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "resources": {"requests": {"storage": "1Mi"}}}}),
    )
    .await;
    create_pod(
        &ns,
        agent,
        "claimant",
        serde_json::json!({
            "initContainers": [{"name": "write", "image": example_image("toolbox"), "command": ["write", "/pv/written.txt", "by", "the", "pod"], "volumeMounts": [{"name": "pv", "mountPath": "/pv"}]}],
            "containers": [{
                "name": "read", "image": example_image("file-reader"), "args": ["/pv/seed.txt", "/fast/local.txt"],
                "volumeMounts": [{"name": "pv", "mountPath": "/pv"}, {"name": "fast", "mountPath": "/fast"}],
            }],
            "volumes": [{"name": "pv", "persistentVolumeClaim": {"claimName": "data"}}, {"name": "fast", "persistentVolumeClaim": {"claimName": "fast"}}],
        }),
    )
    .await;
    create_pod(
        &ns,
        agent,
        "waiting",
        serde_json::json!({
            "containers": [{"name": "c", "image": example_image("hello"), "volumeMounts": [{"name": "u", "mountPath": "/u"}]}],
            "volumes": [{"name": "u", "persistentVolumeClaim": {"claimName": "unbound"}}],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "claimant", "the claimant to finish", finished)
        .await;
    let message = wait_event(&ns, agent, "waiting", "FailedMount", "PVC is not bound").await;
    let pvs: Api<PersistentVolume> = Api::all(ns.client.clone());
    for pv in [&pv_host, &pv_local] {
        let _ = pvs.delete(pv, &DeleteParams::default()).await;
    }
    assert_eq!(phase(&pod), "Succeeded", "{}", agent.log_tail());
    assert_eq!(
        output(agent, &ns, &pod, "read"),
        "seeded\non the local volume\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("written.txt")).unwrap(),
        "by the pod\n"
    );
    assert!(
        message.ends_with(&format!(
            "error processing PVC {}/unbound: PVC is not bound",
            ns.name
        )),
        "{message}"
    );
}

#[tokio::test]
async fn an_init_container_writes_an_empty_dir_the_app_reads_through_sub_path_expr() {
    let agent = &test_node("vol-init", &[]).await;
    let ns = Ns::new("vol-init").await;
    create_pod(
        &ns,
        agent,
        "handoff",
        serde_json::json!({
            "initContainers": [{
                "name": "init", "image": example_image("toolbox"),
                "command": ["write", "/mine/note.txt", "left", "by", "init"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "work", "mountPath": "/mine", "subPathExpr": "$(POD_NAME)"}],
            }],
            "containers": [
                {
                    "name": "app", "image": example_image("file-reader"),
                    "args": ["/mine/note.txt"],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "volumeMounts": [{"name": "work", "mountPath": "/mine", "subPathExpr": "$(POD_NAME)"}, {"name": "mem", "mountPath": "/mem"}],
                },
                {"name": "second", "image": example_image("file-reader"), "args": ["/work/handoff/note.txt"], "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
            ],
            "volumes": [{"name": "work", "emptyDir": {}}, {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "2Mi"}}],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "handoff", "the pod to finish", finished)
        .await;
    assert_eq!(phase(&pod), "Succeeded", "{}", agent.log_tail());
    assert_eq!(
        output(agent, &ns, &pod, "app").trim(),
        "left by init",
        "subPathExpr $(POD_NAME) = handoff"
    );
    assert_eq!(
        output(agent, &ns, &pod, "second").trim(),
        "left by init",
        "the same volume in a second container"
    );
    let mem = pod_dir(agent, &pod).join("volumes/kubernetes.io~empty-dir/mem");
    let options = tmpfs_at(&mem).expect("a Memory emptyDir is a tmpfs");
    assert!(
        options.contains("size=2048k"),
        "sized by sizeLimit: {options}"
    );
}

#[tokio::test]
async fn the_service_account_token_is_valid_for_the_api_server() {
    let agent = &test_node("vol-token", &[]).await;
    let ns = Ns::new("vol-token").await;
    create_pod(
        &ns,
        agent,
        "tokened",
        serde_json::json!({"containers": [{"name": "c", "image": example_image("file-reader"), "args": ["/var/run/secrets/kubernetes.io/serviceaccount/token"]}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "tokened", "the pod to finish", finished)
        .await;
    let token = output(agent, &ns, &pod, "c").trim().to_string();
    assert!(token.starts_with("eyJ"), "a JWT: {token}");
    let review: TokenReview =
        serde_json::from_value(serde_json::json!({"spec": {"token": token}})).unwrap();
    let reviewed = Api::<TokenReview>::all(ns.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let status = reviewed.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:default", ns.name).as_str())
    );
    let bound_pod = user
        .extra
        .unwrap_or_default()
        .get("authentication.kubernetes.io/pod-name")
        .cloned();
    assert_eq!(
        bound_pod,
        Some(vec!["tokened".to_string()]),
        "bound to the pod"
    );
}

#[tokio::test]
async fn an_item_path_escaping_the_volume_is_refused_by_the_api_server_and_by_the_node() {
    let ns = Ns::new("vol-escape").await;
    let spec = |node: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "escape", "namespace": ns.name},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "image": example_image("hello"), "volumeMounts": [{"name": "info", "mountPath": "/info"}]}],
                "volumes": [{"name": "info", "downwardAPI": {"items": [{"path": "../escape", "fieldRef": {"fieldPath": "metadata.name"}}]}}],
            }
        })
    };
    let pod: Pod = serde_json::from_value(spec("nowhere")).unwrap();
    let refused = ns
        .pods()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("must not contain '..'"),
        "{refused}"
    );

    // A static pod never passes the API server's validation: the node refuses it itself.
    integration_tests::push_examples();
    let name = unique_name("vol-escape");
    let manifests = workspace_root()
        .join("target/it")
        .join(&name)
        .join("manifests");
    let _ = std::fs::remove_dir_all(&manifests);
    std::fs::create_dir_all(&manifests).unwrap();
    let mut manifest = spec("");
    manifest["spec"].as_object_mut().unwrap().remove("nodeName");
    std::fs::write(manifests.join("escape.json"), manifest.to_string()).unwrap();
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let agent = Agent::start(
        &name,
        &[
            "--pod-logs-dir",
            logs.to_str().unwrap(),
            "--pod-manifest-path",
            manifests.to_str().unwrap(),
            "--file-check-frequency",
            "1s",
        ],
    )
    .unwrap();
    let static_name = format!("escape-{}", agent.name);
    let message = wait_event(&ns, &agent, &static_name, "FailedMount", "..").await;
    assert!(
        message.ends_with("invalid path: must not contain '..': ../escape"),
        "{message}"
    );
}

#[tokio::test]
async fn orphaned_pod_directories_are_removed_at_start_up() {
    integration_tests::push_examples();
    let name = unique_name("vol-orphan");
    let orphan = workspace_root()
        .join("target/it")
        .join(&name)
        .join("root/pods/0000-orphan-uid/volumes/kubernetes.io~empty-dir/scratch");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("left-over"), "x").unwrap();
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let agent = Agent::start(&name, &["--pod-logs-dir", logs.to_str().unwrap()]).unwrap();
    let pod_dir = agent.dir.join("root/pods/0000-orphan-uid");
    wait_for(
        "the orphaned pod directory to be removed",
        TEST_TIMEOUT,
        || async { (!pod_dir.exists()).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}
