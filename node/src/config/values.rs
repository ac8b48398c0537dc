//! The forms a setting's value takes, each parsed once to its type. A flag and its
//! KubeletConfiguration key go through the same function here (flags.rs through clap's
//! `value_parser`, file.rs through serde's `deserialize_with`), so both refuse the same values
//! for the same reason. Rules between settings are in validate.rs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::{
    AuthorizationMode, EvictionSignal, EvictionThreshold, LogFormat, Reserved, TaintSpec,
    ThresholdValue, WasmRuntimeMode,
};

/// A value not of its form: the value (or the one item of a list) at fault, and why.
/// Flags report it as `invalid value "<value>" for --flag: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?}: {reason}")]
pub struct Bad {
    pub value: String,
    pub reason: String,
}

fn bad(value: impl std::fmt::Display, reason: impl Into<String>) -> Bad {
    Bad {
        value: value.to_string(),
        reason: reason.into(),
    }
}

// Names for the list-valued settings: clap's derive reads an `Option<Vec<T>>` field as a
// repeatable flag, these are one comma-separated value each.
/// `--insecure-registries`, `--allowed-unsafe-sysctls`: a comma-separated list.
pub type Names = Vec<String>;
/// `--pod-egress-deny-cidrs`, `--pod-egress-allow-cidrs`.
pub type Cidrs = Vec<ipnet::IpNet>;
/// `--eviction-hard`, `--eviction-soft`.
pub type Thresholds = Vec<EvictionThreshold>;
/// `--register-with-taints`.
pub type Taints = Vec<TaintSpec>;

/// Go's time.ParseDuration format: a sequence of number+unit, units ns us µs ms s m h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err("want a duration such as 10s, 1m30s or 500ms".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err("want a duration such as 10s, 1m30s or 500ms".into());
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| "bad number in duration".to_string())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit in duration (use ns, us, ms, s, m or h)".into()),
            other => return Err(format!("unknown unit {other:?} in duration")),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

pub fn duration(s: &str) -> Result<Duration, Bad> {
    parse_duration(s).map_err(|reason| bad(s, reason))
}

/// Go's strconv.ParseBool, which the kubelet's flags use.
pub fn boolean(s: &str) -> Result<bool, Bad> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(bad(s, "not a boolean (true or false)")),
    }
}

/// A whole number as a flag gives it (the file gives a YAML number).
pub fn whole(s: &str) -> Result<u32, Bad> {
    s.parse().map_err(|_| bad(s, "not a whole number"))
}

/// `--maximum-dead-containers*`: negative is no limit.
pub fn count(s: &str) -> Result<i32, Bad> {
    s.parse().map_err(|_| bad(s, "not a whole number"))
}

/// `--eviction-max-pod-grace-period`.
pub fn seconds(s: &str) -> Result<i64, Bad> {
    s.parse()
        .map_err(|_| bad(s, "not a whole number of seconds"))
}

/// `--image-gc-*-threshold`.
pub fn percent(s: &str) -> Result<u8, Bad> {
    percent_number(whole(s)?)
}

pub fn percent_number(v: u32) -> Result<u8, Bad> {
    u8::try_from(v)
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| bad(v, "must be between 0 and 100"))
}

/// `--port`: 1 to 65535.
pub fn port(s: &str) -> Result<u16, Bad> {
    port_number(s.parse().map_err(|_| bad(s, "not a port number"))?)
}

pub fn port_number(v: u32) -> Result<u16, Bad> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(v, "must be between 1 and 65535"))
}

/// `--healthz-port`: 0 turns it off.
pub fn port_or_zero(s: &str) -> Result<u16, Bad> {
    port_or_zero_number(s.parse().map_err(|_| bad(s, "not a port number"))?)
}

pub fn port_or_zero_number(v: u32) -> Result<u16, Bad> {
    u16::try_from(v).map_err(|_| bad(v, "must be between 0 and 65535"))
}

pub fn ip(s: &str) -> Result<IpAddr, Bad> {
    s.trim().parse().map_err(|_| bad(s, "not an IP address"))
}

/// A byte size that must not be zero (`--max-module-size`, `--max-layer-uncompressed-size`).
pub fn size(s: &str) -> Result<u64, Bad> {
    match crate::quantity::bytes(s) {
        Ok(0) => Err(bad(s, "must be positive")),
        Ok(n) => Ok(n),
        Err(reason) => Err(bad(s, reason.to_string())),
    }
}

