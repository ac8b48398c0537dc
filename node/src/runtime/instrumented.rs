//! Every call the node makes to its runtimes, counted and timed: the kubelet's
//! `kubelet_runtime_operations_total`, `kubelet_runtime_operations_errors_total` and
//! `kubelet_runtime_operations_duration_seconds`, by `operation_type`. The kubelet records them
//! in its instrumented CRI client; here [`Instrumented`] wraps the node's one provider (the
//! [`super::routing::Router`]) and each call is recorded under the CRI call's name
//! (`create_container`, `list_containers`, ...), whichever runtime answers it.
//!
//! Calls that cannot fail in the trait (`image_status`, `list_images`, ...) count no errors;
//! `status` counts one when a runtime says it is not ready. An operation's error series is
//! served (at 0) from its first call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use provider_api::{
    AttachIo, ContainerConfig, ContainerSummary, ExecIo, ImageFsInfo, ImageInfo, ImageRecord,
    Provider, ProviderError, RegistryAuth, RuntimeInfo, RuntimeStatus, SandboxConfig,
};

use crate::metrics::{self, KubeletMetrics, RuntimeOperationLabels};

/// A provider whose every runtime call is recorded in the kubelet's runtime operation series.
pub struct Instrumented {
    inner: Arc<dyn Provider>,
    metrics: &'static KubeletMetrics,
}

impl Instrumented {
    /// Records into the agent's served series.
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        Self::recording_into(inner, metrics::kubelet())
    }

    /// Records into `metrics` (a test's own set).
    pub fn recording_into(inner: Arc<dyn Provider>, metrics: &'static KubeletMetrics) -> Self {
        Self { inner, metrics }
    }

    fn record(&self, operation_type: &'static str, started: Instant, failed: bool) {
        let labels = RuntimeOperationLabels { operation_type };
        let m = self.metrics;
        m.runtime_operations.get_or_create(&labels).inc();
        m.runtime_operations_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        // The error series of every operation seen is served, at 0 until one fails, so a
        // dashboard's error rate reads 0 rather than no data.
        let errors = m.runtime_operations_errors.get_or_create(&labels);
        if failed {
            errors.inc();
        }
    }

    /// Records `result` of the call `operation_type` begun at `started`, and returns it.
    fn done<T, E>(
        &self,
        operation_type: &'static str,
        started: Instant,
        result: Result<T, E>,
    ) -> Result<T, E> {
        self.record(operation_type, started, result.is_err());
        result
    }
}

#[async_trait::async_trait]
impl Provider for Instrumented {
    fn runtime_info(&self) -> RuntimeInfo {
        self.inner.runtime_info()
    }

    fn runtimes(&self) -> Vec<RuntimeInfo> {
        self.inner.runtimes()
    }

    fn container_uri(&self, container_id: &str) -> String {
        self.inner.container_uri(container_id)
    }

    fn on_node_network(&self, config: &SandboxConfig, sandbox_id: Option<&str>) -> Option<bool> {
        self.inner.on_node_network(config, sandbox_id)
    }

