//! The `wasm-kubelet` binary: parse and check the configuration (one line and exit 2 when it is
//! wrong, before anything starts), start tracing, run the agent, drain on SIGTERM/SIGINT.
//!
//! `wasm-kubelet runtime <flags>` runs the Wasm runtime instead: the process the guests live in,
//! serving the agent on `--wasm-runtime-endpoint` (see `wasm_kubelet::runtime`). It takes the
//! agent's flags (the agent starts it with its own) and uses those that shape the runtime.
//!
//! `wasm-kubelet container-log <log path>` is a container's log driver, run by containerd's
//! shim (`provider_containerd::log_driver`), not by people.

use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use wasm_kubelet::config::{Config, ConfigError, LogFormat, WasmRuntimeMode};

fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Run by containerd's shim as a container's log driver (see provider_containerd::log_driver).
    if argv
        .get(1)
        .is_some_and(|a| a == provider_containerd::log_driver::SUBCOMMAND)
    {
        return provider_containerd::log_driver::main(&argv[2..]);
    }
    let runtime_mode = argv.get(1).is_some_and(|a| a == "runtime");
    if runtime_mode {
        argv.remove(1);
    }
    let config = match Config::load(argv.clone()) {
        Ok(config) => config,
        Err(ConfigError::HelpRequested(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wasm-kubelet: {e}");
            return ExitCode::from(2);
        }
    };

    // Read now, so a bad --registry-ca-file is one line and exit 2 like any other bad flag.
    let mut provider_options = provider_wasmtime::ProviderOptions {
        pod_egress: provider_wasmtime::network::NodeEgress {
            deny: config.pod_egress_deny_cidrs.clone(),
            allow: config.pod_egress_allow_cidrs.clone(),
        },
        ..Default::default()
    };
    provider_options.registries.insecure_registries = config.insecure_registries.clone();
    provider_options.limits = provider_wasmtime::image::PullLimits {
        max_module_size: config.max_module_size,
        max_layer_uncompressed_size: config.max_layer_uncompressed_size,
        progress_deadline: config.image_pull_progress_deadline,
    };
    // All guests together stay under the node's memory for pods (eviction::guests).
    provider_options.node_memory_ceiling =
        wasm_kubelet::machine::capacity(std::path::Path::new("/"))
            .ok()
            .map(|c| {
                wasm_kubelet::eviction::guests::ceiling(
                    c.memory_bytes,
                    &config.system_reserved,
                    &config.kube_reserved,
                )
            });
    if let Some(path) = &config.registry_ca_file {
        if let Err(e) = provider_options.registries.add_ca_file(path) {
            eprintln!("wasm-kubelet: --registry-ca-file {e}");
            return ExitCode::from(2);
        }
    }
    // After the CAs and the insecure list: each configured host gets both.
    if let Some(dir) = &config.registry_config_dir {
        if let Err(e) = provider_options.registries.load_hosts_dir(dir) {
            eprintln!("wasm-kubelet: --registry-config-dir {e}");
            return ExitCode::from(2);
        }
    }
    // The containers side pulls with the same registry settings.
    let container_registries = provider_options.registries.clone();

    let default_level = match config.verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("WASM_KUBELET_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!("warn,wasm_kubelet={default_level},provider_wasmtime={default_level},provider_api={default_level},provider_containerd={default_level},pod_network={default_level}"))
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.logging_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line, the event's fields beside `message` at the top level, so a
        // log pipeline reads `pod` or `reference` without digging into a nested object.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    for notice in &config.notices {
        tracing::warn!("{notice}");
    }
    match wasm_kubelet::agent::raise_open_file_limit() {
        Ok((before, after)) => tracing::info!(
            before,
            after,
            "open-file soft limit raised to the hard limit"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file soft limit; running with the one given")
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wasm-kubelet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Installed before anything else runs (not inside the spawned task, which may not have
        // run yet): a SIGTERM during start-up is then a clean shutdown, never the default action.
        let signals = install_signal_handlers();
        let shutdown = CancellationToken::new();
        // --shutdown-grace-period: the first signal stops the node's pods first (the agent
        // ends itself after), a second one ends the agent at once. The runtime process and
        // run-once have no graceful node shutdown.
        let node_shutdown =
            (!runtime_mode && !config.runonce && !config.shutdown_grace_period.is_zero())
                .then(CancellationToken::new);
        tokio::spawn(on_signal(signals, node_shutdown.clone(), shutdown.clone()));
        if runtime_mode {
            return serve_runtime(&config, provider_options, shutdown).await;
        }
        let (provider, remote): (Arc<dyn provider_api::Provider>, _) = match config.wasm_runtime {
            WasmRuntimeMode::InAgent => (
                Arc::new(provider_wasmtime::WasmtimeProvider::with_options(
                    config.root_dir.clone(),
                    provider_options,
                )?),
                None,
            ),
            WasmRuntimeMode::Spawn | WasmRuntimeMode::External => {
                match wasm_kubelet::runtime::connect(&config, &argv, &shutdown).await? {
                    Some(remote) => (remote.clone(), Some(remote)),
                    None => return anyhow::Ok(()),
                }
            }
        };
        if let Some(remote) = &remote {
            tokio::spawn(wasm_kubelet::runtime::supervise(
                Arc::new(config.clone()),
                argv,
                remote.clone(),
                shutdown.clone(),
            ));
        }
        // One provider for the node: Wasm pods to the Wasm runtime, Linux container pods to
        // containerd; a node without containerd refuses the others (see runtime::routing).
        let containers: Arc<dyn provider_api::Provider> = match &config.container_runtime_endpoint {
            Some(socket) => {
                Arc::new(connect_containerd(&config, socket, container_registries).await?)
            }
            None => Arc::new(wasm_kubelet::runtime::routing::NoContainers),
        };
        // Every call to either runtime counted and timed (kubelet_runtime_operations_*).
        let provider: Arc<dyn provider_api::Provider> = Arc::new(
            wasm_kubelet::runtime::instrumented::Instrumented::new(Arc::new(
                wasm_kubelet::runtime::routing::Router::new(provider, containers),
            )),
        );
        wasm_kubelet::agent::run(
            config,
            provider,
            remote.map(|r| r.identity()),
            shutdown,
            node_shutdown,
        )
        .await?;
        anyhow::Ok(())
    });
    // Do not wait for stray blocking work (an API call in flight) beyond the agent's own grace.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-kubelet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long containerd gets to answer at start-up before the agent gives up (it answers in
/// milliseconds when it runs; this only bounds a socket nobody serves).
const CONTAINERD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The containerd provider of a mixed node: its state under the root dir, its own containerd
/// namespace (two nodes on one containerd never see each other's containers), and the pod
/// network from the Node's `spec.podCIDR`, else `--pod-cidr`. Any failure is the one line the
/// agent exits 1 with: the node does not come up half mixed.
async fn connect_containerd(
    config: &Config,
    socket: &std::path::Path,
    registries: provider_containerd::RegistryOptions,
) -> anyhow::Result<provider_containerd::ContainerdProvider> {
    use anyhow::Context;
    let endpoint = format!("--container-runtime-endpoint=unix://{}", socket.display());
    if !socket.exists() {
        anyhow::bail!("{endpoint}: no such socket (is containerd running?)");
    }
    let pod_cidr = match node_pod_cidr(config).await {
        Some(cidr) => cidr,
        None => config.pod_cidr.with_context(|| {
            format!(
                "{endpoint} needs a pod CIDR for container pods' IPs: give --pod-cidr (or set \
                 the Node's spec.podCIDR)"
            )
        })?,
    };
    // containerd's namespace names: at most 76 characters of [A-Za-z0-9._-].
    let namespace = format!("wasm-kubelet-{}", config.node_name);
    if namespace.len() > 76 {
        anyhow::bail!(
            "node name {:?} is too long for a containerd namespace (at most 63 characters on a \
             node with --container-runtime-endpoint)",
            config.node_name
        );
    }
    let mut options = provider_containerd::ProviderOptions::new(
        socket.to_path_buf(),
        config.root_dir.join("containerd"),
    );
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries = registries;
    // The agent's own binary is the log driver containerd's shim runs per container.
    options.log_driver =
        Some(std::env::current_exe().context("the agent's own path (the containers' log driver)")?);
    let mut network =
        provider_containerd::PodNetworkOptions::new(pod_cidr, config.root_dir.join("pod-network"));
    network.gateway = config.pod_network_gateway;
    options.pod_network = Some(network);
    let provider = tokio::time::timeout(
        CONTAINERD_CONNECT_TIMEOUT,
        provider_containerd::ContainerdProvider::connect(options),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "{endpoint}: containerd did not answer within {CONTAINERD_CONNECT_TIMEOUT:?}"
        )
    })?
    .with_context(|| endpoint.clone())?;
    tracing::info!(socket = %socket.display(), %pod_cidr, "containerd connected: a mixed node");
    Ok(provider)
}

