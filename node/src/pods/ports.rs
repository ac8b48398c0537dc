//! The pod network on a Wasm node: the pod IP is the node IP, so a declared `containerPort` is
//! a port of the host. This module decides who holds which port ([`HostPorts`]: the second pod
//! asking for a held port is rejected at admission, as the kubelet rejects a host port
//! conflict), and builds each container's [`ContainerNetwork`] (its ports, the pod IP, the
//! outbound policy of the [`ALLOWED_OUTBOUND_HOSTS`] annotation).
//!
//! Pods that declare no ports cost nothing: they never take the table's lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod};
use provider_api::{AllowedHost, ContainerNetwork, OutboundPolicy, PortMapping, Protocol};

use super::admission::Rejection;

/// Pod annotation: a comma-separated list of `host` or `host:port` entries (a name or an IP
/// address; `[v6]:port` for IPv6) that the pod's outgoing HTTP requests and socket connections
/// may reach. Absent: anywhere (the default); present: only those, so `""` means none.
pub const ALLOWED_OUTBOUND_HOSTS: &str = "wasm-kubelet.io/allowed-outbound-hosts";

/// Pod annotation: how many requests each HTTP component container of the pod serves at once
/// (the rest are answered 503). Absent: the provider's default.
pub const MAX_CONCURRENT_REQUESTS: &str = "wasm-kubelet.io/max-concurrent-requests";

/// The kubelet's reason for a pod it rejects because a port it asks for is taken: the
/// scheduler plugin's name, as in the kubelet's `Predicate NodePorts failed` admission error.
pub const PORT_CONFLICT_REASON: &str = "NodePorts";

/// One port of the host as a pod claims it: (host IP or none for every address, protocol, port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HostPort {
    host_ip: Option<IpAddr>,
    protocol: Protocol,
    port: u16,
}

impl HostPort {
    /// Two claims collide on the same port and protocol unless both name different addresses.
    fn collides(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }

    fn describe(&self) -> String {
        let proto = protocol_name(self.protocol);
        match self.host_ip {
            Some(ip) => format!("{ip}:{}/{proto}", self.port),
            None => format!("{}/{proto}", self.port),
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// Which pod holds which host port: the node's one table of them, shared by the pod workers.
/// A worker claims its pod's ports at admission and holds the [`PortClaim`] for as long as the
/// pod may run; dropping the claim frees the ports. The lock is held only for the table lookup.
#[derive(Clone, Default)]
pub struct HostPorts {
    held: Arc<Mutex<HashMap<String, Held>>>,
}

struct Held {
    pod: String,
    ports: Vec<HostPort>,
}

/// A pod's hold on its ports; dropping it releases them.
pub struct PortClaim {
    table: Option<(HostPorts, String)>,
}

impl Drop for PortClaim {
    fn drop(&mut self) {
        if let Some((table, uid)) = self.table.take() {
            table
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
        }
    }
}

impl HostPorts {
    /// Claims every host port `pod` (uid `uid`) takes, or rejects it naming the port and the
    /// pod that holds it: on the node's network (`on_node_network`: a Wasm pod, a `hostNetwork`
    /// pod) every port it declares, else only its explicit `hostPort`s. The same pod claiming
    /// again gets its ports again (a worker re-admitting).
    pub fn claim(
        &self,
        uid: &str,
        pod: &Pod,
        on_node_network: bool,
    ) -> Result<PortClaim, Rejection> {
        let wanted = declared(pod, on_node_network)?;
        if wanted.is_empty() {
            return Ok(PortClaim { table: None });
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (other_uid, other) in held.iter() {
            if other_uid == uid {
                continue;
            }
            if let Some(mine) = wanted
                .iter()
                .find(|w| other.ports.iter().any(|p| w.collides(p)))
            {
                return Err(Rejection {
                    reason: PORT_CONFLICT_REASON.into(),
                    message: format!(
                        "Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports ({} is held by pod {})",
                        mine.describe(),
                        other.pod
                    ),
                });
            }
        }
        held.insert(
            uid.to_string(),
            Held {
                pod: pod_name(pod),
                ports: wanted,
            },
        );
        Ok(PortClaim {
            table: Some((self.clone(), uid.to_string())),
        })
    }
}

/// Whether any container of the pod (init containers included) declares a port.
pub fn declares_ports(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
    })
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The host ports the pod's containers (init containers included: they bind too) take: every
/// declared port for a pod on the node's network, none for a pod with an IP of its own; or a
/// rejection when two of its own containers take the same one, or when a pod with an IP of
/// its own asks for a `hostPort` (not mapped yet: no portmap, which would write the host's nat
/// table; refused rather than silently unreachable).
fn declared(pod: &Pod, on_node_network: bool) -> Result<Vec<HostPort>, Rejection> {
    let Some(spec) = &pod.spec else {
        return Ok(Vec::new());
    };
    let mut ports: Vec<(HostPort, &str)> = Vec::new();
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        for p in c.ports.iter().flatten() {
            if !on_node_network {
                if let Some(host) = p.host_port.filter(|h| *h != 0) {
                    return Err(Rejection {
                        reason: "UnsupportedPodSpec".into(),
                        message: format!("container {}: hostPort {host} is not supported for a pod with an IP of its own on this node yet (host ports are not mapped); use hostNetwork or a Service", c.name),
                    });
                }
                continue;
            }
            let port = host_port(p, &c.name)?;
            if let Some((_, owner)) = ports.iter().find(|(q, _)| q.collides(&port)) {
                return Err(Rejection {
                    reason: PORT_CONFLICT_REASON.into(),
                    message: format!("Pod was rejected: containers {owner} and {} both declare port {}: the pod IP is the node IP, so a port can be served only once", c.name, port.describe()),
                });
            }
            ports.push((port, &c.name));
        }
    }
    Ok(ports.into_iter().map(|(p, _)| p).collect())
}

fn host_port(p: &ContainerPort, container: &str) -> Result<HostPort, Rejection> {
    let invalid = |what: String| Rejection {
        reason: "UnsupportedPodSpec".into(),
        message: format!("container {container}: {what}"),
    };
    let port = u16::try_from(p.container_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(format!("invalid containerPort {}", p.container_port)))?;
    // A hostPort other than the containerPort cannot be honoured: there is no NAT in front of a
    // Wasm pod, the guest is reached on its containerPort at the node IP.
    if let Some(host) = p.host_port.filter(|h| *h != 0 && *h != p.container_port) {
        return Err(invalid(format!("hostPort {host} differs from containerPort {port}; a WebAssembly pod is reached at the node IP on its containerPort, so they must be equal")));
    }
    let host_ip = match p.host_ip.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| invalid(format!("invalid hostIP {s:?}")))?,
        )
        .filter(|ip| !ip.is_unspecified()),
    };
    Ok(HostPort {
        host_ip,
        protocol: protocol(p)?,
        port,
    })
}

