//! The network a pod's guests get: one policy, decided here, for `wasi:sockets` (binds,
//! listens, connections, datagrams, name lookups), outgoing `wasi:http` requests, and which of
//! the pod's ports port-forward may dial.
//!
//! Start at [`NetworkPolicy::verdict`]: the pod IP is the node IP and every pod shares the
//! node's loopback, so "a pod's loopback is its own" is decided per destination:
//! 1. an address in the node's deny list (`--pod-egress-deny-cidrs`) is refused, always;
//! 2. a TCP destination that reaches one of the pod's own listeners ([`PodListeners`]) is allowed;
//! 3. an address in the node's allow list (`--pod-egress-allow-cidrs`: a node-local DNS cache on
//!    169.254.20.10, a node-local proxy) goes on to the outbound policy, like any remote host;
//! 4. link-local (169.254.0.0/16, fe80::/10: cloud metadata services) is refused;
//! 5. the rest of loopback (127.0.0.0/8, ::1, and the unspecified address, which the kernel
//!    treats as loopback) is refused: node daemons listen there;
//! 6. anything else follows the pod's outbound policy (the `allowed-outbound-hosts` annotation).
//!
//! "The pod's own listener" is bookkeeping, not a guess from the port number: a listener is
//! recorded when the provider binds it for an HTTP component, or when a guest's socket, already
//! bound, asks to listen (wasmtime-wasi's `TcpListen` check passes the bound address, so the
//! bind succeeded), and forgotten when its container ends. While one of our sockets listens on
//! an address and port, the kernel lets no other socket listen on it (neither side sets
//! `SO_REUSEPORT`), so a connection to it reaches the pod. What remains is the moment between a
//! check and its connect: a guest that closes its own listener in that window, and a host
//! process that binds the same port within it, would meet (see docs/security.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use provider_api::{ContainerNetwork, OutboundPolicy, Protocol};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::WasiCtxBuilder;

/// The TCP listeners the containers of one pod hold, shared by the pod's containers (their
/// socket checks and HTTP servers record here) and by port-forward (which dials only these).
#[derive(Debug, Default)]
pub struct PodListeners {
    listening: Mutex<Vec<Listening>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Listening {
    container: String,
    addr: SocketAddr,
}

impl PodListeners {
    fn listening(&self) -> std::sync::MutexGuard<'_, Vec<Listening>> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `container` listens on `addr` (a bound address: a concrete port).
    pub fn record(&self, container: &str, addr: SocketAddr) {
        let entry = Listening {
            container: container.to_string(),
            addr,
        };
        let mut listening = self.listening();
        if !listening.contains(&entry) {
            listening.push(entry);
        }
    }

    /// `container` ended: its sockets are closed.
    pub fn forget(&self, container: &str) {
        self.listening().retain(|l| l.container != container);
    }

    /// Whether a TCP connection to `dest` reaches one of these listeners: the same address, or
    /// a wildcard listener of the same family when `dest` is an address of this host (loopback,
    /// the unspecified address, or the pod IP). A wildcard listener does not make a remote
    /// address on the same port "own".
    pub fn reaches(&self, dest: SocketAddr, pod_ip: Option<IpAddr>) -> bool {
        let ip = canonical(dest.ip());
        let local = ip.is_loopback() || ip.is_unspecified() || Some(ip) == pod_ip.map(canonical);
        self.listening().iter().any(|l| {
            l.addr.port() == dest.port()
                && (canonical(l.addr.ip()) == ip
                    || (local && l.addr.ip().is_unspecified() && l.addr.is_ipv4() == ip.is_ipv4()))
        })
    }

