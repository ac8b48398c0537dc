//! A container's environment, as the kubelet builds it: `envFrom` first, then `env` in order,
//! with `valueFrom` (configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef) and `$(VAR)`
//! expansion. The ConfigMaps and Secrets a container names are fetched by the worker first
//! ([`referenced`]); resolution itself ([`resolve`]) is pure.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};

/// A missing mandatory reference; the container waits with CreateContainerConfigError.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(pub String);

/// The objects a container's environment reads: names of ConfigMaps and Secrets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Referenced {
    pub config_maps: Vec<String>,
    pub secrets: Vec<String>,
}

/// What the worker fetched: key/value data by object name; `None` for an object that does not
/// exist (or cannot be read).
#[derive(Debug, Default)]
pub struct Sources {
    pub config_maps: HashMap<String, Option<BTreeMap<String, String>>>,
    pub secrets: HashMap<String, Option<BTreeMap<String, String>>>,
    pub host_ip: String,
    /// The pod's own IP (a Linux container pod's on a mixed node); empty: the node's.
    pub pod_ip: String,
    /// Node allocatable, the kubelet's value for a resourceFieldRef without a limit:
    /// (cpu in millicores, memory in bytes).
    pub node_allocatable: (u64, u64),
}

pub fn referenced(container: &Container) -> Referenced {
    let mut r = Referenced::default();
    for from in container.env_from.iter().flatten() {
        if let Some(cm) = &from.config_map_ref {
            r.config_maps.push(cm.name.clone());
        }
        if let Some(s) = &from.secret_ref {
            r.secrets.push(s.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(k) = &from.config_map_key_ref {
                r.config_maps.push(k.name.clone());
            }
            if let Some(k) = &from.secret_key_ref {
                r.secrets.push(k.name.clone());
            }
        }
    }
    r.config_maps.sort();
    r.config_maps.dedup();
    r.secrets.sort();
    r.secrets.dedup();
    r
}

/// The environment, in order, later entries overriding earlier ones of the same name.
pub fn resolve(
    pod: &Pod,
    container: &Container,
    sources: &Sources,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(cm) = &from.config_map_ref {
            (
                "configmap",
                cm.name.as_str(),
                cm.optional.unwrap_or(false),
                sources.config_maps.get(&cm.name).cloned().flatten(),
            )
        } else if let Some(s) = &from.secret_ref {
            (
                "secret",
                s.name.as_str(),
                s.optional.unwrap_or(false),
                sources.secrets.get(&s.name).cloned().flatten(),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    set(&mut env, format!("{prefix}{k}"), v);
                }
            }
            None if optional => {}
            None => return Err(EnvError(format!("{kind} \"{name}\" not found"))),
        }
    }

    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or(""), &env),
            Some(from) => {
                if let Some(k) = &from.config_map_key_ref {
                    match lookup(&sources.config_maps, &k.name, &k.key) {
                        Lookup::Found(v) => v,
                        _ if k.optional.unwrap_or(false) => continue,
                        Lookup::NoObject => {
                            return Err(EnvError(format!("configmap \"{}\" not found", k.name)))
                        }
                        Lookup::NoKey => {
                            return Err(EnvError(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                k.key,
                                ns(pod),
                                k.name
                            )))
                        }
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    match lookup(&sources.secrets, &k.name, &k.key) {
                        Lookup::Found(v) => v,
                        _ if k.optional.unwrap_or(false) => continue,
                        Lookup::NoObject => {
                            return Err(EnvError(format!("secret \"{}\" not found", k.name)))
                        }
                        Lookup::NoKey => {
                            return Err(EnvError(format!(
                                "couldn't find key {} in Secret {}/{}",
                                k.key,
                                ns(pod),
                                k.name
                            )))
                        }
                    }
                } else if let Some(f) = &from.field_ref {
                    field_value(pod, &f.field_path, sources)?
                } else if let Some(r) = &from.resource_field_ref {
                    let target = match &r.container_name {
                        Some(name) if !name.is_empty() => pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.iter().find(|c| &c.name == name))
                            .ok_or_else(|| {
                                EnvError(format!("resourceFieldRef names unknown container {name}"))
                            })?,
                        _ => container,
                    };
                    resource_value(
                        target,
                        &r.resource,
                        r.divisor.as_ref().map(|q| q.0.as_str()),
                        sources,
                    )?
                } else {
                    String::new()
                }
            }
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

enum Lookup {
    Found(String),
    NoObject,
    NoKey,
}

fn lookup(
    objects: &HashMap<String, Option<BTreeMap<String, String>>>,
    name: &str,
    key: &str,
) -> Lookup {
    match objects.get(name).and_then(Option::as_ref) {
        None => Lookup::NoObject,
        Some(data) => data.get(key).cloned().map_or(Lookup::NoKey, Lookup::Found),
    }
}

