//! The rules a value obeys once every setting is known: those between settings (a key needs
//! its certificate, a soft threshold its grace period) and those on the merged value alone
//! (positive, absolute). Each error names the flag, as the value may have come from either.
//! A value's own form was checked when it was parsed (values.rs).

use super::file::KubeletConfiguration;
use super::{invalid, is_dns_subdomain, AuthorizationMode, Config, ConfigError, Flags};

/// Settings the kubelet has that this agent refuses.
pub(super) fn supported(flags: &Flags, file: &KubeletConfiguration) -> Result<(), ConfigError> {
    let sysctls = flags
        .allowed_unsafe_sysctls
        .as_ref()
        .unwrap_or(&file.allowed_unsafe_sysctls);
    if sysctls.iter().any(|s| !s.trim().is_empty()) {
        return Err(ConfigError::Unsupported {
            flag: "--allowed-unsafe-sysctls",
            reason: "WebAssembly pods have no kernel sysctls".into(),
        });
    }
    Ok(())
}

/// Every rule on the merged configuration, in order; the first broken one is the error.
pub(super) fn validate(c: &Config) -> Result<(), ConfigError> {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let standalone = c.kubeconfig.is_none();
    if !c.root_dir.is_absolute() {
        return Err(invalid(
            "--root-dir",
            c.root_dir.display(),
            "must be an absolute path",
        ));
    }
    if !c.pod_logs_dir.is_absolute() {
        return Err(invalid(
            "--pod-logs-dir",
            c.pod_logs_dir.display(),
            "must be an absolute path",
        ));
    }
    if !is_dns_subdomain(&c.node_name) {
        return Err(invalid(
            "--hostname-override",
            &c.node_name,
            "the node name must be a lowercase DNS subdomain (RFC 1123)",
        ));
    }
    if let Some(ip) = c.node_ip.filter(|ip| ip.is_unspecified()) {
        return Err(invalid(
            "--node-ip",
            ip,
            "must be a concrete address, not 0.0.0.0 or ::",
        ));
    }
    if c.bootstrap_kubeconfig.is_some() && standalone {
        return Err(invalid(
            "--bootstrap-kubeconfig",
            path(&c.bootstrap_kubeconfig),
            "needs --kubeconfig: the path the node's kubeconfig is written to",
        ));
    }
    if c.rotate_certificates && standalone {
        return Err(invalid(
            "--rotate-certificates",
            true,
            "needs --kubeconfig: the API server signs the new certificates",
        ));
    }
    if c.rotate_server_certificates && standalone {
        return Err(invalid(
            "--rotate-server-certificates",
            true,
            "needs --kubeconfig: the API server signs the new certificates",
        ));
    }
    if c.node_status_update_frequency.is_zero() {
        return Err(invalid(
            "--node-status-update-frequency",
            "0s",
            "must be positive",
        ));
    }
    if c.node_lease_duration.is_zero() {
        return Err(invalid("nodeLeaseDurationSeconds", 0, "must be positive"));
    }
    if c.image_pull_progress_deadline.is_zero() {
        return Err(invalid(
            "--image-pull-progress-deadline",
            "0s",
            "must be positive",
        ));
    }
    if !c.wasm_runtime_endpoint.is_absolute() {
        return Err(invalid(
            "--wasm-runtime-endpoint",
            c.wasm_runtime_endpoint.display(),
            "must be an absolute path",
        ));
    }
    match (&c.tls_cert_file, &c.tls_private_key_file) {
        (Some(_), None) => {
            return Err(invalid(
                "--tls-cert-file",
                path(&c.tls_cert_file),
                "--tls-private-key-file must be given too",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "--tls-private-key-file",
                path(&c.tls_private_key_file),
                "--tls-cert-file must be given too",
            ))
        }
        _ => {}
    }
    if c.rotate_server_certificates && c.tls_cert_file.is_some() {
        return Err(invalid(
            "--rotate-server-certificates",
            true,
            "the serving certificate comes from a CSR; do not give --tls-cert-file too",
        ));
    }
    if c.authentication_token_webhook && standalone {
        return Err(invalid(
            "--authentication-token-webhook",
            true,
            "needs --kubeconfig: TokenReview asks the API server",
        ));
    }
    if c.authorization_mode == AuthorizationMode::Webhook && standalone {
        return Err(invalid(
            "--authorization-mode",
            "Webhook",
            "needs --kubeconfig: SubjectAccessReview asks the API server",
        ));
    }
    if let Some(cidr) = c.pod_cidr {
        // Room for the network address, the node's bridge address, a pod and (IPv4) broadcast.
        let max = if cidr.addr().is_ipv4() { 30 } else { 126 };
        if cidr.prefix_len() > max {
            return Err(invalid(
                "--pod-cidr",
                cidr,
                format!("too small for pods (at most /{max})"),
            ));
        }
    }
    if c.max_pods == 0 {
        return Err(invalid("--max-pods", 0, "must be at least 1"));
    }
    if let Some(t) = c
        .eviction_soft
        .iter()
        .find(|t| !c.eviction_soft_grace_period.contains_key(&t.signal))
    {
        let why = format!(
            "a grace period must be given for the soft eviction threshold {}",
            t.signal.as_str()
        );
        return Err(invalid("--eviction-soft-grace-period", "", why));
    }
    if c.image_gc_period.is_zero() {
        return Err(invalid("--image-gc-period", "0s", "must be positive"));
    }
    if c.container_gc_period.is_zero() {
        return Err(invalid("--container-gc-period", "0s", "must be positive"));
    }
    if c.image_gc_low_threshold > c.image_gc_high_threshold {
        let why = format!(
            "must not exceed --image-gc-high-threshold ({})",
            c.image_gc_high_threshold
        );
        return Err(invalid(
            "--image-gc-low-threshold",
            c.image_gc_low_threshold,
            why,
        ));
    }
    if c.shutdown_grace_period_critical_pods > c.shutdown_grace_period {
        let why = format!(
            "must not exceed --shutdown-grace-period ({:?})",
            c.shutdown_grace_period
        );
        return Err(invalid(
            "--shutdown-grace-period-critical-pods",
            format!("{:?}", c.shutdown_grace_period_critical_pods),
            why,
        ));
    }
    Ok(())
}
