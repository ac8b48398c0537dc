//! The mixed node's one provider: Wasm pods to the wasmtime provider, container pods to the
//! containerd provider, and the rest of the node none the wiser.
//!
//! [`Router`] is itself a [`Provider`]. Everything above it (workers, PLEG, eviction, GC, the
//! kubelet API) sees one runtime; this file is the only node code that knows there are two.
//!
//! Which provider runs a pod:
//! - its RuntimeClass handler, when it has one ([`SandboxConfig::runtime_handler`]): one of
//!   [`WASM_HANDLERS`] goes to Wasm, any other to containerd (refused when the node has none);
//! - else its images: a pod's sandbox is only recorded until its first container is created,
//!   and goes where that container's image was pulled. A pull tries the Wasm provider first;
//!   an image that is not Wasm ([`ProviderError::UnsupportedImage`]) is pulled by containerd.
//!   A pod whose images are of both kinds is refused at its first container of the other kind.
//!
//! Which provider holds a container or an image is learnt from what each returns (creates,
//! pulls, listings), so it survives an agent restart: the PLEG's first relist teaches it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use provider_api::{
    AttachIo, ContainerConfig, ContainerSummary, ExecIo, ImageFsInfo, ImageInfo, ImageRecord,
    Provider, ProviderError, RegistryAuth, RuntimeInfo, RuntimeStatus, SandboxConfig,
};

/// RuntimeClass handlers that name the Wasm provider.
pub const WASM_HANDLERS: &[&str] = &["wasm", "wasmtime"];

/// One of the two providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Wasm,
    Containers,
}

impl Side {
    /// The scheme of a container ID in a pod's status (`wasm://…`, `containerd://…`).
    pub fn scheme(self) -> &'static str {
        match self {
            Side::Wasm => "wasm",
            Side::Containers => "containerd",
        }
    }
}

/// The containers side of a node without containerd (no `--container-runtime-endpoint`):
/// it holds nothing and refuses every pod, so a Linux image or a non-Wasm RuntimeClass handler
/// gets a clear error instead of a surprise.
pub struct NoContainers;

/// Why a node without containerd runs no Linux image.
const NO_CONTAINERS: &str = "this node runs only WebAssembly (no Linux containers: the node has \
                             no --container-runtime-endpoint)";

#[async_trait::async_trait]
impl Provider for NoContainers {
    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "none".into(),
            version: "0".into(),
        }
    }

    fn runtimes(&self) -> Vec<RuntimeInfo> {
        Vec::new()
    }

    async fn status(&self) -> RuntimeStatus {
        RuntimeStatus::Ready
    }

    async fn image_status(&self, _reference: &str) -> Option<ImageInfo> {
        None
    }

    async fn pull_image(
        &self,
        _reference: &str,
        _auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        Err(ProviderError::UnsupportedImage(NO_CONTAINERS.into()))
    }

    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        Err(ProviderError::Create(format!(
            "RuntimeHandler {:?} is not supported: this node runs only WebAssembly pods \
             (RuntimeClass handlers {}; no --container-runtime-endpoint for others)",
            config.runtime_handler.as_deref().unwrap_or_default(),
            WASM_HANDLERS.join(", ")
        )))
    }

    async fn remove_pod_sandbox(&self, id: &str, _grace: Duration) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(format!("sandbox {id}")))
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        _config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        Err(ProviderError::NotFound(format!("sandbox {sandbox_id}")))
    }

    async fn start_container(&self, id: &str) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(format!("container {id}")))
    }

    async fn stop_container(&self, id: &str, _grace: Duration) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(format!("container {id}")))
    }

    async fn remove_container(&self, id: &str) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(format!("container {id}")))
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        Ok(Vec::new())
    }
}

/// A pod's sandbox as the router knows it.
#[derive(Debug, Clone)]
enum SandboxRoute {
    /// Recorded, not yet created anywhere: no handler, and no container created yet.
    Undecided(SandboxConfig),
    /// Created on this side under this id.
    On(Side, String),
}

#[derive(Default)]
struct Routes {
    /// By pod UID (the router's sandbox id).
    sandboxes: HashMap<String, SandboxRoute>,
    /// Container id -> side.
    containers: HashMap<String, Side>,
    /// Image reference -> side that pulled it.
    images: HashMap<String, Side>,
    /// Whether the sandboxes made before this agent started have been learnt.
    learnt: bool,
}

