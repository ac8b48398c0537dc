//! CNI network configuration lists (CNI spec v1.0.0, "Configuration format").

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{io_err, PodNetError, Result};
use crate::names;

/// The CNI version our configs and invocations speak. Debian's containernetworking-plugins
/// 1.1.1 (bookworm) supports 0.1.0 through 1.0.0.
pub const CNI_VERSION: &str = "1.0.0";

/// A network configuration list: a network name and the plugins run in order for ADD.
///
/// Each plugin's object is kept as JSON, so plugin-specific fields pass through untouched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflist {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(
        rename = "disableCheck",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disable_check: bool,
    pub plugins: Vec<Map<String, Value>>,
}

impl Conflist {
    /// The pod network of a node: a Linux bridge `bridge_iface` whose address is the pod
    /// CIDR's gateway (the node reaches its pods), host-local IPAM over `pod_cidr` with its
    /// allocations under `ipam_data_dir` (not /var/lib/cni: two nodes, or a test, on one host
    /// do not share allocations), a default route through the bridge, and portmap for host
    /// ports. `ipMasq` is off: no NAT rules; outbound traffic from pods is the node operator's
    /// routing, not this network's. Note the bridge plugin turns on IP forwarding in the
    /// network namespace it runs in (isGateway).
    pub fn bridge(
        name: &str,
        bridge_iface: &str,
        pod_cidr: IpNet,
        ipam_data_dir: &Path,
    ) -> Result<Conflist> {
        names::network_name(name)?;
        names::ifname(bridge_iface)?;
        let pod_cidr = pod_cidr.trunc();
        // Room for the network, the gateway, at least one pod and (IPv4) the broadcast address.
        let max_prefix = if pod_cidr.addr().is_ipv4() { 30 } else { 126 };
        if pod_cidr.prefix_len() > max_prefix {
            return Err(PodNetError::Config {
                path: None,
                reason: format!("pod CIDR {pod_cidr} is too small (at most /{max_prefix})"),
            });
        }
        let default_route = match pod_cidr.addr() {
            IpAddr::V4(_) => "0.0.0.0/0",
            IpAddr::V6(_) => "::/0",
        };
        let data_dir = ipam_data_dir.to_str().ok_or_else(|| PodNetError::Config {
            path: None,
            reason: format!("IPAM data dir {} is not UTF-8", ipam_data_dir.display()),
        })?;
        let plugins = vec![
            json!({
                "type": "bridge",
                "bridge": bridge_iface,
                "isGateway": true,
                "ipMasq": false,
                // A pod reaches its own Service address through the bridge (kube-proxy style).
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": pod_cidr.to_string() }]],
                    "routes": [{ "dst": default_route }],
                    "dataDir": data_dir,
                },
            }),
            json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
            }),
        ];
        Ok(Conflist {
            cni_version: CNI_VERSION.into(),
            name: name.into(),
            disable_check: false,
            plugins: plugins.into_iter().map(into_object).collect(),
        })
    }

    /// The loopback network run for `lo` before the pod network, as container runtimes do.
    pub fn loopback() -> Conflist {
        Conflist {
            cni_version: CNI_VERSION.into(),
            name: "cni-loopback".into(),
            disable_check: false,
            plugins: vec![into_object(json!({ "type": "loopback" }))],
        }
    }

    /// Parses and checks a conflist.
    pub fn from_json(bytes: &[u8], path: Option<&Path>) -> Result<Conflist> {
        let config = |reason: String| PodNetError::Config {
            path: path.map(Path::to_path_buf),
            reason,
        };
        let list: Conflist = serde_json::from_slice(bytes).map_err(|e| config(e.to_string()))?;
        names::network_name(&list.name).map_err(|e| config(e.to_string()))?;
        if list.plugins.is_empty() {
            return Err(config("no plugins".into()));
        }
        for plugin in &list.plugins {
            let ty = plugin_type(plugin).map_err(|e| config(e.to_string()))?;
            names::plugin_type(ty).map_err(|e| config(e.to_string()))?;
        }
        Ok(list)
    }

    /// Reads a conflist file.
    pub fn load(path: &Path) -> Result<Conflist> {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        Conflist::from_json(&bytes, Some(path))
    }

    /// Writes the conflist into `dir` as `<name>.conflist` (atomically: a reader never sees half
    /// a file) and returns its path.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let path = dir.join(format!("{}.conflist", self.name));
        let tmp = dir.join(format!(".{}.conflist.tmp", self.name));
        let json = serde_json::to_vec_pretty(self).expect("a Conflist always serializes");
        fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        Ok(path)
    }

    /// The execution configuration of plugin `index` (CNI spec, "Deriving execution
    /// configuration from plugin configuration"): the plugin's object plus the list's `name` and
    /// `cniVersion`, `prevResult` when given, and `runtimeConfig` holding only the capability
    /// arguments the plugin declares in `capabilities`.
    pub(crate) fn plugin_config(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Map<String, Value> {
        let mut conf = self.plugins[index].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        conf.remove("runtimeConfig");
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        let declared = conf.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = capability_args
            .iter()
            .filter(|(cap, _)| declared.and_then(|d| d.get(*cap)) == Some(&Value::Bool(true)))
            .map(|(cap, arg)| (cap.clone(), arg.clone()))
            .collect();
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        conf
    }
}

