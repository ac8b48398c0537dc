//! A pod's resource requests and limits in numbers: CPU in millicores, memory and ephemeral
//! storage in bytes.
//!
//! [`pod_requests`] is the kubelet's (and scheduler's) effective request of a pod: the sum of
//! its app containers and restartable init containers (sidecars), or the largest ordinary init
//! container plus the sidecars started before it, whichever is larger, plus `spec.overhead`.
//! A container without a request but with a limit requests its limit (the API server's
//! defaulting, applied here too for static pods that never went through it).

use k8s_openapi::api::core::v1::{Container, PodSpec};

/// CPU, memory and ephemeral storage, in the units admission compares: millicores and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: u64,
    pub memory: u64,
    pub ephemeral_storage: u64,
}

impl Resources {
    /// Both together (saturating).
    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.saturating_add(o.milli_cpu),
            memory: self.memory.saturating_add(o.memory),
            ephemeral_storage: self.ephemeral_storage.saturating_add(o.ephemeral_storage),
        }
    }
    fn max(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(o.milli_cpu),
            memory: self.memory.max(o.memory),
            ephemeral_storage: self.ephemeral_storage.max(o.ephemeral_storage),
        }
    }
}

/// A quantity we cannot read, named with where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct QuantityError {
    what: String,
    reason: String,
}

/// CPU in millicores: `200m` is 200, `0.5` is 500, `2` is 2000 (see [`crate::quantity`]).
pub fn milli_cpu(q: &str) -> Result<u64, String> {
    crate::quantity::milli_cpu(q).map_err(|e| e.to_string())
}

/// Memory (or storage) in bytes, rounded up: `128Mi`, `1G`, `1500m` (2 bytes).
pub fn bytes(q: &str) -> Result<u64, String> {
    crate::quantity::bytes(q).map_err(|e| e.to_string())
}

fn overhead(spec: &PodSpec) -> Result<Resources, QuantityError> {
    let Some(map) = spec.overhead.as_ref() else {
        return Ok(Resources::default());
    };
    let err = |r: &str, reason: String| QuantityError {
        what: format!("overhead.{r}"),
        reason,
    };
    let milli_cpu = map
        .get("cpu")
        .map(|q| milli_cpu(&q.0).map_err(|e| err("cpu", e)))
        .transpose()?
        .unwrap_or(0);
    let memory = map
        .get("memory")
        .map(|q| bytes(&q.0).map_err(|e| err("memory", e)))
        .transpose()?
        .unwrap_or(0);
    let ephemeral_storage = map
        .get("ephemeral-storage")
        .map(|q| bytes(&q.0).map_err(|e| err("ephemeral-storage", e)))
        .transpose()?
        .unwrap_or(0);
    Ok(Resources {
        milli_cpu,
        memory,
        ephemeral_storage,
    })
}

/// What one container requests; a resource with a limit and no request requests its limit.
pub fn container_requests(c: &Container) -> Result<Resources, QuantityError> {
    let res = c.resources.as_ref();
    let requests = res.and_then(|r| r.requests.as_ref());
    let limits = res.and_then(|r| r.limits.as_ref());
    let pick = |r: &str| -> Result<u64, QuantityError> {
        let q = requests
            .and_then(|m| m.get(r))
            .or_else(|| limits.and_then(|m| m.get(r)));
        let Some(q) = q else { return Ok(0) };
        let kind = if requests.and_then(|m| m.get(r)).is_some() {
            "requests"
        } else {
            "limits"
        };
        let parsed = if r == "cpu" {
            milli_cpu(&q.0)
        } else {
            bytes(&q.0)
        };
        parsed.map_err(|reason| QuantityError {
            what: format!("container {} {kind}.{r}", c.name),
            reason,
        })
    };
    Ok(Resources {
        milli_cpu: pick("cpu")?,
        memory: pick("memory")?,
        ephemeral_storage: pick("ephemeral-storage")?,
    })
}

/// `resources.limits.cpu` of a container in millicores, if it has one.
pub fn cpu_limit(c: &Container) -> Result<Option<u64>, QuantityError> {
    let q = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("cpu"));
    q.map(|q| {
        milli_cpu(&q.0).map_err(|reason| QuantityError {
            what: format!("container {} limits.cpu", c.name),
            reason,
        })
    })
    .transpose()
}

/// The pod's effective request (see the module docs).
pub fn pod_requests(spec: &PodSpec) -> Result<Resources, QuantityError> {
    let mut apps = Resources::default();
    for c in &spec.containers {
        apps = apps.saturating_add(container_requests(c)?);
    }
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c)?;
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.saturating_add(r);
            init_peak = init_peak.max(sidecars);
        } else {
            init_peak = init_peak.max(sidecars.saturating_add(r));
        }
    }
    Ok(apps
        .saturating_add(sidecars)
        .max(init_peak)
        .saturating_add(overhead(spec)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn quantities_in_admission_units() {
        assert_eq!(milli_cpu("200m"), Ok(200));
        assert_eq!(milli_cpu("0.5"), Ok(500));
        assert_eq!(milli_cpu("2"), Ok(2000));
        assert_eq!(milli_cpu("0.0001"), Ok(1), "rounded up, as MilliValue does");
        assert_eq!(bytes("128Mi"), Ok(128 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1500m"), Ok(2));
        assert!(bytes("12 apples").is_err());
    }

    #[test]
    fn pod_requests_sum_apps_max_init_and_add_overhead() {
        let s = spec(serde_json::json!({
            "overhead": {"cpu": "10m", "memory": "1Mi"},
            "initContainers": [
                {"name": "big-init", "resources": {"requests": {"cpu": "3", "memory": "10Mi"}}},
                {"name": "sidecar", "restartPolicy": "Always", "resources": {"requests": {"cpu": "100m"}}},
            ],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi", "ephemeral-storage": "1Gi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}}},
                {"name": "c"},
            ],
        }));
        let r = pod_requests(&s).unwrap();
        // cpu: max(3000 (init), 250 + 500 + 100 sidecar) + 10; memory: max(10Mi, 192Mi) + 1Mi.
        assert_eq!(
            r,
            Resources {
                milli_cpu: 3010,
                memory: (192 + 1) << 20,
                ephemeral_storage: 1 << 30
            }
        );
    }

    #[test]
    fn a_bad_quantity_names_the_container() {
        let s = spec(
            serde_json::json!({"containers": [{"name": "a", "resources": {"requests": {"memory": "lots"}}}]}),
        );
        assert!(pod_requests(&s)
            .unwrap_err()
            .to_string()
            .contains("container a requests.memory"));
    }

    #[test]
    fn cpu_limit_only_when_set() {
        let c: Container = serde_json::from_value(
            serde_json::json!({"name": "a", "resources": {"limits": {"memory": "1Mi"}}}),
        )
        .unwrap();
        assert_eq!(cpu_limit(&c), Ok(None));
        let c: Container = serde_json::from_value(
            serde_json::json!({"name": "a", "resources": {"limits": {"cpu": "200m"}}}),
        )
        .unwrap();
        assert_eq!(cpu_limit(&c), Ok(Some(200)));
    }
}