    /// Where port-forward dials to reach the pod's listener on `port`: its address, or loopback
    /// of its family for a wildcard listener (the kernel lets no one else listen there).
    pub fn dial(&self, port: u16) -> Option<SocketAddr> {
        let listening = self.listening();
        let l = listening.iter().find(|l| l.addr.port() == port)?;
        let ip = match l.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Some(SocketAddr::new(ip, port))
    }
}

/// What the policy says about one destination, before the pod's outbound list is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// One of the pod's own listeners: allowed whatever the outbound list says (as a runc
    /// pod's containers reach each other on localhost).
    OwnPod,
    /// Refused, and why.
    Denied(Denied),
    /// Neither the pod's nor forbidden: the pod's outbound policy decides.
    Outbound,
}

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// In the node's `--pod-egress-deny-cidrs`.
    DenyList,
    /// 169.254.0.0/16 or fe80::/10.
    LinkLocal,
    /// The node's loopback outside the pod's own listeners.
    Loopback,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Denied::DenyList => "the address is in the node's pod egress deny list",
            Denied::LinkLocal => "link-local addresses are not reachable from pods",
            Denied::Loopback => "the node's loopback is reachable only on the pod's own ports",
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (so `::ffff:127.0.0.1` is loopback).
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        // fe80::/10
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The node's egress settings, the same for every pod (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct NodeEgress {
    /// `--pod-egress-deny-cidrs`: never reachable from a pod.
    pub deny: Vec<IpNet>,
    /// `--pod-egress-allow-cidrs`: link-local or loopback addresses pods may reach all the same.
    pub allow: Vec<IpNet>,
}

/// One container's network policy: its declared ports and the pod IP, the pod's outbound list,
/// the node's egress settings, and the pod's listeners (which it records its own into).
#[derive(Debug, Clone)]
pub struct NetworkPolicy {
    network: ContainerNetwork,
    egress: Arc<NodeEgress>,
    listeners: Arc<PodListeners>,
    /// The container id its listeners are recorded under.
    container: String,
}

impl NetworkPolicy {
    pub fn new(
        network: ContainerNetwork,
        egress: Arc<NodeEgress>,
        listeners: Arc<PodListeners>,
        container: &str,
    ) -> Self {
        Self {
            network,
            egress,
            listeners,
            container: container.to_string(),
        }
    }

    /// `addr` is bound and listening for this container.
    pub fn record_listener(&self, addr: SocketAddr) {
        self.listeners.record(&self.container, addr);
    }

    /// Where port-forward would dial the pod's listener on `port` ([`PodListeners::dial`]).
    pub fn listeners_dial(&self, port: u16) -> Option<SocketAddr> {
        self.listeners.dial(port)
    }

    /// This container (its instance, execs and requests) has ended: its sockets are closed.
    pub fn forget_listeners(&self) {
        self.listeners.forget(&self.container);
    }

    /// The IP-level decision for a connection (`tcp`) or datagram to `dest` (see the module docs).
    pub fn verdict(&self, dest: SocketAddr, tcp: bool) -> Verdict {
        let ip = canonical(dest.ip());
        if self.egress.deny.iter().any(|net| net.contains(&ip)) {
            return Verdict::Denied(Denied::DenyList);
        }
        if tcp && self.listeners.reaches(dest, self.network.pod_ip) {
            return Verdict::OwnPod;
        }
        if self.egress.allow.iter().any(|net| net.contains(&ip)) {
            return Verdict::Outbound;
        }
        if is_link_local(ip) {
            return Verdict::Denied(Denied::LinkLocal);
        }
        if ip.is_loopback() || ip.is_unspecified() {
            return Verdict::Denied(Denied::Loopback);
        }
        Verdict::Outbound
    }

