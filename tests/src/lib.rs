//! Harness for wasm-kubelet's integration tests. They run against the real control plane that
//! `deploy/local-cluster up` starts (kube-apiserver, etcd, kube-controller-manager,
//! kube-scheduler, a registry), never a mock.
//!
//! Start at [`Cluster::get`]: it reads `$LOCAL_CLUSTER_DIR/env`, by default
//! `target/local-cluster/env` (the same rule as `deploy/local-cluster`).
//! [`Agent::start`] runs the real `wasm-kubelet` binary as its own node, with a node identity
//! minted by `deploy/local-cluster node-kubeconfig`, and kills it when dropped. Waits are on
//! conditions ([`wait_for`]), never on sleeps.

pub mod mixed_node;
pub mod port_forward;
pub mod pressure;
pub mod registry;
pub mod soak;
pub mod virtual_node;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Node, Pod};

/// The `p` quantile (0..=1) of `sorted` by nearest rank, as both benchmarks report it; zero
/// when there are no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize]
}

/// The workspace root (tests/ is one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The running local cluster, as described by its env file.
#[derive(Debug)]
pub struct Cluster {
    vars: HashMap<String, String>,
}

impl Cluster {
    /// The cluster `deploy/local-cluster up` started. Panics with what to do when it is not up.
    ///
    /// Its location follows the rule of `deploy/local-cluster` itself: `$LOCAL_CLUSTER_DIR` when
    /// set, else `target/local-cluster` of this workspace. The env file found there must name
    /// that same directory; a mismatch (an env file copied or moved from another checkout) is
    /// an error naming both paths.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| Cluster::load(&cluster_dir()).unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// The cluster whose env file is `<dir>/env`, for a test that runs a private cluster of its
    /// own (tests/tests/chaos_control_plane.rs) beside the one [`Cluster::get`] names. Each call
    /// loads the file again and keeps the result for the life of the process.
    pub fn open(dir: &Path) -> anyhow::Result<&'static Cluster> {
        Ok(Box::leak(Box::new(Cluster::load(dir)?)))
    }

    fn load(dir: &Path) -> anyhow::Result<Cluster> {
        let path = dir.join("env");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no local cluster ({}); start one with `deploy/local-cluster up`",
                path.display()
            )
        })?;
        let vars: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let named = vars
            .get("LOCAL_CLUSTER_DIR")
            .with_context(|| format!("{} names no LOCAL_CLUSTER_DIR", path.display()))?;
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(Path::new(named), dir) {
            bail!("the local cluster env file {} describes the cluster in {named}, not {}; set LOCAL_CLUSTER_DIR to one of them", path.display(), dir.display());
        }
        Ok(Cluster { vars })
    }

    pub fn var(&self, name: &str) -> &str {
        self.vars
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the local cluster env file"))
    }

    /// A client with cluster-admin rights.
    pub async fn admin(&self) -> kube::Client {
        client_from(Path::new(self.var("KUBECONFIG")))
            .await
            .expect("admin client")
    }

    /// The real kubectl of the pinned version, with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.var("KUBECTL"));
        cmd.env("KUBECONFIG", self.var("KUBECONFIG"));
        cmd
    }

    /// Writes a kubeconfig for identity `system:node:<name>`.
    pub fn node_kubeconfig(&self, name: &str, out: &Path) -> anyhow::Result<()> {
        let status = Command::new(workspace_root().join("deploy/local-cluster"))
            .args(["node-kubeconfig", name])
            .arg(out)
            .env("LOCAL_CLUSTER_DIR", self.var("LOCAL_CLUSTER_DIR"))
            .status()?;
        if !status.success() {
            bail!("deploy/local-cluster node-kubeconfig {name} failed");
        }
        Ok(())
    }
}

pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Where the local cluster lives: `$LOCAL_CLUSTER_DIR` when set (as `deploy/local-cluster`
/// reads it), else `target/local-cluster` of this workspace.
pub fn cluster_dir() -> PathBuf {
    match std::env::var_os("LOCAL_CLUSTER_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target/local-cluster"),
    }
}

/// The agent binary: `$WASM_KUBELET_BIN`, else target/debug/wasm-kubelet (build it first:
/// `cargo build -p wasm-kubelet`, which the README's test command does).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WASM_KUBELET_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug/wasm-kubelet");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p wasm-kubelet` first",
        bin.display()
    );
    bin
}

