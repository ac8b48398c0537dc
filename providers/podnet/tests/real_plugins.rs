//! Pod namespaces and the pod network with the REAL CNI plugins (Debian's
//! containernetworking-plugins in /usr/lib/cni) and real namespaces. Needs root.
//!
//! Each test plays the node inside a network namespace of its own (`ip netns add`): the
//! plugins run there (they are children of a thread that entered it), so the bridge, its
//! gateway address, the IP forwarding the bridge plugin turns on and portmap's iptables rules
//! all live in that namespace, never in the machine's. Traffic goes only between that node
//! namespace and the pod namespaces the test creates.

use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pod_network::{
    Conflist, NamespaceSpec, PluginRunner, PodNamespaces, PodNetError, PodNetwork, PodRef,
    PortMapping, Sharing,
};

fn require_root_and_plugins() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests create namespaces: run them as root"
    );
    for plugin in ["bridge", "host-local", "portmap", "loopback"] {
        assert!(
            Path::new("/usr/lib/cni").join(plugin).is_file(),
            "/usr/lib/cni/{plugin} missing: install containernetworking-plugins (deploy/setup-host)"
        );
    }
}

/// Runs `f` on a new thread that first joins the namespace pinned at `path` (`nstype`: a
/// CLONE_NEW* flag). Processes it starts are in that namespace too.
fn in_ns<T: Send + 'static>(
    path: &Path,
    nstype: libc::c_int,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: a valid descriptor of a namespace file; affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), nstype) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

fn in_net<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_ns(path, libc::CLONE_NEWNET, f)
}

/// The test's node: a network namespace of its own, deleted on drop (with the bridge, the
/// veths and the iptables rules in it).
struct Node {
    name: String,
    root: PathBuf,
    uids: Vec<String>,
}

impl Node {
    fn new(tag: &str) -> Node {
        require_root_and_plugins();
        let name = format!("podnet-it-{}-{tag}", std::process::id());
        let root = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Node {
            name,
            root,
            uids: Vec::new(),
        }
    }

    fn netns(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ns_root(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// Runs the async body on a thread inside the node's network namespace.
    fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        in_net(&self.netns(), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(body())
        })
    }

