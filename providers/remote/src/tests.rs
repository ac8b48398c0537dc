//! The seam over a real socket: a real [`WasmtimeProvider`] served by [`serve`] in a temp dir,
//! used through [`RemoteProvider`]; guests written in WAT. The fuzz test at the end uses a small
//! fake provider (it is about the server's framing, not the runtime).

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use provider_api::{
    AttachIo, ContainerConfig, ContainerState, ExecIo, ExitReason, Provider, ProviderError,
    RuntimeStatus, SandboxConfig,
};
use provider_wasmtime::WasmtimeProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

/// A fresh directory per test, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wk-remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }
    fn socket(&self) -> PathBuf {
        self.0.join("run/provider.sock")
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails the test instead of hanging when `f` does not finish within 10 s (a guard, not a
/// timing assertion).
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within 10 s"))
}

const POD: &str = "pod-uid-1";
const IMAGE: &str = "127.0.0.1:5000/multi:v1";

/// One program, behaviours chosen by argc:
/// - argc 1: sleeps an hour;
/// - argc 2: copies stdin to stdout, then `done` on stderr; exits argc * 10 + envc;
/// - argc 3: `tick` on stdout, then spins forever.
const MULTI: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "tick\n")
  (data (i32.const 208) "done\n")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 100) (local.get $ptr))
    (i32.store (i32.const 104) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 100) (i32.const 1) (i32.const 112))))
  (func $sleep_an_hour
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const 3600000000000))
    (drop (call $poll (i32.const 256) (i32.const 320) (i32.const 1) (i32.const 360))))
  (func $echo
    (block $done
      (loop $copy
        (i32.store (i32.const 120) (i32.const 1024))
        (i32.store (i32.const 124) (i32.const 4096))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 120) (i32.const 1) (i32.const 128)))
        (br_if $done (i32.eqz (i32.load (i32.const 128))))
        (call $write (i32.const 1) (i32.const 1024) (i32.load (i32.const 128)))
        (br $copy)))
    (call $write (i32.const 2) (i32.const 208) (i32.const 5)))
  (func (export "_start")
    (local $argc i32)
    (drop (call $args (i32.const 0) (i32.const 4)))
    (drop (call $env (i32.const 8) (i32.const 12)))
    (local.set $argc (i32.load (i32.const 0)))
    (if (i32.eq (local.get $argc) (i32.const 1)) (then (call $sleep_an_hour) (return)))
    (if (i32.eq (local.get $argc) (i32.const 2)) (then
      (call $echo)
      (call $exit (i32.add (i32.mul (local.get $argc) (i32.const 10)) (i32.load (i32.const 8))))))
    (call $write (i32.const 1) (i32.const 200) (i32.const 5))
    (loop $spin (br $spin))))"#;

/// A wasmtime provider under `root` holding [`MULTI`] as [`IMAGE`].
fn wasmtime_provider(root: &Path) -> Arc<WasmtimeProvider> {
    let provider = WasmtimeProvider::new(root.join("runtime")).unwrap();
    provider
        .import_image(IMAGE, &wat::parse_str(MULTI).unwrap())
        .unwrap();
    Arc::new(provider)
}

/// Serves `provider` on `socket` (bound afresh); the token stops it.
fn serve_on(socket: &Path, provider: Arc<dyn Provider>) -> (CancellationToken, JoinHandle<()>) {
    let listener = bind(socket).unwrap();
    let shutdown = CancellationToken::new();
    (
        shutdown.clone(),
        tokio::spawn(serve(listener, provider, shutdown)),
    )
}

fn sandbox(root: &Path) -> SandboxConfig {
    SandboxConfig {
        pod_uid: POD.into(),
        namespace: "default".into(),
        name: "p".into(),
        pod_dir: root.join("pod"),
        runtime_handler: None,
        host_network: false,
    }
}