/// The parts of a port that do not depend on the pod's network: its protocol and host IP.
fn check_port(p: &ContainerPort, container: &str) -> Result<(), Rejection> {
    protocol(p)?;
    if let Some(s) = p.host_ip.as_deref().filter(|s| !s.is_empty()) {
        s.parse::<IpAddr>().map_err(|_| Rejection {
            reason: "UnsupportedPodSpec".into(),
            message: format!("container {container}: invalid hostIP {s:?}"),
        })?;
    }
    Ok(())
}

fn protocol(p: &ContainerPort) -> Result<Protocol, Rejection> {
    match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" | "" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(Rejection {
            reason: "UnsupportedPodSpec".into(),
            message: format!("port {} has unknown protocol {other}", p.container_port),
        }),
    }
}

/// The pod's outbound policy from its [`ALLOWED_OUTBOUND_HOSTS`] annotation; a malformed entry
/// is a rejection naming it.
pub fn outbound_policy(pod: &Pod) -> Result<OutboundPolicy, Rejection> {
    let Some(value) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOWED_OUTBOUND_HOSTS))
    else {
        return Ok(OutboundPolicy::AllowAll);
    };
    let mut hosts = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        hosts.push(parse_allowed_host(entry).map_err(|why| Rejection {
            reason: "InvalidOutboundHosts".into(),
            message: format!("annotation {ALLOWED_OUTBOUND_HOSTS}: entry {entry:?}: {why} (expected host, host:port or [ipv6]:port, comma-separated)"),
        })?);
    }
    Ok(OutboundPolicy::AllowOnly(hosts))
}

fn parse_allowed_host(entry: &str) -> Result<AllowedHost, String> {
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an unclosed [")?;
        (host, after.strip_prefix(':'))
    } else if entry.matches(':').count() > 1 {
        (entry, None) // a bare IPv6 address
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err("not a host name or address".into());
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("invalid port {p:?}"))?,
        ),
    };
    Ok(AllowedHost {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// The most requests served at once, from the [`MAX_CONCURRENT_REQUESTS`] annotation.
pub fn max_concurrent_requests(pod: &Pod) -> Result<Option<u32>, Rejection> {
    let Some(value) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MAX_CONCURRENT_REQUESTS))
    else {
        return Ok(None);
    };
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .map(Some)
        .ok_or_else(|| Rejection {
            reason: "UnsupportedPodSpec".into(),
            message: format!(
                "annotation {MAX_CONCURRENT_REQUESTS}: {value:?} is not a positive number"
            ),
        })
}

