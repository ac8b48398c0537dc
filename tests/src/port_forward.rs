//! `kubectl port-forward` as a test drives it ([`PortForward`]), and a host listener a pod
//! must never reach through it ([`secret_listener`]).

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, TEST_TIMEOUT};

/// A host process's listener at `ip`: every connection is answered with `secret` (as an HTTP
/// response, so `net-client` prints its status line) and counted.
pub async fn secret_listener(ip: &str, secret: &'static str) -> (u16, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{secret}", secret.len()).as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, accepted)
}

/// A running `kubectl port-forward` to `pod`'s `port`; killed when dropped.
pub struct PortForward {
    /// The local port kubectl forwards from.
    child: std::process::Child,
    pub local: u16,
    // Kept open: kubectl writes "Handling connection ..." there later, and a closed pipe would end it.
    _stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PortForward {
    pub async fn start(ns: &str, pod: &str, port: u16) -> PortForward {
        let mut child = Cluster::get()
            .kubectl()
            .args([
                "port-forward",
                "-n",
                ns,
                &format!("pod/{pod}"),
                &format!(":{port}"),
                "--address",
                "127.0.0.1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (local, lines) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let local: Option<u16> = lines.find_map(|l| {
                l.ok()?
                    .strip_prefix("Forwarding from 127.0.0.1:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
            (local.expect("kubectl prints the local port"), lines)
        })
        .await
        .unwrap();
        PortForward {
            child,
            local,
            _stdout: lines,
        }
    }

    /// Sends `send` through the tunnel and reads until the far side closes (or the time-out);
    /// what came back, lossily as text.
    pub async fn exchange(&self, send: &[u8]) -> String {
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.local)).await else {
            return String::new();
        };
        let _ = conn.write_all(send).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(TEST_TIMEOUT, conn.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Sends `send` and reads until `want` arrives (for servers that keep the connection open).
    pub async fn read_until(&self, send: &[u8], want: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.local))
            .await
            .unwrap();
        conn.write_all(send).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(TEST_TIMEOUT, async {
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains(want) {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Stops kubectl; its stderr.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        let _ = self.child.wait();
        stderr
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
