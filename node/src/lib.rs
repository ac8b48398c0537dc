//! wasm-kubelet: a kubelet for WebAssembly.
//!
//! Where to start: [`config::Config::load`] turns flags and the KubeletConfiguration file into
//! one checked `Config`; [`agent::run`] starts the agent's tasks. Each task owns one piece of
//! state and talks to the others over channels:
//!
//! - [`node_status`]: registers the Node and is the only writer of its status;
//! - [`lease`]: the heartbeat, the only writer of the node's Lease;
//! - [`machine`]: measurements of the host (capacity, free memory and disk, pids);
//! - [`pods`]: the pod source, one worker per pod, the PLEG and the pod status manager;
//! - [`probes`]: liveness, readiness and startup probes and lifecycle hooks, for the pod workers;
//! - [`events`]: Kubernetes Events, published by one task;
//! - [`eviction`]: node-pressure eviction, the only owner of the pressure conditions;
//! - [`gc`]: garbage collection of unused images and dead containers;
//! - [`metrics`]: the agent's Prometheus metrics (one global registry; served on `/metrics`);
//! - [`certificates`]: TLS bootstrap and rotation of the client and serving certificates;
//! - [`server`]: the kubelet API (HTTPS, authenticated and authorized): logs, exec, attach,
//!   port-forward, `/run`, stats, metrics, `/pods`, `/runningpods/`, `/configz`;
//! - [`streaming`]: exec, attach and port-forward over SPDY/3.1, as the apiserver proxies them;
//! - [`runtime`]: the Wasm runtime process the guests live in, apart from the agent: started,
//!   adopted and supervised by the agent, reached through provider-remote.
//!
//! Pods reach a runtime only through the `provider-api` seam; this crate never names wasmtime
//! (`main.rs` picks the provider: in the agent, or a runtime process through provider-remote).

pub mod agent;
mod backoff;
pub mod certificates;
pub mod config;
pub mod events;
pub mod eviction;
pub mod gc;
pub mod http_client;
pub mod lease;
pub mod machine;
pub mod metrics;
pub mod node_status;
pub mod pods;
pub mod probes;
pub mod quantity;
pub mod runtime;
pub mod server;
pub mod streaming;
pub mod x509;
