//! CPU and memory of running containers for /stats/summary, /metrics/resource and `kubectl top`,
//! from containerd's Tasks.Metrics: one call for every task of the namespace.
//!
//! containerd answers with the shim's cgroup statistics in an `Any`, decoded here with the few
//! fields the provider reads (prost skips the rest; field numbers from
//! github.com/containerd/cgroups' metrics.proto files). Memory is the working set as the
//! kubelet computes it: usage minus inactive file pages.
//! - cgroup v1 (these machines), `io.containerd.cgroups.v1.Metrics`: CPU `cpu.usage.total`
//!   (nanoseconds, cumulative), memory `memory.usage.usage - memory.total_inactive_file`;
//! - cgroup v2, `io.containerd.cgroups.v2.Metrics`: CPU `cpu.usage_usec` (microseconds),
//!   memory `memory.usage - memory.inactive_file`. Checked against a hand-encoded payload only:
//!   these machines run cgroup v1.

use std::collections::HashMap;

use containerd_client::services::v1::MetricsRequest;
use prost::Message;
use provider_api::ContainerUsage;

use crate::client::Client;

/// The type URL of cgroup v1 statistics in a Tasks.Metrics reply.
const CGROUPS_V1_METRICS: &str = "io.containerd.cgroups.v1.Metrics";
/// The type URL of cgroup v2 statistics.
const CGROUPS_V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";

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

/// `io.containerd.cgroups.v2.Metrics` (cgroup2/stats/metrics.proto), only the fields read.
#[derive(Clone, PartialEq, Message)]
struct MetricsV2 {
    #[prost(message, optional, tag = "2")]
    cpu: Option<CpuStatV2>,
    #[prost(message, optional, tag = "4")]
    memory: Option<MemoryStatV2>,
}

#[derive(Clone, PartialEq, Message)]
struct CpuStatV2 {
    #[prost(uint64, tag = "1")]
    usage_usec: u64,
}

#[derive(Clone, PartialEq, Message)]
struct MemoryStatV2 {
    #[prost(uint64, tag = "13")]
    inactive_file: u64,
    #[prost(uint64, tag = "32")]
    usage: u64,
}

/// Whether `type_url` names `name` (bare, or after a `host/` prefix).
fn names(type_url: &str, name: &str) -> bool {
    type_url == name || type_url.rsplit('/').next() == Some(name)
}

/// The usage in one Tasks.Metrics payload; `None` for a payload it does not decode.
fn decode(any: &prost_types::Any) -> Option<ContainerUsage> {
    if names(&any.type_url, CGROUPS_V2_METRICS) {
        let metrics = MetricsV2::decode(any.value.as_slice()).ok()?;
        return Some(ContainerUsage {
            cpu_nanos: metrics.cpu.map_or(0, |c| c.usage_usec.saturating_mul(1000)),
            memory_bytes: metrics
                .memory
                .map_or(0, |m| m.usage.saturating_sub(m.inactive_file)),
        });
    }
    if !names(&any.type_url, CGROUPS_V1_METRICS) {
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

    /// v1 and v2 payloads as containerd's shim encodes them, field numbers from the
    /// metrics.proto files written out by hand (not through the structs above), with fields the
    /// decoder skips around the ones it reads.
    #[test]
    fn decodes_cgroup_cpu_and_working_set() {
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
        let mut cpu = Vec::new();
        uint(1, 2_500_000, &mut cpu); // usage_usec
        uint(2, 1, &mut cpu); // user_usec
        let mut memory = Vec::new();
        uint(1, 9, &mut memory); // anon
        uint(13, 1 << 20, &mut memory); // inactive_file
        uint(32, 5 << 20, &mut memory); // usage
        uint(33, 64 << 20, &mut memory); // usage_limit
        let mut metrics = Vec::new();
        message(1, &pids, &mut metrics);
        message(2, &cpu, &mut metrics);
        message(4, &memory, &mut metrics);
        let v2 = prost_types::Any {
            type_url: format!("types.example/{CGROUPS_V2_METRICS}"),
            value: metrics,
        };
        assert_eq!(
            decode(&v2),
            Some(ContainerUsage {
                cpu_nanos: 2_500_000_000,
                memory_bytes: 4 << 20
            })
        );
        let other = prost_types::Any {
            type_url: "io.containerd.other.Metrics".into(),
            value: vec![],
        };
        assert_eq!(decode(&other), None);
    }
}
