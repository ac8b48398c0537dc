//! Port-forward into a container pod: a TCP connection to 127.0.0.1:<port> made INSIDE the
//! pod's network namespace, so the pod's localhost is its own and never the node's.
//!
//! A socket keeps the network namespace it was created in, so a thread of its own joins the
//! pod's namespace (`setns`), creates and connects the socket, hands it back and exits: the
//! agent's other threads (tokio's workers among them) never change namespace, and the joining
//! thread never runs anything else.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a connect inside the pod may take: on the pod's loopback an answer (accept or
/// refuse) is immediate, so this only bounds a listener whose backlog is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to 127.0.0.1:`port` inside the network namespace pinned at `netns`.
pub(crate) async fn connect_in(netns: &Path, port: u16) -> io::Result<tokio::net::TcpStream> {
    let netns: PathBuf = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pod-netns-connect".into())
        .spawn(move || {
            let _ = tx.send(connect_in_thread(&netns, port));
        })?;
    let stream = rx
        .await
        .map_err(|_| io::Error::other("the connecting thread ended without an answer"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

/// Connects to 127.0.0.1:`port` in the node's own network namespace (a hostNetwork pod).
pub(crate) async fn connect_on_node(port: u16) -> io::Result<tokio::net::TcpStream> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Runs on a thread of its own, which exits right after: it joins the namespace for good.
fn connect_in_thread(netns: &Path, port: u16) -> io::Result<TcpStream> {
    let file = std::fs::File::open(netns)?;
    // SAFETY: setns on a valid open descriptor; it changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("joining the pod's network namespace: {e}"),
        ));
    }
    drop(file);
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        CONNECT_TIMEOUT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace of its own (`unshare` on a throwaway thread, pinned by path through
    /// /proc/<tid>): its loopback is not the node's, and this thread's namespace is unchanged.
    #[tokio::test]
    async fn connects_inside_the_namespace_and_leaves_the_callers_alone() {
        // unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN: these tests run as root on the CI hosts.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let host = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = host.local_addr().unwrap().port();
        // A thread in a new namespace, with loopback up and a listener on the same port; it
        // stays until told to go, so its namespace file stays valid.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let keeper = std::thread::spawn(move || {
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            // `ip` runs in this thread's namespace (a child inherits the caller thread's).
            assert!(up.is_ok_and(|s| s.success()));
            let inside = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
            let tid = unsafe { libc::gettid() };
            ready_tx
                .send(PathBuf::from(format!("/proc/self/task/{tid}/ns/net")))
                .unwrap();
            let (mut conn, _) = inside.accept().unwrap();
            io::Write::write_all(&mut conn, b"inside").unwrap();
            drop(conn);
            let _ = done_rx.recv();
        });
        let netns = ready_rx.recv().unwrap();
        let mut conn = connect_in(&netns, port).await.unwrap();
        let mut got = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut got)
            .await
            .unwrap();
        assert_eq!(got, "inside");
        host.set_nonblocking(true).unwrap();
        assert!(host.accept().is_err(), "the host's listener was reached");
        // A port nothing listens on inside: refused, even though the host has a listener there.
        let other = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let refused = connect_in(&netns, other.local_addr().unwrap().port()).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            before
        );
        done_tx.send(()).unwrap();
        keeper.join().unwrap();
    }
}