/// The Node's `spec.podCIDR`, when the Node exists and has one (as the kubelet, it wins over
/// `--pod-cidr`). `None` when there is no API server, no Node yet, or it cannot be read now.
async fn node_pod_cidr(config: &Config) -> Option<ipnet::IpNet> {
    let client = wasm_kubelet::agent::client(config).await.ok()??;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let node = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        nodes.get_opt(&config.node_name),
    )
    .await
    .ok()?
    .ok()??;
    let cidr = node.spec?.pod_cidr?;
    match cidr.parse::<ipnet::IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            tracing::warn!(
                cidr,
                "the Node's spec.podCIDR is not a CIDR; using --pod-cidr"
            );
            None
        }
    }
}

/// SIGTERM and SIGINT listeners; `None` (logged) when they cannot be installed.
fn install_signal_handlers() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
            None
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; with `node_shutdown` (a graceful node
/// shutdown configured), cancels that on the first and `shutdown` on the second.
async fn on_signal(
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    node_shutdown: Option<CancellationToken>,
    shutdown: CancellationToken,
) {
    let Some((mut term, mut int)) = signals else {
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    if let Some(node_shutdown) = node_shutdown {
        tracing::info!("graceful node shutdown: stopping the pods before exiting (a second signal exits at once)");
        node_shutdown.cancel();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = term.recv() => tracing::info!("second SIGTERM received"),
            _ = int.recv() => tracing::info!("second SIGINT received"),
        }
    }
    shutdown.cancel();
}

/// The runtime mode: one runtime per root dir (a lock), in its own memory cgroup, serving the
/// provider on the endpoint until SIGTERM/SIGINT. Its guests end with it.
async fn serve_runtime(
    config: &Config,
    options: provider_wasmtime::ProviderOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use wasm_kubelet::runtime;
    let dir = runtime::lock_file(config)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(runtime::lock_file(config))
        .with_context(|| format!("opening {}", runtime::lock_file(config).display()))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(runtime::pid_file(config)).unwrap_or_default();
        anyhow::bail!(
            "another Wasm runtime (pid {}) serves {}",
            holder.trim(),
            config.root_dir.display()
        );
    }
    std::fs::write(runtime::pid_file(config), std::process::id().to_string())
        .with_context(|| format!("writing {}", runtime::pid_file(config).display()))?;
    // The kernel's line behind the guests' own limits: all guests plus the runtime's overhead.
    if let Some(guests) = options.node_memory_ceiling {
        let limit = guests.saturating_add(runtime::cgroup::RUNTIME_OVERHEAD);
        match runtime::cgroup::place_self(&runtime::cgroup::name_for(&config.root_dir), limit) {
            Ok(placed) => {
                tracing::info!(cgroup = %placed.dir.display(), limit_bytes = placed.limit, "runtime in its own memory cgroup")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the runtime runs without a memory cgroup of its own; give it one (systemd MemoryMax=) so guests cannot take the agent's memory")
            }
        }
    }
    let provider =
        provider_wasmtime::WasmtimeProvider::with_options(config.root_dir.clone(), options)?;
    let listener = provider_remote::bind(&config.wasm_runtime_endpoint)
        .with_context(|| format!("binding {}", config.wasm_runtime_endpoint.display()))?;
    tracing::info!(socket = %config.wasm_runtime_endpoint.display(), pid = std::process::id(), "Wasm runtime serving");
    provider_remote::serve(listener, Arc::new(provider), shutdown).await;
    let _ = std::fs::remove_file(&config.wasm_runtime_endpoint);
    let _ = std::fs::remove_file(runtime::pid_file(config));
    drop(lock);
    tracing::info!("Wasm runtime stopped; its guests ended with it");
    Ok(())
}
