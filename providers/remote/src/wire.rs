//! What crosses the socket: frames, the first frame of a connection, control requests and
//! responses, and the tagged binary frames of exec and attach streams.
//!
//! Every frame is a 4-byte big-endian length and that many bytes
//! ([`LengthDelimitedCodec`]). The first frame of a connection is a JSON [`Open`]: `Hello`
//! makes it the control connection (the server answers one JSON `Result<RuntimeIdentity,
//! ProviderError>`, then requests and responses follow, JSON [`Request`]/[`Response`], matched
//! by id); `Exec`/`Attach` make it a stream connection, after which every frame is a
//! [`StreamFrame`]: one tag byte, then the data.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use provider_api::{ContainerConfig, ProviderError, RegistryAuth, SandboxConfig};
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// The largest frame either side sends or accepts. The biggest messages are a
/// `create_container` (a pod's env, which `envFrom` may fill from several ConfigMaps of up to
/// 1 MiB each) and a `list_containers` answer for a full node (110 pods, each container's
/// summary and annotations, a few KiB each): 16 MiB holds either with room, and bounds what a
/// broken or hostile peer can make the other side allocate for one frame.
pub const MAX_FRAME: usize = 16 << 20;

/// The most bytes of stream data (stdin, stdout, stderr) one frame carries: 32 KiB, half a
/// Linux pipe buffer, keeps frames small so output reaches the caller as it is written.
pub(crate) const CHUNK: usize = 32 * 1024;

/// The codec of every connection, both sides.
pub(crate) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// The first frame of a connection: what the connection is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Open {
    /// The control connection; answered with `Result<RuntimeIdentity, ProviderError>`.
    Hello { protocol: u32 },
    /// One [`provider_api::Provider::exec`].
    Exec {
        protocol: u32,
        container_id: String,
        command: Vec<String>,
        stdin: bool,
        timeout: Option<Duration>,
    },
    /// One [`provider_api::Provider::attach`].
    Attach {
        protocol: u32,
        container_id: String,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
}

/// One call of the [`provider_api::Provider`] trait (exec and attach have their own
/// connections; `runtime_info` is the identity's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Call {
    Status,
    ImageStatus {
        reference: String,
    },
    PullImage {
        reference: String,
        auth: Vec<RegistryAuth>,
    },
    RunPodSandbox {
        config: SandboxConfig,
    },
    RemovePodSandbox {
        sandbox_id: String,
        grace: Duration,
    },
    CreateContainer {
        sandbox_id: String,
        config: Box<ContainerConfig>,
    },
    StartContainer {
        container_id: String,
    },
    StopContainer {
        container_id: String,
        grace: Duration,
    },
    RemoveContainer {
        container_id: String,
    },
    ListContainers,
    ListPodSandboxes,
    ImageFs,
    ListImages,
    RemoveImage {
        reference: String,
    },
    PodListener {
        pod_uid: String,
        port: u16,
    },
}

impl Call {
    /// The method's name, for messages.
    pub(crate) fn method(&self) -> &'static str {
        match self {
            Call::Status => "status",
            Call::ImageStatus { .. } => "image_status",
            Call::PullImage { .. } => "pull_image",
            Call::RunPodSandbox { .. } => "run_pod_sandbox",
            Call::RemovePodSandbox { .. } => "remove_pod_sandbox",
            Call::CreateContainer { .. } => "create_container",
            Call::StartContainer { .. } => "start_container",
            Call::StopContainer { .. } => "stop_container",
            Call::RemoveContainer { .. } => "remove_container",
            Call::ListContainers => "list_containers",
            Call::ListPodSandboxes => "list_pod_sandboxes",
            Call::ImageFs => "image_fs",
            Call::ListImages => "list_images",
            Call::RemoveImage { .. } => "remove_image",
            Call::PodListener { .. } => "pod_listener",
        }
    }
}

/// A control request: the call and the id its response carries back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request<C> {
    pub id: u64,
    pub call: C,
}

/// Just the id of a request whose call could not be read (a newer peer's call, a bad field),
/// so it can still be answered.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestId {
    pub id: u64,
}

/// A control response: the method's return value as JSON, or its error.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    pub id: u64,
    pub result: Result<serde_json::Value, ProviderError>,
}

/// One frame of an exec or attach stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamFrame {
    /// Client to server: bytes for the command's stdin.
    Stdin(Bytes),
    /// Client to server: the caller's stdin ended.
    StdinEnd,
    /// Server to client: bytes the command wrote to stdout.
    Stdout(Bytes),
    /// Server to client: bytes the command wrote to stderr.
    Stderr(Bytes),
    /// Server to client, last: the call's JSON result (`Result<i32, ProviderError>` for exec,
    /// `Result<(), ProviderError>` for attach).
    Result(Bytes),
}