/// See the module docs.
pub struct Router {
    wasm: Arc<dyn Provider>,
    containers: Arc<dyn Provider>,
    routes: Mutex<Routes>,
}

impl Router {
    /// `containers` is [`NoContainers`] on a node without containerd.
    pub fn new(wasm: Arc<dyn Provider>, containers: Arc<dyn Provider>) -> Self {
        Self {
            wasm,
            containers,
            routes: Mutex::new(Routes::default()),
        }
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn provider(&self, side: Side) -> &Arc<dyn Provider> {
        match side {
            Side::Wasm => &self.wasm,
            Side::Containers => &self.containers,
        }
    }

    /// The side a RuntimeClass handler names (`None`: no handler, decide by image).
    fn side_of_handler(handler: Option<&str>) -> Option<Side> {
        match handler {
            None | Some("") => None,
            Some(h) if WASM_HANDLERS.contains(&h) => Some(Side::Wasm),
            Some(_) => Some(Side::Containers),
        }
    }

    /// The side holding container `id`; relearnt from both listings when it is not known yet
    /// (a container created before an agent restart, before the first relist).
    async fn side_of_container(&self, id: &str) -> Result<Side, ProviderError> {
        if let Some(side) = self.routes().containers.get(id) {
            return Ok(*side);
        }
        for side in [Side::Wasm, Side::Containers] {
            if let Ok(list) = self.provider(side).list_containers().await {
                let mut routes = self.routes();
                for c in &list {
                    routes.containers.insert(c.id.clone(), side);
                }
            }
        }
        self.routes()
            .containers
            .get(id)
            .copied()
            .ok_or_else(|| ProviderError::NotFound(format!("container {id}")))
    }

    /// The side holding image `reference`, asking both when it is not known yet.
    async fn side_of_image(&self, reference: &str) -> Option<Side> {
        if let Some(side) = self.routes().images.get(reference) {
            return Some(*side);
        }
        for side in [Side::Wasm, Side::Containers] {
            if self.provider(side).image_status(reference).await.is_some() {
                self.routes().images.insert(reference.to_string(), side);
                return Some(side);
            }
        }
        None
    }

    /// Learns, once, which side holds each sandbox made before this agent started (so an
    /// adopted pod is removed where it runs); every later sandbox is made through the router.
    async fn learn_sandboxes(&self) -> Result<(), ProviderError> {
        if self.routes().learnt {
            return Ok(());
        }
        self.list_pod_sandboxes().await?;
        self.routes().learnt = true;
        Ok(())
    }

    /// The scheme of container `id` in a pod's status (`wasm` when it is not known).
    pub fn scheme_of(&self, id: &str) -> &'static str {
        self.routes()
            .containers
            .get(id)
            .copied()
            .unwrap_or(Side::Wasm)
            .scheme()
    }

    /// The pod's sandbox on `side`, created there now if it was only recorded; refuses a
    /// sandbox already on the other side.
    async fn sandbox_on(
        &self,
        sandbox_id: &str,
        side: Side,
        image: &str,
    ) -> Result<String, ProviderError> {
        let route = self.routes().sandboxes.get(sandbox_id).cloned();
        match route {
            Some(SandboxRoute::On(s, id)) if s == side => Ok(id),
            Some(SandboxRoute::On(s, _)) => Err(ProviderError::Create(format!(
                "image {image} is {} but the pod's other containers run as {}: a pod's containers \
                 must all be Wasm or all be Linux containers",
                describe(side),
                describe(s)
            ))),
            Some(SandboxRoute::Undecided(config)) => {
                let id = self.provider(side).run_pod_sandbox(&config).await?;
                self.routes()
                    .sandboxes
                    .insert(sandbox_id.to_string(), SandboxRoute::On(side, id.clone()));
                Ok(id)
            }
            None => Err(ProviderError::NotFound(format!("sandbox {sandbox_id}"))),
        }
    }
}

/// The id a provider gave the sandbox it lists (providers key sandboxes by pod UID).
fn sandbox_id(s: &SandboxConfig) -> String {
    s.pod_uid.clone()
}

fn describe(side: Side) -> &'static str {
    match side {
        Side::Wasm => "WebAssembly",
        Side::Containers => "a Linux container image",
    }
}

