//! The real binary: a bad flag, value or kubeconfig is one line on stderr and exit code 2
//! before anything starts; standalone mode starts without an API server and stops on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Instant;

use integration_tests::{agent_binary, workspace_root, TEST_TIMEOUT};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--node-ip=300.1.1.1"], "--node-ip"),
        (&["--max-pods=lots"], "--max-pods"),
        (
            &["--node-status-update-frequency=fast"],
            "--node-status-update-frequency",
        ),
        (
            &["--kubeconfig=/nonexistent/kubeconfig"],
            "/nonexistent/kubeconfig",
        ),
        (
            &["--config=/nonexistent/kubelet.yaml"],
            "/nonexistent/kubelet.yaml",
        ),
        (
            &["--allowed-unsafe-sysctls=kernel.msg*"],
            "--allowed-unsafe-sysctls",
        ),
    ];
    for (args, names) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?} gives one line: {stderr}"
        );
        assert!(
            stderr.starts_with("wasm-kubelet: ") && stderr.contains(names),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn help_prints_to_stdout_and_exits_0() {
    let out = Command::new(agent_binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--node-status-update-frequency") && text.contains("--kubeconfig"));
}

/// The areas of `--help`, in the order printed: a user finds a flag by its area, as in the
/// kubelet's documentation.
const HEADINGS: &[&str] = &[
    "General",
    "Cluster connection and node credentials",
    "Node identity and registration",
    "Pods and static pods",
    "Resources and eviction",
    "Image and container garbage collection",
    "Images and registries",
    "Runtime (Wasm and containerd)",
    "Pod network and egress",
    "Kubelet API server (TLS, authentication, authorization)",
    "Shutdown",
    "Logging and debugging",
];

/// `--help` is grouped: each heading once, in order, and every flag line under one of them
/// (none under clap's catch-all "Options", none before the first heading).
#[test]
fn help_groups_every_flag_under_a_heading() {
    let out = Command::new(agent_binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // A heading is a line `Name:` at column 0; a flag line starts with spaces and `-`.
    let mut heading: Option<&str> = None;
    let mut seen = Vec::new();
    let mut flags = 0;
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(':').filter(|_| !line.starts_with(' ')) {
            heading = Some(name);
            seen.push(name);
        } else if line.trim_start().starts_with('-') && line.starts_with("  ") {
            let flag = line.split_whitespace().next().unwrap();
            let heading = heading.unwrap_or_else(|| panic!("{flag} is under no heading:\n{text}"));
            assert!(
                HEADINGS.contains(&heading),
                "{flag} is under {heading:?}, not one of ours:\n{text}"
            );
            flags += 1;
        }
    }
    let ours: Vec<&str> = seen.iter().copied().filter(|h| *h != "Usage").collect();
    assert_eq!(ours, HEADINGS, "headings in order, each once:\n{text}");
    // Every flag the README's flag table documents is printed, under a heading (above).
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    for flag in [
        "--kubeconfig",
        "--bootstrap-kubeconfig",
        "--max-pods",
        "--v",
        "--version",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    let documented = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| l.split('`').nth(1))
        .map(|f| f.split(['=', ' ']).next().unwrap().to_string())
        .collect::<Vec<_>>();
    assert!(!documented.is_empty(), "the README has a flag table");
    for flag in &documented {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with('-') && l.contains(flag.as_str())),
            "README flag {flag} is not in --help"
        );
    }
    assert!(flags >= documented.len(), "{flags} flag lines");
}

/// `--version` prints the name, the crate's version and, when built from git, the commit.
#[test]
fn version_prints_the_version_and_commit() {
    let out = Command::new(agent_binary())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.trim_end();
    assert_eq!(line.lines().count(), 1, "{text}");
    let version = line
        .strip_prefix("wasm-kubelet ")
        .unwrap_or_else(|| panic!("{line}"));
    let (semver, commit) = match version.split_once(" (git ") {
        // "(git COMMIT)", or "(git COMMIT or later, debug build)" for a debug build.
        Some((v, c)) => (v, c.split([' ', ')']).next()),
        None => (version, None),
    };
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!("version = \"{semver}\"")),
        "{semver} is the workspace's version"
    );
    // This test runs from a git checkout: the commit is there, and it is HEAD's (or HEAD's
    // parent while a commit is being made with this binary from before it).
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    if head.status.success() {
        let commit = commit.unwrap_or_else(|| panic!("no commit in {line}"));
        assert_eq!(commit.len(), 12, "{line}");
        assert!(commit.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(workspace_root())
            .status()
            .unwrap();
        assert!(known.success(), "{commit} is a commit of this repository");
    }
}

/// Runs the agent standalone (no API server) with `extra` flags until it logs that it runs,
/// then stops it with SIGTERM; returns its stderr, asserting it ran and ended cleanly.
fn run_standalone(what: &str, extra: &[&str]) -> String {
    let root = workspace_root().join(format!("target/it/{what}-{}", std::process::id()));
    let mut child = Command::new(agent_binary())
        // Guests in the agent: a runtime process it spawned would outlive this test.
        .args([
            "--hostname-override=standalone",
            "--healthz-port=0",
            "--enable-server=false",
            "--wasm-runtime=in-agent",
        ])
        .args(extra)
        .arg("--root-dir")
        .arg(&root)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = String::new();
    // Start-up is quick when the machine is idle; the bound is the suite's, for a loaded one.
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !log.contains("running standalone") {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => log += &(line + "\n"),
            Err(_) => panic!("no standalone notice within {TEST_TIMEOUT:?}: {log}"),
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "standalone agent keeps running"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    log.extend(lines.try_iter().map(|l| l + "\n"));
    assert!(status.success(), "{status:?}: {log}");
    let _ = std::fs::remove_dir_all(&root);
    log
}

#[test]
fn standalone_runs_without_an_api_server() {
    let log = run_standalone("standalone", &[]);
    assert!(log.contains("running standalone"), "{log}");
}

/// `--logging-format=json`: every line the agent writes is one JSON object with the time, the
/// level and the message at the top level, the event's own fields beside them.
#[test]
fn json_logging_is_one_object_per_line() {
    let log = run_standalone("json-logs", &["--logging-format=json"]);
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for event in &events {
        for key in ["timestamp", "level", "message"] {
            assert!(event.get(key).is_some(), "no {key} in {event}");
        }
    }
    let running = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains("running standalone")
        })
        .unwrap_or_else(|| panic!("no standalone event in {log}"));
    assert_eq!(running["level"], "INFO", "{running}");
    // A field of an event is a key of its own (the open-file limit line carries two).
    assert!(
        events
            .iter()
            .any(|e| e.get("before").is_some() && e.get("after").is_some()),
        "no event with top-level fields: {log}"
    );
}
