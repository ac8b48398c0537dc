//! An in-memory [`Provider`] for unit tests of the node (feature `fake`): images are names,
//! containers are entries that run until the test says they exit. It keeps the provider's
//! contract (ids, states, attempts, annotations, sandbox removal stops containers) so the
//! pod worker's restart, backoff, init and status logic can be tested without a cluster.
//!
//! A test drives it with [`FakeProvider::exit`] (the running instance of a container ends),
//! [`FakeProvider::fail_pulls`] (a registry error), [`FakeProvider::hang_pulls`] (a registry
//! that never answers), [`FakeProvider::forget_all`] (the runtime
//! restarted and lost everything), and reads what the node asked with [`FakeProvider::calls`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::{
    ContainerConfig, ContainerState, ContainerSummary, ContainerUsage, ExitReason, ImageInfo,
    Provider, ProviderError, RegistryAuth, RuntimeInfo, RuntimeStatus, SandboxConfig,
};

/// See the module docs.
#[derive(Default)]
pub struct FakeProvider {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    images: HashMap<String, ImageInfo>,
    pull_errors: HashMap<String, ProviderError>,
    hanging_pulls: std::collections::HashSet<String>,
    sandboxes: HashMap<String, SandboxConfig>,
    containers: HashMap<String, Entry>,
    next_id: u64,
    calls: Vec<String>,
    /// Container ids are `<prefix>-<n>` ("fake" unless [`FakeProvider::with_id_prefix`]).
    id_prefix: Option<String>,
    /// [`FakeProvider::give_pod_ips`]: what `pod_ips` answers for a sandbox.
    pod_ips: HashMap<String, Vec<std::net::IpAddr>>,
    /// [`FakeProvider::own_network`]: pods get a network of their own (unless hostNetwork).
    own_network: bool,
}

struct Entry {
    pod_uid: String,
    config: ContainerConfig,
    state: ContainerState,
}

impl FakeProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake whose container ids start with `prefix` (two fakes side by side, as a mixed
    /// node's two providers, hand out different ids).
    pub fn with_id_prefix(prefix: &str) -> Self {
        let fake = Self::default();
        fake.state().id_prefix = Some(prefix.to_string());
        fake
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pulls of `reference` fail with `error` from now on.
    pub fn fail_pulls(&self, reference: &str, error: ProviderError) {
        self.state()
            .pull_errors
            .insert(reference.to_string(), error);
    }

    /// Pulls of `reference` succeed again (and no longer hang).
    pub fn heal_pulls(&self, reference: &str) {
        let mut state = self.state();
        state.pull_errors.remove(reference);
        state.hanging_pulls.remove(reference);
    }

    /// Pulls of `reference` never complete from now on (a registry that accepts and never
    /// answers), until [`FakeProvider::heal_pulls`]; pulls already hanging stay hung.
    pub fn hang_pulls(&self, reference: &str) {
        self.state().hanging_pulls.insert(reference.to_string());
    }

    /// The running instance of container `name` of pod `pod_uid` exits with `code`. False
    /// when none runs.
    pub fn exit(&self, pod_uid: &str, name: &str, code: i32) -> bool {
        let mut state = self.state();
        let Some(entry) = state.containers.values_mut().find(|e| {
            e.pod_uid == pod_uid
                && e.config.name == name
                && matches!(e.state, ContainerState::Running { .. })
        }) else {
            return false;
        };
        let started_at = match entry.state {
            ContainerState::Running { started_at } => Some(started_at),
            _ => None,
        };
        let reason = if code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        entry.state = ContainerState::Exited {
            started_at,
            finished_at: SystemTime::now(),
            exit_code: code,
            reason,
            message: None,
        };
        true
    }

    /// The sandbox of pod `pod_uid` has these IPs (a provider that gives pods a network of
    /// their own); answered by `pod_ips` while the sandbox exists.
    pub fn give_pod_ips(&self, pod_uid: &str, ips: Vec<std::net::IpAddr>) {
        self.state().pod_ips.insert(pod_uid.to_string(), ips);
    }

    /// From now on pods get a network of their own, as the container provider's do (unless
    /// `hostNetwork`); by default they are on the node's, as Wasm pods are.
    pub fn own_network(&self) {
        self.state().own_network = true;
    }

    /// The runtime restarted: every sandbox and container is gone.
    pub fn forget_all(&self) {
        let mut state = self.state();
        state.sandboxes.clear();
        state.containers.clear();
    }

    /// What the node asked, in order: `pull <ref>`, `create <pod uid>/<name>#<attempt>`,
    /// `start <name>#<attempt>`, `stop <name>#<attempt>`, `remove-sandbox <pod uid>`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn describe(entry: &Entry) -> String {
        format!("{}#{}", entry.config.name, entry.config.attempt)
    }
}

