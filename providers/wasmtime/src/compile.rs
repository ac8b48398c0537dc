//! Compiled code, cached by layer digest so nothing is compiled twice.
//!
//! Start at [`CompileCache::get`]: memory first (a second pod or a container restart reuses the
//! `Module`/`Component`), then `<root>/compiled/<engine-hash>/<hex>.cwasm` (so an agent restart
//! does not recompile), and only then cranelift, on a blocking thread. The engine hash changes
//! with wasmtime's version and settings, so stale artifacts are never loaded.
//!
//! A module that fails to compile (or takes longer than [`COMPILE_TIMEOUT`]) is remembered by
//! digest until the agent restarts: a crash-looping pod gets the same error at once, not one
//! compilation per restart. One compilation per digest at a time; a module over the size cap is
//! not read at all.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module, Precompiled};

use crate::image::{sha256_hex, to_hex, write_atomically};

/// A core module (WASI preview1 command) or a component (WASI preview2 `wasi:cli/run`).
#[derive(Clone)]
pub enum Program {
    Module(Module),
    Component(Component),
}

/// What the first 8 bytes of a Wasm binary say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    Module,
    Component,
}

/// `\0asm` + version 1 is a core module; `\0asm` + `0d 00 01 00` (layer 1) a component.
pub fn detect(bytes: &[u8]) -> Option<WasmKind> {
    match bytes.get(..8)? {
        [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(WasmKind::Module),
        [0, b'a', b's', b'm', 0x0d, 0, 1, 0] => Some(WasmKind::Component),
        _ => None,
    }
}

/// How long one compilation may take before the container fails with a clear error: cranelift
/// compiles the largest real modules (~100 MiB) in well under a minute on one core; a module
/// built to make the compiler slow must not hold a pod (and a blocking thread) for longer than
/// this. The thread cannot be interrupted and finishes in the background; its result is dropped.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The cache; one per provider (per engine).
pub struct CompileCache {
    engine: Engine,
    dir: PathBuf,
    memory: Mutex<HashMap<String, Program>>,
    /// digest -> why it does not compile (until the agent restarts).
    failed: Mutex<HashMap<String, String>>,
    /// digest -> held while that digest compiles (one compilation per digest at a time).
    compiling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Counted on the blocking thread, when cranelift starts.
    compilations: Arc<AtomicUsize>,
    max_module_size: u64,
    timeout: Duration,
}

impl CompileCache {
    /// A cache under `<root>/compiled/<engine-hash>`.
    pub fn new(engine: Engine, root: &Path) -> Self {
        let dir = root.join("compiled").join(engine_hash(&engine));
        Self {
            engine,
            dir,
            memory: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            compiling: Mutex::new(HashMap::new()),
            compilations: Arc::new(AtomicUsize::new(0)),
            max_module_size: u64::MAX,
            timeout: COMPILE_TIMEOUT,
        }
    }

    /// The cache refusing modules over `max` bytes (`--max-module-size`).
    pub fn with_max_module_size(mut self, max: u64) -> Self {
        self.max_module_size = max;
        self
    }

    /// The cache with another compilation time limit (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times cranelift ran, successfully or not (tests count it).
    pub fn compilations(&self) -> usize {
        self.compilations.load(Ordering::Relaxed)
    }

    /// Forgets the compiled code of layer `digest` (its image was removed): the in-memory entry
    /// and the on-disk artifacts of every engine (`<root>/compiled/*/`, e.g. the HTTP engine's
    /// too), which `discard` deletes (crash-safely, through the image trash). Returns the bytes
    /// freed on disk.
    pub fn remove(&self, digest: &str, discard: impl Fn(&Path)) -> u64 {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        let Ok(hex) = sha256_hex(digest) else {
            return 0;
        };
        let mut freed = 0;
        for dir in self.engine_dirs() {
            let cwasm = dir.join(format!("{hex}.cwasm"));
            if let Ok(meta) = std::fs::metadata(&cwasm) {
                freed += meta.len();
                discard(&cwasm);
            }
        }
        freed
    }

    /// Deletes on-disk artifacts (of every engine) whose layer no image holds any more (a removal
    /// interrupted between the image and its compiled code), and temporary files of interrupted
    /// writes.
    pub fn sweep(&self, layers: &std::collections::HashSet<String>) {
        for dir in self.engine_dirs() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let keep = name
                    .strip_suffix(".cwasm")
                    .is_some_and(|hex| layers.contains(hex));
                if !keep {
                    tracing::info!(file = %name, "deleting compiled code no image needs");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// `<root>/compiled/<engine-hash>` of every engine that stored code there.
    fn engine_dirs(&self) -> Vec<PathBuf> {
        let Some(all) = self.dir.parent() else {
            return vec![self.dir.clone()];
        };
        std::fs::read_dir(all)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    }

    /// The directory of the on-disk artifacts.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The compiled program of the layer `digest` whose bytes are at `wasm`. The error is one
    /// line for the container's CreateContainerError message.
    pub async fn get(&self, digest: &str, wasm: &Path) -> Result<Program, String> {
        if let Some(known) = self.known(digest) {
            return known;
        }
        let hex = sha256_hex(digest)?.to_string();
        let size = std::fs::metadata(wasm)
            .map_err(|e| format!("reading {}: {e}", wasm.display()))?
            .len();
        if size > self.max_module_size {
            return Err(format!(
                "the module is {size} bytes, more than the {} bytes --max-module-size allows",
                self.max_module_size
            ));
        }
        // One compilation per digest: a second caller waits, then finds the result.
        let lock = self
            .compiling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_string())
            .or_default()
            .clone();
        let _compiling = lock.lock().await;
        if let Some(known) = self.known(digest) {
            return known;
        }
        let engine = self.engine.clone();
        let cwasm = self.dir.join(format!("{hex}.cwasm"));
        let (wasm, compilations, logged_digest) = (
            wasm.to_path_buf(),
            self.compilations.clone(),
            digest.to_string(),
        );
        let task = tokio::task::spawn_blocking(move || {
            load_or_compile(&engine, &wasm, &cwasm, &logged_digest, &compilations)
        });
        let loaded = match tokio::time::timeout(self.timeout, task).await {
            Ok(joined) => joined.map_err(|e| format!("compilation task failed: {e}"))?,
            Err(_) => Err(format!("compiling took longer than {}s; not tried again for this module until the agent restarts", self.timeout.as_secs())),
        };
        let result = match loaded {
            Ok(program) => {
                self.memory
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest.to_string(), program.clone());
                Ok(program)
            }
            Err(e) => {
                tracing::warn!(digest, error = %e, "compilation failed; remembered, so restarts fail at once without compiling again");
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest.to_string(), e.clone());
                Err(e)
            }
        };
        self.compiling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        result
    }

    /// The compiled program or the remembered failure of `digest`, if either is known.
    fn known(&self, digest: &str) -> Option<Result<Program, String>> {
        if let Some(program) = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Some(Ok(program.clone()));
        }
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()?;
        tracing::debug!(
            digest,
            "not compiling again: this module failed to compile before"
        );
        Some(Err(format!(
            "{failed} (remembered from an earlier attempt)"
        )))
    }
}

