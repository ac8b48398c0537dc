//! Admission: whether this node can run a pod at all. A pod it cannot run is rejected with
//! phase Failed, a reason and a message naming the cause, and an Event; it never loops.

use k8s_openapi::api::core::v1::Pod;

/// Why a pod was rejected: `reason` goes to status.reason, `message` to status.message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub message: String,
}

fn reject(reason: &str, message: String) -> Result<(), Rejection> {
    Err(Rejection { reason: reason.into(), message })
}

/// Checks what a Wasm node cannot honour. Volume types are admitted only when
/// [`super::volumes`] can materialise them.
pub fn admit(pod: &Pod) -> Result<(), Rejection> {
    let Some(spec) = &pod.spec else { return reject("UnsupportedPodSpec", "the pod has no spec".into()) };
    if spec.host_pid == Some(true) {
        return reject("UnsupportedPodSpec", "hostPID is not supported: WebAssembly pods have no process namespace to share".into());
    }
    if spec.host_ipc == Some(true) {
        return reject("UnsupportedPodSpec", "hostIPC is not supported: WebAssembly pods have no IPC namespace to share".into());
    }
    for c in spec.init_containers.iter().flatten().chain(spec.containers.iter()) {
        let sc = c.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            return reject("UnsupportedPodSpec", format!("container {} asks to be privileged, which a WebAssembly sandbox cannot grant", c.name));
        }
        if sc.and_then(|s| s.capabilities.as_ref()).and_then(|caps| caps.add.as_ref()).is_some_and(|a| !a.is_empty()) {
            return reject("UnsupportedPodSpec", format!("container {} adds Linux capabilities, which WebAssembly pods do not have", c.name));
        }
        if c.image.as_deref().unwrap_or("").is_empty() {
            return reject("UnsupportedPodSpec", format!("container {} has no image", c.name));
        }
    }
    if let Some(sysctls) = spec.security_context.as_ref().and_then(|s| s.sysctls.as_ref()) {
        if !sysctls.is_empty() {
            return reject("SysctlForbidden", "sysctls are not supported: WebAssembly pods have no kernel parameters".into());
        }
    }
    for v in spec.volumes.iter().flatten() {
        if !super::volumes::supported(v) {
            return reject("UnsupportedVolume", format!("volume {} has a type this node does not support yet", v.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({ "metadata": {"name": "p"}, "spec": spec })).unwrap()
    }

    #[test]
    fn plain_wasm_pod_is_admitted() {
        assert!(admit(&pod(serde_json::json!({"containers": [{"name": "c", "image": "r/hello:v1"}]}))).is_ok());
    }

    #[test]
    fn host_namespaces_privilege_and_unknown_volumes_are_rejected_with_reasons() {
        let r = admit(&pod(serde_json::json!({"hostPID": true, "containers": [{"name": "c", "image": "i"}]}))).unwrap_err();
        assert!(r.message.contains("hostPID"));
        let r = admit(&pod(serde_json::json!({"containers": [{"name": "c", "image": "i", "securityContext": {"privileged": true}}]}))).unwrap_err();
        assert!(r.message.contains("privileged"));
        let r = admit(&pod(serde_json::json!({"volumes": [{"name": "v", "nfs": {"server": "s", "path": "/"}}], "containers": [{"name": "c", "image": "i"}]})))
            .unwrap_err();
        assert_eq!(r.reason, "UnsupportedVolume");
    }
}
