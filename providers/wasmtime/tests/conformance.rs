//! The provider conformance suite (provider-api's `conformance` feature) against the Wasm
//! provider, with the wasm-examples guests pushed to the local cluster's registry: the same
//! checks the containerd provider passes (providers/containerd/tests/conformance.rs). Not run
//! for the Wasm provider:
//! stop-when-asked (WASI has no signals, so `ends_when_asked` is `None`) and list after a
//! restart (the Wasm provider keeps its containers in memory; pods outlive the agent through
//! its separate runtime process instead).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use provider_api::conformance::{self, Case, Fixture};
use provider_api::Provider;
use provider_wasmtime::image::RegistryOptions;
use provider_wasmtime::{ProviderOptions, WasmtimeProvider};

/// A value of the environment, or of the local cluster's env file (`export NAME=value`), the
/// cluster found as deploy/local-cluster finds it: $LOCAL_CLUSTER_DIR, else
/// target/local-cluster of this checkout.
fn cluster_var(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    let dir = std::env::var_os("LOCAL_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/local-cluster"));
    let text = std::fs::read_to_string(dir.join("env")).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn workspace_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the wasm-examples guests and pushes `names`; returns their references by name.
fn push_examples(registry: &str, names: &[&str]) -> Vec<String> {
    let out = Command::new(workspace_root().join("deploy/build-examples"))
        .stderr(Stdio::inherit())
        .output()
        .expect("deploy/build-examples runs");
    assert!(out.status.success(), "deploy/build-examples failed");
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    names
        .iter()
        .map(|name| {
            let path = built
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("build-examples built no {name}: {built}"));
            let digest = Command::new("sha256sum")
                .arg(path)
                .output()
                .expect("sha256sum");
            let tag: String = String::from_utf8_lossy(&digest.stdout)
                .chars()
                .take(16)
                .collect();
            let reference = format!("{registry}/conformance-wasm/{name}:{tag}");
            let pushed = Command::new(workspace_root().join("deploy/push-wasm"))
                .arg(path)
                .arg(&reference)
                .output()
                .expect("deploy/push-wasm runs");
            assert!(
                pushed.status.success(),
                "push-wasm {reference}: {}",
                String::from_utf8_lossy(&pushed.stderr)
            );
            reference
        })
        .collect()
}

struct Setup {
    provider: WasmtimeProvider,
    fixture: Fixture,
    /// The toolbox guest (a busybox-style multi-call program) and the busy-loop guest.
    toolbox: String,
    busy_loop: String,
    work: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn setup(test: &str) -> Setup {
    let registry = cluster_var("REGISTRY").expect(
        "the local cluster's registry: set LOCAL_CLUSTER_DIR (its env file names REGISTRY) or REGISTRY",
    );
    let images = push_examples(
        &registry,
        &["exit-with", "ticker", "memory-hog", "toolbox", "busy-loop"],
    );
    let work = std::env::temp_dir().join(format!("wasm-conf-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let options = ProviderOptions {
        registries: RegistryOptions {
            insecure_registries: vec![registry],
            ..Default::default()
        },
        ..Default::default()
    };
    let provider = WasmtimeProvider::with_options(work.join("root"), options).expect("provider");
    let exit_with = images[0].clone();
    let case = |image: &str| Case {
        image: image.to_string(),
        command: vec![],
        args: vec![],
    };
    let fixture = Fixture {
        prints_and_exits: Box::new(move |code| {
            let case = Case {
                image: exit_with.clone(),
                command: vec![],
                args: vec![code.to_string()],
            };
            (case, format!("exit-with: exiting with status {code}"))
        }),
        ends_when_asked: None,
        term_exit_code: 0,
        ignores_stop: case(&images[1]),
        memory_hog: case(&images[2]),
        memory_limit: 32 << 20,
        auth: vec![],
        work_dir: work.clone(),
        name: "wasmtime".into(),
    };
    Setup {
        provider,
        fixture,
        toolbox: images[3].clone(),
        busy_loop: images[4].clone(),
        work,
    }
}

#[tokio::test]
async fn pull() {
    let s = setup("pull");
    conformance::check_pull(&s.provider, &s.fixture).await;
}

#[tokio::test]
async fn exit_codes_and_logs() {
    let s = setup("exit");
    conformance::check_pull(&s.provider, &s.fixture).await;
    conformance::check_exit_codes_and_logs(&s.provider, &s.fixture).await;
}

#[tokio::test]
async fn stop_with_grace() {
    let s = setup("stop");
    conformance::check_pull(&s.provider, &s.fixture).await;
    conformance::check_stop_with_grace(&s.provider, &s.fixture).await;
}

#[tokio::test]
async fn memory_limit() {
    let s = setup("oom");
    conformance::check_pull(&s.provider, &s.fixture).await;
    conformance::check_memory_limit(&s.provider, &s.fixture).await;
}

/// A toolbox container running `applet args...` (argv[0] names the applet).
fn toolbox(s: &Setup, argv: &[&str]) -> Case {
    Case {
        image: s.toolbox.clone(),
        command: argv.iter().map(|a| a.to_string()).collect(),
        args: vec![],
    }
}

#[tokio::test]
async fn exec() {
    let s = setup("exec");
    conformance::check_pull(&s.provider, &s.fixture).await;
    let ex = conformance::ExecFixture {
        target: toolbox(&s, &["sleep", "100000"]),
        echo: Box::new(|line| vec!["echo".into(), line.into()]),
        // The toolbox's `false`: exit 1 (it has no applet exiting with any other code).
        fails: (vec!["false".into()], 1),
        cat: vec!["cat".into()],
        sleeps: vec!["sleep".into(), "100000".into()],
    };
    s.provider
        .pull_image(&s.toolbox, &[])
        .await
        .expect("pull toolbox");
    conformance::check_exec(&s.provider, &s.fixture, &ex).await;
}

#[tokio::test]
async fn attach() {
    let s = setup("attach");
    conformance::check_pull(&s.provider, &s.fixture).await;
    s.provider
        .pull_image(&s.toolbox, &[])
        .await
        .expect("pull toolbox");
    conformance::check_attach(&s.provider, &s.fixture, &toolbox(&s, &["cat"])).await;
}

#[tokio::test]
async fn usage() {
    let s = setup("usage");
    conformance::check_pull(&s.provider, &s.fixture).await;
    s.provider
        .pull_image(&s.busy_loop, &[])
        .await
        .expect("pull busy-loop");
    let busy = Case {
        image: s.busy_loop.clone(),
        command: vec![],
        args: vec![],
    };
    conformance::check_usage(&s.provider, &s.fixture, &busy).await;
}