const TAG_STDIN: u8 = 1;
const TAG_STDIN_END: u8 = 2;
const TAG_STDOUT: u8 = 3;
const TAG_STDERR: u8 = 4;
const TAG_RESULT: u8 = 5;

impl StreamFrame {
    /// The frame's bytes: its tag, then its data.
    pub(crate) fn encode(&self) -> Bytes {
        let (tag, data): (u8, &[u8]) = match self {
            StreamFrame::Stdin(d) => (TAG_STDIN, d),
            StreamFrame::StdinEnd => (TAG_STDIN_END, &[]),
            StreamFrame::Stdout(d) => (TAG_STDOUT, d),
            StreamFrame::Stderr(d) => (TAG_STDERR, d),
            StreamFrame::Result(d) => (TAG_RESULT, d),
        };
        tagged(tag, data)
    }

    /// Reads a frame; `None` for an empty frame or an unknown tag.
    pub(crate) fn decode(mut frame: Bytes) -> Option<StreamFrame> {
        if frame.is_empty() {
            return None;
        }
        let tag = frame[0];
        let data = frame.split_off(1);
        Some(match tag {
            TAG_STDIN => StreamFrame::Stdin(data),
            TAG_STDIN_END if data.is_empty() => StreamFrame::StdinEnd,
            TAG_STDOUT => StreamFrame::Stdout(data),
            TAG_STDERR => StreamFrame::Stderr(data),
            TAG_RESULT => StreamFrame::Result(data),
            _ => return None,
        })
    }
}

/// `tag` then `data`, as one frame's bytes.
pub(crate) fn tagged(tag: u8, data: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(1 + data.len());
    frame.put_u8(tag);
    frame.put_slice(data);
    frame.freeze()
}

/// The stdout tag, for the server's output writers.
pub(crate) const STDOUT: u8 = TAG_STDOUT;
/// The stderr tag, for the server's output writers.
pub(crate) const STDERR: u8 = TAG_STDERR;

/// JSON of `value` as a frame, or the reason it cannot be one (too large, not serialisable).
pub(crate) fn json_frame<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("encoding: {e}"))?;
    if bytes.len() > MAX_FRAME {
        return Err(format!(
            "{} bytes, over the {MAX_FRAME}-byte frame limit",
            bytes.len()
        ));
    }
    Ok(Bytes::from(bytes))
}

/// The error both sides give when the peer speaks another protocol version.
pub(crate) fn mismatch(agent: u32, runtime: u32) -> ProviderError {
    ProviderError::Setup(format!("protocol mismatch: the agent speaks provider protocol {agent}, the runtime {runtime}; restart the runtime with this agent's binary"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed pull errors cross the socket as themselves, so the node words and retries
    /// a pull the runtime process made as it would its own.
    #[test]
    fn typed_pull_errors_cross_the_socket_unchanged() {
        let source = || provider_api::Cause::from("fetching the manifest: 404");
        let reference = || "r/a:v1".to_string();
        for error in [
            ProviderError::ImageNotFound {
                reference: reference(),
                source: source(),
            },
            ProviderError::Unauthorized {
                reference: reference(),
                source: source(),
            },
            ProviderError::RegistryUnavailable {
                reference: reference(),
                source: source(),
            },
            ProviderError::InvalidImageName("bad".into()),
            ProviderError::UnsupportedImage("not wasm".into()),
            ProviderError::Pull("other".into()),
        ] {
            let frame = json_frame(&Response {
                id: 7,
                result: Err(error.clone()),
            })
            .unwrap();
            let back: Response = serde_json::from_slice(&frame).unwrap();
            assert_eq!((back.id, back.result), (7, Err(error)));
        }
    }

    #[test]
    fn stream_frames_round_trip_and_unknown_tags_are_refused() {
        for frame in [
            StreamFrame::Stdin(Bytes::from_static(b"in")),
            StreamFrame::StdinEnd,
            StreamFrame::Stdout(Bytes::from_static(b"out")),
            StreamFrame::Stderr(Bytes::new()),
            StreamFrame::Result(Bytes::from_static(b"{\"Ok\":0}")),
        ] {
            assert_eq!(StreamFrame::decode(frame.encode()), Some(frame));
        }
        assert_eq!(StreamFrame::decode(Bytes::new()), None);
        assert_eq!(StreamFrame::decode(Bytes::from_static(&[0, 1])), None);
        assert_eq!(
            StreamFrame::decode(Bytes::from_static(&[TAG_STDIN_END, 1])),
            None
        );
    }
}