/// Checks the pod's network settings without claiming anything (the pure part of admission).
/// Only what holds on any network is checked here: the rules that depend on it (a hostPort must
/// equal its containerPort on the node's; none on a pod's own) apply at the claim, once the
/// provider says which the pod is on.
pub fn validate(pod: &Pod) -> Result<(), Rejection> {
    for c in pod.spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    }) {
        for p in c.ports.iter().flatten() {
            check_port(p, &c.name)?;
        }
    }
    outbound_policy(pod)?;
    max_concurrent_requests(pod)?;
    Ok(())
}

/// What `container` of `pod` gets: its declared ports at the pod IP (`node_ip`), the pod's
/// outbound policy and request bound. Call after [`validate`] (settings that do not parse fall
/// back to the defaults here).
pub fn container_network(pod: &Pod, container: &Container, node_ip: &str) -> ContainerNetwork {
    ContainerNetwork {
        pod_ip: node_ip.parse().ok(),
        ports: container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(PortMapping {
                    port: u16::try_from(p.container_port).ok()?,
                    protocol: protocol(p).ok()?,
                })
            })
            .collect(),
        outbound: outbound_policy(pod).unwrap_or_default(),
        max_concurrent_requests: max_concurrent_requests(pod).ok().flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, annotations: serde_json::Value, containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
            "spec": {"containers": containers}
        }))
        .unwrap()
    }

    fn with_ports(name: &str, ports: serde_json::Value) -> Pod {
        pod(
            name,
            serde_json::json!({}),
            serde_json::json!([{"name": "c", "image": "i", "ports": ports}]),
        )
    }

    #[test]
    fn a_second_pod_on_a_held_port_is_rejected_until_the_first_lets_go() {
        let table = HostPorts::default();
        let first = table
            .claim(
                "u1",
                &with_ports("a", serde_json::json!([{"containerPort": 8080}])),
                true,
            )
            .unwrap();
        let r = table
            .claim(
                "u2",
                &with_ports(
                    "b",
                    serde_json::json!([{"containerPort": 8080, "protocol": "TCP"}]),
                ),
                true,
            )
            .err()
            .unwrap();
        assert_eq!(r.reason, "NodePorts");
        assert!(
            r.message.contains("didn't have free ports")
                && r.message.contains("8080/TCP is held by pod ns/a"),
            "{}",
            r.message
        );
        // Another protocol or another port is free; the same pod claiming again is not a conflict.
        let _udp = table
            .claim(
                "u3",
                &with_ports(
                    "c",
                    serde_json::json!([{"containerPort": 8080, "protocol": "UDP"}]),
                ),
                true,
            )
            .unwrap();
        let _again = table
            .claim(
                "u1",
                &with_ports("a", serde_json::json!([{"containerPort": 8080}])),
                true,
            )
            .unwrap();
        drop(first);
        drop(_again);
        table
            .claim(
                "u2",
                &with_ports("b", serde_json::json!([{"containerPort": 8080}])),
                true,
            )
            .unwrap();
    }

    #[test]
    fn host_ips_collide_only_with_the_same_address_or_the_wildcard() {
        let table = HostPorts::default();
        let _a = table
            .claim(
                "u1",
                &with_ports(
                    "a",
                    serde_json::json!([{"containerPort": 80, "hostIP": "127.0.0.2"}]),
                ),
                true,
            )
            .unwrap();
        let _b = table
            .claim(
                "u2",
                &with_ports(
                    "b",
                    serde_json::json!([{"containerPort": 80, "hostIP": "127.0.0.3"}]),
                ),
                true,
            )
            .unwrap();
        assert!(table
            .claim(
                "u3",
                &with_ports("c", serde_json::json!([{"containerPort": 80}])),
                true
            )
            .is_err());
        assert!(table
            .claim(
                "u4",
                &with_ports(
                    "d",
                    serde_json::json!([{"containerPort": 80, "hostIP": "0.0.0.0"}])
                ),
                true
            )
            .is_err());
    }

    #[test]
    fn a_pod_with_an_ip_of_its_own_takes_no_host_port() {
        let table = HostPorts::default();
        let _wasm = table
            .claim(
                "u1",
                &with_ports("a", serde_json::json!([{"containerPort": 8080}])),
                true,
            )
            .unwrap();
        // A container pod serving 8080 on its own IP takes nothing of the host's...
        let own = table
            .claim(
                "u2",
                &with_ports("b", serde_json::json!([{"containerPort": 8080}])),
                false,
            )
            .unwrap();
        assert!(own.table.is_none());
        // ...and a hostPort it asks for is refused, not left silently unreachable.
        let mapped = with_ports(
            "c",
            serde_json::json!([{"containerPort": 80, "hostPort": 9090}]),
        );
        let r = table.claim("u3", &mapped, false).err().unwrap();
        assert_eq!(r.reason, "UnsupportedPodSpec");
        assert!(
            r.message.contains("hostPort 9090 is not supported"),
            "{}",
            r.message
        );
        validate(&mapped).unwrap();
    }

    #[test]
    fn pods_without_ports_hold_nothing() {
        let table = HostPorts::default();
        let claim = table
            .claim(
                "u1",
                &pod(
                    "a",
                    serde_json::json!({}),
                    serde_json::json!([{"name": "c", "image": "i"}]),
                ),
                true,
            )
            .unwrap();
        assert!(claim.table.is_none());
        assert!(table.held.lock().unwrap().is_empty());
    }

    #[test]
    fn two_containers_of_one_pod_on_one_port_are_rejected_on_the_node_network() {
        let table = HostPorts::default();
        let p = pod(
            "a",
            serde_json::json!({}),
            serde_json::json!([
                {"name": "one", "image": "i", "ports": [{"containerPort": 9000}]},
                {"name": "two", "image": "i", "ports": [{"containerPort": 9000}]}
            ]),
        );
        let r = table.claim("u1", &p, true).err().unwrap();
        assert_eq!(r.reason, "NodePorts");
        assert!(
            r.message
                .contains("containers one and two both declare port 9000/TCP"),
            "{}",
            r.message
        );
        // With an IP of its own the pod's ports are its own: nothing to refuse at admission.
        validate(&p).unwrap();
        assert!(table.claim("u1", &p, false).unwrap().table.is_none());
        let h = with_ports(
            "h",
            serde_json::json!([{"containerPort": 80, "hostPort": 8080}]),
        );
        assert!(table
            .claim("u2", &h, true)
            .err()
            .unwrap()
            .message
            .contains("hostPort 8080 differs"));
        validate(&h).unwrap();
    }

    #[test]
    fn outbound_hosts_annotation() {
        let none = pod("a", serde_json::json!({}), serde_json::json!([]));
        assert_eq!(outbound_policy(&none).unwrap(), OutboundPolicy::AllowAll);
        let some = pod(
            "a",
            serde_json::json!({ALLOWED_OUTBOUND_HOSTS: "127.0.0.1:8080, Example.com,[::1]:443"}),
            serde_json::json!([]),
        );
        let policy = outbound_policy(&some).unwrap();
        assert!(policy.allows("127.0.0.1", 8080));
        assert!(!policy.allows("127.0.0.1", 8081));
        assert!(policy.allows("example.com", 80) && policy.allows("EXAMPLE.com", 443));
        assert!(policy.allows("[::1]", 443) && !policy.allows("::1", 80));
        assert!(!policy.allows("127.0.0.2", 8080));
        let empty = pod(
            "a",
            serde_json::json!({ALLOWED_OUTBOUND_HOSTS: ""}),
            serde_json::json!([]),
        );
        assert!(!outbound_policy(&empty).unwrap().allows("127.0.0.1", 80));
        let bad = pod(
            "a",
            serde_json::json!({ALLOWED_OUTBOUND_HOSTS: "host:http"}),
            serde_json::json!([]),
        );
        let r = outbound_policy(&bad).unwrap_err();
        assert_eq!(r.reason, "InvalidOutboundHosts");
        assert!(
            r.message.contains("\"host:http\"") && r.message.contains("invalid port"),
            "{}",
            r.message
        );
    }

    #[test]
    fn container_network_carries_ports_ip_and_policy() {
        let p = pod(
            "a",
            serde_json::json!({MAX_CONCURRENT_REQUESTS: "8"}),
            serde_json::json!([{"name": "c", "image": "i", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]),
        );
        let net = container_network(&p, &p.spec.as_ref().unwrap().containers[0], "127.0.0.9");
        assert_eq!(net.pod_ip, Some("127.0.0.9".parse().unwrap()));
        assert_eq!(
            net.ports,
            vec![
                PortMapping {
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                PortMapping {
                    port: 53,
                    protocol: Protocol::Udp
                }
            ]
        );
        assert_eq!(net.outbound, OutboundPolicy::AllowAll);
        assert_eq!(net.max_concurrent_requests, Some(8));
    }
}