/// A unique, valid node name for one test: `it-<what>-<pid>-<n>`.
pub fn unique_name(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "it-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The hard eviction thresholds test agents get unless a test sets its own: the kubelet's
/// memory default, and disk thresholds low enough that a nearly full build disk is no pressure.
pub const TEST_EVICTION_HARD: &str = "--eviction-hard=memory.available<100Mi,nodefs.available<2%,nodefs.inodesFree<2%,imagefs.available<2%";

/// The flags every agent a test starts by hand (standalone, run-once, bootstrap) needs to work
/// on this machine like [`Agent::start`]'s: the local cluster's plain-http registry named as
/// insecure (no registry gets plain http otherwise), and [`TEST_EVICTION_HARD`].
///
/// Such agents run their guests in their own process (`--wasm-runtime=in-agent`): nothing of
/// theirs outlives them, as no harness stops a runtime they would spawn. The runtime process
/// is exercised by every [`Agent`].
pub fn local_node_flags() -> Vec<String> {
    vec![
        format!("--insecure-registries={}", Cluster::get().var("REGISTRY")),
        TEST_EVICTION_HARD.to_string(),
        "--wasm-runtime=in-agent".to_string(),
    ]
}

/// A running `wasm-kubelet` process serving one node, and the Wasm runtime process it starts
/// (`--wasm-runtime=spawn`, the default). Both are killed (SIGKILL) when dropped.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub node_ip: String,
    args: Vec<String>,
    child: Option<Child>,
    runs: u32,
    /// The cluster the node joins ([`Cluster::get`] unless started with [`Agent::start_on`]).
    cluster: &'static Cluster,
    /// Keeps `node_ip` reserved against other agents, in this process and in others.
    _address: LoopbackAddress,
}

impl Agent {
    /// Starts an agent for a new node called `name` with `--node-ip` on loopback and its own
    /// root directory; `extra` flags are appended.
    pub fn start(name: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_on(Cluster::get(), name, extra)
    }

