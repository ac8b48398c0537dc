//! Running CNI plugins as the CNI spec (v1.0.0, "Execution protocol") says: one process per
//! plugin, the operation in environment variables, the execution configuration on stdin, a
//! result or an error object on stdout.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use crate::conflist::{plugin_type, Conflist};
use crate::error::{PodNetError, Result};
use crate::names;

/// Where Debian's containernetworking-plugins installs the plugins.
pub const DEFAULT_PLUGIN_DIR: &str = "/usr/lib/cni";

/// How long one plugin may run. The plugins of our chain finish in milliseconds; a minute
/// leaves room for a loaded node (portmap waits for the xtables lock), while a hung plugin
/// still cannot hold a pod's worker forever.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this much of a failing plugin's stderr goes into an error: enough for a Go error
/// line, not a log.
const STDERR_TAIL: usize = 2048;

/// A CNI operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

impl fmt::Display for CniCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attachment of a container to a network: the CNI "runtime parameters".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// CNI_CONTAINERID: the pod uid (there is no sandbox container).
    pub container_id: String,
    /// CNI_NETNS: the pod's pinned network namespace.
    pub netns: PathBuf,
    /// CNI_IFNAME: the interface inside the pod.
    pub ifname: String,
    /// CNI_ARGS as key/value pairs (`K8S_POD_NAMESPACE` and friends).
    pub args: Vec<(String, String)>,
}

impl Attachment {
    fn cni_args(&self) -> String {
        // IgnoreUnknown: plugins that do not know the K8S_* keys must not fail on them.
        let mut args = String::from("IgnoreUnknown=1");
        for (k, v) in &self.args {
            args.push(';');
            args.push_str(k);
            args.push('=');
            args.push_str(v);
        }
        args
    }
}

/// Runs plugins found in `plugin_dirs` (the CNI_PATH).
#[derive(Clone, Debug)]
pub struct PluginRunner {
    pub plugin_dirs: Vec<PathBuf>,
    pub timeout: Duration,
}

impl Default for PluginRunner {
    fn default() -> Self {
        PluginRunner {
            plugin_dirs: vec![PathBuf::from(DEFAULT_PLUGIN_DIR)],
            timeout: DEFAULT_PLUGIN_TIMEOUT,
        }
    }
}