pub fn wasm_runtime(s: &str) -> Result<WasmRuntimeMode, Bad> {
    match s {
        "spawn" => Ok(WasmRuntimeMode::Spawn),
        "external" => Ok(WasmRuntimeMode::External),
        "in-agent" => Ok(WasmRuntimeMode::InAgent),
        _ => Err(bad(s, "want spawn, external or in-agent")),
    }
}

pub fn log_format(s: &str) -> Result<LogFormat, Bad> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(bad(s, "must be text or json")),
    }
}

pub fn authorization_mode(s: &str) -> Result<AuthorizationMode, Bad> {
    match s {
        "Webhook" => Ok(AuthorizationMode::Webhook),
        "AlwaysAllow" => Ok(AuthorizationMode::AlwaysAllow),
        _ => Err(bad(s, "must be Webhook or AlwaysAllow")),
    }
}

pub fn manifest_url(s: &str) -> Result<String, Bad> {
    if !s.starts_with("http://") && !s.starts_with("https://") {
        return Err(bad(s, "only http:// and https:// URLs are supported"));
    }
    Ok(s.to_string())
}

/// One `--manifest-url-header`, `Key:Value`.
pub fn header(s: &str) -> Result<(String, String), Bad> {
    match s.split_once(':') {
        Some((k, v))
            if !k.trim().is_empty()
                && !k.contains(char::is_whitespace)
                && !v.contains(['\r', '\n']) =>
        {
            Ok((k.trim().to_string(), v.trim().to_string()))
        }
        _ => Err(bad(s, "want Key:Value")),
    }
}

/// The items of a comma-separated flag value, trimmed, empty ones dropped.
fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// A comma-separated list, as given.
pub fn names(s: &str) -> Result<Names, Bad> {
    Ok(items(s).map(str::to_string).collect())
}

/// `host[:port]` registries, comma-separated.
pub fn registries(s: &str) -> Result<Names, Bad> {
    items(s).map(registry).collect()
}

pub fn registry(s: &str) -> Result<String, Bad> {
    let valid = !s.is_empty() && !s.contains(['/', ' ', '@']) && !s.contains("://");
    if !valid {
        return Err(bad(s, "want host[:port], e.g. registry.lan:5000"));
    }
    Ok(s.to_string())
}

/// A comma-separated CIDR list; a bare address is its /32 or /128.
pub fn cidrs(list: &str) -> Result<Cidrs, Bad> {
    items(list)
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| bad(s, "not a CIDR (e.g. 10.0.0.0/8) or an IP address"))
        })
        .collect()
}

/// One CIDR (`--pod-cidr`): an address and a prefix length; host bits are dropped.
pub fn cidr(s: &str) -> Result<ipnet::IpNet, Bad> {
    s.trim()
        .parse::<ipnet::IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| bad(s, "not a CIDR (e.g. 10.244.1.0/24)"))
}

/// A CRI endpoint as the kubelet takes it, `unix:///absolute/path.sock`; the socket path.
pub fn unix_endpoint(s: &str) -> Result<std::path::PathBuf, Bad> {
    let path = s.strip_prefix("unix://").ok_or_else(|| {
        bad(
            s,
            "want unix:///path/to/containerd.sock (only unix sockets are supported)",
        )
    })?;
    if !path.starts_with('/') {
        return Err(bad(s, "the socket path after unix:// must be absolute"));
    }
    Ok(std::path::PathBuf::from(path))
}

/// `key=value,...` node labels.
pub fn labels(v: &str) -> Result<BTreeMap<String, String>, Bad> {
    let mut labels = BTreeMap::new();
    for pair in items(v) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(pair, "want key=value"))?;
        if !super::is_qualified_name(key) {
            return Err(bad(pair, format!("{key:?} is not a valid label key")));
        }
        if !super::is_label_value(value) {
            return Err(bad(pair, format!("{value:?} is not a valid label value")));
        }
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

/// `key=value:Effect,...` taints.
pub fn taints(v: &str) -> Result<Taints, Bad> {
    let mut taints = Vec::new();
    for item in items(v) {
        let (kv, effect) = item
            .rsplit_once(':')
            .ok_or_else(|| bad(item, "want key=value:Effect"))?;
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (kv.to_string(), None),
        };
        taints.push(taint(TaintSpec {
            key,
            value,
            effect: effect.to_string(),
        })?);
    }
    Ok(taints)
}