#[async_trait::async_trait]
impl Provider for FakeProvider {
    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "fake".into(),
            version: "0".into(),
        }
    }

    async fn status(&self) -> RuntimeStatus {
        RuntimeStatus::Ready
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        self.state().images.get(reference).cloned()
    }

    async fn pull_image(
        &self,
        reference: &str,
        _auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let hang = {
            let mut state = self.state();
            state.calls.push(format!("pull {reference}"));
            state.hanging_pulls.contains(reference)
        };
        if hang {
            return std::future::pending().await;
        }
        let mut state = self.state();
        if let Some(e) = state.pull_errors.get(reference) {
            return Err(e.clone());
        }
        let info = ImageInfo {
            reference: reference.to_string(),
            digest: format!("sha256:{:064x}", reference.len()),
            size: 1,
        };
        state.images.insert(reference.to_string(), info.clone());
        Ok(info)
    }

    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        self.state()
            .sandboxes
            .insert(config.pod_uid.clone(), config.clone());
        Ok(config.pod_uid.clone())
    }

    fn on_node_network(&self, config: &SandboxConfig, _sandbox_id: Option<&str>) -> Option<bool> {
        Some(config.host_network || !self.state().own_network)
    }

    async fn pod_ips(&self, sandbox_id: &str) -> Vec<std::net::IpAddr> {
        let state = self.state();
        if !state.sandboxes.contains_key(sandbox_id) {
            return Vec::new();
        }
        state.pod_ips.get(sandbox_id).cloned().unwrap_or_default()
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        _grace: Duration,
    ) -> Result<(), ProviderError> {
        let mut state = self.state();
        state.calls.push(format!("remove-sandbox {sandbox_id}"));
        state.containers.retain(|_, e| e.pod_uid != sandbox_id);
        state.sandboxes.remove(sandbox_id);
        Ok(())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        let mut state = self.state();
        if !state.sandboxes.contains_key(sandbox_id) {
            return Err(ProviderError::NotFound(format!("sandbox {sandbox_id}")));
        }
        if !state.images.contains_key(&config.image) {
            return Err(ProviderError::ImageNotPresent(config.image.clone()));
        }
        state.next_id += 1;
        let id = format!(
            "{}-{}",
            state.id_prefix.as_deref().unwrap_or("fake"),
            state.next_id
        );
        state.calls.push(format!(
            "create {sandbox_id}/{}#{}",
            config.name, config.attempt
        ));
        state.containers.insert(
            id.clone(),
            Entry {
                pod_uid: sandbox_id.to_string(),
                config,
                state: ContainerState::Created,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let mut state = self.state();
        let entry = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| ProviderError::NotFound(container_id.to_string()))?;
        if entry.state != ContainerState::Created {
            return Err(ProviderError::Create(format!(
                "{container_id} is not Created"
            )));
        }
        entry.state = ContainerState::Running {
            started_at: SystemTime::now(),
        };
        let call = format!("start {}", Self::describe(entry));
        state.calls.push(call);
        Ok(())
    }

    async fn stop_container(
        &self,
        container_id: &str,
        _grace: Duration,
    ) -> Result<(), ProviderError> {
        let mut state = self.state();
        let entry = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| ProviderError::NotFound(container_id.to_string()))?;
        let started_at = match entry.state {
            ContainerState::Running { started_at } => Some(started_at),
            ContainerState::Created => None,
            ContainerState::Exited { .. } => return Ok(()),
        };
        entry.state = ContainerState::Exited {
            started_at,
            finished_at: SystemTime::now(),
            exit_code: 137,
            reason: ExitReason::Killed,
            message: None,
        };
        let call = format!("stop {}", Self::describe(entry));
        state.calls.push(call);
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        self.state()
            .containers
            .remove(container_id)
            .map(drop)
            .ok_or_else(|| ProviderError::NotFound(container_id.to_string()))
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        Ok(self
            .state()
            .containers
            .iter()
            .map(|(id, e)| ContainerSummary {
                id: id.clone(),
                pod_uid: e.pod_uid.clone(),
                name: e.config.name.clone(),
                attempt: e.config.attempt,
                image_digest: format!("sha256:{:064x}", e.config.image.len()),
                state: e.state.clone(),
                usage: ContainerUsage::default(),
                annotations: e.config.annotations.clone(),
            })
            .collect())
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        Ok(self.state().sandboxes.values().cloned().collect())
    }
}