#[async_trait::async_trait]
impl Provider for Router {
    /// The containerd side's on a mixed node, else the Wasm side's; [`Provider::runtimes`]
    /// names both.
    fn runtime_info(&self) -> RuntimeInfo {
        self.runtimes()
            .into_iter()
            .next()
            .unwrap_or_else(|| self.wasm.runtime_info())
    }

    fn runtimes(&self) -> Vec<RuntimeInfo> {
        let mut all = self.containers.runtimes();
        all.extend(self.wasm.runtimes());
        all
    }

    fn container_uri(&self, id: &str) -> String {
        format!("{}://{id}", self.scheme_of(id))
    }

    async fn status(&self) -> RuntimeStatus {
        for side in [Side::Containers, Side::Wasm] {
            if let RuntimeStatus::NotReady { message } = self.provider(side).status().await {
                let name = self.provider(side).runtime_info().name;
                return RuntimeStatus::NotReady {
                    message: format!("{name}: {message}"),
                };
            }
        }
        RuntimeStatus::Ready
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        let side = self.side_of_image(reference).await?;
        self.provider(side).image_status(reference).await
    }

    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let known = self.routes().images.get(reference).copied();
        let first = known.unwrap_or(Side::Wasm);
        let result = match self.provider(first).pull_image(reference, auth).await {
            // Not Wasm: a Linux container image, for containerd.
            Err(ProviderError::UnsupportedImage(why)) if first == Side::Wasm => {
                tracing::debug!(
                    reference,
                    why,
                    "not a Wasm image: pulling through containerd"
                );
                match self.containers.pull_image(reference, auth).await {
                    Ok(info) => Ok((Side::Containers, info)),
                    // Neither side runs it: both say why.
                    Err(ProviderError::UnsupportedImage(also)) => {
                        Err(ProviderError::UnsupportedImage(format!("{why}; {also}")))
                    }
                    Err(e) => Err(e),
                }
            }
            other => other.map(|info| (first, info)),
        };
        let (side, info) = result?;
        self.routes().images.insert(reference.to_string(), side);
        Ok(info)
    }

    /// The router's sandbox id is the pod UID, whichever side holds the sandbox.
    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        self.learn_sandboxes().await?;
        let uid = config.pod_uid.clone();
        let known = self.routes().sandboxes.get(&uid).cloned();
        let side = match known {
            // Asked again: the side may have lost it (a restarted runtime), and making a sandbox
            // is idempotent per pod UID there.
            Some(SandboxRoute::On(side, _)) => Some(side),
            Some(SandboxRoute::Undecided(_)) | None => {
                Self::side_of_handler(config.runtime_handler.as_deref())
            }
        };
        let route = match side {
            Some(side) => {
                let id = self.provider(side).run_pod_sandbox(config).await?;
                SandboxRoute::On(side, id)
            }
            None => SandboxRoute::Undecided(config.clone()),
        };
        self.routes().sandboxes.insert(uid.clone(), route);
        Ok(uid)
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let route = self.routes().sandboxes.get(sandbox_id).cloned();
        match route {
            Some(SandboxRoute::On(side, id)) => {
                self.provider(side).remove_pod_sandbox(&id, grace).await?
            }
            Some(SandboxRoute::Undecided(_)) => {}
            // Not known here (created before an agent restart): remove it wherever it is.
            None => {
                let wasm = self.wasm.remove_pod_sandbox(sandbox_id, grace).await;
                let containers = self.containers.remove_pod_sandbox(sandbox_id, grace).await;
                match (wasm, containers) {
                    (Ok(()), _) | (_, Ok(())) => {}
                    (Err(e), _) => return Err(e),
                }
            }
        }
        self.routes().sandboxes.remove(sandbox_id);
        Ok(())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        let side = match self.side_of_image(&config.image).await {
            Some(side) => side,
            None => return Err(ProviderError::ImageNotPresent(config.image.clone())),
        };
        let sandbox = self.sandbox_on(sandbox_id, side, &config.image).await?;
        let id = self
            .provider(side)
            .create_container(&sandbox, config)
            .await?;
        self.routes().containers.insert(id.clone(), side);
        Ok(id)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side).start_container(container_id).await
    }

    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side)
            .stop_container(container_id, grace)
            .await
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side).remove_container(container_id).await?;
        self.routes().containers.remove(container_id);
        Ok(())
    }

    /// Both sides' containers; an error when either cannot be asked (never half a listing).
    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        let (wasm, containers) = tokio::join!(
            self.wasm.list_containers(),
            self.containers.list_containers()
        );
        let (wasm, containers) = (wasm?, containers?);
        let mut routes = self.routes();
        for c in &wasm {
            routes.containers.insert(c.id.clone(), Side::Wasm);
        }
        for c in &containers {
            routes.containers.insert(c.id.clone(), Side::Containers);
        }
        // Forget containers neither side holds any more.
        let held: std::collections::HashSet<&str> = wasm
            .iter()
            .chain(containers.iter())
            .map(|c| c.id.as_str())
            .collect();
        routes.containers.retain(|id, _| held.contains(id.as_str()));
        drop(routes);
        Ok(wasm.into_iter().chain(containers).collect())
    }

    /// Both sides' sandboxes, learnt as this pod's route (after a restart).
    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        let (wasm, containers) = tokio::join!(
            self.wasm.list_pod_sandboxes(),
            self.containers.list_pod_sandboxes()
        );
        let (wasm, containers) = (wasm?, containers?);
        let mut routes = self.routes();
        for (side, list) in [(Side::Wasm, &wasm), (Side::Containers, &containers)] {
            for s in list {
                routes
                    .sandboxes
                    .entry(s.pod_uid.clone())
                    .or_insert_with(|| SandboxRoute::On(side, sandbox_id(s)));
            }
        }
        drop(routes);
        Ok(wasm.into_iter().chain(containers).collect())
    }

    /// The Wasm side's image filesystem, counting both sides' images as used.
    async fn image_fs(&self) -> Option<ImageFsInfo> {
        let (wasm, containers) = tokio::join!(self.wasm.image_fs(), self.containers.image_fs());
        match (wasm, containers) {
            (Some(mut w), Some(c)) => {
                w.used_bytes += c.used_bytes;
                w.inodes_used += c.inodes_used;
                Some(w)
            }
            (w, c) => w.or(c),
        }
    }

    async fn list_images(&self) -> Vec<ImageRecord> {
        let (wasm, containers) =
            tokio::join!(self.wasm.list_images(), self.containers.list_images());
        let mut routes = self.routes();
        for i in &wasm {
            routes.images.insert(i.reference.clone(), Side::Wasm);
        }
        for i in &containers {
            routes.images.insert(i.reference.clone(), Side::Containers);
        }
        drop(routes);
        wasm.into_iter().chain(containers).collect()
    }

    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        let side = self
            .side_of_image(reference)
            .await
            .ok_or_else(|| ProviderError::NotFound(format!("image {reference}")))?;
        let freed = self.provider(side).remove_image(reference).await?;
        self.routes().images.remove(reference);
        Ok(freed)
    }

    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side).exec(container_id, command, io).await
    }

    async fn attach(&self, container_id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side).attach(container_id, io).await
    }

    /// The answer of the side holding the sandbox, or of the side its handler names; without
    /// either, a `hostNetwork` pod is on the node's network wherever it goes, a pod on a node
    /// without containerd goes to the Wasm side, and any other waits for its first image.
    fn on_node_network(&self, config: &SandboxConfig, sandbox_id: Option<&str>) -> Option<bool> {
        let route = sandbox_id.and_then(|id| self.routes().sandboxes.get(id).cloned());
        if let Some(SandboxRoute::On(side, id)) = route {
            return self.provider(side).on_node_network(config, Some(&id));
        }
        if let Some(side) = Self::side_of_handler(config.runtime_handler.as_deref()) {
            return self.provider(side).on_node_network(config, None);
        }
        if config.host_network || self.containers.runtimes().is_empty() {
            return self.wasm.on_node_network(config, None);
        }
        None
    }

    /// A recorded sandbox is made on the side of the (pulled) image, as `create_container`
    /// would make it; an image not pulled yet leaves it recorded.
    async fn place_sandbox(&self, sandbox_id: &str, image: &str) -> Result<(), ProviderError> {
        match self.side_of_image(image).await {
            Some(side) => self.sandbox_on(sandbox_id, side, image).await.map(drop),
            None => Ok(()),
        }
    }

    /// The IPs of the side holding the sandbox (none while it is only recorded, or on the Wasm
    /// side, whose pods have the node's IP).
    async fn pod_ips(&self, sandbox_id: &str) -> Vec<std::net::IpAddr> {
        let route = self.routes().sandboxes.get(sandbox_id).cloned();
        match route {
            Some(SandboxRoute::On(side, id)) => self.provider(side).pod_ips(&id).await,
            _ => Vec::new(),
        }
    }

    async fn pod_listener(&self, pod_uid: &str, port: u16) -> Option<std::net::SocketAddr> {
        let route = self.routes().sandboxes.get(pod_uid).cloned();
        match route {
            Some(SandboxRoute::On(side, _)) => {
                self.provider(side).pod_listener(pod_uid, port).await
            }
            _ => None,
        }
    }

    /// Forwarded to the side holding the pod's sandbox: that side knows where its localhost is.
    async fn pod_connect(
        &self,
        pod_uid: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProviderError> {
        let route = self.routes().sandboxes.get(pod_uid).cloned();
        match route {
            Some(SandboxRoute::On(side, _)) => self.provider(side).pod_connect(pod_uid, port).await,
            _ => Err(ProviderError::NotFound(format!("pod {pod_uid}"))),
        }
    }

    async fn exec_sync(
        &self,
        container_id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>), ProviderError> {
        let side = self.side_of_container(container_id).await?;
        self.provider(side)
            .exec_sync(container_id, command, timeout)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::fake::FakeProvider;

    struct Node {
        wasm: Arc<FakeProvider>,
        containers: Arc<FakeProvider>,
        router: Router,
    }

    fn node() -> Node {
        let wasm = Arc::new(FakeProvider::with_id_prefix("w"));
        let containers = Arc::new(FakeProvider::with_id_prefix("c"));
        let router = Router::new(wasm.clone(), containers.clone());
        Node {
            wasm,
            containers,
            router,
        }
    }

    impl Node {
        /// `reference` is a Linux container image: the Wasm side refuses it.
        fn linux_image(&self, reference: &str) {
            self.wasm.fail_pulls(
                reference,
                ProviderError::UnsupportedImage(format!("{reference}: no Wasm layer")),
            );
        }

        /// The same providers under a new router (the agent restarted).
        fn restarted(&self) -> Router {
            Router::new(self.wasm.clone(), self.containers.clone())
        }
    }

    fn sandbox(uid: &str, handler: Option<&str>) -> SandboxConfig {
        SandboxConfig {
            pod_uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            pod_dir: "/nonexistent".into(),
            runtime_handler: handler.map(str::to_string),
            host_network: false,
        }
    }

    fn container(name: &str, image: &str) -> ContainerConfig {
        ContainerConfig {
            name: name.into(),
            image: image.into(),
            command: vec![],
            args: vec![],
            env: vec![],
            working_dir: None,
            mounts: vec![],
            log_path: "/dev/null".into(),
            memory_limit_bytes: None,
            cpu_limit_millicores: None,
            cpu_request_millicores: None,
            attempt: 0,
            network: Default::default(),
            stdin: false,
            stdin_once: false,
            annotations: Default::default(),
        }
    }

    async fn sandboxes(p: &FakeProvider) -> Vec<String> {
        let mut uids: Vec<_> = p
            .list_pod_sandboxes()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.pod_uid)
            .collect();
        uids.sort();
        uids
    }

    #[tokio::test]
    async fn a_pod_without_a_runtime_class_runs_where_its_image_was_pulled() {
        let n = node();
        n.linux_image("busybox");
        let wasm_pod = n.router.run_pod_sandbox(&sandbox("a", None)).await.unwrap();
        let linux_pod = n.router.run_pod_sandbox(&sandbox("b", None)).await.unwrap();
        // Nothing is made before the first container says which side the pod is for.
        assert!(sandboxes(&n.wasm).await.is_empty() && sandboxes(&n.containers).await.is_empty());

        n.router.pull_image("hello.wasm", &[]).await.unwrap();
        n.router.pull_image("busybox", &[]).await.unwrap();
        assert!(n.containers.calls().contains(&"pull busybox".to_string()));
        assert!(!n
            .containers
            .calls()
            .contains(&"pull hello.wasm".to_string()));

        let w = n
            .router
            .create_container(&wasm_pod, container("app", "hello.wasm"))
            .await
            .unwrap();
        let c = n
            .router
            .create_container(&linux_pod, container("app", "busybox"))
            .await
            .unwrap();
        assert_eq!(sandboxes(&n.wasm).await, ["a"]);
        assert_eq!(sandboxes(&n.containers).await, ["b"]);
        n.router.start_container(&w).await.unwrap();
        n.router.start_container(&c).await.unwrap();
        assert_eq!(n.router.container_uri(&w), format!("wasm://{w}"));
        assert_eq!(n.router.container_uri(&c), format!("containerd://{c}"));
        let listed = n.router.list_containers().await.unwrap();
        assert_eq!(listed.len(), 2);
    }

    #[tokio::test]
    async fn a_runtime_class_handler_decides_at_once() {
        let n = node();
        n.router
            .run_pod_sandbox(&sandbox("a", Some("wasmtime")))
            .await
            .unwrap();
        n.router
            .run_pod_sandbox(&sandbox("b", Some("runc")))
            .await
            .unwrap();
        assert_eq!(sandboxes(&n.wasm).await, ["a"]);
        assert_eq!(sandboxes(&n.containers).await, ["b"]);
        // A Wasm image in a runc pod is refused, naming both kinds.
        n.router.pull_image("hello.wasm", &[]).await.unwrap();
        let e = n
            .router
            .create_container("b", container("app", "hello.wasm"))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("must all be Wasm or all be Linux containers"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_pod_mixing_wasm_and_linux_images_is_refused_at_the_odd_one() {
        let n = node();
        n.linux_image("busybox");
        let pod = n.router.run_pod_sandbox(&sandbox("a", None)).await.unwrap();
        n.router.pull_image("hello.wasm", &[]).await.unwrap();
        n.router.pull_image("busybox", &[]).await.unwrap();
        n.router
            .create_container(&pod, container("one", "hello.wasm"))
            .await
            .unwrap();
        let e = n
            .router
            .create_container(&pod, container("two", "busybox"))
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Create(_)), "{e:?}");
        assert!(sandboxes(&n.containers).await.is_empty());
    }

    #[tokio::test]
    async fn after_a_restart_a_pod_is_found_and_removed_where_it_runs() {
        let n = node();
        n.linux_image("busybox");
        let pod = n.router.run_pod_sandbox(&sandbox("a", None)).await.unwrap();
        n.router.pull_image("busybox", &[]).await.unwrap();
        let id = n
            .router
            .create_container(&pod, container("app", "busybox"))
            .await
            .unwrap();
        n.router.start_container(&id).await.unwrap();

        let router = n.restarted();
        // The worker adopts: the same sandbox call, then stops the container it finds listed.
        assert_eq!(
            router.run_pod_sandbox(&sandbox("a", None)).await.unwrap(),
            "a"
        );
        router.stop_container(&id, Duration::ZERO).await.unwrap();
        assert_eq!(router.container_uri(&id), format!("containerd://{id}"));
        router
            .remove_pod_sandbox("a", Duration::ZERO)
            .await
            .unwrap();
        assert!(sandboxes(&n.containers).await.is_empty());
        assert!(n
            .containers
            .calls()
            .contains(&"remove-sandbox a".to_string()));
        assert!(!n
            .wasm
            .calls()
            .iter()
            .any(|c| c.starts_with("remove-sandbox")));
    }

    #[tokio::test]
    async fn a_wasm_only_node_refuses_linux_images_and_other_handlers_clearly() {
        let wasm = Arc::new(FakeProvider::new());
        let router = Router::new(wasm.clone(), Arc::new(NoContainers));
        assert_eq!(router.runtimes(), [wasm.runtime_info()]);
        assert_eq!(router.runtime_info(), wasm.runtime_info());
        wasm.fail_pulls(
            "busybox",
            ProviderError::UnsupportedImage("/bin/sh is not WebAssembly".into()),
        );
        let e = router.pull_image("busybox", &[]).await.unwrap_err();
        // The Wasm side's reason first (what the image holds), then why nothing else runs it.
        assert!(
            e.to_string().starts_with("/bin/sh is not WebAssembly; "),
            "{e}"
        );
        assert!(matches!(e, ProviderError::UnsupportedImage(_)), "{e:?}");
        assert!(e.to_string().contains("runs only WebAssembly"), "{e}");
        let e = router
            .run_pod_sandbox(&sandbox("a", Some("runc")))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("RuntimeHandler \"runc\" is not supported"),
            "{e}"
        );
        // Wasm pods run as on any node.
        router
            .run_pod_sandbox(&sandbox("b", Some("wasm")))
            .await
            .unwrap();
        router.run_pod_sandbox(&sandbox("c", None)).await.unwrap();
        router.pull_image("hello.wasm", &[]).await.unwrap();
        let id = router
            .create_container("c", container("app", "hello.wasm"))
            .await
            .unwrap();
        router.start_container(&id).await.unwrap();
        assert_eq!(router.list_containers().await.unwrap().len(), 1);
        router
            .remove_pod_sandbox("c", Duration::ZERO)
            .await
            .unwrap();
        assert!(router.list_containers().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn whether_a_pod_is_on_the_node_network_comes_from_its_side() {
        let n = node();
        n.containers.own_network();
        n.linux_image("busybox");
        let net = |uid: &str, handler: Option<&str>, host_network: bool| SandboxConfig {
            host_network,
            ..sandbox(uid, handler)
        };
        // By handler, before any sandbox: Wasm pods share the node's network, container pods
        // have their own unless they ask for the host's.
        assert_eq!(
            n.router
                .on_node_network(&net("a", Some("wasm"), false), None),
            Some(true)
        );
        assert_eq!(
            n.router
                .on_node_network(&net("a", Some("runc"), false), None),
            Some(false)
        );
        assert_eq!(
            n.router
                .on_node_network(&net("a", Some("runc"), true), None),
            Some(true)
        );
        // Without a handler the first image decides; a hostNetwork pod is on the node's either way.
        assert_eq!(
            n.router.on_node_network(&net("b", None, true), None),
            Some(true)
        );
        let config = net("b", None, false);
        let pod = n.router.run_pod_sandbox(&config).await.unwrap();
        assert_eq!(n.router.on_node_network(&config, Some(&pod)), None);
        n.router.pull_image("busybox", &[]).await.unwrap();
        n.router
            .create_container(&pod, container("app", "busybox"))
            .await
            .unwrap();
        assert_eq!(n.router.on_node_network(&config, Some(&pod)), Some(false));
        // A node without containerd runs every pod on the Wasm side.
        let wasm_only = Router::new(Arc::new(FakeProvider::new()), Arc::new(NoContainers));
        assert_eq!(
            wasm_only.on_node_network(&net("c", None, false), None),
            Some(true)
        );
    }

    #[tokio::test]
    async fn pod_ips_come_from_the_side_holding_the_sandbox() {
        let n = node();
        n.linux_image("busybox");
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        n.containers.give_pod_ips("b", vec![ip]);
        n.wasm.give_pod_ips("a", vec!["10.9.9.9".parse().unwrap()]);
        n.router
            .run_pod_sandbox(&sandbox("a", Some("wasm")))
            .await
            .unwrap();
        let pod = n.router.run_pod_sandbox(&sandbox("b", None)).await.unwrap();
        // Only recorded so far: no IPs anywhere.
        assert!(n.router.pod_ips(&pod).await.is_empty());
        n.router.pull_image("busybox", &[]).await.unwrap();
        n.router
            .create_container(&pod, container("app", "busybox"))
            .await
            .unwrap();
        assert_eq!(n.router.pod_ips(&pod).await, [ip]);
        assert_eq!(
            n.router.pod_ips("a").await,
            ["10.9.9.9".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(n.router.pod_ips("unknown").await.is_empty());
    }

    #[tokio::test]
    async fn a_side_that_lost_its_sandboxes_gets_them_back_when_asked_again() {
        let n = node();
        let handler = sandbox("a", Some("wasm"));
        n.router.run_pod_sandbox(&handler).await.unwrap();
        n.wasm.forget_all(); // the Wasm runtime restarted
        n.router.run_pod_sandbox(&handler).await.unwrap();
        assert_eq!(sandboxes(&n.wasm).await, ["a"]);
    }

    #[tokio::test]
    async fn an_unknown_container_is_not_found_on_either_side() {
        let n = node();
        let e = n.router.start_container("nope").await.unwrap_err();
        assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");
    }
}