pub fn taint(t: TaintSpec) -> Result<TaintSpec, Bad> {
    let shown = format!(
        "{}={}:{}",
        t.key,
        t.value.as_deref().unwrap_or(""),
        t.effect
    );
    if !matches!(
        t.effect.as_str(),
        "NoSchedule" | "PreferNoSchedule" | "NoExecute"
    ) {
        return Err(bad(
            shown,
            "the effect must be NoSchedule, PreferNoSchedule or NoExecute",
        ));
    }
    if !super::is_qualified_name(&t.key) {
        return Err(bad(shown, format!("{:?} is not a valid taint key", t.key)));
    }
    if let Some(value) = &t.value {
        if !super::is_label_value(value) {
            return Err(bad(shown, format!("{value:?} is not a valid taint value")));
        }
    }
    Ok(t)
}

/// `cpu=100m,memory=1Gi,ephemeral-storage=1Gi,pid=1000`; the kubelet's resource names only.
pub fn reserved(v: &str) -> Result<Reserved, Bad> {
    let mut r = Reserved::default();
    for item in items(v) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| bad(item, "expected resource=quantity"))?;
        let quantity = |q: &str| {
            crate::quantity::bytes(q.trim()).map_err(|reason| bad(item, reason.to_string()))
        };
        match name.trim() {
            // Millicores: `100m`, or cores (`0.5`), rounded up as the kubelet reads them.
            "cpu" => {
                r.milli_cpu = crate::quantity::milli_cpu(value.trim())
                    .map_err(|reason| bad(item, reason.to_string()))?
            }
            "memory" => r.memory = quantity(value)?,
            "ephemeral-storage" => r.ephemeral_storage = quantity(value)?,
            "pid" => r.pid = quantity(value)?,
            other => {
                return Err(bad(
                    item,
                    format!("unknown resource {other:?} (cpu, memory, ephemeral-storage, pid)"),
                ))
            }
        }
    }
    Ok(r)
}

/// `signal<quantity|percent,...` eviction thresholds.
pub fn thresholds(v: &str) -> Result<Thresholds, Bad> {
    let mut thresholds = Vec::new();
    for item in items(v) {
        let (signal, limit) = item
            .split_once('<')
            .ok_or_else(|| bad(item, "want signal<value, e.g. memory.available<100Mi"))?;
        let signal = EvictionSignal::parse(signal).ok_or_else(|| {
            bad(item, "unknown signal (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, imagefs.inodesFree, pid.available)")
        })?;
        let limit = match limit.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.parse().map_err(|_| bad(item, "bad percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(bad(item, "a percentage must be between 0 and 100"));
                }
                ThresholdValue::Percent(p)
            }
            None => ThresholdValue::Quantity(
                crate::quantity::bytes(limit).map_err(|reason| bad(item, reason.to_string()))?,
            ),
        };
        thresholds.push(EvictionThreshold { signal, limit });
    }
    Ok(thresholds)
}

/// `signal=value,...`, each value read by `value` (the form of --eviction-soft-grace-period
/// and --eviction-minimum-reclaim).
fn signal_map<T>(
    v: &str,
    value: impl Fn(&str) -> Result<T, String>,
) -> Result<BTreeMap<EvictionSignal, T>, Bad> {
    let mut out = BTreeMap::new();
    for item in items(v) {
        let (signal, text) = item
            .split_once('=')
            .ok_or_else(|| bad(item, "want signal=value, e.g. memory.available=1m30s"))?;
        let signal =
            EvictionSignal::parse(signal.trim()).ok_or_else(|| bad(item, "unknown signal"))?;
        let text = text.trim();
        out.insert(
            signal,
            value(text).map_err(|reason| bad(format!("{}={text}", signal.as_str()), reason))?,
        );
    }
    Ok(out)
}

/// `--eviction-soft-grace-period`: `signal=duration,...`.
pub fn grace_periods(v: &str) -> Result<BTreeMap<EvictionSignal, Duration>, Bad> {
    signal_map(v, parse_duration)
}

/// `--eviction-minimum-reclaim`: `signal=quantity|percent,...`.
pub fn reclaims(v: &str) -> Result<BTreeMap<EvictionSignal, ThresholdValue>, Bad> {
    signal_map(v, |text| match text.strip_suffix('%') {
        Some(p) => p
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p))
            .map(ThresholdValue::Percent)
            .ok_or_else(|| "a percentage must be between 0 and 100".to_string()),
        None => crate::quantity::bytes(text)
            .map(ThresholdValue::Quantity)
            .map_err(|e| e.to_string()),
    })
}