fn config(root: &Path, name: &str) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: IMAGE.into(),
        command: vec![],
        args: vec![],
        env: vec![("A".into(), "1".into())],
        working_dir: None,
        mounts: vec![],
        log_path: root.join(format!("logs/{name}/0.log")),
        memory_limit_bytes: None,
        cpu_limit_millicores: None,
        cpu_request_millicores: None,
        attempt: 0,
        network: Default::default(),
        stdin: false,
        stdin_once: false,
        annotations: Default::default(),
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A connected client with a pod sandbox and a running [`MULTI`] container (sleeping).
async fn running(root: &Root) -> (RemoteProvider, (CancellationToken, JoinHandle<()>), String) {
    let server = serve_on(&root.socket(), wasmtime_provider(&root.0));
    let remote = RemoteProvider::connect(root.socket()).await.unwrap();
    remote.run_pod_sandbox(&sandbox(&root.0)).await.unwrap();
    let id = remote
        .create_container(POD, config(&root.0, "multi"))
        .await
        .unwrap();
    remote.start_container(&id).await.unwrap();
    (remote, server, id)
}

async fn state_of(remote: &RemoteProvider, id: &str) -> ContainerState {
    remote
        .list_containers()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap()
        .state
}

#[tokio::test]
async fn the_lifecycle_round_trips_through_the_socket() {
    let root = Root::new("lifecycle");
    let provider = wasmtime_provider(&root.0);
    let (shutdown, server) = serve_on(&root.socket(), provider.clone());
    // The socket is the owner's alone.
    assert_eq!(
        std::fs::metadata(root.socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(root.socket().parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let remote = RemoteProvider::connect(root.socket()).await.unwrap();
    let identity = remote
        .identity()
        .borrow()
        .clone()
        .expect("an identity after connect");
    assert_eq!(
        (identity.protocol, identity.pid),
        (PROTOCOL_VERSION, std::process::id())
    );
    assert_eq!(identity.runtime_info, provider.runtime_info());
    assert_eq!(remote.runtime_info(), provider.runtime_info());
    assert_eq!(remote.status().await, RuntimeStatus::Ready);

    let image = remote
        .image_status(IMAGE)
        .await
        .expect("the imported image");
    assert_eq!(Some(image.clone()), provider.image_status(IMAGE).await);
    assert_eq!(remote.image_status("127.0.0.1:5000/absent:v1").await, None);
    let images = remote.list_images().await;
    assert!(
        images
            .iter()
            .any(|i| i.reference == IMAGE && i.digest == image.digest),
        "{images:?}"
    );
    assert_eq!(remote.image_fs().await, provider.image_fs().await);
    assert!(matches!(
        remote.pull_image("127.0.0.1:1/nothing:v1", &[]).await,
        Err(ProviderError::RegistryUnavailable { .. })
    ));

    assert_eq!(
        remote.run_pod_sandbox(&sandbox(&root.0)).await.unwrap(),
        POD
    );
    assert_eq!(
        remote.list_pod_sandboxes().await.unwrap(),
        vec![sandbox(&root.0)]
    );
    let mut cfg = config(&root.0, "multi");
    cfg.annotations
        .insert("wasm-kubelet/spec-hash".into(), "abc123".into());
    let id = remote.create_container(POD, cfg).await.unwrap();
    let listed = remote.list_containers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].id.as_str(),
            listed[0].pod_uid.as_str(),
            listed[0].name.as_str()
        ),
        (id.as_str(), POD, "multi")
    );
    assert_eq!(listed[0].state, ContainerState::Created);
    assert_eq!(
        listed[0]
            .annotations
            .get("wasm-kubelet/spec-hash")
            .map(String::as_str),
        Some("abc123")
    );
    assert_eq!(listed[0].image_digest, image.digest);

    remote.start_container(&id).await.unwrap();
    assert!(matches!(
        state_of(&remote, &id).await,
        ContainerState::Running { .. }
    ));
    assert_eq!(remote.pod_listener(POD, 8080).await, None);
    // Typed errors come back as themselves.
    assert!(
        matches!(remote.start_container(&id).await, Err(ProviderError::Create(m)) if m.contains("not Created"))
    );
    assert!(matches!(
        remote.stop_container("no-such-id", Duration::ZERO).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        remote
            .create_container("no-such-pod", config(&root.0, "x"))
            .await,
        Err(ProviderError::NotFound(_))
    ));

    remote.stop_container(&id, Duration::ZERO).await.unwrap();
    assert!(matches!(
        state_of(&remote, &id).await,
        ContainerState::Exited {
            reason: ExitReason::Killed,
            ..
        }
    ));
    remote.remove_container(&id).await.unwrap();
    assert!(remote.list_containers().await.unwrap().is_empty());
    remote
        .remove_pod_sandbox(POD, Duration::ZERO)
        .await
        .unwrap();
    assert!(remote.list_pod_sandboxes().await.unwrap().is_empty());
    assert!(remote.remove_image(IMAGE).await.unwrap() > 0);
    assert_eq!(remote.image_status(IMAGE).await, None);

    shutdown.cancel();
    within("serve ends on shutdown", server).await.unwrap();
}

