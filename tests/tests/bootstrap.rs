//! TLS bootstrap and certificate rotation against the real control plane: a node that starts
//! with only the bootstrap token joins through a CSR the controller manager approves and signs,
//! keeps working while its short-lived client certificate (LC_SIGNING_DURATION, 3m by default)
//! is rotated and the old one expires, and serves the serving certificate a person approved with
//! `kubectl certificate approve`. Certificates are read with the openssl command line, not with
//! the agent's own parser.
//!
//! Needs a cluster from a `deploy/local-cluster up` that has the bootstrap flags (bootstrap
//! token auth, the CSR bindings and a short signing duration): its env file names
//! BOOTSTRAP_KUBECONFIG.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{
    agent_binary, example_image, node_condition, phase, push_examples, unique_name, unmount_under,
    wait_for, workspace_root, Agent, Cluster, LoopbackAddress, TestNamespace, TEST_TIMEOUT,
};
use jiff::Timestamp;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::PostParams;
use kube::Api;

/// What openssl reads out of a certificate.
#[derive(Debug, Clone, PartialEq)]
struct Cert {
    serial: String,
    not_before: Timestamp,
    not_after: Timestamp,
    issuer: String,
    subject: String,
}

/// Runs `openssl x509` on PEM text.
fn inspect(pem: &[u8]) -> Cert {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-serial",
            "-startdate",
            "-enddate",
            "-issuer",
            "-subject",
            "-dateopt",
            "iso_8601",
            "-nameopt",
            "RFC2253",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child.stdin.take().unwrap().write_all(pem).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl x509: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_string()
    };
    let time = |name: &str| {
        field(name)
            .replace(' ', "T")
            .parse::<Timestamp>()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    Cert {
        serial: field("serial"),
        not_before: time("notBefore"),
        not_after: time("notAfter"),
        issuer: field("issuer"),
        subject: field("subject"),
    }
}

/// The certificate the kubelet API at `addr` serves (openssl s_client), `None` while it does
/// not answer.
fn served_certificate(addr: &str) -> Option<Cert> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-showcerts"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")?
        + start
        + "-----END CERTIFICATE-----".len();
    Some(inspect(text[start..end].as_bytes()))
}

