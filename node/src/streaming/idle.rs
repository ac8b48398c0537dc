//! The streaming idle timeout (`--streaming-connection-idle-timeout`): an upgraded exec, attach
//! or port-forward connection on which no byte has moved either way for the timeout is closed,
//! as the kubelet closes an idle SPDY connection. Start at [`serve_until_idle`].
//!
//! Traffic is counted on the raw upgraded connection, below SPDY or WebSocket framing, so every
//! frame counts (a client's PING keeps a session alive, as it does the kubelet's).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved, as milliseconds since `start` (one atomic store per read or write).
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection that records when bytes last moved on it.
pub struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How a session served by [`serve_until_idle`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The session finished on its own.
    Finished,
    /// Nothing moved for the idle timeout: the session was dropped, closing the connection.
    Idle,
}

/// Runs `serve` on `io` wrapped in a traffic watch; when no byte has moved for `timeout`, the
/// session future is dropped, which drops the connection (and with it every stream of the
/// session). `None` never times out.
pub async fn serve_until_idle<IO, F, Fut>(io: IO, timeout: Option<Duration>, serve: F) -> Ended
where
    F: FnOnce(Watched<IO>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let session = serve(Watched {
        io,
        activity: activity.clone(),
    });
    let Some(timeout) = timeout.filter(|t| !t.is_zero()) else {
        session.await;
        return Ended::Finished;
    };
    tokio::pin!(session);
    loop {
        // A timeout too long to add to an instant is no timeout.
        let Some(deadline) = activity.last().checked_add(timeout) else {
            session.await;
            return Ended::Finished;
        };
        tokio::select! {
            () = &mut session => return Ended::Finished,
            () = tokio::time::sleep_until(deadline) => {
                if activity.last().checked_add(timeout).is_some_and(|d| d <= Instant::now()) {
                    return Ended::Idle;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_is_dropped_and_a_busy_one_is_not() {
        // Idle: the client never sends; the session (an echo) is dropped after the timeout,
        // and the client sees the connection end.
        let (server, mut client) = tokio::io::duplex(64);
        let serving = tokio::spawn(serve_until_idle(
            server,
            Some(Duration::from_secs(5)),
            |mut io| async move {
                let mut buf = [0u8; 8];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
        ));
        assert_eq!(serving.await.unwrap(), Ended::Idle);
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "the connection is closed"
        );

        // Busy: a byte every 3 s keeps a 5 s timeout from firing for 30 s.
        let (server, mut client) = tokio::io::duplex(64);
        let serving = tokio::spawn(serve_until_idle(
            server,
            Some(Duration::from_secs(5)),
            |mut io| async move {
                let mut buf = [0u8; 8];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
        ));
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.write_all(b"x").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        }
        drop(client);
        assert_eq!(serving.await.unwrap(), Ended::Finished);
    }
}
