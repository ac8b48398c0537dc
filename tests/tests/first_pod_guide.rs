//! The user docs cannot rot: docs/first-wasm-pod.md's sources are the repository's files, its
//! Go guest builds with the guide's command and both guides' pods run on a node with the
//! guide's manifests and print the guide's logs; docs/compatibility.md agrees with the README's
//! "What works today" table row by row.

use std::path::Path;
use std::process::Command;

use integration_tests::{
    example_wasm, phase, test_node, wait_for, workspace_root, Agent, Cluster, TestNamespace,
    TEST_TIMEOUT,
};

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fenced block right after the line `<!-- {marker} -->`.
fn block_after(text: &str, marker: &str) -> String {
    let tag = format!("<!-- {marker} -->");
    let at = text
        .find(&tag)
        .unwrap_or_else(|| panic!("no {tag} in the guide"));
    let rest = &text[at + tag.len()..];
    let open = rest.find("```").expect("a fence after the marker");
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let close = body.find("\n```").expect("the fence closes");
    format!("{}\n", &body[..close])
}

/// The markers `<!-- {kind}: X -->` of the guide, each X.
fn markers<'a>(text: &'a str, kind: &str) -> Vec<&'a str> {
    let open = format!("<!-- {kind}: ");
    text.match_indices(&open)
        .map(|(i, _)| {
            let rest = &text[i + open.len()..];
            &rest[..rest.find(" -->").unwrap()]
        })
        .collect()
}

#[test]
fn the_guides_sources_are_the_repositorys_files() {
    let guide = read("docs/first-wasm-pod.md");
    let files = markers(&guide, "file");
    for expected in [
        "wasm-examples/hello/src/main.rs",
        "wasm-examples/go-hello/main.go",
        "wasm-examples/go-hello/go.mod",
    ] {
        assert!(files.contains(&expected), "the guide shows {expected}");
    }
    for path in files {
        assert_eq!(
            block_after(&guide, &format!("file: {path}")),
            read(path),
            "the guide's {path} is the file's text"
        );
    }
}

/// Builds the Go guest as the guide says (`GOOS=wasip1 GOARCH=wasm go build`), into target/.
fn build_go_guest(guide: &str) -> std::path::PathBuf {
    let line = guide
        .lines()
        .find(|l| l.starts_with("GOOS=wasip1 GOARCH=wasm go build"))
        .expect("the guide's Go build command");
    assert_eq!(line, "GOOS=wasip1 GOARCH=wasm go build -o hello-go.wasm .");
    let out_dir = workspace_root().join("target/it-guests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let wasm = out_dir.join(format!("hello-go-{}.wasm", std::process::id()));
    let go = ["/usr/local/go/bin/go", "go"]
        .into_iter()
        .find(|g| Command::new(g).arg("version").output().is_ok())
        .expect("Go is installed (deploy/setup-host requires it)");
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&wasm)
        .arg(".")
        .current_dir(workspace_root().join("wasm-examples/go-hello"))
        .env("GOOS", "wasip1")
        .env("GOARCH", "wasm")
        // The go.mod's toolchain line never makes Go download another toolchain.
        .env("GOTOOLCHAIN", "local")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wasm
}