/// Loads `cwasm` if it is a usable artifact, else compiles `wasm` (counting it in
/// `compilations`) and writes `cwasm`.
fn load_or_compile(
    engine: &Engine,
    wasm: &Path,
    cwasm: &Path,
    digest: &str,
    compilations: &AtomicUsize,
) -> Result<Program, String> {
    if let Some(program) = load_precompiled(engine, cwasm) {
        tracing::debug!(path = %cwasm.display(), "loaded precompiled code");
        return Ok(program);
    }
    let bytes = std::fs::read(wasm).map_err(|e| format!("reading {}: {e}", wasm.display()))?;
    let started = std::time::Instant::now();
    compilations.fetch_add(1, Ordering::Relaxed);
    tracing::info!(digest, size = bytes.len(), "compiling");
    let (program, serialized) = match detect(&bytes) {
        Some(WasmKind::Module) => {
            let module =
                Module::new(engine, &bytes).map_err(|e| format!("compiling the module: {e:#}"))?;
            let bytes = module.serialize();
            (Program::Module(module), bytes)
        }
        Some(WasmKind::Component) => {
            let component = Component::new(engine, &bytes)
                .map_err(|e| format!("compiling the component: {e:#}"))?;
            let bytes = component.serialize();
            (Program::Component(component), bytes)
        }
        None => {
            return Err(format!(
                "{} is not a Wasm module or component (bad header)",
                wasm.display()
            ))
        }
    };
    tracing::info!(path = %wasm.display(), elapsed_ms = started.elapsed().as_millis() as u64, "compiled");
    match serialized {
        Ok(bytes) => {
            let written = std::fs::create_dir_all(cwasm.parent().unwrap_or(Path::new(".")))
                .and_then(|()| write_atomically(cwasm, &bytes));
            if let Err(e) = written {
                tracing::warn!(path = %cwasm.display(), error = %e, "cannot store compiled code; it will be compiled again after a restart");
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot serialize compiled code"),
    }
    Ok(program)
}

fn load_precompiled(engine: &Engine, cwasm: &Path) -> Option<Program> {
    let kind = Engine::detect_precompiled_file(cwasm).ok()??;
    // SAFETY: `cwasm` is written only by `load_or_compile` above, into the provider's own root
    // directory, from code this engine compiled; wasmtime still checks that the artifact's
    // engine settings and version match before using it.
    let loaded = match kind {
        Precompiled::Module => {
            unsafe { Module::deserialize_file(engine, cwasm) }.map(Program::Module)
        }
        Precompiled::Component => {
            unsafe { Component::deserialize_file(engine, cwasm) }.map(Program::Component)
        }
    };
    loaded.inspect_err(|e| tracing::warn!(path = %cwasm.display(), error = %format!("{e:#}"), "precompiled code unusable; compiling again")).ok()
}

/// A short, stable name for the engine's compatibility (wasmtime version and settings).
fn engine_hash(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    to_hex(&hasher.0.finalize()[..8])
}

/// `std::hash::Hasher` over SHA-256, so the name is the same across Rust versions (the std
/// `DefaultHasher` does not promise that).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0 // unused: the digest is read from the inner state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_modules_and_components() {
        assert_eq!(detect(b"\0asm\x01\0\0\0rest"), Some(WasmKind::Module));
        assert_eq!(detect(b"\0asm\x0d\0\x01\0"), Some(WasmKind::Component));
        assert_eq!(detect(b"\0asm"), None);
        assert_eq!(detect(b"\x7fELF\x02\x01\x01\0"), None);
    }

    #[test]
    fn the_engine_hash_is_short_and_stable() {
        let engine = Engine::default();
        let a = engine_hash(&engine);
        assert_eq!(a.len(), 16);
        assert_eq!(a, engine_hash(&engine));
    }
}