/// An `AsyncWrite` whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn exec_streams_stdin_and_output_and_returns_the_exit_code_or_the_timeout() {
    let root = Root::new("exec");
    let (remote, _server, id) = running(&root).await;
    // More than one frame's worth of stdin, so the copy goes through several frames both ways.
    let input: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (out, err) = (Capture::default(), Capture::default());
    let io = ExecIo {
        stdin: Some(Box::pin(std::io::Cursor::new(input.clone()))),
        stdout: Box::pin(out.clone()),
        stderr: Box::pin(err.clone()),
        timeout: None,
    };
    // argc 2 * 10 + the container's one env var.
    assert_eq!(
        within("exec", remote.exec(&id, argv(&["echo", "x"]), io))
            .await
            .unwrap(),
        21
    );
    assert!(
        out.bytes() == input,
        "stdout: {} bytes, not the {} of stdin",
        out.bytes().len(),
        input.len()
    );
    assert_eq!(err.bytes(), b"done\n");

    // No stdin: end of file at once.
    assert_eq!(
        within(
            "exec_sync",
            remote.exec_sync(&id, argv(&["echo", "x"]), Duration::from_secs(10))
        )
        .await
        .unwrap(),
        (21, b"done\n".to_vec())
    );

    // Output streams while the command runs, and the timeout comes back as itself.
    let (writer, mut reader) = tokio::io::duplex(64);
    let io = ExecIo {
        stdin: None,
        stdout: Box::pin(writer),
        stderr: Box::pin(Capture::default()),
        timeout: Some(Duration::from_millis(500)),
    };
    let exec = remote.exec(&id, argv(&["spin", "a", "b"]), io);
    let tick = async {
        let mut tick = [0u8; 5];
        reader.read_exact(&mut tick).await.unwrap();
        tick
    };
    let (result, tick) = within("exec with a timeout", async { tokio::join!(exec, tick) }).await;
    assert_eq!(&tick, b"tick\n");
    match result {
        Err(ProviderError::Timeout(message)) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(matches!(
        remote
            .exec(
                "no-such-id",
                argv(&["x"]),
                ExecIo {
                    stdin: None,
                    stdout: Box::pin(Capture::default()),
                    stderr: Box::pin(Capture::default()),
                    timeout: None
                }
            )
            .await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        state_of(&remote, &id).await,
        ContainerState::Running { .. }
    ));
}

