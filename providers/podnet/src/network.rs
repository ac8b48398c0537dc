//! A pod's network: loopback up, then the node's conflist attached as `eth0`, and the result
//! kept so DEL (after an agent restart too) gets what the spec says it must: the same
//! configuration, the same capability arguments, and the ADD's result as `prevResult`.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cni::{Attachment, CniResult, PluginRunner};
use crate::conflist::Conflist;
use crate::error::{io_err, PodNetError, Result};
use crate::names;
use crate::ns::PodNamespaces;

/// The pod's interface on the pod network, as Kubernetes runtimes name it.
pub const POD_IFNAME: &str = "eth0";

/// Which pod an attachment is for: its uid is the CNI container ID; its namespace and name go
/// to the plugins as `K8S_POD_NAMESPACE` / `K8S_POD_NAME` in CNI_ARGS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// A host port (`containers[].ports[].hostPort`): portmap's `portMappings` capability argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// What ADD gave the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddresses {
    /// podIPs: at most one per family; the first is podIP.
    pub ips: Vec<IpAddr>,
    pub result: CniResult,
}

/// The node's pod network: one conflist, the plugin runner, and a state directory holding one
/// record per attached pod (`<uid>.json`).
#[derive(Clone, Debug)]
pub struct PodNetwork {
    conflist: Conflist,
    runner: PluginRunner,
    state_dir: PathBuf,
}

/// The cached attachment (what libcni keeps under /var/lib/cni/results). Written before the
/// first plugin runs, so a crash part-way still leaves enough for DEL.
#[derive(Serialize, Deserialize)]
struct Record {
    conflist: Conflist,
    attachment: Attachment,
    capability_args: Map<String, Value>,
    /// The ADD's result; `None` while ADD has not finished.
    result: Option<Value>,
}

impl PodNetwork {
    pub fn new(conflist: Conflist, runner: PluginRunner, state_dir: impl Into<PathBuf>) -> Self {
        PodNetwork {
            conflist,
            runner,
            state_dir: state_dir.into(),
        }
    }

    pub fn conflist(&self) -> &Conflist {
        &self.conflist
    }

