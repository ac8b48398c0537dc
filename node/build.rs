//! Stamps the binary's `--version` with the git commit it was built from, when it is built from
//! a git checkout (or `WASM_KUBELET_GIT_COMMIT` names one, for builds from a source tarball);
//! otherwise the version is the crate's alone. (A debug build's commit is that of its last
//! full build; see below.)

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=WASM_KUBELET_GIT_COMMIT");
    let commit = std::env::var("WASM_KUBELET_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // A release build is rebuilt when HEAD moves (HEAD itself, the branch it names, and
            // packed refs; only paths that exist: cargo reruns a script whose path is missing
            // each time). A debug build keeps the commit of its last full build: rebuilding the
            // whole crate on every commit costs minutes on the shared dev machines.
            if std::env::var("PROFILE").as_deref() != Ok("release") {
                return git(&["rev-parse", "--short=12", "HEAD"]);
            }
            let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watched.push(branch);
            }
            for name in watched {
                if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                    if Path::new(&path).exists() {
                        println!("cargo:rerun-if-changed={path}");
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        });
    let version = env!("CARGO_PKG_VERSION");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let full = match commit {
        Some(commit) if release => format!("{version} (git {commit})"),
        // Said so, since the debug build may be from a later commit than the one it names.
        Some(commit) => format!("{version} (git {commit} or later, debug build)"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=WASM_KUBELET_VERSION={full}");
}
