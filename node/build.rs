//! Stamps the binary's `--version` with the git commit it was built from, when it is built from
//! a git checkout (or `WASM_KUBELET_GIT_COMMIT` names one, for builds from a source tarball);
//! otherwise the version is the crate's alone.

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
            // Rebuilt when HEAD moves: HEAD itself, the branch it names, and packed refs. Only
            // paths that exist are named (cargo reruns a script whose path is missing each time).
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
    let full = match commit {
        Some(commit) => format!("{version} (git {commit})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=WASM_KUBELET_VERSION={full}");
}