    fn network(&self, tag: &str, bridge: &str, cidr: &str) -> PodNetwork {
        let list = Conflist::bridge(
            &format!("podnet-{tag}"),
            bridge,
            cidr.parse().unwrap(),
            &self.root.join("ipam"),
        )
        .unwrap();
        // Through the file, as the node does.
        let path = list.write_to(&self.root.join("net.d")).unwrap();
        let list = Conflist::load(&path).unwrap();
        PodNetwork::new(list, PluginRunner::default(), self.root.join("cni-state"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for uid in &self.uids {
            if let Ok(Some(ns)) = PodNamespaces::open(&self.ns_root(), uid) {
                let _ = ns.remove();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pod(uid: &str, name: &str) -> PodRef {
    PodRef {
        uid: uid.into(),
        namespace: "podnet-test".into(),
        name: name.into(),
    }
}

fn ino(path: &Path) -> (u64, u64) {
    let m = fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// Serves one connection on `ip:port` inside the pod's netns: reads a line, answers with it
/// reversed. Returns once listening.
fn serve_once(netns: &Path, ip: IpAddr, port: u16) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = netns.to_path_buf();
    let handle = std::thread::spawn(move || {
        in_net(&netns, move || {
            let listener = TcpListener::bind(SocketAddr::new(ip, port)).unwrap();
            ready_tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            buf.reverse();
            conn.write_all(&buf).unwrap();
        })
    });
    ready_rx.recv().expect("listener thread failed");
    handle
}

fn exchange(addr: SocketAddr) -> String {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).unwrap();
    String::from_utf8(buf.to_vec()).unwrap()
}

#[test]
fn two_pods_get_own_addresses_reach_each_other_and_release_them() {
    let mut node = Node::new("two");
    let (uid_a, uid_b) = ("pod-a-1111", "pod-b-2222");
    node.uids = vec![uid_a.into(), uid_b.into()];
    let root = node.ns_root();
    let ns_a = PodNamespaces::create(&root, uid_a, &NamespaceSpec::pod("pod-a")).unwrap();
    let ns_b = PodNamespaces::create(&root, uid_b, &NamespaceSpec::pod("pod-b")).unwrap();
    let (net_a, net_b) = (ns_a.netns_path().unwrap(), ns_b.netns_path().unwrap());
    let net = node.network("two", "pnit-two", "10.213.1.0/24");
    let ipam_dir = node.root.join("ipam").join("podnet-two");
    let node_netns = node.netns();

    // A second namespace set for a pod that has one is refused, not silently replaced.
    assert!(matches!(
        PodNamespaces::create(&root, uid_a, &NamespaceSpec::pod("pod-a")),
        Err(PodNetError::AlreadyExists { .. })
    ));

    let (a_net, b_net) = (net_a.clone(), net_b.clone());
    let net2 = net.clone();
    node.run(move || async move {
        let a = net2.setup(&pod(uid_a, "a"), &a_net, &[]).await.unwrap();
        let b = net2.setup(&pod(uid_b, "b"), &b_net, &[]).await.unwrap();
        let (ip_a, ip_b) = (a.ips[0], b.ips[0]);
        assert_eq!(a.ips.len(), 1);
        assert_ne!(ip_a, ip_b);
        let cidr: ipnet::IpNet = "10.213.1.0/24".parse().unwrap();
        assert!(
            cidr.contains(&ip_a) && cidr.contains(&ip_b),
            "{ip_a} {ip_b}"
        );

        // Each pod has its address on its own eth0, and lo is up.
        for (netns, ip) in [(a_net.clone(), ip_a), (b_net.clone(), ip_b)] {
            let eth0 = in_net(&netns, || run("ip", &["-o", "addr", "show", "dev", "eth0"]));
            assert!(eth0.contains(&format!("inet {ip}/24")), "{eth0}");
            in_net(&netns, || {
                let l = TcpListener::bind("127.0.0.1:0").expect("lo is up in the pod");
                TcpStream::connect(l.local_addr().unwrap()).expect("connect over lo");
            });
        }

        // Pod b reaches pod a; the node reaches pod b.
        let server = serve_once(&a_net, ip_a, 7001);
        let answer = in_net(&b_net, move || exchange(SocketAddr::new(ip_a, 7001)));
        assert_eq!(answer, "olleh");
        server.join().unwrap();
        let server = serve_once(&b_net, ip_b, 7002);
        assert_eq!(exchange(SocketAddr::new(ip_b, 7002)), "olleh");
        server.join().unwrap();

        // CHECK passes on a healthy attachment.
        net2.check(uid_a).await.unwrap();

        // The host-side veth of pod a, and its host-local allocation, exist now...
        let veth_a = a
            .result
            .host_interfaces()
            .find(|n| n.starts_with("veth"))
            .unwrap()
            .to_owned();
        let ipam = ipam_dir.join(ip_a.to_string());
        assert!(ipam.exists(), "{} missing", ipam.display());
        let links = run("ip", &["-o", "link", "show"]);
        assert!(links.contains(&veth_a), "{links}");

        // ...and are gone after teardown. Teardown twice is fine.
        net2.teardown(uid_a).await.unwrap();
        net2.teardown(uid_a).await.unwrap();
        assert!(!ipam.exists(), "host-local still holds {ip_a}");
        let links = run("ip", &["-o", "link", "show"]);
        assert!(!links.contains(&veth_a), "{veth_a} still there: {links}");
        assert!(
            ipam_dir.join(ip_b.to_string()).exists(),
            "pod b's address went too"
        );
    });

    // The UTS and IPC namespaces are the pods' own.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for (ns, want) in [(&ns_a, "pod-a"), (&ns_b, "pod-b")] {
        let uts = ns.paths().uts.unwrap();
        let got = in_ns(&uts, libc::CLONE_NEWUTS, || {
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
        });
        assert_eq!(got.trim(), want);
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
    let (ipc_a, ipc_b) = (ns_a.paths().ipc.unwrap(), ns_b.paths().ipc.unwrap());
    assert_ne!(ino(&ipc_a), ino(&ipc_b));
    assert_ne!(ino(&ipc_a), ino(Path::new("/proc/self/ns/ipc")));
    assert_ne!(ino(&net_a), ino(Path::new("/proc/self/ns/net")));
    assert_ne!(ino(&net_a), ino(&node_netns));

    // "Restart": drop the handle without remove, open finds the same namespaces.
    let before = ino(&net_b);
    let (before_ipc, before_uts) = (
        ino(&ns_b.paths().ipc.unwrap()),
        ino(&ns_b.paths().uts.unwrap()),
    );
    drop(ns_b);
    let ns_b = PodNamespaces::open(&root, uid_b)
        .unwrap()
        .expect("pinned namespaces found");
    assert_eq!(ino(&ns_b.netns_path().unwrap()), before);
    assert_eq!(ino(&ns_b.paths().ipc.unwrap()), before_ipc);
    assert_eq!(ino(&ns_b.paths().uts.unwrap()), before_uts);
    // The restarted network still knows pod b's address.
    assert!(net.addresses_of(&pod(uid_b, "b")).unwrap().is_some());

    // remove() unpins and deletes; twice is fine; open finds nothing after.
    ns_a.remove().unwrap();
    ns_a.remove().unwrap();
    assert!(!net_a.exists());
    assert!(PodNamespaces::open(&root, uid_a).unwrap().is_none());
    let b_clone = net.clone();
    node.run(move || async move { b_clone.teardown(uid_b).await.unwrap() });
    ns_b.remove().unwrap();
    assert!(!root.join(uid_b).exists());
}

#[test]
fn host_ports_go_through_portmap_and_del_removes_its_rules() {
    let mut node = Node::new("ports");
    let uid = "pod-ports-3333";
    node.uids = vec![uid.into()];
    let ns = PodNamespaces::create(&node.ns_root(), uid, &NamespaceSpec::pod("ports")).unwrap();
    let netns = ns.netns_path().unwrap();
    let net = node.network("ports", "pnit-ports", "10.213.2.0/24");
    let ports = vec![PortMapping {
        host_port: 40123,
        container_port: 8080,
        protocol: "tcp".into(),
        host_ip: None,
    }];
    let name = node.name.clone();
    let nat = move || {
        run(
            "ip",
            &["netns", "exec", &name, "iptables-save", "-t", "nat"],
        )
    };
    let nat2 = nat.clone();
    node.run(move || async move {
        let got = net.setup(&pod(uid, "ports"), &netns, &ports).await.unwrap();
        let ip = got.ips[0];
        let rules = nat2();
        assert!(
            rules.contains(uid),
            "no portmap rule names the pod: {rules}"
        );
        assert!(rules.contains("--dport 40123"), "{rules}");
        // The node connects to its own bridge address on the host port: DNAT to the pod.
        let gateway = got.result.ips[0].gateway.expect("bridge is the gateway");
        let server = serve_once(&netns, ip, 8080);
        assert_eq!(exchange(SocketAddr::new(gateway, 40123)), "olleh");
        server.join().unwrap();
        net.teardown(uid).await.unwrap();
    });
    let rules = nat();
    assert!(
        !rules.contains(uid),
        "portmap rules left after DEL: {rules}"
    );
    assert!(!rules.contains("40123"), "{rules}");
    // No NAT rule for the pod subnet's outbound traffic (ipMasq is off).
    assert!(!rules.contains("10.213.2.0/24"), "{rules}");
    ns.remove().unwrap();
}

#[test]
fn an_exhausted_range_is_a_typed_plugin_error_and_leaves_nothing() {
    let mut node = Node::new("full");
    let (uid_a, uid_b) = ("pod-full-a", "pod-full-b");
    node.uids = vec![uid_a.into(), uid_b.into()];
    let root = node.ns_root();
    let ns_a = PodNamespaces::create(&root, uid_a, &NamespaceSpec::pod("a")).unwrap();
    let ns_b = PodNamespaces::create(&root, uid_b, &NamespaceSpec::pod("b")).unwrap();
    // A /30: the gateway and one pod address.
    let net = node.network("full", "pnit-full", "10.213.3.0/30");
    let (a_net, b_net) = (ns_a.netns_path().unwrap(), ns_b.netns_path().unwrap());
    node.run(move || async move {
        net.setup(&pod(uid_a, "a"), &a_net, &[]).await.unwrap();
        let err = net.setup(&pod(uid_b, "b"), &b_net, &[]).await.unwrap_err();
        match &err {
            PodNetError::Plugin { plugin, msg, .. } => {
                assert_eq!(plugin, "bridge");
                assert!(msg.contains("no IP addresses available"), "{err}");
            }
            other => panic!("not a plugin error: {other:?}"),
        }
        // The failed ADD was undone: no record, no eth0 in pod b, one veth on the bridge.
        assert!(net.addresses_of(&pod(uid_b, "b")).unwrap().is_none());
        let links = in_net(&b_net, || run("ip", &["-o", "link", "show"]));
        assert!(!links.contains("eth0"), "{links}");
        let ports = run("ip", &["-o", "link", "show", "master", "pnit-full"]);
        assert_eq!(ports.lines().count(), 1, "{ports}");
        net.teardown(uid_a).await.unwrap();
    });
    ns_a.remove().unwrap();
    ns_b.remove().unwrap();
}

#[test]
fn host_network_creates_no_netns_and_half_created_state_is_cleaned() {
    let mut node = Node::new("hostnet");
    let root = node.ns_root();
    node.uids = vec!["pod-host-1".into(), "pod-half-1".into()];

    // hostNetwork: the node's network and UTS, an IPC namespace of the pod's own.
    let spec = NamespaceSpec {
        hostname: "ignored".into(),
        network: Sharing::Host,
        ipc: Sharing::Pod,
    };
    let host = PodNamespaces::create(&root, "pod-host-1", &spec).unwrap();
    let paths = host.paths();
    assert_eq!((paths.network.clone(), paths.uts.clone()), (None, None));
    assert!(!root.join("pod-host-1/ns/net").exists());
    assert!(!root.join("pod-host-1/ns/uts").exists());
    assert_ne!(
        ino(&paths.ipc.clone().unwrap()),
        ino(Path::new("/proc/self/ns/ipc"))
    );
    // No CNI for it: attach answers None without running a plugin (a conflist naming a
    // plugin that does not exist would fail otherwise).
    let raw = r#"{"cniVersion":"1.0.0","name":"none","plugins":[{"type":"no-such-plugin"}]}"#;
    let list = Conflist::from_json(raw.as_bytes(), None).unwrap();
    let net = PodNetwork::new(list, PluginRunner::default(), node.root.join("cni-state"));
    let attached = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(net.attach(&pod("pod-host-1", "h"), &host, &[]))
        .unwrap();
    assert_eq!(attached, None);
    drop(host);
    let host = PodNamespaces::open(&root, "pod-host-1").unwrap().unwrap();
    assert_eq!(host.paths(), paths);
    host.remove().unwrap();

    // Half-created: namespaces pinned but the completion marker never written (a crash).
    let half = PodNamespaces::create(&root, "pod-half-1", &NamespaceSpec::pod("half")).unwrap();
    let net_path = half.netns_path().unwrap();
    drop(half);
    fs::remove_file(root.join("pod-half-1/ns/spec.json")).unwrap();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mounts.contains(net_path.to_str().unwrap()));
    // open cleans it: unmounted and deleted, and reports nothing.
    assert!(PodNamespaces::open(&root, "pod-half-1").unwrap().is_none());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(net_path.to_str().unwrap()),
        "still mounted"
    );
    assert!(!net_path.exists());
    // A leftover empty mount point (crash before the mount) does not stop create.
    fs::create_dir_all(root.join("pod-half-1/ns")).unwrap();
    fs::write(root.join("pod-half-1/ns/net"), "").unwrap();
    let again = PodNamespaces::create(&root, "pod-half-1", &NamespaceSpec::pod("half")).unwrap();
    again.remove().unwrap();
}