#[tokio::test]
async fn attach_streams_the_running_containers_stdio_until_the_caller_or_the_container_ends() {
    let root = Root::new("attach");
    let server = serve_on(&root.socket(), wasmtime_provider(&root.0));
    let remote = RemoteProvider::connect(root.socket()).await.unwrap();
    remote.run_pod_sandbox(&sandbox(&root.0)).await.unwrap();
    // The container echoes its stdin (the attach pipe) to stdout.
    let mut cfg = config(&root.0, "echo");
    cfg.command = argv(&["echo", "x"]);
    cfg.stdin = true;
    let id = remote.create_container(POD, cfg).await.unwrap();
    remote.start_container(&id).await.unwrap();

    // The caller stops reading: the attach ends, the container runs on.
    let (mut typed, stdin) = tokio::io::duplex(1024);
    let (stdout, mut seen) = tokio::io::duplex(1024);
    let attach = remote.attach(
        &id,
        AttachIo {
            stdin: Some(Box::pin(stdin)),
            stdout: Some(Box::pin(stdout)),
            stderr: None,
        },
    );
    let caller = async {
        typed.write_all(b"ping\n").await.unwrap();
        let mut echoed = [0u8; 5];
        seen.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping\n");
        drop(seen);
        // More output: writing it to the caller fails, which ends the attach.
        typed.write_all(b"more\n").await.unwrap();
        typed
    };
    let (result, _typed) = within("attach ended by the caller", async {
        tokio::join!(attach, caller)
    })
    .await;
    result.unwrap();
    assert!(matches!(
        state_of(&remote, &id).await,
        ContainerState::Running { .. }
    ));

    // Attached to stdout only: the container's end ends the attach.
    let (stdout, mut seen) = tokio::io::duplex(1024);
    let attach = remote.attach(
        &id,
        AttachIo {
            stdin: None,
            stdout: Some(Box::pin(stdout)),
            stderr: None,
        },
    );
    let stop = async {
        // Attached once the runtime forwards output: the container echoes what a second
        // (stdin-only) attach types.
        let (mut typed, stdin) = tokio::io::duplex(1024);
        let typing = remote.attach(
            &id,
            AttachIo {
                stdin: Some(Box::pin(stdin)),
                stdout: None,
                stderr: None,
            },
        );
        let reading = async {
            let mut echoed = [0u8; 16];
            loop {
                typed.write_all(b"hi\n").await.unwrap();
                tokio::select! {
                    read = seen.read(&mut echoed) => { assert!(read.unwrap() > 0); break; }
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            drop(typed);
        };
        let (typing, ()) = tokio::join!(typing, reading);
        typing.unwrap();
        remote.stop_container(&id, Duration::ZERO).await.unwrap();
    };
    let (result, ()) = within("attach ended by the container", async {
        tokio::join!(attach, stop)
    })
    .await;
    result.unwrap();
    assert!(matches!(
        state_of(&remote, &id).await,
        ContainerState::Exited { .. }
    ));
    // Attaching to a container that has ended is the provider's error, as itself.
    let io = AttachIo {
        stdin: None,
        stdout: Some(Box::pin(Capture::default())),
        stderr: None,
    };
    assert!(
        matches!(remote.attach(&id, io).await, Err(ProviderError::Exec(m)) if m.contains("not Running"))
    );
    drop(server);
}

#[tokio::test]
async fn a_dead_runtime_is_unavailable_at_once_and_a_new_one_is_found_on_the_next_call() {
    let root = Root::new("restart");
    let (remote, (shutdown, server), id) = running(&root).await;
    let mut identity = remote.identity();
    let first = identity.borrow_and_update().clone().unwrap();

    // In flight when the runtime goes: a stop with an hour's grace, and an exec that spins.
    let stop = remote.stop_container(&id, Duration::from_secs(3600));
    let (writer, mut reader) = tokio::io::duplex(64);
    let exec = remote.exec(
        &id,
        argv(&["spin", "a", "b"]),
        ExecIo {
            stdin: None,
            stdout: Box::pin(writer),
            stderr: Box::pin(Capture::default()),
            timeout: None,
        },
    );
    let kill = async {
        let mut tick = [0u8; 5];
        reader.read_exact(&mut tick).await.unwrap();
        // The exec runs, and the stop went out before this list on the one control connection.
        remote.list_containers().await.unwrap();
        shutdown.cancel();
        server.await.unwrap();
        reader
    };
    let (stopped, exec, _reader) = within("in-flight calls when the runtime dies", async {
        tokio::join!(stop, exec, kill)
    })
    .await;
    assert!(
        matches!(&stopped, Err(ProviderError::Unavailable(m)) if m.contains("lost")),
        "{stopped:?}"
    );
    assert!(
        matches!(&exec, Err(ProviderError::Unavailable(m)) if m.contains("lost")),
        "{exec:?}"
    );
    within("identity goes to None", identity.wait_for(Option::is_none))
        .await
        .unwrap();

    // Nothing listens: every call says so, none waits.
    let listed = within("list while down", remote.list_containers()).await;
    assert!(
        matches!(&listed, Err(ProviderError::Unavailable(m)) if m.contains("provider.sock")),
        "{listed:?}"
    );
    match within("status while down", remote.status()).await {
        RuntimeStatus::NotReady { message } => assert!(
            message.starts_with("container runtime unavailable: "),
            "{message}"
        ),
        RuntimeStatus::Ready => panic!("Ready while the runtime is down"),
    }
    assert_eq!(
        within("image_status while down", remote.image_status(IMAGE)).await,
        None
    );
    assert_eq!(
        remote.runtime_info().name,
        "wasmtime",
        "the last identity's info"
    );
    std::fs::remove_file(root.socket()).unwrap();
    let sandboxes = within(
        "list_pod_sandboxes without a socket",
        remote.list_pod_sandboxes(),
    )
    .await;
    assert!(
        matches!(&sandboxes, Err(ProviderError::Unavailable(m)) if m.contains("No such file")),
        "{sandboxes:?}"
    );
    let io = ExecIo {
        stdin: None,
        stdout: Box::pin(Capture::default()),
        stderr: Box::pin(Capture::default()),
        timeout: None,
    };
    assert!(matches!(
        within(
            "exec without a socket",
            remote.exec(&id, argv(&["echo", "x"]), io)
        )
        .await,
        Err(ProviderError::Unavailable(_))
    ));
    assert!(matches!(
        RemoteProvider::connect(root.socket()).await,
        Err(ProviderError::Unavailable(_))
    ));

    // A new runtime on the same path: the next call reaches it, and it is a new instance.
    let (_shutdown, _server) = serve_on(&root.socket(), wasmtime_provider(&root.0));
    assert!(within("list after the restart", remote.list_containers())
        .await
        .unwrap()
        .is_empty());
    let second = identity
        .borrow_and_update()
        .clone()
        .expect("an identity after reconnecting");
    assert_ne!(second.instance, first.instance);
}

#[tokio::test]
async fn a_peer_of_another_protocol_version_is_refused_naming_both() {
    use futures::{SinkExt, StreamExt};
    let root = Root::new("protocol");
    let _server = serve_on(&root.socket(), wasmtime_provider(&root.0));
    let stream = tokio::net::UnixStream::connect(root.socket())
        .await
        .unwrap();
    let mut conn = tokio_util::codec::Framed::new(stream, wire::codec());
    conn.send(bytes::Bytes::from_static(br#"{"Hello":{"protocol":99}}"#))
        .await
        .unwrap();
    let answer = within("answer to hello", conn.next())
        .await
        .unwrap()
        .unwrap();
    let welcome: Result<RuntimeIdentity, ProviderError> = serde_json::from_slice(&answer).unwrap();
    match welcome {
        Err(ProviderError::Setup(m)) => assert!(
            m.contains("protocol 99") && m.contains(&format!("the runtime {PROTOCOL_VERSION}")),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(within("close after refusing", conn.next()).await.is_none());

    // The client refuses a runtime of another version the same way.
    let fake = Root::new("protocol-client");
    let listener = bind(&fake.socket()).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = tokio_util::codec::Framed::new(stream, wire::codec());
        let _hello = conn.next().await;
        let info = provider_api::RuntimeInfo {
            name: "wasmtime".into(),
            version: "0".into(),
        };
        let identity = RuntimeIdentity {
            protocol: 7,
            pid: 1,
            instance: "x".into(),
            runtime_info: info,
        };
        let _ = conn
            .send(wire::json_frame(&Ok::<_, ProviderError>(identity)).unwrap())
            .await;
    });
    match RemoteProvider::connect(fake.socket()).await {
        Err(ProviderError::Setup(m)) => assert!(
            m.contains(&format!(
                "agent speaks provider protocol {PROTOCOL_VERSION}"
            )) && m.contains("the runtime 7"),
            "{m}"
        ),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected to a runtime of protocol 7"),
    }
}

/// What a client running as `nobody` (uid 65534) gets from the socket: `EACCES` (connect
/// refused by the file mode), `CLOSED` (the server hung up without answering), `ANSWER`.
fn connect_as_nobody(socket: &Path) -> String {
    use std::os::unix::process::CommandExt;
    const CLIENT: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
m = b'{"Hello":{"protocol":1}}'
try:
    s.sendall(struct.pack(">I", len(m)) + m)
    d = s.recv(65536)
except (BrokenPipeError, ConnectionResetError):
    d = b""
print("ANSWER" if d else "CLOSED")
"#;
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running python3 as nobody");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Needs root (to run the client as another uid) and /usr/bin/python3.
#[tokio::test]
async fn a_peer_of_another_uid_is_refused_even_when_the_socket_mode_lets_it_connect() {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/python3").exists() {
        eprintln!("skipped: needs root and /usr/bin/python3 to run a client as uid 65534");
        return;
    }
    let root = Root::new("peer-uid");
    std::fs::set_permissions(&root.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _server = serve_on(&root.socket(), wasmtime_provider(&root.0));
    let socket = root.socket();
    let probe = socket.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || connect_as_nobody(&probe))
            .await
            .unwrap(),
        "EACCES",
        "the 0700 directory keeps other users out"
    );
    // A mode mistake (or a parent directory's) lets the connect through: the credential check
    // still refuses it.
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let probe = socket.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || connect_as_nobody(&probe))
            .await
            .unwrap(),
        "CLOSED"
    );
    // The owner is still served.
    assert!(RemoteProvider::connect(socket).await.is_ok());
}

// --- fuzz: arbitrary input never panics the server, which answers or closes -------------------

/// A provider with nothing in it. Without `ended`, its exec copies stdin to stdout. With it,
/// it records how a stream call ended on the runtime's side: for exec, what stdin held and
/// whether writing after it worked; for attach (a container that writes one line and never
/// ends), that the call was dropped.
#[derive(Default)]
struct Fake {
    ended: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

#[async_trait::async_trait]
impl Provider for Fake {
    fn runtime_info(&self) -> provider_api::RuntimeInfo {
        provider_api::RuntimeInfo {
            name: "fake".into(),
            version: "0".into(),
        }
    }
    async fn status(&self) -> RuntimeStatus {
        RuntimeStatus::Ready
    }
    async fn image_status(&self, _: &str) -> Option<provider_api::ImageInfo> {
        None
    }
    async fn pull_image(
        &self,
        reference: &str,
        _: &[provider_api::RegistryAuth],
    ) -> Result<provider_api::ImageInfo, ProviderError> {
        Err(ProviderError::Pull(reference.into()))
    }
    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        Ok(config.pod_uid.clone())
    }
    async fn remove_pod_sandbox(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn create_container(
        &self,
        sandbox_id: &str,
        _: ContainerConfig,
    ) -> Result<String, ProviderError> {
        Err(ProviderError::NotFound(sandbox_id.into()))
    }
    async fn start_container(&self, id: &str) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(id.into()))
    }
    async fn stop_container(&self, id: &str, _: Duration) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(id.into()))
    }
    async fn remove_container(&self, id: &str) -> Result<(), ProviderError> {
        Err(ProviderError::NotFound(id.into()))
    }
    async fn list_containers(&self) -> Result<Vec<provider_api::ContainerSummary>, ProviderError> {
        Ok(Vec::new())
    }
    async fn exec(&self, _: &str, _: Vec<String>, mut io: ExecIo) -> Result<i32, ProviderError> {
        let Some(ended) = &self.ended else {
            // Copies stdin to stdout.
            if let Some(mut stdin) = io.stdin.take() {
                tokio::io::copy(&mut stdin, &mut io.stdout)
                    .await
                    .map_err(|e| ProviderError::Io(e.to_string()))?;
            }
            return Ok(0);
        };
        let _ = ended.send("exec started".into());
        let mut input = Vec::new();
        if let Some(mut stdin) = io.stdin.take() {
            let _ = stdin.read_to_end(&mut input).await;
        }
        let wrote = io
            .stdout
            .write_all(b"after the client left\n")
            .await
            .is_ok();
        let _ = ended.send(format!(
            "exec stdin {:?}, output written: {wrote}",
            String::from_utf8_lossy(&input)
        ));
        Ok(0)
    }
    async fn attach(&self, id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let Some(ended) = &self.ended else {
            return Err(ProviderError::NotFound(id.into()));
        };
        let _guard = OnDrop(ended.clone());
        let mut stdout = io.stdout.expect("stdout attached");
        stdout
            .write_all(b"attached\n")
            .await
            .map_err(|e| ProviderError::Io(e.to_string()))?;
        // A container that writes nothing more and does not end.
        std::future::pending().await
    }
}