    /// Whether a guest may make `usage` of `addr` (wasmtime-wasi's `socket_addr_check`): binds
    /// only on a declared port (or port 0, a client's implicit bind) at the pod IP or the
    /// wildcard; a listen is recorded as the pod's; connections and datagrams by [`Self::verdict`]
    /// and then the outbound list.
    pub async fn socket_allowed(&self, addr: SocketAddr, usage: SocketAddrUse) -> bool {
        let declared = |protocol: Protocol| {
            self.network
                .ports
                .iter()
                .any(|p| p.port == addr.port() && p.protocol == protocol)
        };
        match usage {
            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
                let protocol = if matches!(usage, SocketAddrUse::TcpBind) {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                let ip_ok = addr.ip().is_unspecified() || Some(addr.ip()) == self.network.pod_ip;
                ip_ok && (addr.port() == 0 || declared(protocol))
            }
            SocketAddrUse::TcpListen => {
                // The socket is bound at `addr` already (or port 0: listen binds an ephemeral
                // port, which is never a declared one).
                if addr.port() != 0 && declared(Protocol::Tcp) {
                    self.listeners.record(&self.container, addr);
                }
                true
            }
            SocketAddrUse::TcpAccept => true,
            SocketAddrUse::TcpConnect => self.destination_allowed(addr, true).await,
            // A datagram sent to, or received from, `addr`.
            SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
                self.destination_allowed(addr, false).await
            }
        }
    }

    async fn destination_allowed(&self, addr: SocketAddr, tcp: bool) -> bool {
        match self.verdict(addr, tcp) {
            Verdict::OwnPod => true,
            Verdict::Denied(why) => {
                tracing::debug!(%addr, %why, "connection refused by the pod network policy");
                false
            }
            Verdict::Outbound => outbound_allows(&self.network.outbound, addr).await,
        }
    }

    /// Whether name lookups (`wasi:sockets/ip-name-lookup`) are granted: always for a pod
    /// without an outbound list; with one, only when it names a host (a list of addresses, or
    /// an empty one, needs no names). wasmtime-wasi has no per-name hook, so a pod whose list
    /// names a host may look up other names too; connecting to what they resolve to is still
    /// held to the list.
    pub fn name_lookup_allowed(&self) -> bool {
        match &self.network.outbound {
            OutboundPolicy::AllowAll => true,
            OutboundPolicy::AllowOnly(hosts) => {
                hosts.iter().any(|h| h.host.parse::<IpAddr>().is_err())
            }
        }
    }

    /// Where an outgoing `wasi:http` request to `host:port` may connect: the outbound list
    /// allows the host as named, and every address it resolves to passes [`Self::verdict`] (one
    /// denied address denies the request: a name cannot smuggle the guest to loopback). Returns
    /// the first address, for the caller to pin the connection to.
    pub async fn http_destination(&self, host: &str, port: u16) -> Result<SocketAddr, HttpDenied> {
        if !self.network.outbound.allows(host, port) {
            return Err(HttpDenied::NotAllowed);
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let resolved: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| HttpDenied::Unresolvable(e.to_string()))?
                .collect(),
        };
        let first = *resolved
            .first()
            .ok_or_else(|| HttpDenied::Unresolvable(format!("{host} has no address")))?;
        for addr in resolved {
            if let Verdict::Denied(why) = self.verdict(addr, true) {
                return Err(HttpDenied::Prohibited(addr, why));
            }
        }
        Ok(first)
    }

    /// Grants `wasi:sockets` under this policy: TCP and UDP, name lookups where
    /// [`Self::name_lookup_allowed`], every address checked by [`Self::socket_allowed`].
    pub fn grant(&self, wasi: &mut WasiCtxBuilder) {
        let policy = Arc::new(self.clone());
        wasi.allow_tcp(true)
            .allow_udp(true)
            .allow_ip_name_lookup(self.name_lookup_allowed());
        wasi.socket_addr_check(move |addr, usage| {
            let policy = policy.clone();
            Box::pin(async move { policy.socket_allowed(addr, usage).await })
        });
    }
}

/// Why an outgoing `wasi:http` request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpDenied {
    /// Not in the pod's allowed outbound hosts.
    NotAllowed,
    /// The host resolves to an address the node forbids.
    Prohibited(SocketAddr, Denied),
    /// The host name does not resolve.
    Unresolvable(String),
}

