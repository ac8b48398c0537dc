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
