//! The benchmark runner (tests/src/bin/pod-startup-bench) run with tiny N, so it cannot rot
//! unseen: every scenario runs against a real agent and the JSON it writes is checked for
//! counts and the absence of errors. Never a timing: the figures are the bench's business.

use std::process::Command;

use integration_tests::unique_name;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pod-startup-bench"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run pod-startup-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pod-startup-bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// `compare` on our node alone: scenarios 1 (create -> Running), 5 (idle usage), 3 (delete ->
/// gone), 2 (burst) and 4 (density, two steps).
#[test]
fn compare_runs_every_scenario_and_writes_sane_json() {
    let out = std::env::temp_dir().join(unique_name("bench-smoke"));
    let stdout = run(bench()
        .args([
            "compare",
            "--pods",
            "3",
            "--burst",
            "3",
            "--density",
            "4",
            "--density-steps",
            "2",
            "--settle",
            "0",
            "--window",
            "0.5",
            "--out",
        ])
        .arg(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).expect("compare.json"))
            .expect("compare.json is JSON");
    let md = std::fs::read_to_string(out.join("compare.md")).expect("compare.md");
    let svg = std::fs::read_to_string(out.join("compare-startup.svg")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);

    assert_eq!(json["pods"], 3, "{json}");
    assert_eq!(json["density"], 4, "{json}");
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "our node only, and it ran:\n{stdout}");
    let r = &results[0];
    assert_eq!(r["kind"], "wasm-kubelet (Wasm)");

    // 1 and 3: every pod seen Running, then gone.
    for scenario in ["create_to_running", "delete_to_gone"] {
        assert_eq!(count(&r[scenario]["n"]), 3, "{scenario}: {r}");
        assert_eq!(count(&r[scenario]["missing"]), 0, "{scenario}: {r}");
    }
    assert_eq!(r["samples_create_ms"].as_array().map(Vec::len), Some(3));
    // 5: the agent (and its runtime process) measured at 0 and N pods.
    for at in ["idle_0", "idle_n"] {
        assert!(count(&r[at]["agent_rss_kib"]) > 0, "{at}: {r}");
        assert!(count(&r[at]["processes"]) >= 1, "{at}: {r}");
    }
    // 2: the burst, all Running.
    assert_eq!(count(&r["burst"]["pods"]), 3, "{r}");
    assert_eq!(count(&r["burst"]["missing"]), 0, "{r}");
    // 4: density to 4 pods in two steps (2, 4) after step 0, no failure, both processes.
    let d = &r["density"];
    assert!(d["failure"].is_null(), "density stopped: {d}");
    assert_eq!(count(&d["reached"]), 4, "{d}");
    let steps = d["steps"].as_array().expect("density steps");
    let pods: Vec<u64> = steps.iter().map(|s| count(&s["pods"])).collect();
    assert_eq!(pods, [0, 2, 4], "{d}");
    for s in steps {
        let procs = s["processes"].as_array().expect("processes");
        let labels: Vec<&str> = procs.iter().filter_map(|p| p["process"].as_str()).collect();
        assert_eq!(labels, ["agent", "runtime"], "{s}");
        assert!(procs.iter().all(|p| count(&p["rss_kib"]) > 0), "{s}");
    }
    assert!(d["rss_kib_per_pod"].is_number(), "{d}");
    for section in ["## 1.", "## 2.", "## 3.", "## 4.", "## 5."] {
        assert!(md.contains(section), "compare.md has no {section}:\n{md}");
    }
    // The start-up plot: one curve per node kind, labelled.
    assert!(
        svg.starts_with("<svg") && svg.contains("wasm-kubelet (Wasm)") && svg.contains("<polyline"),
        "compare-startup.svg: {:.300}",
        svg
    );
}

/// The original mode (our node alone, example guests): both runs complete with every pod.
#[test]
fn the_plain_mode_runs_its_pods() {
    let stdout = run(bench().arg("3"));
    for line in [
        "create -> Running (ticker, cached image): n=3 ",
        "create -> Succeeded (hello): n=3 ",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("warning"), "{stdout}");
}

/// `sleeper-wasm` writes the comparison's guest (deploy/bench builds runwasi's image from it).
#[test]
fn sleeper_wasm_is_a_module() {
    let out = std::env::temp_dir().join(format!("{}.wasm", unique_name("sleeper")));
    run(bench().arg("sleeper-wasm").arg(&out));
    let bytes = std::fs::read(&out).expect("sleeper.wasm");
    let _ = std::fs::remove_file(&out);
    assert_eq!(&bytes[..4], b"\0asm");
}
