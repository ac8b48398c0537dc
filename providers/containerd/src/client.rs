//! One connection to containerd's gRPC socket, with every request in the provider's namespace.

use std::path::Path;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use provider_api::ProviderError;

/// containerd's request header naming the namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's request header naming the lease that protects what the request makes from
/// garbage collection.
const LEASE_HEADER: &str = "containerd-lease";

/// The snapshotter images are unpacked into and container root filesystems come from.
pub const SNAPSHOTTER: &str = "overlayfs";

#[derive(Clone)]
pub struct Client {
    channel: Channel,
    namespace: String,
}

impl Client {
    /// Connects lazily: the first request dials the socket (containerd may start later).
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ProviderError> {
        let channel = containerd_client::connect(socket).await.map_err(|e| {
            ProviderError::Unavailable(format!(
                "containerd at {}: {}",
                socket.display(),
                provider_api::one_line(&e)
            ))
        })?;
        Ok(Self {
            channel,
            namespace: namespace.to_string(),
        })
    }

    /// `msg` in the provider's namespace.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        self.req_leased(msg, None)
    }

    /// `msg` in the provider's namespace, under `lease` when given.
    pub fn req_leased<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert(NAMESPACE_HEADER, ns);
        }
        if let Some(lease) = lease.and_then(|l| l.parse().ok()) {
            req.metadata_mut().insert(LEASE_HEADER, lease);
        }
        req
    }

    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub fn version(&self) -> VersionClient<Channel> {
        VersionClient::new(self.channel.clone())
    }
}

/// A failed containerd call as the provider reports it: `what` says what was being done.
pub fn status_error(what: &str, status: Status) -> ProviderError {
    let message = format!("{what}: {}", status.message());
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            ProviderError::Unavailable(message)
        }
        Code::NotFound => ProviderError::NotFound(message),
        _ => ProviderError::Io(message),
    }
}

/// Whether a call failed because the object is not there.
pub fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
}

/// Whether a call failed because the object exists already.
pub fn is_already_exists(status: &Status) -> bool {
    status.code() == Code::AlreadyExists
}