pub(crate) fn plugin_type(plugin: &Map<String, Value>) -> Result<&str> {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| PodNetError::Config {
            path: None,
            reason: "a plugin has no string \"type\"".into(),
        })
}

fn into_object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("json!({{..}}) is an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_conflist_is_what_the_plugins_read() {
        let list = Conflist::bridge(
            "pods",
            "cni0",
            "10.88.0.0/16".parse().unwrap(),
            Path::new("/var/lib/wk/ipam"),
        )
        .unwrap();
        let got = serde_json::to_value(&list).unwrap();
        let want = json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [
                {
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": "10.88.0.0/16" }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": "/var/lib/wk/ipam",
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        });
        assert_eq!(got, want);
        // Round trip through the file format.
        let back = Conflist::from_json(&serde_json::to_vec(&list).unwrap(), None).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn bridge_refuses_bad_input() {
        let dir = Path::new("/d");
        let cidr: IpNet = "10.88.0.0/16".parse().unwrap();
        assert!(Conflist::bridge("../x", "cni0", cidr, dir).is_err());
        assert!(Conflist::bridge("pods", "a-very-long-bridge", cidr, dir).is_err());
        assert!(Conflist::bridge("pods", "cni0", "10.0.0.0/31".parse().unwrap(), dir).is_err());
        // Host bits are dropped, not passed to host-local.
        let list = Conflist::bridge("pods", "cni0", "10.88.3.4/16".parse().unwrap(), dir).unwrap();
        assert_eq!(
            list.plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.0.0/16"
        );
    }

    #[test]
    fn a_conflist_whose_plugin_type_is_a_path_is_refused() {
        let bad = br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#;
        assert!(matches!(
            Conflist::from_json(bad, None),
            Err(PodNetError::Config { .. })
        ));
        let none = br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#;
        assert!(Conflist::from_json(none, None).is_err());
        let untyped = br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#;
        assert!(Conflist::from_json(untyped, None).is_err());
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let list = Conflist::bridge(
            "pods",
            "cni0",
            "10.88.0.0/16".parse().unwrap(),
            Path::new("/d"),
        )
        .unwrap();
        let mut caps = Map::new();
        caps.insert(
            "portMappings".into(),
            json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }]),
        );
        caps.insert("bandwidth".into(), json!({ "ingressRate": 1 }));
        let prev = json!({ "cniVersion": "1.0.0", "ips": [] });

        let bridge = list.plugin_config(0, None, &caps);
        assert_eq!(bridge["name"], "pods");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(!bridge.contains_key("runtimeConfig"));
        assert!(!bridge.contains_key("prevResult"));

        let portmap = list.plugin_config(1, Some(&prev), &caps);
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({ "portMappings": caps["portMappings"] })
        );
    }
}