    /// [`Agent::start`] on `cluster` instead of the one [`Cluster::get`] names.
    pub fn start_on(
        cluster: &'static Cluster,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let dir = workspace_root().join("target/it").join(name);
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("node.kubeconfig");
        cluster.node_kubeconfig(name, &kubeconfig)?;
        // A loopback address of its own, held until the agent is dropped: the node IP must be
        // loopback in tests, and each agent's kubelet API and its pods' ports bind that address.
        let address = LoopbackAddress::reserve();
        let node_ip = address.ip.clone();
        let mut args: Vec<String> = vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--hostname-override".into(),
            name.into(),
            "--node-ip".into(),
            node_ip.clone(),
            "--root-dir".into(),
            dir.join("root").display().to_string(),
            "--healthz-port=0".into(),
            "--address".into(),
            node_ip.clone(),
            "--client-ca-file".into(),
            Path::new(cluster.var("LOCAL_CLUSTER_DIR"))
                .join("pki/ca.crt")
                .display()
                .to_string(),
            "-v=4".into(),
        ];
        // The local cluster's plain-http registry is the only one spoken to without TLS, as a
        // deployment names its insecure registries (a test may name its own instead).
        if !extra.iter().any(|f| f.starts_with("--insecure-registries")) {
            args.push(format!("--insecure-registries={}", cluster.var("REGISTRY")));
        }
        // Trust the local cluster's TLS registry (its certificate is signed by the cluster CA).
        if let Some(ca) = cluster.vars.get("SECURE_REGISTRY_CA") {
            args.extend(["--registry-ca-file".to_string(), ca.clone()]);
        }
        // The machines tests run on keep little disk free (the kubelet's imagefs.available<15%
        // default is met on them), and eviction acts on it: pin thresholds the host satisfies,
        // unless the test gives its own.
        if !extra.iter().any(|f| f.starts_with("--eviction-hard")) {
            args.push(TEST_EVICTION_HARD.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Agent {
            name: name.into(),
            dir,
            node_ip,
            args,
            child: None,
            runs: 0,
            cluster,
            _address: address,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// (Re)starts the process with the same flags; its log is appended to.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "agent {} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(agent_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning wasm-kubelet")?;
        // Leave a pid file where `deploy/local-cluster down` looks, so a crashed test run
        // cannot leak the agent, and where the runtime's pid file will be (`.runtime`).
        let pids = Path::new(self.cluster.var("LOCAL_CLUSTER_DIR")).join("pids");
        std::fs::create_dir_all(&pids)?;
        std::fs::write(
            pids.join(format!("agent-{}.pid", self.name)),
            child.id().to_string(),
        )?;
        std::fs::write(
            pids.join(format!("agent-{}.cmd", self.name)),
            agent_binary().display().to_string(),
        )?;
        std::fs::write(
            pids.join(format!("agent-{}.runtime", self.name)),
            self.runtime_pid_file().display().to_string(),
        )?;
        self.child = Some(child);
        self.runs += 1;
        Ok(())
    }

    /// Sets `--name=value` flags for the next [`Agent::spawn`], replacing the same flags given
    /// before (the agent refuses a flag given twice).
    pub fn set_flags(&mut self, flags: &[&str]) {
        for flag in flags {
            let name = flag.split('=').next().unwrap_or(flag);
            self.args.retain(|a| a.split('=').next() != Some(name));
            self.args.push(flag.to_string());
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has ended by itself (`None` while it runs or when it
    /// was never started).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent not running")?;
        // SAFETY: plain kill(2) on our own child's PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "agent {} did not exit within {within:?} of SIGTERM",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the agent's log and of its runtime's, for failure messages.
    pub fn log_tail(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        let agent = tail(std::fs::read_to_string(self.log_path()).unwrap_or_default());
        match std::fs::read_to_string(self.runtime_log_path()) {
            Ok(runtime) => format!("{agent}\n--- wasm runtime log:\n{}", tail(runtime)),
            Err(_) => agent,
        }
    }

    /// The agent's log, then its runtime's (the guests' side: pulls, compilations, exits).
    pub fn log(&self) -> String {
        let mut text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(self.runtime_log_path()).unwrap_or_default());
        text
    }

    fn runtime_log_path(&self) -> PathBuf {
        self.dir.join("root/runtime/wasm-runtime.log")
    }

    fn runtime_pid_file(&self) -> PathBuf {
        self.dir.join("root/runtime/wasm-runtime.pid")
    }

    /// The pid of the Wasm runtime process serving this node, while one runs.
    pub fn runtime_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.runtime_pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // The pid must still be a runtime (pids are reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.get(1) == Some(&&b"runtime"[..])).then_some(pid)
    }

    /// SIGKILL to the runtime process, as a crash would; returns once it is gone.
    pub fn kill_runtime(&self) -> Option<u32> {
        let pid = self.runtime_pid()?;
        // SAFETY: plain kill(2); the pid was checked to be a runtime just above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Not our child: gone once /proc says it is gone or a zombie.
        while Instant::now() < deadline {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat)
                    if !stat
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z') =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
        Some(pid)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // The runtime's memory cgroup goes with it (an empty cgroup can be removed).
        let cgroup = self.runtime_pid().and_then(runtime_cgroup);
        self.kill_runtime();
        if let Some(dir) = cgroup {
            let _ = std::fs::remove_dir(dir);
        }
        // A killed agent leaves its tmpfs volumes (secrets, tokens, memory emptyDirs) mounted.
        unmount_under(&self.dir);
        let pids = Path::new(self.cluster.var("LOCAL_CLUSTER_DIR")).join("pids");
        let _ = std::fs::remove_file(pids.join(format!("agent-{}.pid", self.name)));
        let _ = std::fs::remove_file(pids.join(format!("agent-{}.cmd", self.name)));
        let _ = std::fs::remove_file(pids.join(format!("agent-{}.runtime", self.name)));
        // Remove the Node so test nodes do not pile up in the cluster.
        let _ = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "node",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// `GET path` on the agent's kubelet API with the admin client certificate (curl): (HTTP
/// status, body).
pub fn kubelet_get(agent: &Agent, path: &str) -> (u16, String) {
    let (crt, key) = admin_cert();
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}", "--cert"])
        .arg(crt)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{}:10250{path}", agent.node_ip))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The memory cgroup directory of `pid` when it is the runtime's own (cgroup v1 or v2).
pub fn runtime_cgroup(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let v1 = text.lines().find_map(|l| {
        l.split_once(":memory:")
            .map(|(_, p)| Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')))
    });
    let v2 = || {
        text.lines().find_map(|l| {
            l.strip_prefix("0::")
                .map(|p| Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')))
        })
    };
    v1.or_else(v2).filter(|d| {
        d.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("wasm-kubelet-runtime-"))
    })
}

/// The port every agent's kubelet API listens on unless a test sets `--port`.
const KUBELET_PORT: u16 = 10250;

/// A loopback address (`127.a.b.1`) reserved for one agent, for as long as this value lives.
///
/// Every test process on the machine (other test files, other checkouts, other developers)
/// draws from the same space, so a per-process formula cannot promise uniqueness (two PIDs that
/// agree modulo the formula's range would share addresses). The reservation is an exclusive
/// `flock` on `<tmp>/wasm-kubelet-it-loopback/<ip>.lock`: it is released by the kernel when
/// this value is dropped or the process dies, so a crashed run frees its addresses. An address
/// is also skipped while anything (a leaked agent, a process that does not use this harness)
/// holds its kubelet port. The search starts at a place derived from the PID and walks the
/// whole space, so many agents in one process never wrap onto an address still in use.
pub struct LoopbackAddress {
    pub ip: String,
    _lock: std::fs::File,
}

impl LoopbackAddress {
    /// Reserves a free address; panics only when all 62 500 are taken.
    pub fn reserve() -> LoopbackAddress {
        use std::sync::atomic::{AtomicU32, Ordering};
        // 250 x 250 addresses: 127.1.1.1 to 127.250.250.1 (127.0.0.0/16 is the cluster's).
        const SPAN: u32 = 250 * 250;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join("wasm-kubelet-it-loopback");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let start = std::process::id().wrapping_mul(7919) % SPAN;
        for _ in 0..SPAN {
            let i = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
            let ip = format!("127.{}.{}.1", 1 + i / 250, 1 + i % 250);
            let Ok(lock) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{ip}.lock")))
            else {
                continue;
            };
            // Locks are per open file: another agent of this very process conflicts too.
            if lock.try_lock().is_err() {
                continue;
            }
            // Held by something outside this scheme: leave it alone.
            if std::net::TcpListener::bind((ip.as_str(), KUBELET_PORT)).is_err() {
                continue;
            }
            return LoopbackAddress { ip, _lock: lock };
        }
        panic!(
            "no free loopback address in 127.1-250.1-250.1 (locks in {})",
            dir.display()
        );
    }
}

/// Unmounts (lazily, deepest first) every mount point under `dir`: the tmpfs volumes an agent
/// made for its pods outlive the agent when it is killed.
pub fn unmount_under(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(root) = std::fs::canonicalize(dir) else {
        return;
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point.as_os_str().as_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// How much CPU this machine offers one busy thread, measured while a test measures a guest:
/// a native thread spins from [`CpuOffer::start`] to [`CpuOffer::finish`], which returns the
/// cores it got (0 to 1). Tests that assert a guest's CPU rate compare with it instead of
/// assuming an idle machine: on a loaded 2-core machine a busy loop gets a fraction of a core,
/// and that is the machine, not the agent.
pub struct CpuOffer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    spinner: std::thread::JoinHandle<f64>,
}

impl CpuOffer {
    pub fn start() -> CpuOffer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let spinner = std::thread::spawn(move || {
            let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for i in 0..100_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
            }
            (thread_cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64()
        });
        CpuOffer { stop, spinner }
    }

    /// Stops the spinning thread; the cores it got while it ran.
    pub fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.spinner
            .join()
            .expect("the spinning thread does not panic")
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) with a valid clock id and out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The cluster admin's client certificate and key (for requests straight to a kubelet API).
pub fn admin_cert() -> (PathBuf, PathBuf) {
    let pki = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    (pki.join("admin.crt"), pki.join("admin.key"))
}

/// Accepts the agent's self-signed serving certificate (the test talks to the node directly).
#[derive(Debug)]
pub struct AcceptAnyServer(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client connection to a kubelet API.
pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the agent's kubelet API with the admin's client certificate.
pub async fn admin_tls(agent: &Agent) -> Tls {
    use rustls_pki_types::pem::PemObject;
    let (crt, key) = admin_cert();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&crt)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect((agent.node_ip.as_str(), 10250))
        .await
        .unwrap();
    let server_name = rustls_pki_types::ServerName::try_from(agent.node_ip.clone()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .unwrap()
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Builds every wasm-examples program (deploy/build-examples) and pushes it to the local
/// registry as `$REGISTRY/wasm-examples/<name>:<content tag>`, once per process.
///
/// The tag names the bytes (see [`push_wasm`]), not a fixed `v1`: every test process on the
/// machine pushes to the same registry, and another checkout whose example differs (a helper
/// changing `toolbox`, say) would otherwise replace the image this process's tests pull.
pub fn push_examples() -> &'static HashMap<String, String> {
    static PUSHED: OnceLock<HashMap<String, String>> = OnceLock::new();
    PUSHED.get_or_init(|| {
        let registry = Cluster::get().var("REGISTRY").to_string();
        let out = Command::new(workspace_root().join("deploy/build-examples"))
            .stderr(Stdio::inherit())
            .output()
            .expect("deploy/build-examples runs");
        assert!(out.status.success(), "build-examples failed");
        let mut pushed = HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (name, path) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("build-examples printed {line:?}, not `NAME PATH`"));
            let wasm = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let reference = format!("{registry}/wasm-examples/{name}:{}", content_tag(&wasm));
            let out = Command::new(workspace_root().join("deploy/push-wasm"))
                .arg(path)
                .arg(&reference)
                .output()
                .expect("deploy/push-wasm runs");
            assert!(
                out.status.success(),
                "push-wasm {reference}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            pushed.insert(name.to_string(), reference);
        }
        pushed
    })
}

/// A built wasm-examples preview1 program (`deploy/build-examples` output; builds and pushes
/// them first). Honours `WASM_EXAMPLES_TARGET_DIR` as deploy/build-examples does.
pub fn example_wasm(name: &str) -> PathBuf {
    push_examples();
    let target = std::env::var_os("WASM_EXAMPLES_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/wasm-examples"));
    let path = target
        .join("wasm32-wasip1/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing after deploy/push-examples",
        path.display()
    );
    path
}

/// The image reference of a wasm-examples program in the local registry (pushed first when
/// this process has not yet).
pub fn example_image(name: &str) -> String {
    push_examples()
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no wasm-examples program {name}"))
}

/// A tag that names `wasm`'s bytes without a crypto dependency: two hashes of different
/// seeds, 64 bits each, so the same bytes get the same tag and changed bytes a new one.
fn content_tag(wasm: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut a = DefaultHasher::new();
    wasm.hash(&mut a);
    let mut b = DefaultHasher::new();
    (wasm.len(), wasm).hash(&mut b);
    format!("c{:016x}{:016x}", a.finish(), b.finish())
}

/// Pushes `wasm` (a module or component) to the local registry as `$REGISTRY/it-guests/<name>:<tag>`
/// with deploy/push-wasm, the tag naming its content ([`content_tag`]: the same bytes push
/// once and a changed guest is a new image); returns the image reference.
pub fn push_wasm(name: &str, wasm: &[u8]) -> String {
    push_wasm_to(Cluster::get(), name, wasm)
}

/// [`push_wasm`] to the registry of `cluster`.
pub fn push_wasm_to(cluster: &Cluster, name: &str, wasm: &[u8]) -> String {
    let tag = content_tag(wasm);
    let reference = format!("{}/it-guests/{name}:{tag}", cluster.var("REGISTRY"));
    let dir = workspace_root().join("target/it-guests");
    std::fs::create_dir_all(&dir).expect("target/it-guests");
    // Written under a name of this push alone, then renamed into place: another test process
    // pushing the same guest at the same time rewrites the file, and push-wasm must never read
    // a half-written one.
    let file = dir.join(format!("{name}-{tag}.wasm"));
    let partial = dir.join(format!(".{name}-{tag}.wasm.{}", unique_name("push")));
    std::fs::write(&partial, wasm).expect("guest written");
    std::fs::rename(&partial, &file).expect("guest renamed into place");
    let out = Command::new(workspace_root().join("deploy/push-wasm"))
        .arg(&file)
        .arg(&reference)
        .output()
        .expect("deploy/push-wasm runs");
    assert!(
        out.status.success(),
        "push-wasm {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

/// Compiles a WebAssembly text guest (a module or a component) and pushes it with
/// [`push_wasm`]; returns the image reference. Adversarial guests live in the test files as
/// .wat text, so each test shows exactly what its guest does.
pub fn push_wat(name: &str, wat: &str) -> String {
    push_wat_to(Cluster::get(), name, wat)
}

/// [`push_wat`] to the registry of `cluster`.
pub fn push_wat_to(cluster: &Cluster, name: &str, wat: &str) -> String {
    let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("guest {name} is not valid WAT: {e}"));
    push_wasm_to(cluster, name, &wasm)
}

/// The status of condition `kind` on a Node ("True", "False", "Unknown").
pub fn node_condition(node: &Node, kind: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// Whether the Node carries a taint with this key.
pub fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key))
}

/// Waits for the agent's Node to exist; on time-out fails with the agent's log.
pub(crate) async fn wait_registered(agent: &Agent) {
    let nodes: kube::Api<Node> = kube::Api::all(agent.cluster.admin().await);
    wait_for("the test node to register", TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}

/// How long a test waits for a node or pod condition.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// A node of its own for one test: pushes the wasm-examples, starts an agent named after `what`
/// with its pod logs in `<agent dir>/logs` and `extra` flags, and waits for its Node to exist.
pub async fn test_node(what: &str, extra: &[&str]) -> Agent {
    push_examples();
    test_node_on(Cluster::get(), what, extra).await
}

/// [`test_node`] on `cluster`, without pushing the wasm-examples.
pub async fn test_node_on(cluster: &'static Cluster, what: &str, extra: &[&str]) -> Agent {
    let name = unique_name(what);
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let mut args = vec!["--pod-logs-dir", logs.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let agent = Agent::start_on(cluster, &name, &args).expect("the agent starts");
    wait_registered(&agent).await;
    agent
}

/// A namespace of its own for one test, with its default ServiceAccount (which the
/// ServiceAccount admission plugin needs); deleted, without waiting, when dropped.
pub struct TestNamespace {
    pub client: kube::Client,
    pub name: String,
    cluster: &'static Cluster,
}

impl TestNamespace {
    pub async fn new(what: &str) -> Self {
        TestNamespace::new_on(Cluster::get(), what).await
    }

    /// [`TestNamespace::new`] in `cluster`.
    pub async fn new_on(cluster: &'static Cluster, what: &str) -> Self {
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        let client = cluster.admin().await;
        let name = unique_name(what);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .expect("valid namespace");
        kube::Api::<Namespace>::all(client.clone())
            .create(&Default::default(), &ns)
            .await
            .expect("namespace created");
        let sas: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), &name);
        wait_for("the default service account", TEST_TIMEOUT, || async {
            sas.get_opt("default").await.ok()?
        })
        .await
        .expect("default service account");
        Self {
            client,
            name,
            cluster,
        }
    }

    pub fn pods(&self) -> kube::Api<Pod> {
        kube::Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates pod `name` bound to the agent's node (no scheduler in the way, so admission is
    /// the node's alone). `spec` is merged over restartPolicy Never, a 1 s grace period and a
    /// toleration of every taint; `metadata` over the name.
    pub async fn create_bound_pod(
        &self,
        agent: &Agent,
        name: &str,
        metadata: serde_json::Value,
        spec: serde_json::Value,
    ) -> Pod {
        let mut full_spec = serde_json::json!({
            "nodeName": agent.name,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
        });
        let mut full_metadata = serde_json::json!({"name": name});
        for (base, extra) in [(&mut full_spec, spec), (&mut full_metadata, metadata)] {
            if let (Some(base), serde_json::Value::Object(extra)) = (base.as_object_mut(), extra) {
                base.extend(extra);
            }
        }
        let pod: Pod = serde_json::from_value(
            serde_json::json!({"metadata": full_metadata, "spec": full_spec}),
        )
        .expect("a valid pod");
        self.pods()
            .create(&Default::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"))
    }

    /// Waits until pod `name` passes `check`; on time-out fails with its status, its events
    /// and the agent's log.
    pub async fn wait_pod(
        &self,
        agent: &Agent,
        name: &str,
        what: &str,
        check: impl Fn(&Pod) -> bool,
    ) -> Pod {
        let pods = self.pods();
        let result = wait_for(what, TEST_TIMEOUT, || async {
            pods.get_opt(name).await.ok()?.filter(|p| check(p))
        })
        .await;
        match result {
            Ok(pod) => pod,
            Err(e) => {
                let pod = pods.get_opt(name).await.ok().flatten();
                let events = self.events(name).await;
                panic!(
                    "{e}\npod status: {:#?}\nevents: {events:#?}\nagent log:\n{}",
                    pod.and_then(|p| p.status),
                    agent.log_tail()
                )
            }
        }
    }

    /// (reason, message) of the events about pod `pod`.
    pub async fn events(&self, pod: &str) -> Vec<(String, String)> {
        let events: kube::Api<k8s_openapi::api::core::v1::Event> =
            kube::Api::namespaced(self.client.clone(), &self.name);
        let list = events
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        list.into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(pod))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    /// Waits until the events about `pod` pass `check` (Events are published by the agent
    /// asynchronously, after the status change they describe may already be visible); returns
    /// them. On time-out fails with the events seen and the agent's log.
    pub async fn wait_events(
        &self,
        agent: &Agent,
        pod: &str,
        what: &str,
        check: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let result = wait_for(what, TEST_TIMEOUT, || async {
            let events = self.events(pod).await;
            check(&events).then_some(events)
        })
        .await;
        match result {
            Ok(events) => events,
            Err(e) => panic!(
                "{e}\nevents: {:#?}\nagent log:\n{}",
                self.events(pod).await,
                agent.log_tail()
            ),
        }
    }

    /// The reasons of the events about pod `pod`.
    pub async fn event_reasons(&self, pod: &str) -> Vec<String> {
        self.events(pod)
            .await
            .into_iter()
            .map(|(reason, _)| reason)
            .collect()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

/// A pod's phase, "" before it has one.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The message the kubelet gives a pod it stopped for a graceful node shutdown.
pub const SHUTDOWN_MESSAGE: &str = "Pod was terminated in response to imminent node shutdown.";

/// The pod ended as the kubelet ends one stopped for a node shutdown: Failed, `Terminated`.
pub fn stopped_for_shutdown(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    phase(pod) == "Failed"
        && status.and_then(|s| s.reason.as_deref()) == Some("Terminated")
        && status.and_then(|s| s.message.as_deref()) == Some(SHUTDOWN_MESSAGE)
}

/// Running, with every container's state running.
pub fn all_containers_running(pod: &Pod) -> bool {
    phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            })
}

/// A tmpfs mounted for one test (we are root), for a small filesystem whose filling is real
/// and harmless; unmounted (lazily, so a straggler cannot block it) when dropped, also when the
/// test fails. Declare it before the [`Agent`] that uses it, so the agent is killed first.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount's `size=`, e.g. `64m`) at `path`.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount tmpfs at {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// (size, bytes available) of the filesystem.
    pub fn usage(&self) -> (u64, u64) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.path.as_os_str().as_bytes()).expect("path without NUL");
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a properly sized out-parameter.
        assert_eq!(
            unsafe { libc::statvfs(c.as_ptr(), &mut st) },
            0,
            "statvfs {}",
            self.path.display()
        );
        (
            st.f_blocks as u64 * st.f_frsize as u64,
            st.f_bavail as u64 * st.f_frsize as u64,
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// A test node whose `--root-dir` is a tmpfs of `size` (its pod logs there too): pushes the
/// wasm-examples, starts the agent with `extra` flags and waits for its Node to exist.
pub async fn test_node_on_tmpfs(what: &str, size: &str, extra: &[&str]) -> (Tmpfs, Agent) {
    push_examples();
    let name = unique_name(what);
    let root = workspace_root().join("target/it").join(&name).join("root");
    let tmpfs = Tmpfs::mount(&root, size);
    let logs = root.join("logs");
    let mut args = vec!["--pod-logs-dir", logs.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let agent = Agent::start(&name, &args).expect("the agent starts");
    wait_registered(&agent).await;
    (tmpfs, agent)
}

/// `GET path` over plain HTTP/1.1 on a fresh connection (`Connection: close`): (status, body),
/// a chunked body decoded. Written by hand so a test sees exactly what the pod's server sent.
pub async fn http_get(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// The payload of a chunked body (`SIZE\r\nDATA\r\n ... 0\r\n\r\n`).
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