fn ns(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

fn field_value(pod: &Pod, path: &str, sources: &Sources) -> Result<String, EnvError> {
    let m = &pod.metadata;
    let from_map = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let quoted_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => ns(pod).to_string(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => sources.host_ip.clone(),
        // A Wasm pod's IP is the node IP (DESIGN: no pod network for Wasm pods).
        "status.podIP" | "status.podIPs" if sources.pod_ip.is_empty() => sources.host_ip.clone(),
        "status.podIP" | "status.podIPs" => sources.pod_ip.clone(),
        _ => {
            if let Some(k) = quoted_key("metadata.labels['") {
                from_map(&m.labels, &k)
            } else if let Some(k) = quoted_key("metadata.annotations['") {
                from_map(&m.annotations, &k)
            } else {
                return Err(EnvError(format!("unsupported fieldRef {path}")));
            }
        }
    })
}

pub(super) fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    sources: &Sources,
) -> Result<String, EnvError> {
    let res = container.resources.as_ref();
    let get = |kind: &str, name: &str| -> Option<String> {
        let map = if kind == "limits" {
            res.and_then(|r| r.limits.as_ref())
        } else {
            res.and_then(|r| r.requests.as_ref())
        };
        map.and_then(|m| m.get(name)).map(|q| q.0.clone())
    };
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| EnvError(format!("unsupported resourceFieldRef {resource}")))?;
    let is_cpu = name == "cpu";
    // Value in base units: millicores for cpu, bytes otherwise.
    let value = match get(kind, name) {
        Some(q) => parse_base_units(&q, is_cpu)?,
        None if kind == "limits" && is_cpu => sources.node_allocatable.0,
        None if kind == "limits" && name == "memory" => sources.node_allocatable.1,
        None => 0,
    };
    let divisor = match divisor {
        Some(d) => parse_base_units(d, is_cpu)?,
        None if is_cpu => 1000,
        None => 1,
    }
    .max(1);
    // The kubelet rounds up: 250m with divisor 1 is "1".
    Ok(value.div_ceil(divisor).to_string())
}

/// The kubelet's units: millicores (`MilliValue()`) for cpu, whole units (`Value()`, both
/// rounded up) for memory and storage.
fn parse_base_units(q: &str, is_cpu: bool) -> Result<u64, EnvError> {
    let quantity = crate::quantity::Quantity::parse(q).map_err(|e| EnvError(e.to_string()))?;
    if is_cpu {
        quantity.millis()
    } else {
        quantity.bytes()
    }
    .map_err(|e| EnvError(e.to_string()))
}