/// One server for every fuzz case, on its own runtime; panics in this crate's code are counted.
fn fuzz_server() -> &'static (
    tokio::runtime::Runtime,
    PathBuf,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    static SERVER: std::sync::OnceLock<(
        tokio::runtime::Runtime,
        PathBuf,
        Arc<std::sync::atomic::AtomicUsize>,
    )> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| {
                l.file().contains("providers/remote/src/") && !l.file().ends_with("tests.rs")
            }) {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info)
        }));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = std::env::temp_dir().join(format!("wk-remote-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("provider.sock");
        let listener = runtime.block_on(async { bind(&socket) }).unwrap();
        runtime.spawn(serve(
            listener,
            Arc::new(Fake::default()),
            CancellationToken::new(),
        ));
        (runtime, socket, panics)
    })
}

/// Length-delimited frames of `payloads`, as the codec writes them.
fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads
        .iter()
        .flat_map(|p| {
            (p.len() as u32)
                .to_be_bytes()
                .into_iter()
                .chain(p.iter().copied())
        })
        .collect()
}

/// Writes `input`, ends the write side, and reads until the server closes: the server must
/// close (having answered or not) rather than hang, and must not panic.
fn feed(input: Vec<u8>) -> Result<(), proptest::test_runner::TestCaseError> {
    let (runtime, socket, panics) = fuzz_server();
    let closed = runtime.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (mut read, mut write) = stream.split();
        let writing = async {
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        };
        let mut answer = Vec::new();
        let reading = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer));
        let ((), read) = tokio::join!(writing, reading);
        read.is_ok()
    });
    proptest::prop_assert!(closed, "the server neither answered nor closed within 10 s");
    proptest::prop_assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server panicked"
    );
    Ok(())
}

