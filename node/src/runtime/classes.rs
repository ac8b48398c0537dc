//! RuntimeClass handlers, as the kubelet's runtime class manager has them: a cache the API
//! server's watch keeps current (one list and one watch per node, not a GET per pod), with a
//! GET for a name the cache does not hold (not synced yet, or created a moment ago).
//!
//! Start at [`RuntimeClasses::watch`]; the pod worker asks [`RuntimeClasses::handler`] before
//! it creates a sandbox, and the Router routes the sandbox by the answer.

use futures::StreamExt;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

/// The node's view of the cluster's RuntimeClasses. Cheap to clone.
#[derive(Clone)]
pub struct RuntimeClasses {
    client: Option<kube::Client>,
    store: Option<Store<RuntimeClass>>,
}

impl RuntimeClasses {
    /// No API server (standalone, static pods only): every lookup fails, saying so.
    pub fn none() -> RuntimeClasses {
        RuntimeClasses {
            client: None,
            store: None,
        }
    }

    /// Starts the watch (a task of its own, retrying with backoff while the API server is away,
    /// ended when the runtime stops) and returns the view it keeps.
    pub fn watch(client: kube::Client) -> RuntimeClasses {
        let (store, writer) = reflector::store();
        let api: Api<RuntimeClass> = Api::all(client.clone());
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::debug!(error = %e, "RuntimeClass watch (retrying)");
                }
            }
        });
        RuntimeClasses {
            client: Some(client),
            store: Some(store),
        }
    }

    /// The handler of the RuntimeClass `name`. An error says why it cannot be had (no such
    /// RuntimeClass, the API server unreachable); the caller waits and asks again.
    pub async fn handler(&self, name: &str) -> Result<String, String> {
        if let Some(class) = self
            .store
            .as_ref()
            .and_then(|store| store.get(&ObjectRef::new(name)))
        {
            return Ok(class.handler.clone());
        }
        let Some(client) = &self.client else {
            return Err(format!(
                "RuntimeClass {name:?}: no API server to look it up from"
            ));
        };
        let api: Api<RuntimeClass> = Api::all(client.clone());
        match api.get_opt(name).await {
            Ok(Some(class)) => Ok(class.handler),
            Ok(None) => Err(format!("RuntimeClass {name:?} not found")),
            Err(e) => Err(format!(
                "looking up RuntimeClass {name:?}: {}",
                provider_api::one_line(&e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_an_api_server_a_lookup_says_so() {
        let err = RuntimeClasses::none().handler("wasm").await.unwrap_err();
        assert!(err.contains("no API server"), "{err}");
    }
}