/// Whether the outbound list allows `addr`: named by address, or by a host name that resolves to it.
pub async fn outbound_allows(policy: &OutboundPolicy, addr: SocketAddr) -> bool {
    let OutboundPolicy::AllowOnly(hosts) = policy else {
        return true;
    };
    if policy.allows(&addr.ip().to_string(), addr.port()) {
        return true;
    }
    for host in hosts
        .iter()
        .filter(|h| h.host.parse::<IpAddr>().is_err() && h.port.is_none_or(|p| p == addr.port()))
    {
        if let Ok(resolved) = tokio::net::lookup_host((host.host.as_str(), addr.port())).await {
            if resolved.into_iter().any(|a| a.ip() == addr.ip()) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::{AllowedHost, PortMapping};

    const POD_IP: &str = "127.0.0.5";

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &str) -> Vec<IpNet> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect()
    }

    fn policy(outbound: OutboundPolicy, deny: &str) -> NetworkPolicy {
        policy_with(outbound, deny, "")
    }

    fn policy_with(outbound: OutboundPolicy, deny: &str, allow: &str) -> NetworkPolicy {
        let network = ContainerNetwork {
            pod_ip: Some(POD_IP.parse().unwrap()),
            ports: vec![
                PortMapping {
                    port: 8080,
                    protocol: Protocol::Tcp,
                },
                PortMapping {
                    port: 9000,
                    protocol: Protocol::Tcp,
                },
            ],
            outbound,
            max_concurrent_requests: None,
        };
        NetworkPolicy::new(
            network,
            Arc::new(NodeEgress {
                deny: cidrs(deny),
                allow: cidrs(allow),
            }),
            Arc::default(),
            "c1",
        )
    }

    #[test]
    fn verdicts_by_destination() {
        let p = policy(
            OutboundPolicy::AllowAll,
            "10.96.0.0/12, 192.0.2.7/32, fd00::/8",
        );
        p.listeners.record("c1", at("127.0.0.5:8080"));
        p.listeners.record("c1", at("0.0.0.0:9000"));
        let own = Verdict::OwnPod;
        let denied = Verdict::Denied;
        let table: &[(&str, bool, Verdict)] = &[
            // The pod's own listeners, at their address or (wildcard) at any local address.
            ("127.0.0.5:8080", true, own),
            ("127.0.0.5:9000", true, own),
            ("127.0.0.1:9000", true, own),
            ("127.9.9.9:9000", true, own),
            ("0.0.0.0:9000", true, own),
            ("[::ffff:127.0.0.1]:9000", true, own),
            // A specific listener says nothing about other loopback addresses on its port.
            ("127.0.0.1:8080", true, denied(Denied::Loopback)),
            // Anything else on loopback: node daemons (etcd), another pod's listener.
            ("127.0.0.1:2379", true, denied(Denied::Loopback)),
            ("127.0.0.5:2379", true, denied(Denied::Loopback)),
            ("[::1]:9000", true, denied(Denied::Loopback)),
            ("[::1]:2379", true, denied(Denied::Loopback)),
            ("[::ffff:127.0.0.1]:2379", true, denied(Denied::Loopback)),
            ("0.0.0.0:2379", true, denied(Denied::Loopback)),
            ("[::]:2379", true, denied(Denied::Loopback)),
            // UDP never counts as the pod's own listener.
            ("127.0.0.1:9000", false, denied(Denied::Loopback)),
            // Link-local, however spelled.
            ("169.254.169.254:80", true, denied(Denied::LinkLocal)),
            ("169.254.0.1:9000", true, denied(Denied::LinkLocal)),
            (
                "[::ffff:169.254.169.254]:80",
                true,
                denied(Denied::LinkLocal),
            ),
            ("[fe80::1]:80", true, denied(Denied::LinkLocal)),
            ("[febf::1]:80", true, denied(Denied::LinkLocal)),
            ("169.254.169.254:53", false, denied(Denied::LinkLocal)),
            // The node's deny list, whatever the protocol.
            ("10.96.0.1:443", true, denied(Denied::DenyList)),
            ("10.111.255.255:53", false, denied(Denied::DenyList)),
            ("192.0.2.7:80", true, denied(Denied::DenyList)),
            ("[fd12::1]:80", true, denied(Denied::DenyList)),
            // Everything else: the outbound list decides.
            ("10.112.0.1:443", true, Verdict::Outbound),
            ("192.0.2.8:80", true, Verdict::Outbound),
            ("[fec0::1]:80", true, Verdict::Outbound),
            ("[2001:db8::1]:443", true, Verdict::Outbound),
            ("169.255.0.1:80", true, Verdict::Outbound),
        ];
        for (dest, tcp, want) in table {
            assert_eq!(p.verdict(at(dest), *tcp), *want, "{dest} tcp={tcp}");
        }
    }

    #[test]
    fn the_deny_list_wins_even_over_the_pods_own_listener() {
        let p = policy(OutboundPolicy::AllowAll, "127.0.0.5/32");
        p.listeners.record("c1", at("127.0.0.5:8080"));
        assert_eq!(
            p.verdict(at("127.0.0.5:8080"), true),
            Verdict::Denied(Denied::DenyList)
        );
    }

    #[tokio::test]
    async fn the_allow_list_opens_node_local_services_to_the_outbound_list_only() {
        let p = policy_with(
            OutboundPolicy::AllowAll,
            "169.254.20.11/32",
            "169.254.20.0/24, 127.0.0.2/32",
        );
        assert_eq!(
            p.verdict(at("169.254.20.10:53"), false),
            Verdict::Outbound,
            "a node-local DNS cache"
        );
        assert_eq!(
            p.verdict(at("127.0.0.2:3128"), true),
            Verdict::Outbound,
            "a node-local proxy"
        );
        assert_eq!(
            p.verdict(at("169.254.20.11:53"), false),
            Verdict::Denied(Denied::DenyList),
            "the deny list wins"
        );
        assert_eq!(
            p.verdict(at("169.254.169.254:80"), true),
            Verdict::Denied(Denied::LinkLocal)
        );
        assert_eq!(
            p.verdict(at("127.0.0.1:3128"), true),
            Verdict::Denied(Denied::Loopback)
        );
        let listed = policy_with(
            OutboundPolicy::AllowOnly(vec![AllowedHost {
                host: "127.0.0.3".into(),
                port: None,
            }]),
            "",
            "127.0.0.2/32",
        );
        assert!(
            !listed
                .socket_allowed(at("127.0.0.2:3128"), SocketAddrUse::TcpConnect)
                .await,
            "the pod's list still narrows it"
        );
    }

    #[test]
    fn a_wildcard_listener_does_not_own_remote_addresses() {
        let p = policy(OutboundPolicy::AllowAll, "");
        p.listeners.record("c1", at("0.0.0.0:80"));
        assert_eq!(
            p.verdict(at("169.254.169.254:80"), true),
            Verdict::Denied(Denied::LinkLocal)
        );
        assert_eq!(p.verdict(at("192.0.2.1:80"), true), Verdict::Outbound);
        assert_eq!(
            p.verdict(at("[::1]:80"), true),
            Verdict::Denied(Denied::Loopback),
            "an IPv4 wildcard does not listen on ::1"
        );
    }

    #[test]
    fn listeners_are_forgotten_with_their_container_and_dialled_on_loopback() {
        let listeners = PodListeners::default();
        listeners.record("c1", at("0.0.0.0:9000"));
        listeners.record("c2", at("127.0.0.5:8080"));
        listeners.record("c2", at("[::]:7000"));
        assert_eq!(listeners.dial(9000), Some(at("127.0.0.1:9000")));
        assert_eq!(listeners.dial(8080), Some(at("127.0.0.5:8080")));
        assert_eq!(listeners.dial(7000), Some(at("[::1]:7000")));
        assert_eq!(listeners.dial(2379), None);
        listeners.forget("c2");
        assert_eq!(listeners.dial(8080), None);
        assert_eq!(listeners.dial(9000), Some(at("127.0.0.1:9000")));
    }

    #[tokio::test]
    async fn sockets_bind_declared_ports_and_only_a_listen_makes_a_port_the_pods() {
        let p = policy(OutboundPolicy::AllowAll, "");
        assert!(
            p.socket_allowed(at("127.0.0.5:8080"), SocketAddrUse::TcpBind)
                .await
        );
        assert!(
            p.socket_allowed(at("0.0.0.0:8080"), SocketAddrUse::TcpBind)
                .await
        );
        assert!(
            p.socket_allowed(at("0.0.0.0:0"), SocketAddrUse::TcpBind)
                .await,
            "a client's implicit bind"
        );
        assert!(
            !p.socket_allowed(at("127.0.0.5:8081"), SocketAddrUse::TcpBind)
                .await,
            "an undeclared port"
        );
        assert!(
            !p.socket_allowed(at("127.0.0.6:8080"), SocketAddrUse::TcpBind)
                .await,
            "another address"
        );
        assert!(
            !p.socket_allowed(at("127.0.0.1:8080"), SocketAddrUse::TcpBind)
                .await,
            "the node's loopback is not the pod IP"
        );
        assert!(
            !p.socket_allowed(at("0.0.0.0:8080"), SocketAddrUse::UdpBind)
                .await,
            "8080 is declared TCP only"
        );
        // A bind alone (which may yet fail: another process holds the port) owns nothing.
        assert!(
            !p.socket_allowed(at("127.0.0.5:8080"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            p.socket_allowed(at("127.0.0.5:8080"), SocketAddrUse::TcpListen)
                .await
        );
        assert!(
            p.socket_allowed(at("127.0.0.5:8080"), SocketAddrUse::TcpConnect)
                .await,
            "the pod's own listener"
        );
        assert_eq!(p.listeners.dial(8080), Some(at("127.0.0.5:8080")));
        // An ephemeral listener is not a declared port: never recorded, never dialled.
        assert!(
            p.socket_allowed(at("0.0.0.0:41234"), SocketAddrUse::TcpListen)
                .await
        );
        assert_eq!(p.listeners.dial(41234), None);
        assert!(
            !p.socket_allowed(at("127.0.0.1:2379"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.socket_allowed(at("169.254.169.254:80"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.socket_allowed(at("169.254.169.254:53"), SocketAddrUse::UdpSend)
                .await
        );
        assert!(
            !p.socket_allowed(at("[fe80::1]:53"), SocketAddrUse::UdpSend)
                .await
        );
    }

    #[tokio::test]
    async fn the_outbound_list_narrows_what_is_left_but_not_the_pods_own_ports() {
        let p = policy(
            OutboundPolicy::AllowOnly(vec![AllowedHost {
                host: "192.0.2.1".into(),
                port: Some(443),
            }]),
            "",
        );
        p.listeners.record("c1", at("0.0.0.0:9000"));
        assert!(
            p.socket_allowed(at("127.0.0.1:9000"), SocketAddrUse::TcpConnect)
                .await,
            "the pod's own port"
        );
        assert!(
            p.socket_allowed(at("192.0.2.1:443"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.socket_allowed(at("192.0.2.1:80"), SocketAddrUse::TcpConnect)
                .await
        );
        // Listing a forbidden address does not open it.
        let p = policy(
            OutboundPolicy::AllowOnly(vec![
                AllowedHost {
                    host: "169.254.169.254".into(),
                    port: None,
                },
                AllowedHost {
                    host: "127.0.0.1".into(),
                    port: None,
                },
            ]),
            "",
        );
        assert!(
            !p.socket_allowed(at("169.254.169.254:80"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.socket_allowed(at("127.0.0.1:2379"), SocketAddrUse::TcpConnect)
                .await
        );
    }

    #[test]
    fn name_lookups_follow_the_outbound_list() {
        assert!(policy(OutboundPolicy::AllowAll, "").name_lookup_allowed());
        assert!(
            !policy(OutboundPolicy::AllowOnly(vec![]), "").name_lookup_allowed(),
            "an empty list: no names"
        );
        let addresses = OutboundPolicy::AllowOnly(vec![
            AllowedHost {
                host: "192.0.2.1".into(),
                port: None,
            },
            AllowedHost {
                host: "::1".into(),
                port: Some(80),
            },
        ]);
        assert!(
            !policy(addresses, "").name_lookup_allowed(),
            "addresses only: nothing to look up"
        );
        let named = OutboundPolicy::AllowOnly(vec![AllowedHost {
            host: "api.example.com".into(),
            port: Some(443),
        }]);
        assert!(policy(named, "").name_lookup_allowed());
    }

    #[tokio::test]
    async fn http_destinations_are_checked_by_every_address_they_resolve_to() {
        let p = policy(OutboundPolicy::AllowAll, "192.0.2.0/24");
        p.listeners.record("c1", at("127.0.0.5:8080"));
        assert_eq!(
            p.http_destination("127.0.0.5", 8080).await,
            Ok(at("127.0.0.5:8080")),
            "the pod's own server"
        );
        assert_eq!(
            p.http_destination("127.0.0.1", 2379).await,
            Err(HttpDenied::Prohibited(
                at("127.0.0.1:2379"),
                Denied::Loopback
            ))
        );
        assert_eq!(
            p.http_destination("169.254.169.254", 80).await,
            Err(HttpDenied::Prohibited(
                at("169.254.169.254:80"),
                Denied::LinkLocal
            ))
        );
        assert_eq!(
            p.http_destination("[fe80::1]", 80).await,
            Err(HttpDenied::Prohibited(
                at("[fe80::1]:80"),
                Denied::LinkLocal
            ))
        );
        assert_eq!(
            p.http_destination("192.0.2.9", 80).await,
            Err(HttpDenied::Prohibited(at("192.0.2.9:80"), Denied::DenyList))
        );
        assert_eq!(
            p.http_destination("198.51.100.1", 80).await,
            Ok(at("198.51.100.1:80"))
        );
        // A name is held to what it resolves to: `localhost` (from /etc/hosts, no DNS traffic).
        assert!(matches!(
            p.http_destination("localhost", 2379).await,
            Err(HttpDenied::Prohibited(_, Denied::Loopback))
        ));
        let listed = policy(
            OutboundPolicy::AllowOnly(vec![AllowedHost {
                host: "198.51.100.1".into(),
                port: None,
            }]),
            "",
        );
        assert_eq!(
            listed.http_destination("198.51.100.2", 80).await,
            Err(HttpDenied::NotAllowed)
        );
    }
}
