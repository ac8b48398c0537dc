//! Pods: where they come from ([`source`], static pods from [`static_source`], whose API
//! objects [`mirror`] keeps), who acts on each ([`manager`] and one
//! [`worker`] per UID), how the node learns about container changes ([`pleg`], which is also
//! the runtime cache every reader shares), and the only writer of pod status ([`status`]).
//! A worker decides with [`plan`] (pure: which containers start, restart or are replaced),
//! carries the steps out itself, and reports with [`pod_status`] (pure: the pod status). [`volumes`] sets up what containers mount. [`admission`] and
//! [`env`] are pure helpers. [`beneath`] is how every path inside a pod's directories is opened;
//! [`layout`] is where those directories are.

pub mod admission;
pub mod beneath;
pub mod env;
pub mod layout;
pub mod manager;
pub mod mirror;
pub mod node_shutdown;
pub mod plan;
pub mod pleg;
pub mod pod_status;
pub mod ports;
pub mod resources;
pub mod source;
pub mod static_source;
pub mod status;
pub mod volumes;
pub mod worker;