    /// Attaches the pod whose network namespace is pinned at `netns`: `lo` up (the loopback
    /// plugin), then the conflist's plugins as `eth0`, with `ports` for portmap. Returns the
    /// pod's addresses. A pod already attached gets its recorded addresses back; a failed ADD
    /// is undone by DEL before the error is returned.
    pub async fn setup(
        &self,
        pod: &PodRef,
        netns: &Path,
        ports: &[PortMapping],
    ) -> Result<PodAddresses> {
        names::pod_uid(&pod.uid)?;
        names::cni_arg("pod namespace", &pod.namespace)?;
        names::cni_arg("pod name", &pod.name)?;
        match self.read_record(&pod.uid)? {
            Some(Record {
                result: Some(result),
                ..
            }) => return self.addresses(pod, &result),
            Some(_) => self.teardown(&pod.uid).await?,
            None => {}
        }
        let mut capability_args = Map::new();
        if !ports.is_empty() {
            capability_args.insert(
                "portMappings".into(),
                serde_json::to_value(ports).expect("port mappings always serialize"),
            );
        }
        let attachment = Attachment {
            container_id: pod.uid.clone(),
            netns: netns.to_path_buf(),
            ifname: POD_IFNAME.into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), pod.namespace.clone()),
                ("K8S_POD_NAME".into(), pod.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), pod.uid.clone()),
                ("K8S_POD_UID".into(), pod.uid.clone()),
            ],
        };
        let mut record = Record {
            conflist: self.conflist.clone(),
            attachment,
            capability_args,
            result: None,
        };
        self.write_record(&pod.uid, &record)?;
        let added = self.add(&record).await;
        let checked = added.and_then(|result| {
            let addresses = self.addresses(pod, &result)?;
            Ok((result, addresses))
        });
        match checked {
            Ok((result, addresses)) => {
                record.result = Some(result);
                self.write_record(&pod.uid, &record)?;
                tracing::info!(pod_uid = %pod.uid, ips = ?addresses.ips, network = %self.conflist.name, "pod network attached");
                Ok(addresses)
            }
            Err(e) => {
                if let Err(undo) = self.teardown(&pod.uid).await {
                    tracing::warn!(pod_uid = %pod.uid, error = %undo, "undoing a failed CNI ADD");
                }
                Err(e)
            }
        }
    }

    /// `setup` for the pod whose namespaces these are; `None` for a `hostNetwork` pod (no
    /// network namespace of its own: nothing to attach, its IP is the node's).
    pub async fn attach(
        &self,
        pod: &PodRef,
        namespaces: &PodNamespaces,
        ports: &[PortMapping],
    ) -> Result<Option<PodAddresses>> {
        match namespaces.netns_path() {
            Some(netns) => self.setup(pod, &netns, ports).await.map(Some),
            None => Ok(None),
        }
    }

    async fn add(&self, record: &Record) -> Result<Value> {
        let lo = loopback_attachment(&record.attachment);
        self.runner
            .add_list(&Conflist::loopback(), &lo, &Map::new())
            .await?;
        self.runner
            .add_list(
                &record.conflist,
                &record.attachment,
                &record.capability_args,
            )
            .await
    }

    /// CHECK of an attached pod's network (the plugins verify what they set up).
    pub async fn check(&self, pod_uid: &str) -> Result<()> {
        names::pod_uid(pod_uid)?;
        let Some(Record {
            conflist,
            attachment,
            capability_args,
            result: Some(result),
        }) = self.read_record(pod_uid)?
        else {
            return Err(PodNetError::NotAttached {
                uid: pod_uid.to_owned(),
            });
        };
        self.runner
            .check_list(&conflist, &attachment, &capability_args, &result)
            .await
    }

    /// Detaches the pod: DEL with the recorded configuration (the conflist as it was at ADD),
    /// plugins in reverse order, then loopback; the record goes last, so a failed DEL is
    /// retried by the next call. Nothing recorded: nothing to do. Call it before removing the
    /// pod's namespaces (the plugins tidy inside the netns while it exists).
    pub async fn teardown(&self, pod_uid: &str) -> Result<()> {
        names::pod_uid(pod_uid)?;
        let Some(record) = self.read_record(pod_uid)? else {
            return Ok(());
        };
        self.runner
            .del_list(
                &record.conflist,
                &record.attachment,
                &record.capability_args,
                record.result.as_ref(),
            )
            .await?;
        let lo = loopback_attachment(&record.attachment);
        self.runner
            .del_list(&Conflist::loopback(), &lo, &Map::new(), None)
            .await?;
        let path = self.record_path(pod_uid);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", path)(e)),
        }
        tracing::info!(pod_uid, network = %record.conflist.name, "pod network detached");
        Ok(())
    }

    /// The recorded addresses of an attached pod (after an agent restart), if any.
    pub fn addresses_of(&self, pod: &PodRef) -> Result<Option<PodAddresses>> {
        names::pod_uid(&pod.uid)?;
        match self.read_record(&pod.uid)? {
            Some(Record {
                result: Some(result),
                ..
            }) => self.addresses(pod, &result).map(Some),
            _ => Ok(None),
        }
    }

    fn addresses(&self, pod: &PodRef, result: &Value) -> Result<PodAddresses> {
        let result = CniResult::from_value(result).map_err(|e| PodNetError::BadResult {
            plugin: self.conflist.name.clone(),
            command: crate::CniCommand::Add,
            reason: e.to_string(),
        })?;
        let ips = result.pod_ips();
        if ips.is_empty() {
            return Err(PodNetError::NoAddress {
                network: self.conflist.name.clone(),
                uid: pod.uid.clone(),
            });
        }
        Ok(PodAddresses { ips, result })
    }

    fn record_path(&self, pod_uid: &str) -> PathBuf {
        self.state_dir.join(format!("{pod_uid}.json"))
    }

    fn read_record(&self, pod_uid: &str) -> Result<Option<Record>> {
        let path = self.record_path(pod_uid);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PodNetError::Config {
                path: Some(path),
                reason: format!("attachment record: {e}"),
            })
    }

    fn write_record(&self, pod_uid: &str, record: &Record) -> Result<()> {
        fs::create_dir_all(&self.state_dir).map_err(io_err("create directory", &self.state_dir))?;
        let path = self.record_path(pod_uid);
        let tmp = self.state_dir.join(format!(".{pod_uid}.json.tmp"));
        let json = serde_json::to_vec(record).expect("a record always serializes");
        fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }
}

fn loopback_attachment(pod: &Attachment) -> Attachment {
    Attachment {
        ifname: "lo".into(),
        ..pod.clone()
    }
}