/// A wasm-kubelet started with only a bootstrap kubeconfig: `--kubeconfig` names a file that
/// does not exist yet. Killed, and its Node deleted, when dropped.
struct BootstrapAgent {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Keeps the node IP reserved against other agents (the harness's too).
    _address: LoopbackAddress,
}

impl BootstrapAgent {
    fn start(what: &str, bootstrap_kubeconfig: &str, extra: &[&str]) -> BootstrapAgent {
        let cluster = Cluster::get();
        let name = unique_name(what);
        let dir = workspace_root().join("target/it").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Loopback, reserved the same way as the harness's agents (unique across processes).
        let address = LoopbackAddress::reserve();
        let node_ip = address.ip.clone();
        let ca = Path::new(cluster.var("LOCAL_CLUSTER_DIR")).join("pki/ca.crt");
        let mut args: Vec<String> = vec![
            format!("--bootstrap-kubeconfig={bootstrap_kubeconfig}"),
            format!("--kubeconfig={}", dir.join("node.kubeconfig").display()),
            format!("--cert-dir={}", dir.join("pki").display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={node_ip}"),
            format!("--address={node_ip}"),
            format!("--root-dir={}", dir.join("root").display()),
            format!("--pod-logs-dir={}", dir.join("logs").display()),
            format!("--client-ca-file={}", ca.display()),
            "--healthz-port=0".into(),
            "-v=4".into(),
        ];
        args.extend(integration_tests::local_node_flags());
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(agent_binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("wasm-kubelet starts");
        // Where `deploy/local-cluster down` looks, so a crashed run cannot leak the agent.
        let pids = Path::new(cluster.var("LOCAL_CLUSTER_DIR")).join("pids");
        let _ = std::fs::create_dir_all(&pids);
        let _ = std::fs::write(
            pids.join(format!("agent-{name}.pid")),
            child.id().to_string(),
        );
        let _ = std::fs::write(
            pids.join(format!("agent-{name}.cmd")),
            agent_binary().display().to_string(),
        );
        BootstrapAgent {
            name,
            dir,
            child: Some(child),
            _address: address,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The client certificate the agent uses now (the store's current link).
    fn client_certificate(&self) -> Option<(PathBuf, Cert)> {
        let link = self.dir.join("pki/kubelet-client-current.pem");
        let target = std::fs::canonicalize(&link).ok()?;
        Some((target.clone(), inspect(&std::fs::read(&target).ok()?)))
    }

    /// Waits for the process to exit by itself; its exit code.
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        wait_for("the agent to exit", within, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
        .ok()
        .and_then(|s| s.code())
    }
}

impl Drop for BootstrapAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A killed agent leaves its tmpfs volumes (service-account tokens) mounted.
        unmount_under(&self.dir);
        let pids = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pids");
        let _ = std::fs::remove_file(pids.join(format!("agent-{}.pid", self.name)));
        let _ = std::fs::remove_file(pids.join(format!("agent-{}.cmd", self.name)));
        let _ = Cluster::get()
            .kubectl()
            .args([
                "delete",
                "node",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// The bootstrap kubeconfig `deploy/local-cluster up` writes.
fn bootstrap_kubeconfig() -> String {
    let path = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("bootstrap.kubeconfig");
    assert!(
        path.exists(),
        "{} is missing: the local cluster was started before TLS bootstrap was added to deploy/local-cluster; restart it (down, then up)",
        path.display()
    );
    // A cluster reused by `up` without a restart has the token but not the apiserver flag.
    let out = Command::new(cluster_kubectl())
        .args(["auth", "whoami", "--kubeconfig"])
        .arg(&path)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "the API server refuses the bootstrap token ({}): it runs without --enable-bootstrap-token-auth; restart the local cluster (down, then up)",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    path.display().to_string()
}

/// The kubectl binary of the local cluster.
fn cluster_kubectl() -> String {
    Cluster::get().var("KUBECTL").to_string()
}

async fn wait_ready(agent: &BootstrapAgent, nodes: &Api<Node>, what: &str) -> Node {
    wait_for(what, TEST_TIMEOUT, || async {
        nodes
            .get_opt(&agent.name)
            .await
            .ok()?
            .filter(|n| node_condition(n, "Ready").as_deref() == Some("True"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()))
}

/// A pod that runs `hello` once on the agent's node; waits for it to succeed.
async fn run_hello(ns: &TestNamespace, agent: &BootstrapAgent, name: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": agent.name,
            "restartPolicy": "Never",
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "hello", "image": example_image("hello")}],
        },
    }))
    .unwrap();
    ns.pods()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let pods = ns.pods();
    wait_for(&format!("pod {name} to succeed"), TEST_TIMEOUT, || async {
        pods.get_opt(name)
            .await
            .ok()?
            .filter(|p| phase(p) == "Succeeded")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}

#[tokio::test]
async fn a_bootstrapped_node_joins_and_keeps_working_across_client_certificate_rotation() {
    let bootstrap = bootstrap_kubeconfig();
    push_examples();
    let cluster = Cluster::get();
    let admin = cluster.admin().await;
    let agent = BootstrapAgent::start("boot", &bootstrap, &["--rotate-certificates"]);
    let nodes: Api<Node> = Api::all(admin.clone());

    // Joined: Ready, with the kubeconfig written next to the certificate store.
    wait_ready(&agent, &nodes, "the bootstrapped node to be Ready").await;
    let kubeconfig = std::fs::read_to_string(agent.dir.join("node.kubeconfig"))
        .expect("the kubeconfig was written");
    let current = agent.dir.join("pki/kubelet-client-current.pem");
    assert!(
        kubeconfig.contains(&format!("client-certificate: {}", current.display())),
        "{kubeconfig}"
    );
    assert!(
        kubeconfig.contains(&format!("client-key: {}", current.display())),
        "{kubeconfig}"
    );
    let (first_path, first) = agent
        .client_certificate()
        .expect("kubelet-client-current.pem names a certificate");
    assert!(
        first_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("kubelet-client-20"),
        "{}",
        first_path.display()
    );
    assert_eq!(
        first.subject,
        format!("CN=system:node:{},O=system:nodes", agent.name)
    );
    assert_eq!(first.issuer, "CN=wasm-kubelet-local-ca");

    // The CSR: asked for by the bootstrap identity, approved by the controller manager.
    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let issued = std::fs::read(&first_path).unwrap();
    let csr = csrs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|c| {
            c.status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|cert| !cert.0.is_empty() && issued.starts_with(&cert.0))
        })
        .expect("a CSR issued the stored certificate");
    assert_eq!(
        csr.spec.signer_name,
        "kubernetes.io/kube-apiserver-client-kubelet"
    );
    assert!(
        csr.spec
            .username
            .as_deref()
            .is_some_and(|u| u.starts_with("system:bootstrap:")),
        "{:?}",
        csr.spec.username
    );
    let approved = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Approved"))
        .expect("approved");
    assert_eq!(
        approved.reason.as_deref(),
        Some("AutoApproved"),
        "approved by the csrapproving controller"
    );

    let ns = TestNamespace::new("boot").await;
    run_hello(&ns, &agent, "before-rotation").await;

    // Rotation: a new certificate (later notBefore, other serial) before the first expires.
    let lifetime = (first.not_after.as_second() - Timestamp::now().as_second()).max(0) as u64;
    assert!(
        lifetime <= 15 * 60,
        "the cluster signs certificates for {lifetime} s; this test waits for one to expire: start it with a short LC_SIGNING_DURATION (the default 3m)"
    );
    let rotated = wait_for(
        "the client certificate to rotate",
        Duration::from_secs(lifetime + 60),
        || async {
            agent
                .client_certificate()
                .filter(|(_, c)| c.serial != first.serial)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let (second_path, second) = rotated;
    assert_ne!(second_path, first_path, "a new dated file");
    assert!(
        second.not_before > first.not_before,
        "{second:?} after {first:?}"
    );
    // When the rotation happened is when the new file was written, not when this test got
    // round to looking (which a loaded machine can delay).
    let written: Timestamp = std::fs::metadata(&second_path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| Timestamp::try_from(t).ok())
        .expect("the new file's mtime");
    assert!(
        written < first.not_after,
        "rotated at {written}, before the old certificate expired at {}",
        first.not_after
    );
    assert!(
        first_path.exists(),
        "the old file stays, as the kubelet keeps it"
    );
    let node_user = format!("system:node:{}", agent.name);
    let renewals = csrs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| c.spec.username.as_deref() == Some(node_user.as_str()))
        .count();
    assert!(
        renewals >= 1,
        "the renewal was asked for with the node's own identity"
    );

    // After the first certificate expired, the node still renews its lease, stays Ready and
    // runs pods: every request now uses the new certificate.
    // A renewal stamped after the expiry is the condition waited for (no sleep until then): the
    // time left to the expiry, then the usual bound.
    let expired_at = first.not_after;
    let left = (expired_at.as_second() - Timestamp::now().as_second()).max(0) as u64;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    wait_for(
        "a lease renewal after the first certificate expired",
        Duration::from_secs(left) + TEST_TIMEOUT,
        || async {
            let renewed = leases.get_opt(&agent.name).await.ok()??.spec?.renew_time?.0;
            (renewed.timestamp_millis() > expired_at.as_millisecond()
                && Timestamp::now() > expired_at)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    wait_ready(&agent, &nodes, "the node to stay Ready").await;
    run_hello(&ns, &agent, "after-expiry").await;
    assert!(
        agent.log().contains("rotated the client certificate"),
        "{}",
        agent.log_tail()
    );
}

#[tokio::test]
async fn a_serving_certificate_approved_by_hand_is_served() {
    let cluster = Cluster::get();
    let admin = cluster.admin().await;
    let name = unique_name("serving");
    let agent = Agent::start(&name, &["--rotate-server-certificates"]).expect("the agent starts");
    let addr = format!("{}:10250", agent.node_ip);

    // Self-signed until someone approves the CSR.
    let before = wait_for("the kubelet API to answer", TEST_TIMEOUT, || async {
        served_certificate(&addr)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_ne!(
        before.issuer, "CN=wasm-kubelet-local-ca",
        "self-signed before approval: {before:?}"
    );

    let csrs: Api<CertificateSigningRequest> = Api::all(admin);
    let user = format!("system:node:{name}");
    let csr = wait_for("the serving CSR", TEST_TIMEOUT, || async {
        csrs.list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|c| {
                c.spec.username.as_deref() == Some(user.as_str())
                    && c.spec.signer_name == "kubernetes.io/kubelet-serving"
            })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert!(
        csr.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|c| c.is_empty()),
        "nothing approves serving CSRs by itself: {:?}",
        csr.status
    );
    let csr_name = csr.metadata.name.clone().unwrap();
    let said = format!("kubectl certificate approve {csr_name}");
    wait_for(
        "the agent to say how to approve its CSR",
        TEST_TIMEOUT,
        || async { agent.log().contains(&said).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let out = cluster
        .kubectl()
        .args(["certificate", "approve", &csr_name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl certificate approve: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let served = wait_for(
        "the issued serving certificate to be served",
        TEST_TIMEOUT,
        || async { served_certificate(&addr).filter(|c| c.issuer == "CN=wasm-kubelet-local-ca") },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_eq!(
        served.subject,
        format!("CN=system:node:{name},O=system:nodes")
    );
    let stored = std::fs::read(agent.dir.join("root/pki/kubelet-server-current.pem"))
        .expect("the serving certificate is stored");
    assert_eq!(
        inspect(&stored).serial,
        served.serial,
        "the stored certificate is the one served"
    );
    // Its names: the node name and IP (openssl prints them in the text form).
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&stored)?;
            c.wait_with_output()
        });
    let text = String::from_utf8_lossy(&text.unwrap().stdout).into_owned();
    assert!(
        text.contains(&format!("DNS:{name}"))
            && text.contains(&format!("IP Address:{}", agent.node_ip)),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_bootstrap_token_is_one_clear_line_and_a_failed_exit() {
    let bootstrap = bootstrap_kubeconfig();
    let text = std::fs::read_to_string(&bootstrap).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("a token in the bootstrap kubeconfig")
        .trim_matches('"')
        .to_string();
    let (id, _) = token.split_once('.').unwrap();
    let dir = workspace_root()
        .join("target/it")
        .join(unique_name("badtoken"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad-bootstrap.kubeconfig");
    // A secret of the token's format that is not the token's. Letters in it, so that YAML reads
    // the value as a string even when the id is all digits (a hex id often is) and the
    // kubeconfig does not quote it.
    std::fs::write(
        &bad,
        text.replace(&token, &format!("{id}.badbadbadbadbadb")),
    )
    .unwrap();

    let mut agent = BootstrapAgent::start("badtoken", bad.to_str().unwrap(), &[]);
    let code = agent.exit_code(TEST_TIMEOUT).await;
    assert_eq!(code, Some(1), "exit code; log:\n{}", agent.log_tail());
    let log = agent.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("wasm-kubelet: certificate signing request:")
            && last.contains("Unauthorized"),
        "last line: {last}\nlog:\n{log}"
    );
    assert!(
        !agent.dir.join("node.kubeconfig").exists(),
        "no kubeconfig is written without a certificate"
    );
}

#[tokio::test]
async fn a_denied_csr_is_one_clear_line_and_a_failed_exit() {
    // A requester that may create CSRs but is not auto-approved (not a bootstrap token, not a
    // node): a ServiceAccount bound to system:node-bootstrapper only. Its CSR stays pending
    // until the test denies it.
    let bootstrap = bootstrap_kubeconfig();
    let cluster = Cluster::get();
    let ns = TestNamespace::new("deny").await;
    let kubectl = |args: &[&str]| {
        let out = cluster.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    kubectl(&["create", "serviceaccount", "requester", "-n", &ns.name]);
    let binding = format!("{}-node-bootstrapper", ns.name);
    kubectl(&[
        "create",
        "clusterrolebinding",
        &binding,
        "--clusterrole=system:node-bootstrapper",
        &format!("--serviceaccount={}:requester", ns.name),
    ]);
    let token = kubectl(&[
        "create",
        "token",
        "requester",
        "-n",
        &ns.name,
        "--duration=10m",
    ]);
    let text = std::fs::read_to_string(&bootstrap).unwrap();
    let bootstrap_token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("a token in the bootstrap kubeconfig")
        .trim_matches('"')
        .to_string();
    let dir = workspace_root().join("target/it").join(&ns.name);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("requester.kubeconfig");
    std::fs::write(&kubeconfig, text.replace(&bootstrap_token, &token)).unwrap();

    let mut agent = BootstrapAgent::start("deny", kubeconfig.to_str().unwrap(), &[]);
    let csrs: Api<CertificateSigningRequest> = Api::all(cluster.admin().await);
    let user = format!("system:serviceaccount:{}:requester", ns.name);
    let csr = wait_for("the pending CSR", TEST_TIMEOUT, || async {
        csrs.list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|c| c.spec.username.as_deref() == Some(user.as_str()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let name = csr.metadata.name.clone().unwrap();
    let said = format!("waiting for certificate signing request {name} to be approved");
    wait_for(
        "the agent to say it waits for its CSR",
        TEST_TIMEOUT,
        || async { agent.log().contains(&said).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    kubectl(&["certificate", "deny", &name]);

    let code = agent.exit_code(TEST_TIMEOUT).await;
    let _ = cluster
        .kubectl()
        .args([
            "delete",
            "clusterrolebinding",
            &binding,
            "--ignore-not-found",
        ])
        .output();
    assert_eq!(code, Some(1), "exit code; log:\n{}", agent.log_tail());
    let log = agent.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "wasm-kubelet: certificate signing request {name} was denied: KubectlDeny"
        )),
        "last line: {last}\nlog:\n{log}"
    );
    assert_eq!(
        last.matches("certificate signing request").count(),
        1,
        "said once: {last}"
    );
    assert!(
        !agent.dir.join("node.kubeconfig").exists(),
        "no kubeconfig is written without a certificate"
    );
}
