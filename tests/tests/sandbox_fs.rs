//! The sandbox holds on the host filesystem (issue 11): a hostile guest plants symlinks (and
//! the test plants a FIFO) inside the directories the agent gives it, and the agent, running as
//! root, must not read, create or remove anything outside them on its behalf. Each test makes
//! its own host "secret" (mode 0600, random content) under its own directory, a real pod on a
//! real control plane, and checks what the pod's status, its logs and the host show.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use integration_tests::{
    example_image, phase, push_wat, test_node, unique_name, wait_for, workspace_root, Agent,
    Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::DeleteParams;
use kube::Api;

/// A host file only root may read, with random content, in a directory of the test's own.
struct Secret {
    dir: PathBuf,
    file: PathBuf,
    content: String,
}

impl Secret {
    fn new(what: &str) -> Secret {
        let dir = workspace_root()
            .join("target/it-secrets")
            .join(unique_name(what));
        std::fs::create_dir_all(&dir).unwrap();
        let mut random = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
            .unwrap();
        let content = format!(
            "HOST-SECRET-{}",
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let file = dir.join("secret");
        std::fs::write(&file, &content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Secret { dir, file, content }
    }

    /// `path` as a relative symlink target from any directory: enough `..` to reach `/`.
    fn relative(path: &Path) -> String {
        format!(
            "{}{}",
            "../".repeat(40),
            path.strip_prefix("/").unwrap().display()
        )
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// WAT string literal bytes.
fn wat_bytes(s: &str) -> String {
    s.bytes().map(|b| format!("\\{b:02x}")).collect()
}

/// A WASI preview1 guest that, in its first preopen (fd 3), replaces `link` with a symlink to
/// `target` (relative), then exits with `code`; an exit of 100+errno says which call failed.
fn symlink_guest(link: &str, target: &str, code: i32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_unlink_file" (func $unlink (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{link}")
  (data (i32.const 2048) "{target}")
  (func (export "_start") (local $e i32)
    (drop (call $unlink (i32.const 3) (i32.const 1024) (i32.const {link_len})))
    (local.set $e (call $symlink (i32.const 2048) (i32.const {target_len}) (i32.const 3) (i32.const 1024) (i32.const {link_len})))
    (if (local.get $e) (then (call $exit (i32.add (i32.const 100) (local.get $e)))))
    (call $exit (i32.const {code}))))"#,
        link = wat_bytes(link),
        link_len = link.len(),
        target = wat_bytes(target),
        target_len = target.len(),
    )
}

/// A guest that writes `size` bytes of `a` then `tail` to `termination-log` in fd 3, and
/// exits 1.
fn big_message_guest(size: usize, tail: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "termination-log")
  (data (i32.const {tail_at}) "{tail}")
  (func (export "_start") (local $e i32)
    (memory.fill (i32.const 4096) (i32.const 97) (i32.const {size}))
    ;; path_open(fd 3, no dirflags, "termination-log", O_CREAT|O_TRUNC, FD_WRITE, 0, 0, &fd @0)
    (local.set $e (call $open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 15) (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 0)))
    (if (local.get $e) (then (call $exit (i32.add (i32.const 100) (local.get $e)))))
    ;; one iovec at 16: (4096, size + tail)
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.const {total}))
    (local.set $e (call $write (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 32)))
    (if (local.get $e) (then (call $exit (i32.add (i32.const 100) (local.get $e)))))
    (call $exit (i32.const 1))))"#,
        tail_at = 4096 + size,
        tail = wat_bytes(tail),
        total = size + tail.len(),
    )
}