fn hello() -> Vec<u8> {
    br#"{"Hello":{"protocol":1}}"#.to_vec()
}

fn exec_open() -> Vec<u8> {
    br#"{"Exec":{"protocol":1,"container_id":"c","command":["x"],"stdin":true,"timeout":null}}"#
        .to_vec()
}

/// Requests that parse, with arbitrary ids and arguments, besides arbitrary bytes.
fn control_payload() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        (any::<u64>(), "[a-z_]{0,12}", "\\PC{0,32}").prop_map(|(id, method, arg)| format!(r#"{{"id":{id},"call":{{"{method}":{{"reference":{arg:?}}}}}}}"#).into_bytes()),
        (any::<u64>(), prop::sample::select(vec!["Status", "ListContainers", "ListPodSandboxes", "ImageFs", "ListImages"])).prop_map(|(id, call)| format!(r#"{{"id":{id},"call":"{call}"}}"#).into_bytes()),
        (any::<u64>(), "\\PC{0,16}", any::<u64>()).prop_map(|(id, c, secs)| format!(r#"{{"id":{id},"call":{{"StopContainer":{{"container_id":{c:?},"grace":{{"secs":{secs},"nanos":0}}}}}}}}"#).into_bytes()),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 96, ..Default::default() })]

    #[test]
    fn arbitrary_bytes_are_answered_or_closed(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
        feed(input)?;
    }

    #[test]
    fn arbitrary_frames_after_a_hello_are_answered_or_closed(frames in proptest::collection::vec(control_payload(), 0..16)) {
        let mut all = vec![hello()];
        all.extend(frames);
        feed(framed(&all))?;
    }

    #[test]
    fn arbitrary_frames_on_an_exec_stream_are_answered_or_closed(frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), 0..16), tag in 0u8..7) {
        let mut all = vec![exec_open()];
        // Mostly well-tagged frames, so stdin reaches the command.
        all.extend(frames.into_iter().map(|mut f| { f.insert(0, tag); f }));
        feed(framed(&all))?;
    }
}

#[test]
fn a_frame_over_the_limit_or_a_bad_first_frame_closes_the_connection() {
    let mut too_long = ((wire::MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    too_long.extend([0u8; 64]);
    feed(too_long).unwrap();
    feed(framed(&[b"{\"Nope\":{}}".to_vec()])).unwrap();
    let mut after_hello = framed(&[hello()]);
    after_hello.extend(((wire::MAX_FRAME + 1) as u32).to_be_bytes());
    feed(after_hello).unwrap();
}

/// Reports `attach dropped` when the runtime drops an attach call.
struct OnDrop(tokio::sync::mpsc::UnboundedSender<String>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send("attach dropped".into());
    }
}

#[tokio::test]
async fn a_client_leaving_mid_exec_closes_its_stdin_and_the_exec_runs_on_while_an_attach_ends() {
    let root = Root::new("leaving");
    let (ended, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let _server = serve_on(&root.socket(), Arc::new(Fake { ended: Some(ended) }));
    let remote = RemoteProvider::connect(root.socket()).await.unwrap();

    // The caller's stdin stays open; the caller gives up on the exec once it runs.
    let (mut typed, stdin) = tokio::io::duplex(64);
    typed.write_all(b"typed").await.unwrap();
    let (stdout, _out) = tokio::io::duplex(64);
    let exec = remote.exec(
        "c",
        argv(&["x"]),
        ExecIo {
            stdin: Some(Box::pin(stdin)),
            stdout: Box::pin(stdout),
            stderr: Box::pin(Capture::default()),
            timeout: None,
        },
    );
    tokio::select! {
        result = exec => panic!("the exec ended while its stdin was open: {result:?}"),
        started = seen.recv() => assert_eq!(started.as_deref(), Some("exec started")),
    }
    let line = within("the exec ends on the runtime", seen.recv())
        .await
        .unwrap();
    assert!(
        line.starts_with("exec stdin ") && line.ends_with("output written: true"),
        "{line}"
    );
    let stdin_seen = &line["exec stdin ".len()..line.find(',').unwrap()];
    assert!(
        ["\"\"", "\"typed\""].contains(&stdin_seen),
        "stdin held only what was typed: {line}"
    );
    drop(typed);

    // An attach whose caller leaves is dropped on the runtime's side, though the container
    // neither writes nor ends.
    let (stdout, mut attached) = tokio::io::duplex(64);
    let attach = remote.attach(
        "c",
        AttachIo {
            stdin: None,
            stdout: Some(Box::pin(stdout)),
            stderr: None,
        },
    );
    let mut buf = [0u8; 16];
    tokio::select! {
        result = attach => panic!("the attach ended by itself: {result:?}"),
        read = attached.read(&mut buf) => assert!(read.unwrap() > 0),
    }
    assert_eq!(
        within("the attach is dropped on the runtime", seen.recv())
            .await
            .unwrap(),
        "attach dropped"
    );
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_refuses_anything_else() {
    let root = Root::new("bind");
    let socket = root.socket();
    drop(bind(&socket).unwrap());
    assert!(socket.exists(), "a listener's socket file outlives it");
    let _listener = bind(&socket).expect("the stale socket is replaced");
    let file = root.0.join("run/not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let refused = bind(&file).unwrap_err();
    assert!(refused.to_string().contains("not a socket"), "{refused}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}
