//! wasm-kubelet's Wasm provider: runs pods with wasmtime and WASI.
//!
//! Start at [`WasmtimeProvider`]: it owns the one `wasmtime::Engine` every pod shares (compiled
//! code is per engine, so sharing it is what lets a second pod of an image skip compilation).
//! Running pods (OCI pull, sandboxes, instances) arrives with the pod lifecycle; today the
//! provider reports its runtime and health so the node can register.

use provider_api::{Provider, ProviderError, RuntimeInfo, RuntimeStatus};

/// The wasmtime version pinned in the workspace (see build.rs).
pub const WASMTIME_VERSION: &str = env!("WASMTIME_VERSION");

/// Runs Wasm pods with wasmtime.
pub struct WasmtimeProvider {
    engine: wasmtime::Engine,
}

impl WasmtimeProvider {
    /// An engine with the settings pods need: epoch interruption (so a busy loop can be
    /// stopped) and the component model (so WASI preview2 components run).
    pub fn new() -> Result<Self, ProviderError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true).wasm_component_model(true);
        let engine = wasmtime::Engine::new(&config).map_err(|e| ProviderError::Setup(format!("{e:#}")))?;
        Ok(Self { engine })
    }

    /// The engine shared by every pod.
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }
}

#[async_trait::async_trait]
impl Provider for WasmtimeProvider {
    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo { name: "wasmtime".into(), version: WASMTIME_VERSION.into() }
    }

    async fn status(&self) -> RuntimeStatus {
        // Compiling and instantiating an empty module exercises the code generator and the
        // instance allocator: if either is broken on this host, no pod could run.
        let engine = self.engine.clone();
        let check = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let module = wasmtime::Module::new(&engine, b"\0asm\x01\0\0\0").map_err(|e| format!("{e:#}"))?;
            drop(module);
            Ok(())
        })
        .await;
        match check {
            Ok(Ok(())) => RuntimeStatus::Ready,
            Ok(Err(message)) => RuntimeStatus::NotReady { message: format!("wasmtime cannot compile modules: {message}") },
            Err(e) => RuntimeStatus::NotReady { message: format!("wasmtime health check failed: {e}") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_pinned_wasmtime_version() {
        let provider = WasmtimeProvider::new().unwrap();
        let info = provider.runtime_info();
        assert_eq!(info.name, "wasmtime");
        assert!(info.version.starts_with("48."), "version from Cargo.lock, got {}", info.version);
    }

    #[tokio::test]
    async fn a_working_engine_is_ready() {
        let provider = WasmtimeProvider::new().unwrap();
        assert_eq!(provider.status().await, RuntimeStatus::Ready);
    }
}