/// A guest that waits (50 ms sleeps) until a file `go` appears in fd 3, then exits 1.
fn wait_for_go_guest() -> String {
    r#"(module
  (import "wasi_snapshot_preview1" "path_filestat_get" (func $stat (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "go")
  (func (export "_start")
    ;; one clock subscription at 256: tag 0 (clock) @264, id 1 (monotonic) @272, timeout 50 ms @280
    (i64.store (i32.const 280) (i64.const 50000000))
    (i32.store (i32.const 272) (i32.const 1))
    (block $done
      (loop $again
        (br_if $done (i32.eqz (call $stat (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 2) (i32.const 512))))
        (drop (call $poll (i32.const 256) (i32.const 768) (i32.const 1) (i32.const 1000)))
        (br $again)))
    (call $exit (i32.const 1))))"#
        .to_string()
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    let s = pod.status.as_ref()?;
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
}

fn terminated_message(pod: &Pod, container: &str) -> Option<(i32, String)> {
    let t = status_of(pod, container)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?;
    Some((t.exit_code, t.message.clone().unwrap_or_default()))
}

fn waiting(pod: &Pod, container: &str) -> Option<(String, String)> {
    let w = status_of(pod, container)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?;
    Some((
        w.reason.clone().unwrap_or_default(),
        w.message.clone().unwrap_or_default(),
    ))
}

/// Everything under the agent's pod-log directory, concatenated.
fn all_logs(agent: &Agent) -> String {
    let mut out = String::new();
    let mut stack = vec![agent.dir.join("logs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    out
}

/// A guest replaces its termination-message file with a relative symlink to a root-only host
/// file and fails: the agent must not publish that file in the pod's status.
#[tokio::test]
async fn a_termination_message_symlinked_out_is_not_read() {
    let secret = Secret::new("tm-link");
    let agent = test_node("tm-link", &[]).await;
    let ns = TestNamespace::new("tm-link").await;
    let image = push_wat(
        "tm-symlink",
        &symlink_guest("termination-log", &Secret::relative(&secret.file), 1),
    );
    ns.create_bound_pod(
        &agent,
        "leak",
        serde_json::json!({}),
        serde_json::json!({
            "automountServiceAccountToken": false,
            "containers": [{"name": "leak", "image": image}],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(&agent, "leak", "the container to terminate", |p| {
            terminated_message(p, "leak").is_some()
        })
        .await;
    let (code, message) = terminated_message(&pod, "leak").unwrap();
    assert_eq!(code, 1, "the guest made its symlink (an exit of 100+errno says which call failed); message: {message:?}");
    println!("terminated.message: {message:?}");
    assert!(
        !message.contains(&secret.content),
        "the host secret was published in the pod status: {message:?}"
    );
    assert_eq!(message, "Error on reading termination log /dev/termination-log: the path leads outside the container's termination message directory");
}

/// A FIFO where the termination-message file was (planted from the host while the container
/// runs): the agent must not wait for a writer; the terminated status still arrives.
#[tokio::test]
async fn a_fifo_as_termination_message_does_not_hang_the_pod() {
    let agent = test_node("tm-fifo", &[]).await;
    let ns = TestNamespace::new("tm-fifo").await;
    let image = push_wat("tm-wait-for-go", &wait_for_go_guest());
    let pod = ns
        .create_bound_pod(
            &agent,
            "fifo",
            serde_json::json!({}),
            serde_json::json!({
                "automountServiceAccountToken": false,
                "containers": [{"name": "fifo", "image": image}],
            }),
        )
        .await;
    ns.wait_pod(&agent, "fifo", "the container to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let dir = agent
        .dir
        .join("root/pods")
        .join(pod.metadata.uid.as_deref().unwrap())
        .join("containers/fifo/0");
    let file = dir.join("termination-log");
    std::fs::remove_file(&file).unwrap();
    let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        file.display()
    );
    std::fs::write(dir.join("go"), "").unwrap();
    let pod = ns
        .wait_pod(
            &agent,
            "fifo",
            "the terminated status, despite the FIFO",
            |p| terminated_message(p, "fifo").is_some(),
        )
        .await;
    let (code, message) = terminated_message(&pod, "fifo").unwrap();
    println!("terminated.message: {message:?}");
    assert_eq!(code, 1);
    assert_eq!(
        message,
        "Error on reading termination log /dev/termination-log: not a regular file"
    );
}

/// An oversized termination message: the kubelet keeps its last 4096 bytes.
#[tokio::test]
async fn an_oversized_termination_message_is_capped_to_its_tail() {
    let agent = test_node("tm-big", &[]).await;
    let ns = TestNamespace::new("tm-big").await;
    let image = push_wat("tm-big", &big_message_guest(100_000, "THE-END"));
    ns.create_bound_pod(
        &agent,
        "big",
        serde_json::json!({}),
        serde_json::json!({
            "automountServiceAccountToken": false,
            "containers": [{"name": "big", "image": image}],
        }),
    )
    .await;
    let pod = ns
        .wait_pod(&agent, "big", "the container to terminate", |p| {
            terminated_message(p, "big").is_some()
        })
        .await;
    let (code, message) = terminated_message(&pod, "big").unwrap();
    assert_eq!(code, 1, "the guest wrote its message");
    assert_eq!(message.len(), 4096, "capped at the kubelet's 4096 bytes");
    assert!(
        message.ends_with("THE-END"),
        "the tail is kept, as the kubelet's tail.ReadAtMost: ...{:?}",
        &message[message.len() - 20..]
    );
}

/// An init container plants a symlink out of an emptyDir; app containers then mount the
/// emptyDir with `subPath` through it. They must not start (CreateContainerConfigError, the
/// kubelet's message), must not read the host file, and nothing may be created on the host.
#[tokio::test]
async fn a_sub_path_through_a_guest_symlink_is_refused() {
    let secret = Secret::new("subpath");
    let agent = test_node("subpath", &[]).await;
    let ns = TestNamespace::new("subpath").await;
    let plant = push_wat(
        "subpath-plant",
        &symlink_guest("esc", &Secret::relative(&secret.dir), 0),
    );
    let reader = example_image("file-reader");
    ns.create_bound_pod(&agent, "sub", serde_json::json!({}), serde_json::json!({
        "automountServiceAccountToken": false,
        "volumes": [{"name": "shared", "emptyDir": {}}],
        "initContainers": [{"name": "plant", "image": plant, "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
        "containers": [
            {"name": "reader", "image": reader, "args": ["/data/secret"], "volumeMounts": [{"name": "shared", "mountPath": "/data", "subPath": "esc"}]},
            {"name": "maker", "image": reader, "args": ["/made"], "volumeMounts": [{"name": "shared", "mountPath": "/made", "subPath": "esc/made"}]},
        ],
    }))
    .await;
    let refused = |p: &Pod, c: &str| {
        waiting(p, c).is_some_and(|(reason, _)| reason == "CreateContainerConfigError")
    };
    let pod = ns
        .wait_pod(&agent, "sub", "both app containers refused", |p| {
            refused(p, "reader") && refused(p, "maker")
        })
        .await;
    assert_eq!(
        terminated_message(&pod, "plant").map(|t| t.0),
        Some(0),
        "the init container planted its link"
    );
    let (_, reader_msg) = waiting(&pod, "reader").unwrap();
    let (_, maker_msg) = waiting(&pod, "maker").unwrap();
    println!("reader: {reader_msg:?}\nmaker: {maker_msg:?}");
    assert_eq!(
        reader_msg,
        "failed to prepare subPath for volumeMount \"shared\" of container \"reader\""
    );
    assert!(
        maker_msg == "failed to prepare subPath for volumeMount \"shared\" of container \"maker\""
            || maker_msg == "failed to create subPath directory for volumeMount \"shared\" of container \"maker\"",
        "{maker_msg:?}"
    );
    let entries: Vec<_> = std::fs::read_dir(&secret.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("secret")],
        "nothing created in the host directory"
    );
    assert!(
        !all_logs(&agent).contains(&secret.content),
        "no container read the host file"
    );
    let reasons = ns.events("sub").await;
    assert!(
        reasons
            .iter()
            .any(|(r, m)| r == "Failed" && m == &format!("Error: {reader_msg}")),
        "a Failed event as the kubelet's: {reasons:?}"
    );
}

/// A guest plants symlinks to a host directory and to a file in it inside its emptyDir;
/// deleting the pod removes the links, never what they point at.
#[tokio::test]
async fn teardown_does_not_follow_a_guest_symlink() {
    let secret = Secret::new("teardown");
    let agent = test_node("teardown", &[]).await;
    let ns = TestNamespace::new("teardown").await;
    let image = push_wat(
        "teardown-plant",
        &symlink_guest("link", &Secret::relative(&secret.dir), 0),
    );
    let pod = ns
        .create_bound_pod(&agent, "plant", serde_json::json!({}), serde_json::json!({
            "automountServiceAccountToken": false,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "plant", "image": image, "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
        }))
        .await;
    let done = ns
        .wait_pod(&agent, "plant", "the guest to plant its link", |p| {
            terminated_message(p, "plant").is_some()
        })
        .await;
    assert_eq!(
        terminated_message(&done, "plant").map(|t| t.0),
        Some(0),
        "the guest made its symlink"
    );
    let pod_dir = agent
        .dir
        .join("root/pods")
        .join(pod.metadata.uid.as_deref().unwrap());
    let link = pod_dir.join("volumes/kubernetes.io~empty-dir/scratch/link");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is there before the teardown"
    );
    ns.pods()
        .delete("plant", &DeleteParams::default())
        .await
        .unwrap();
    let pods: Api<Pod> = ns.pods();
    wait_for(
        "the pod to be gone and its directory removed",
        TEST_TIMEOUT,
        || async {
            (pods.get_opt("plant").await.ok()?.is_none() && !pod_dir.exists()).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert_eq!(
        std::fs::read_to_string(&secret.file).unwrap(),
        secret.content,
        "the host file the link pointed into is intact"
    );
}

/// A static pod whose volume and container names would make host paths outside the agent's
/// directories is refused before anything touches the disk; a good one beside it runs.
#[tokio::test]
async fn a_static_pod_with_escaping_names_is_refused_before_touching_the_disk() {
    integration_tests::push_examples();
    let name = unique_name("static-esc");
    let base = workspace_root().join("target/it").join(&name);
    let manifests = base.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let ticker = example_image("ticker");
    std::fs::write(manifests.join("good.yaml"), format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: good}}\nspec:\n  containers:\n  - {{name: ticker, image: {ticker}}}\n")).unwrap();
    // From <root>/pods/<uid>/volumes/kubernetes.io~empty-dir/, five `..` reach the agent's own
    // directory; from <logs>/<ns>_<pod>_<uid>/, two do.
    std::fs::write(
        manifests.join("bad.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: bad}}\nspec:\n  volumes:\n  - {{name: ../../../../../escaped-volume, emptyDir: {{}}}}\n  containers:\n  - name: ../../escaped-container\n    image: {ticker}\n    volumeMounts: [{{name: ../../../../../escaped-volume, mountPath: /v}}]\n"
        ),
    )
    .unwrap();
    let logs = base.join("logs");
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
    let pods: Api<Pod> = Api::namespaced(Cluster::get().admin().await, "default");
    let mirror = format!("good-{}", agent.name);
    wait_for("the good static pod to run", TEST_TIMEOUT, || async {
        (phase(&pods.get_opt(&mirror).await.ok()??) == "Running").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let warned = wait_for(
        "a warning naming bad.yaml and the invalid name",
        TEST_TIMEOUT,
        || async {
            agent
                .log()
                .lines()
                .any(|l| {
                    l.contains("WARN") && l.contains("bad.yaml") && l.contains("RFC 1123 label")
                })
                .then_some(())
        },
    )
    .await;
    let escaped: Vec<PathBuf> = [base.join("escaped-volume"), base.join("escaped-container")]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    assert!(
        escaped.is_empty(),
        "created outside the agent's pod directories: {escaped:?}"
    );
    warned.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}