impl PluginRunner {
    /// ADD of a whole list: each plugin in order, each given the previous one's result as
    /// `prevResult`. The last result is the attachment's result (raw JSON, for the cache and
    /// for DEL and CHECK).
    pub async fn add_list(
        &self,
        list: &Conflist,
        att: &Attachment,
        capability_args: &Map<String, Value>,
    ) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for index in 0..list.plugins.len() {
            let conf = list.plugin_config(index, prev.as_ref(), capability_args);
            let ty = plugin_type(&list.plugins[index])?;
            let out = self.exec(ty, CniCommand::Add, att, &conf).await?;
            let result = parse_result_object(ty, CniCommand::Add, &out)?;
            prev = Some(result);
        }
        prev.ok_or_else(|| PodNetError::Config {
            path: None,
            reason: "no plugins".into(),
        })
    }

    /// DEL of a whole list: the plugins in reverse order, each given the ADD's result (when
    /// known) as `prevResult`. Stops at the first error (a retried DEL repeats the ones done;
    /// DEL is idempotent by the spec).
    pub async fn del_list(
        &self,
        list: &Conflist,
        att: &Attachment,
        capability_args: &Map<String, Value>,
        add_result: Option<&Value>,
    ) -> Result<()> {
        for index in (0..list.plugins.len()).rev() {
            let conf = list.plugin_config(index, add_result, capability_args);
            let ty = plugin_type(&list.plugins[index])?;
            self.exec(ty, CniCommand::Del, att, &conf).await?;
        }
        Ok(())
    }

    /// CHECK of a whole list, in ADD order, each given the ADD's result. Skipped when the list
    /// says `disableCheck` or speaks a version before 0.4.0 (CHECK did not exist).
    pub async fn check_list(
        &self,
        list: &Conflist,
        att: &Attachment,
        capability_args: &Map<String, Value>,
        add_result: &Value,
    ) -> Result<()> {
        if list.disable_check || !supports_check(&list.cni_version) {
            return Ok(());
        }
        for index in 0..list.plugins.len() {
            let conf = list.plugin_config(index, Some(add_result), capability_args);
            let ty = plugin_type(&list.plugins[index])?;
            self.exec(ty, CniCommand::Check, att, &conf).await?;
        }
        Ok(())
    }

    fn find(&self, ty: &str) -> Result<PathBuf> {
        names::plugin_type(ty)?;
        self.plugin_dirs
            .iter()
            .map(|dir| dir.join(ty))
            .find(|path| path.is_file())
            .ok_or_else(|| PodNetError::PluginNotFound {
                plugin: ty.to_owned(),
                dirs: self.plugin_dirs.clone(),
            })
    }

    /// One plugin invocation; its stdout on success.
    async fn exec(
        &self,
        ty: &str,
        command: CniCommand,
        att: &Attachment,
        conf: &Map<String, Value>,
    ) -> Result<Vec<u8>> {
        let binary = self.find(ty)?;
        let stdin = serde_json::to_vec(conf).expect("a JSON object always serializes");
        let exec_err = |source| PodNetError::PluginExec {
            plugin: ty.into(),
            command,
            source,
        };
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.env_clear()
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", att.cni_args())
            .env("CNI_PATH", join_paths(&self.plugin_dirs))
            // portmap and bridge run iptables and friends by name.
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::debug!(plugin = ty, %command, container_id = %att.container_id, ifname = %att.ifname, "CNI plugin");
        let mut child = cmd.spawn().map_err(exec_err)?;
        let mut input = child.stdin.take().expect("stdin is piped");
        let run = async move {
            // Write and wait together: a plugin that answers before reading all of its input
            // must not deadlock us on a full pipe.
            let write = async move {
                // A plugin that exits without reading makes this fail with EPIPE; its exit
                // status says what happened.
                let _ = input.write_all(&stdin).await;
                drop(input);
            };
            let (_, output) = tokio::join!(write, child.wait_with_output());
            output
        };
        let output = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| PodNetError::PluginTimeout {
                plugin: ty.into(),
                command,
                timeout: self.timeout,
            })?
            .map_err(exec_err)?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(plugin_error(
            ty,
            command,
            output.status.code(),
            &output.stdout,
            &output.stderr,
        ))
    }
}

fn supports_check(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (0, 4)
}

fn join_paths(dirs: &[PathBuf]) -> std::ffi::OsString {
    let mut joined = std::ffi::OsString::new();
    for (i, dir) in dirs.iter().enumerate() {
        if i > 0 {
            joined.push(":");
        }
        joined.push(dir);
    }
    joined
}

/// The CNI error object (spec, "Error").
#[derive(Deserialize)]
struct ErrorObject {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

fn plugin_error(
    ty: &str,
    command: CniCommand,
    exit_code: Option<i32>,
    stdout: &[u8],
    stderr: &[u8],
) -> PodNetError {
    if let Ok(obj) = serde_json::from_slice::<ErrorObject>(stdout) {
        return PodNetError::Plugin {
            plugin: ty.into(),
            command,
            code: obj.code,
            msg: obj.msg,
            details: obj.details,
            exit_code,
        };
    }
    let stderr = String::from_utf8_lossy(stderr);
    let tail = stderr.trim();
    let mut start = tail.len().saturating_sub(STDERR_TAIL);
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    let tail = &tail[start..];
    PodNetError::Plugin {
        plugin: ty.into(),
        command,
        code: 0,
        msg: match exit_code {
            Some(code) => format!("exit status {code}: {tail}"),
            None => format!("killed by a signal: {tail}"),
        },
        details: String::new(),
        exit_code,
    }
}

fn parse_result_object(ty: &str, command: CniCommand, stdout: &[u8]) -> Result<Value> {
    let bad = |reason: String| PodNetError::BadResult {
        plugin: ty.into(),
        command,
        reason,
    };
    let value: Value = serde_json::from_slice(stdout).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    // The typed view must parse too, or the next plugin and we disagree about the result.
    CniResult::from_value(&value).map_err(|e| bad(e.to_string()))?;
    Ok(value)
}

/// A CNI result (spec v1.0.0 "Success"; the 0.4.0 shape, with `version` in each IP, parses
/// too: unknown fields are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIp>,
    #[serde(default)]
    pub routes: Vec<CniRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The netns path for interfaces inside the container; absent for host-side ones.
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CniIp {
    /// CIDR notation: the address and its prefix (e.g. `10.88.0.5/16`).
    pub address: String,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CniRoute {
    pub dst: String,
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

impl CniResult {
    pub fn from_value(value: &Value) -> serde_json::Result<CniResult> {
        let result = CniResult::deserialize(value)?;
        for ip in &result.ips {
            ip.address
                .parse::<IpNet>()
                .map_err(serde::de::Error::custom)?;
        }
        Ok(result)
    }

    /// The pod's addresses: those on interfaces inside the pod (with a `sandbox`), or with no
    /// interface named; the first of each family, in the result's order (Kubernetes podIPs
    /// holds at most one per family, the first is podIP).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &self.ips {
            let inside = match ip.interface {
                None => true,
                Some(i) => self
                    .interfaces
                    .get(i)
                    .is_some_and(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty())),
            };
            let Ok(net) = ip.address.parse::<IpNet>() else {
                continue;
            };
            if inside
                && !ips
                    .iter()
                    .any(|have| have.is_ipv4() == net.addr().is_ipv4())
            {
                ips.push(net.addr());
            }
        }
        ips
    }

