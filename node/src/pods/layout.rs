//! The node's disk layout for pods, in one place: every module that needs a pod's directory,
//! a volume's directory, a run's directory or a pod's log directory asks here, so the layout
//! (the kubelet's own) is written down once.
//!
//! ```text
//! <root-dir>/pods/<uid>/                                   pod_dir
//!     volumes/kubernetes.io~<kind>/<volume>/               volume_dir
//!     containers/<container>/<attempt>/                    run_dir (terminationMessagePath)
//! <pod-logs-dir>/<namespace>_<name>_<uid>/<container>/<attempt>.log
//!                                                          pod_log_dir, container_log
//! ```

use std::path::{Path, PathBuf};

/// Where every pod's directory is: `<root-dir>/pods`.
pub fn pods_dir(root_dir: &Path) -> PathBuf {
    root_dir.join("pods")
}

/// One pod's directory.
pub fn pod_dir(root_dir: &Path, uid: &str) -> PathBuf {
    pods_dir(root_dir).join(uid)
}

/// A volume of kind `kind` (`empty-dir`, `secret`, ...) named `volume`, in the pod directory.
pub fn volume_dir(pod_dir: &Path, kind: &str, volume: &str) -> PathBuf {
    pod_dir
        .join("volumes")
        .join(format!("kubernetes.io~{kind}"))
        .join(volume)
}

/// The directory of run `attempt` of `container` (where its termination message is written).
pub fn run_dir(pod_dir: &Path, container: &str, attempt: u32) -> PathBuf {
    pod_dir
        .join("containers")
        .join(container)
        .join(attempt.to_string())
}

/// A pod's log directory, `<namespace>_<name>_<uid>` (neither a namespace nor a name holds `_`).
pub fn pod_log_dir(pod_logs_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    pod_logs_dir.join(format!("{namespace}_{name}_{uid}"))
}

/// The log file of run `attempt` of `container`.
pub fn container_log(pod_log_dir: &Path, container: &str, attempt: u32) -> PathBuf {
    pod_log_dir.join(container).join(format!("{attempt}.log"))
}

/// The UID in `dir_name` when it is a log directory of pod `namespace/name` (several UIDs: a
/// pod deleted and made again under the same name).
pub fn uid_of_pod_log_dir<'a>(dir_name: &'a str, namespace: &str, name: &str) -> Option<&'a str> {
    dir_name
        .strip_prefix(namespace)?
        .strip_prefix('_')?
        .strip_prefix(name)?
        .strip_prefix('_')
}

/// Whether `dir_name` (an entry of the pod logs directory) is the log directory of pod `uid`.
pub fn is_pod_log_dir_of(dir_name: &str, uid: &str) -> bool {
    dir_name.matches('_').count() == 2 && dir_name.ends_with(&format!("_{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelets_layout() {
        let pod = pod_dir(Path::new("/var/lib/wk"), "u1");
        assert_eq!(pod, Path::new("/var/lib/wk/pods/u1"));
        assert_eq!(
            volume_dir(&pod, "empty-dir", "cache"),
            Path::new("/var/lib/wk/pods/u1/volumes/kubernetes.io~empty-dir/cache")
        );
        assert_eq!(
            run_dir(&pod, "app", 2),
            Path::new("/var/lib/wk/pods/u1/containers/app/2")
        );
        let logs = pod_log_dir(Path::new("/var/log/pods"), "ns", "web", "u1");
        assert_eq!(
            container_log(&logs, "app", 0),
            Path::new("/var/log/pods/ns_web_u1/app/0.log")
        );
        assert!(is_pod_log_dir_of("ns_web_u1", "u1"));
        assert_eq!(uid_of_pod_log_dir("ns_web_u1", "ns", "web"), Some("u1"));
        assert_eq!(uid_of_pod_log_dir("ns_web2_u1", "ns", "web"), None);
        assert!(!is_pod_log_dir_of("ns_web_u12", "u1") && !is_pod_log_dir_of("web_u1", "u1"));
    }
}
