//! Checks of every name that becomes a path component, an interface or a CNI variable.

use crate::error::{PodNetError, Result};

fn invalid(what: &'static str, value: &str, reason: &'static str) -> PodNetError {
    PodNetError::Invalid {
        what,
        value: value.to_owned(),
        reason,
    }
}

/// A pod uid names a directory under the root and is the CNI container ID. The CNI spec
/// (Parameters, CNI_CONTAINERID) allows `[A-Za-z0-9][A-Za-z0-9_.\-]*`; Kubernetes uids are
/// UUIDs. 128 bytes: four times a UUID, far below any path limit.
pub(crate) fn pod_uid(uid: &str) -> Result<()> {
    const MAX: usize = 128;
    if uid.is_empty() || uid.len() > MAX {
        return Err(invalid("pod uid", uid, "must be 1 to 128 characters"));
    }
    if !uid.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("pod uid", uid, "must start with a letter or digit"));
    }
    if !uid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "pod uid",
            uid,
            "only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// A hostname set in a pod's UTS namespace: 1 to 64 bytes (HOST_NAME_MAX on Linux), letters,
/// digits, '-' and '.' (what Kubernetes allows in `spec.hostname` and pod names).
pub(crate) fn hostname(name: &str) -> Result<()> {
    const HOST_NAME_MAX: usize = 64;
    if name.is_empty() || name.len() > HOST_NAME_MAX {
        return Err(invalid("hostname", name, "must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
    {
        return Err(invalid(
            "hostname",
            name,
            "only letters, digits, '-' and '.'",
        ));
    }
    Ok(())
}

/// A Linux interface name (IFNAMSIZ 16 with its NUL), as the CNI spec restricts CNI_IFNAME.
pub(crate) fn ifname(name: &str) -> Result<()> {
    const IFNAMSIZ: usize = 16;
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(invalid(
            "interface name",
            name,
            "must be 1 to 15 characters",
        ));
    }
    if name == "." || name == ".." {
        return Err(invalid("interface name", name, "must not be . or .."));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
    {
        return Err(invalid(
            "interface name",
            name,
            "no '/', ':', spaces or control characters",
        ));
    }
    Ok(())
}

/// A CNI network name (CNI spec, Configuration format: `name`); it names host-local's
/// directory under its dataDir, so no separators.
pub(crate) fn network_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(invalid("network name", name, "must be 1 to 128 characters"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "network name",
            name,
            "a letter or digit, then letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// A plugin `type` is an executable's name inside a plugin directory: never a path.
pub(crate) fn plugin_type(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(invalid(
            "plugin type",
            name,
            "must be a file name, not a path",
        ));
    }
    Ok(())
}

/// A value inside CNI_ARGS (`K=V;K=V`): no separators of that format.
pub(crate) fn cni_arg(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.contains(['=', ';', '\0']) {
        return Err(invalid(what, value, "must be non-empty without '=', ';'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_that_escape_or_break_paths_are_refused() {
        pod_uid("0b8e4c8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "-a",
            "a b",
            "a\0b",
            &"a".repeat(129),
        ] {
            assert!(pod_uid(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn interface_names_follow_the_kernel_limit() {
        ifname("eth0").unwrap();
        ifname("lo").unwrap();
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(ifname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hostnames_and_plugin_types() {
        hostname("pod-a.example").unwrap();
        assert!(hostname(&"h".repeat(65)).is_err());
        assert!(hostname("a_b").is_err());
        plugin_type("bridge").unwrap();
        assert!(plugin_type("../../bin/sh").is_err());
        assert!(plugin_type("/bin/sh").is_err());
        assert!(cni_arg("pod name", "a;K8S_POD_UID=x").is_err());
    }
}