    /// Host-side interfaces the result names (the veth peer and the bridge).
    pub fn host_interfaces(&self) -> impl Iterator<Item = &str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
            .map(|i| i.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn result_of_the_bridge_plugin_gives_the_pod_ip() {
        // As bridge 1.1.1 prints it (captured on this machine).
        let raw = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                { "name": "pnscr0", "mac": "56:45:59:27:05:74" },
                { "name": "veth0c443ad4", "mac": "c2:15:2c:d3:90:70" },
                { "name": "eth0", "mac": "ce:90:c6:e6:0b:d3", "sandbox": "/run/netns/p" }
            ],
            "ips": [{ "interface": 2, "address": "10.213.7.2/24", "gateway": "10.213.7.1" }],
            "dns": {}
        });
        let result = CniResult::from_value(&raw).unwrap();
        assert_eq!(
            result.pod_ips(),
            vec!["10.213.7.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            result.host_interfaces().collect::<Vec<_>>(),
            ["pnscr0", "veth0c443ad4"]
        );
    }

    #[test]
    fn result_0_4_0_and_dual_stack() {
        let raw = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{ "name": "eth0", "sandbox": "/p" }, { "name": "vethx" }],
            "ips": [
                { "version": "4", "interface": 1, "address": "10.0.0.9/24" },
                { "version": "4", "interface": 0, "address": "10.1.0.2/24" },
                { "version": "4", "interface": 0, "address": "10.1.0.3/24" },
                { "version": "6", "interface": 0, "address": "fd00::2/64" }
            ]
        });
        let result = CniResult::from_value(&raw).unwrap();
        assert_eq!(
            result.pod_ips(),
            vec![
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        let bad = json!({ "ips": [{ "address": "not-an-address" }] });
        assert!(CniResult::from_value(&bad).is_err());
    }

    #[test]
    fn error_object_and_bare_failures() {
        let err = plugin_error(
            "host-local",
            CniCommand::Add,
            Some(1),
            br#"{"cniVersion":"1.0.0","code":999,"msg":"no IP addresses available","details":"range 10.0.0.0/30"}"#,
            b"",
        );
        match &err {
            PodNetError::Plugin {
                code,
                msg,
                details,
                exit_code,
                ..
            } => {
                assert_eq!(
                    (*code, msg.as_str(), details.as_str()),
                    (999, "no IP addresses available", "range 10.0.0.0/30")
                );
                assert_eq!(*exit_code, Some(1));
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_retryable());
        let busy = plugin_error(
            "x",
            CniCommand::Add,
            Some(1),
            br#"{"code":11,"msg":"busy"}"#,
            b"",
        );
        assert!(busy.is_retryable());
        let bare = plugin_error("x", CniCommand::Del, Some(2), b"garbage", b"panic: boom\n");
        assert!(
            bare.to_string().contains("exit status 2: panic: boom"),
            "{bare}"
        );
    }

    #[test]
    fn check_needs_0_4_0() {
        assert!(supports_check("1.0.0"));
        assert!(supports_check("0.4.0"));
        assert!(!supports_check("0.3.1"));
    }
}