    async fn status(&self) -> RuntimeStatus {
        let started = Instant::now();
        let status = self.inner.status().await;
        self.record(
            "status",
            started,
            matches!(status, RuntimeStatus::NotReady { .. }),
        );
        status
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        let started = Instant::now();
        let info = self.inner.image_status(reference).await;
        self.record("image_status", started, false);
        info
    }

    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let started = Instant::now();
        let r = self.inner.pull_image(reference, auth).await;
        self.done("pull_image", started, r)
    }

    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        let started = Instant::now();
        let r = self.inner.run_pod_sandbox(config).await;
        self.done("run_podsandbox", started, r)
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.remove_pod_sandbox(sandbox_id, grace).await;
        self.done("remove_podsandbox", started, r)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        let started = Instant::now();
        let r = self.inner.create_container(sandbox_id, config).await;
        self.done("create_container", started, r)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.start_container(container_id).await;
        self.done("start_container", started, r)
    }

    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.stop_container(container_id, grace).await;
        self.done("stop_container", started, r)
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.remove_container(container_id).await;
        self.done("remove_container", started, r)
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        let started = Instant::now();
        let r = self.inner.list_containers().await;
        self.done("list_containers", started, r)
    }

    async fn place_sandbox(&self, sandbox_id: &str, image: &str) -> Result<(), ProviderError> {
        // Where the router makes a recorded sandbox: the CRI's RunPodSandbox.
        let started = Instant::now();
        let r = self.inner.place_sandbox(sandbox_id, image).await;
        self.done("run_podsandbox", started, r)
    }

    async fn pod_ips(&self, sandbox_id: &str) -> Vec<std::net::IpAddr> {
        let started = Instant::now();
        let ips = self.inner.pod_ips(sandbox_id).await;
        self.record("podsandbox_status", started, false);
        ips
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        let started = Instant::now();
        let r = self.inner.list_pod_sandboxes().await;
        self.done("list_podsandbox", started, r)
    }

    async fn image_fs(&self) -> Option<ImageFsInfo> {
        let started = Instant::now();
        let fs = self.inner.image_fs().await;
        self.record("image_fs_info", started, false);
        fs
    }

    async fn list_images(&self) -> Vec<ImageRecord> {
        let started = Instant::now();
        let images = self.inner.list_images().await;
        self.record("list_images", started, false);
        images
    }

    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        let started = Instant::now();
        let r = self.inner.remove_image(reference).await;
        self.done("remove_image", started, r)
    }

    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let started = Instant::now();
        let r = self.inner.exec(container_id, command, io).await;
        self.done("exec", started, r)
    }

    async fn attach(&self, container_id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.attach(container_id, io).await;
        self.done("attach", started, r)
    }

    async fn pod_listener(&self, pod_uid: &str, port: u16) -> Option<std::net::SocketAddr> {
        self.inner.pod_listener(pod_uid, port).await
    }

    async fn pod_connect(
        &self,
        pod_uid: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProviderError> {
        let started = Instant::now();
        let r = self.inner.pod_connect(pod_uid, port).await;
        self.done("port_forward", started, r)
    }

    async fn exec_sync(
        &self,
        container_id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>), ProviderError> {
        let started = Instant::now();
        let r = self.inner.exec_sync(container_id, command, timeout).await;
        self.done("exec_sync", started, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    /// A runtime with one container `c1`; everything else is unknown.
    struct OneContainer;

    #[async_trait::async_trait]
    impl Provider for OneContainer {
        fn runtime_info(&self) -> RuntimeInfo {
            RuntimeInfo {
                name: "one".into(),
                version: "1".into(),
            }
        }
        async fn status(&self) -> RuntimeStatus {
            RuntimeStatus::Ready
        }
        async fn image_status(&self, _: &str) -> Option<ImageInfo> {
            None
        }
        async fn pull_image(
            &self,
            r: &str,
            _: &[RegistryAuth],
        ) -> Result<ImageInfo, ProviderError> {
            Err(ProviderError::NotFound(r.into()))
        }
        async fn run_pod_sandbox(&self, c: &SandboxConfig) -> Result<String, ProviderError> {
            Ok(c.pod_uid.clone())
        }
        async fn remove_pod_sandbox(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn create_container(
            &self,
            _: &str,
            _: ContainerConfig,
        ) -> Result<String, ProviderError> {
            Ok("c1".into())
        }
        async fn start_container(&self, id: &str) -> Result<(), ProviderError> {
            match id {
                "c1" => Ok(()),
                _ => Err(ProviderError::NotFound(id.into())),
            }
        }
        async fn stop_container(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn remove_container(&self, _: &str) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn each_call_is_counted_and_timed_under_its_cri_name_and_errors_apart() {
        static SET: LazyLock<(KubeletMetrics, prometheus_client::registry::Registry)> =
            LazyLock::new(metrics::kubelet_registry);
        let p = Instrumented::recording_into(Arc::new(OneContainer), &SET.0);
        p.start_container("c1").await.unwrap();
        p.start_container("c1").await.unwrap();
        p.start_container("nope").await.unwrap_err();
        p.list_containers().await.unwrap();
        p.pull_image("r/x:1", &[]).await.unwrap_err();

        let count = |op: &'static str| {
            SET.0
                .runtime_operations
                .get_or_create(&RuntimeOperationLabels { operation_type: op })
                .get()
        };
        let errors = |op: &'static str| {
            SET.0
                .runtime_operations_errors
                .get_or_create(&RuntimeOperationLabels { operation_type: op })
                .get()
        };
        assert_eq!(count("start_container"), 3);
        assert_eq!(errors("start_container"), 1);
        assert_eq!(
            (count("list_containers"), errors("list_containers")),
            (1, 0)
        );
        assert_eq!((count("pull_image"), errors("pull_image")), (1, 1));
        assert_eq!(count("create_container"), 0);

        // The duration histogram saw every call: its _count, as served.
        let text = metrics::encode(&SET.1);
        assert!(text.contains(
            "kubelet_runtime_operations_duration_seconds_count{operation_type=\"start_container\"} 3"
        ), "{text}");
    }
}