/// Kubernetes `$(VAR)` expansion against the variables defined so far: `$$` is a literal `$`,
/// an undefined reference is left as written.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match env.iter().rev().find(|(n, _)| n == name) {
                            Some((_, v)) => out.push_str(v),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch = input[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
        SecretEnvSource, SecretKeySelector,
    };

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "demo"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}}}]}
        }))
        .unwrap()
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn sources() -> Sources {
        let mut s = Sources {
            host_ip: "127.0.0.9".into(),
            node_allocatable: (2000, 1 << 30),
            ..Default::default()
        };
        s.config_maps.insert(
            "cfg".into(),
            Some(BTreeMap::from([
                ("color".into(), "blue".into()),
                ("size".into(), "L".into()),
            ])),
        );
        s.config_maps.insert("gone".into(), None);
        s.secrets.insert(
            "creds".into(),
            Some(BTreeMap::from([("password".into(), "s3cret".into())])),
        );
        s
    }

    #[test]
    fn values_field_and_resource_refs_and_expansion() {
        let pod = pod();
        let mut c = pod.spec.as_ref().unwrap().containers[0].clone();
        c.env = Some(vec![
            var("GREETING", "hello"),
            var("MSG", "$(GREETING) world $$(GREETING) $(UNDEFINED)"),
            from(
                "POD",
                EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "APP",
                EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.labels['app']".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "IP",
                EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "status.podIP".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "MEM",
                EnvVarSource {
                    resource_field_ref: Some(k8s_openapi::api::core::v1::ResourceFieldSelector {
                        resource: "limits.memory".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            from(
                "CPU",
                EnvVarSource {
                    resource_field_ref: Some(k8s_openapi::api::core::v1::ResourceFieldSelector {
                        resource: "limits.cpu".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
        ]);
        let env: HashMap<_, _> = resolve(&pod, &c, &sources()).unwrap().into_iter().collect();
        assert_eq!(env["MSG"], "hello world $(GREETING) $(UNDEFINED)");
        assert_eq!(env["POD"], "p");
        assert_eq!(env["APP"], "demo");
        assert_eq!(env["IP"], "127.0.0.9");
        assert_eq!(env["MEM"], (64u64 << 20).to_string());
        assert_eq!(env["CPU"], "1", "250m rounds up to 1 core");
    }

    #[test]
    fn a_pod_with_its_own_ip_gets_it_as_pod_ip_and_the_node_ip_as_host_ip() {
        let pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).expect("pod");
        let mut c = Container {
            name: "c".into(),
            ..Default::default()
        };
        let field = |path: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        };
        c.env = Some(vec![
            from("POD_IP", field("status.podIP")),
            from("HOST_IP", field("status.hostIP")),
        ]);
        let mut s = sources();
        s.pod_ip = "10.1.2.3".into();
        let env: HashMap<_, _> = resolve(&pod, &c, &s).unwrap().into_iter().collect();
        assert_eq!(env["POD_IP"], "10.1.2.3");
        assert_eq!(env["HOST_IP"], "127.0.0.9");
    }

    #[test]
    fn resource_refs_read_every_quantity_form_as_the_kubelet() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "resources": {
            "limits": {"memory": "67108864001m", "cpu": "1.5"}, "requests": {"memory": "0.5Ki", "cpu": "0.0001"}}}))
        .unwrap();
        let value = |r: &str, d: Option<&str>| resource_value(&c, r, d, &sources()).unwrap();
        assert_eq!(
            value("limits.memory", None),
            "67108865",
            "milli bytes round up"
        );
        assert_eq!(
            value("limits.memory", Some("1Mi")),
            "65",
            "64 MiB and a byte, in MiB, rounded up"
        );
        assert_eq!(value("limits.cpu", None), "2", "1500m in cores, rounded up");
        assert_eq!(value("limits.cpu", Some("1m")), "1500");
        assert_eq!(value("requests.memory", Some("1")), "512");
        assert_eq!(
            value("requests.cpu", Some("1m")),
            "1",
            "0.0001 cores is 1 millicore, rounded up"
        );
        assert!(resource_value(&c, "limits.memory", Some("1Xi"), &sources()).is_err());
    }

    #[test]
    fn config_maps_secrets_env_from_and_optional() {
        let pod = pod();
        let mut c = pod.spec.as_ref().unwrap().containers[0].clone();
        c.env_from = Some(vec![
            EnvFromSource {
                prefix: Some("CFG_".into()),
                config_map_ref: Some(k8s_openapi::api::core::v1::ConfigMapEnvSource {
                    name: "cfg".into(),
                    optional: None,
                }),
                secret_ref: None,
            },
            EnvFromSource {
                prefix: None,
                config_map_ref: None,
                secret_ref: Some(SecretEnvSource {
                    name: "missing".into(),
                    optional: Some(true),
                }),
            },
        ]);
        c.env = Some(vec![
            from(
                "COLOR",
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cfg".into(),
                        key: "color".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "PW",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "creds".into(),
                        key: "password".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "OPT",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "creds".into(),
                        key: "nope".into(),
                        optional: Some(true),
                    }),
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(
            referenced(&c),
            Referenced {
                config_maps: vec!["cfg".into()],
                secrets: vec!["creds".into(), "missing".into()]
            }
        );
        let env: HashMap<_, _> = resolve(&pod, &c, &sources()).unwrap().into_iter().collect();
        assert_eq!(env["CFG_color"], "blue");
        assert_eq!(env["COLOR"], "blue");
        assert_eq!(env["PW"], "s3cret");
        assert!(!env.contains_key("OPT"));
    }

    #[test]
    fn a_missing_mandatory_reference_is_an_error_naming_it() {
        let pod = pod();
        let mut c = pod.spec.as_ref().unwrap().containers[0].clone();
        c.env = Some(vec![from(
            "PW",
            EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "absent".into(),
                    key: "k".into(),
                    optional: None,
                }),
                ..Default::default()
            },
        )]);
        assert_eq!(
            resolve(&pod, &c, &sources()).unwrap_err().0,
            "secret \"absent\" not found"
        );
        c.env = Some(vec![from(
            "C",
            EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "cfg".into(),
                    key: "nokey".into(),
                    optional: None,
                }),
                ..Default::default()
            },
        )]);
        assert!(resolve(&pod, &c, &sources())
            .unwrap_err()
            .0
            .contains("couldn't find key nokey"));
    }

    #[test]
    fn expansion_rules() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$(A)", &env), "1-1");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$(A", &env), "$(A");
        assert_eq!(expand("é$", &env), "é$");
    }
}