/// Pushes `wasm` with deploy/push-wasm to the reference the guide's manifest names.
fn push(wasm: &Path, reference: &str) {
    let out = Command::new(workspace_root().join("deploy/push-wasm"))
        .arg(wasm)
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push-wasm {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guide's manifest for `pod`, on `agent`'s node, applied with the real kubectl; waits for
/// it to succeed and returns its logs.
async fn run_guide_pod(guide: &str, ns: &TestNamespace, agent: &Agent, pod: &str) -> String {
    let cluster = Cluster::get();
    let manifest = block_after(guide, &format!("pod: {pod}"))
        .replace("${REGISTRY}", cluster.var("REGISTRY"))
        // Pinned to this test's node (the guide lets the scheduler pick a Wasm node).
        .replace("spec:\n", &format!("spec:\n  nodeName: {}\n", agent.name));
    let mut apply = cluster
        .kubectl()
        .args(["apply", "-n", &ns.name, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = apply.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply {pod}: {}\n{manifest}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.wait_pod(agent, pod, "the guide's pod to succeed", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    // `kubectl logs`, as the guide says (through the API server to the node's kubelet API).
    wait_for("the pod's logs", TEST_TIMEOUT, || async {
        let out = cluster
            .kubectl()
            .args(["logs", "-n", &ns.name, pod])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_guides_pods_run_as_written() {
    let guide = read("docs/first-wasm-pod.md");
    let cluster = Cluster::get();
    let agent = test_node("guide", &[]).await;
    let ns = TestNamespace::new("guide").await;

    // Rust: wasm-examples/hello (the guide's source, built by deploy/build-examples).
    push(
        &example_wasm("hello"),
        &format!("{}/hello-rust:v1", cluster.var("REGISTRY")),
    );
    let logs = run_guide_pod(&guide, &ns, &agent, "hello-rust").await;
    assert_eq!(logs, block_after(&guide, "logs: hello-rust"));

    // Go: built here with the guide's command, the ConfigMap made with the guide's command.
    let wasm = build_go_guest(&guide);
    push(&wasm, &format!("{}/hello-go:v1", cluster.var("REGISTRY")));
    let _ = std::fs::remove_file(&wasm);
    let create = guide
        .lines()
        .find(|l| l.starts_with("kubectl create configmap"))
        .expect("the guide's ConfigMap command");
    let out = cluster
        .kubectl()
        .args(create.split_whitespace().skip(1))
        .args(["-n", &ns.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{create}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = run_guide_pod(&guide, &ns, &agent, "hello-go").await;
    assert_eq!(logs, block_after(&guide, "logs: hello-go"));
}

/// A table's rows (cells trimmed), from the line starting `header` to the table's end.
fn table<'a>(text: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("no table {header}"));
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split(" | ")
                .map(str::trim)
                .collect()
        })
        .collect()
}

/// The status a README state cell gives: its words up to the first `,`, `:`, `;` or `(`.
fn readme_status(state: &str) -> &str {
    state
        .split([',', ':', ';', '('])
        .next()
        .unwrap_or(state)
        .trim()
}

#[test]
fn compatibility_table_agrees_with_the_readme() {
    let readme = read("README.md");
    let readme_rows = table(&readme, "| area | state |");
    assert!(readme_rows.len() > 30, "{readme_rows:?}");
    let compat = read("docs/compatibility.md");
    let rows = table(&compat, "| Kubelet feature | Status | README row |");
    let mut cited = vec![false; readme_rows.len()];
    let mut wrong = Vec::new();
    for row in &rows {
        let [feature, status, readme_row] = row[..] else {
            panic!("three cells: {row:?}");
        };
        let matches: Vec<usize> = readme_rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r[0].starts_with(readme_row))
            .map(|(i, _)| i)
            .collect();
        let [i] = matches[..] else {
            wrong.push(format!(
                "{feature}: {} README rows start with {readme_row:?}",
                matches.len()
            ));
            continue;
        };
        cited[i] = true;
        let (area, state) = (readme_rows[i][0], readme_rows[i][1]);
        if readme_status(state) != status {
            wrong.push(format!(
                "{feature}: {status:?} here, {:?} in the README",
                readme_status(state)
            ));
        }
        // A row the README lists among the unsupported names it there.
        if status == "not supported" {
            let name = feature.split(" (").next().unwrap().to_lowercase();
            if !area.to_lowercase().contains(&name) {
                wrong.push(format!(
                    "{feature}: not named in the README's {readme_row:?} row"
                ));
            }
        }
    }
    for (row, cited) in readme_rows.iter().zip(&cited) {
        if !cited {
            wrong.push(format!(
                "README row with no row in docs/compatibility.md: {:.80}",
                row[0]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/compatibility.md differs from the README:\n{}",
        wrong.join("\n")
    );
}
