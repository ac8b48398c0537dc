//! CPU and memory of running containers for /stats/summary, /metrics/resource and `kubectl top`,
//! from containerd's Tasks.Metrics: one call for every task of the namespace.
//!
//! containerd answers with the shim's cgroup statistics in an `Any`. On cgroup v1 (these
//! machines) that is `io.containerd.cgroups.v1.Metrics`, decoded here with the few fields the
//! provider reads (prost skips the rest): CPU time is `cpu.usage.total` (nanoseconds,
//! cumulative), memory is the working set as the kubelet computes it, `memory.usage.usage`
//! minus `memory.total_inactive_file`. Other payloads (cgroup v2's
//! `io.containerd.cgroups.v2.Metrics`) are not decoded yet: those containers report no usage.

use std::collections::HashMap;

use containerd_client::services::v1::MetricsRequest;
use prost::Message;
use provider_api::ContainerUsage;

use crate::client::Client;

/// The type URL of cgroup v1 statistics in a Tasks.Metrics reply.
const CGROUPS_V1_METRICS: &str = "io.containerd.cgroups.v1.Metrics";

/// `io.containerd.cgroups.v1.Metrics` (github.com/containerd/cgroups stats/v1/metrics.proto),
/// only the fields read.
#[derive(Clone, PartialEq, Message)]
struct MetricsV1 {
    #[prost(message, optional, tag = "3")]
    cpu: Option<CpuStat>,
    #[prost(message, optional, tag = "4")]
    memory: Option<MemoryStat>,
}

#[derive(Clone, PartialEq, Message)]
struct CpuStat {
    #[prost(message, optional, tag = "1")]
    usage: Option<CpuUsage>,
}

#[derive(Clone, PartialEq, Message)]
struct CpuUsage {
    /// Nanoseconds.
    #[prost(uint64, tag = "1")]
    total: u64,
}

#[derive(Clone, PartialEq, Message)]
struct MemoryStat {
    #[prost(uint64, tag = "30")]
    total_inactive_file: u64,
    #[prost(message, optional, tag = "33")]
    usage: Option<MemoryEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct MemoryEntry {
    #[prost(uint64, tag = "2")]
    usage: u64,
}

/// The usage in one Tasks.Metrics payload; `None` for a payload it does not decode.
fn decode(any: &prost_types::Any) -> Option<ContainerUsage> {
    if any.type_url.trim_start_matches('/') != CGROUPS_V1_METRICS
        && !any.type_url.ends_with(&format!("/{CGROUPS_V1_METRICS}"))
    {
        return None;
    }
    let metrics = MetricsV1::decode(any.value.as_slice()).ok()?;
    let cpu_nanos = metrics.cpu.and_then(|c| c.usage).map_or(0, |u| u.total);
    let memory_bytes = metrics.memory.map_or(0, |m| {
        m.usage
            .map_or(0, |u| u.usage)
            .saturating_sub(m.total_inactive_file)
    });
    Some(ContainerUsage {
        cpu_nanos,
        memory_bytes,
    })
}

/// The usage of every task of the namespace that containerd has statistics for, by container
/// ID. A failed call is logged and yields nothing: listing goes on without usage.
pub(crate) async fn usage(client: &Client) -> HashMap<String, ContainerUsage> {
    let reply = client
        .tasks()
        .metrics(client.req(MetricsRequest { filters: vec![] }))
        .await;
    let metrics = match reply {
        Ok(reply) => reply.into_inner().metrics,
        Err(e) => {
            tracing::debug!(error = %e.message(), "containerd task metrics failed");
            return HashMap::new();
        }
    };
    let mut out = HashMap::new();
    for metric in metrics {
        let Some(data) = &metric.data else { continue };
        match decode(data) {
            Some(usage) => {
                out.insert(metric.id, usage);
            }
            None => tracing::debug!(
                id = metric.id,
                type_url = data.type_url,
                "task metrics in a format the provider does not decode"
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 payload as containerd's shim encodes it, field numbers from
    /// stats/v1/metrics.proto written out by hand (not through the structs above), with
    /// fields the decoder skips around the ones it reads.
    #[test]
    fn decodes_cgroup_v1_cpu_and_working_set() {
        fn varint(mut v: u64, out: &mut Vec<u8>) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        fn field(tag: u32, wire: u8, out: &mut Vec<u8>) {
            varint(u64::from(tag << 3 | u32::from(wire)), out);
        }
        fn uint(tag: u32, v: u64, out: &mut Vec<u8>) {
            field(tag, 0, out);
            varint(v, out);
        }
        fn message(tag: u32, body: &[u8], out: &mut Vec<u8>) {
            field(tag, 2, out);
            varint(body.len() as u64, out);
            out.extend_from_slice(body);
        }
        let mut usage = Vec::new();
        uint(1, 7_000_000_000, &mut usage); // total
        uint(2, 1, &mut usage); // kernel
        let mut cpu = Vec::new();
        message(1, &usage, &mut cpu);
        let mut entry = Vec::new();
        uint(1, 64 << 20, &mut entry); // limit
        uint(2, 10 << 20, &mut entry); // usage
        let mut memory = Vec::new();
        uint(1, 5, &mut memory); // cache
        uint(30, 3 << 20, &mut memory); // total_inactive_file
        message(33, &entry, &mut memory);
        let mut pids = Vec::new();
        uint(1, 4, &mut pids);
        let mut metrics = Vec::new();
        message(2, &pids, &mut metrics);
        message(3, &cpu, &mut metrics);
        message(4, &memory, &mut metrics);
        let any = prost_types::Any {
            type_url: CGROUPS_V1_METRICS.into(),
            value: metrics,
        };
        assert_eq!(
            decode(&any),
            Some(ContainerUsage {
                cpu_nanos: 7_000_000_000,
                memory_bytes: 7 << 20
            })
        );
        let v2 = prost_types::Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: vec![],
        };
        assert_eq!(decode(&v2), None);
    }
}
