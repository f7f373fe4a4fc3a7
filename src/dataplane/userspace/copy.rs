//! Moving bytes of one proxied TCP connection: connecting to an endpoint with retries, then a
//! bidirectional zero-copy `splice(2)` with half-close and an idle timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Connect timeout of the n-th attempt of one client connection (the last value repeats):
/// short first, so a dead endpoint costs little, longer later, so a slow but live endpoint
/// still gets a chance (upstream's userspace proxy used the same ladder).
pub const DIAL_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Why an attempt to reach an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The endpoint refused or the connect failed otherwise.
    #[error("connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// No answer within the attempt's timeout.
    #[error("connect to {endpoint}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The attempt's timeout.
        timeout: Duration,
    },
}

/// One connect attempt to `endpoint` with the timeout of attempt number `attempt`.
pub async fn dial(endpoint: SocketAddr, attempt: usize) -> Result<TcpStream, DialError> {
    let timeout = DIAL_TIMEOUTS[attempt.min(DIAL_TIMEOUTS.len() - 1)];
    match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(DialError::Connect { endpoint, source }),
        Err(_) => Err(DialError::Timeout { endpoint, timeout }),
    }
}

/// A TCP stream that counts its I/O operations in a shared counter, so one watchdog can
/// tell when a connection (both directions) has been idle. The splice path uses the fd
/// directly; both it and the plain `AsyncRead`/`AsyncWrite` path bump the counter.
struct Tracked<'a> {
    inner: &'a mut TcpStream,
    activity: Arc<AtomicU64>,
}

impl Tracked<'_> {
    fn bump(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsFd for Tracked<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsyncRead for Tracked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.bump();
        }
        r
    }
}

impl AsyncWrite for Tracked<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.bump();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP half-close: FIN towards this side, reading from it continues.
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

impl tokio_splice2::AsyncReadFd for Tracked<'_> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }

    fn try_io_read<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let r = self.inner.try_io(Interest::READABLE, f);
        if r.is_ok() {
            self.bump();
        }
        r
    }
}

impl tokio_splice2::AsyncWriteFd for Tracked<'_> {
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_write_ready(cx)
    }

    fn try_io_write<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let r = self.inner.try_io(Interest::WRITABLE, f);
        if r.is_ok() {
            self.bump();
        }
        r
    }
}

impl tokio_splice2::IsNotFile for Tracked<'_> {}

/// How a proxied connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both sides closed their direction (FIN each way) or one side reset.
    Closed {
        /// Bytes client → endpoint.
        to_endpoint: u64,
        /// Bytes endpoint → client.
        to_client: u64,
    },
    /// Nothing moved in either direction for the idle timeout.
    Idle,
    /// The service went away.
    Cancelled,
}

/// Copies both directions between `client` and `upstream` until both are closed, nothing
/// moved for `idle`, or `cancel` fires. A FIN from one side is passed on as a FIN (shutdown
/// of the write half) while the other direction keeps flowing. Uses `splice(2)` through a
/// pipe per direction; falls back to a userspace copy when pipes cannot be created.
pub async fn proxy(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    cancel: &CancellationToken,
) -> CopyEnd {
    let activity = Arc::new(AtomicU64::new(0));
    let mut a = Tracked {
        inner: client,
        activity: activity.clone(),
    };
    let mut b = Tracked {
        inner: upstream,
        activity: activity.clone(),
    };
    let watchdog = idle_watchdog(&activity, idle);
    let copy = async {
        match tokio_splice2::copy_bidirectional(&mut a, &mut b).await {
            Ok(traffic) => {
                if let Some(e) = &traffic.error {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                CopyEnd::Closed {
                    to_endpoint: traffic.tx as u64,
                    to_client: traffic.rx as u64,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "splice unavailable; copying in userspace");
                match tokio::io::copy_bidirectional(&mut a, &mut b).await {
                    Ok((tx, rx)) => CopyEnd::Closed {
                        to_endpoint: tx,
                        to_client: rx,
                    },
                    Err(_) => CopyEnd::Closed {
                        to_endpoint: 0,
                        to_client: 0,
                    },
                }
            }
        }
    };
    tokio::select! {
        end = copy => end,
        () = watchdog => CopyEnd::Idle,
        () = cancel.cancelled() => CopyEnd::Cancelled,
    }
}

/// Resolves once `activity` has not changed for `idle` (checked a few times per period, so
/// the busy path costs one relaxed increment per I/O and no clock reads).
async fn idle_watchdog(activity: &AtomicU64, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    let mut last = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.load(Ordering::Relaxed);
        if now == last {
            quiet += tick;
            if quiet >= idle {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A proxy on loopback in front of `upstream_addr`; returns its address.
    async fn proxy_in_front(
        upstream_addr: SocketAddr,
        idle: Duration,
    ) -> (SocketAddr, tokio::task::JoinHandle<CopyEnd>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut c, _) = front.accept().await.unwrap();
            let mut u = dial(upstream_addr, 0).await.unwrap();
            proxy(&mut c, &mut u, idle, &CancellationToken::new()).await
        });
        (addr, task)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_with_half_close() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        // Echo server that reads until EOF, then answers with the length and closes.
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut data = Vec::new();
            s.read_to_end(&mut data).await.unwrap();
            s.write_all(format!("got {}", data.len()).as_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
        });
        let (addr, task) = proxy_in_front(backend_addr, Duration::from_secs(10)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let payload = vec![7u8; 3 << 20];
        c.write_all(&payload).await.unwrap();
        // Half-close: the backend only answers after seeing our FIN through the proxy.
        c.shutdown().await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, format!("got {}", 3 << 20));
        match task.await.unwrap() {
            CopyEnd::Closed {
                to_endpoint,
                to_client,
            } => {
                assert_eq!(to_endpoint, 3 << 20);
                assert_eq!(to_client, answer.len() as u64);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut buf = [0u8; 16];
            // Answers once, then stays silent with the connection open.
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let (addr, task) = proxy_in_front(backend_addr, Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        let started = std::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, CopyEnd::Idle);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        // The client sees the close.
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    #[tokio::test]
    async fn dial_reports_refusal() {
        // Bind then drop: nothing listens on the port any more.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        match dial(port, 0).await {
            Err(DialError::Connect { endpoint, .. }) => assert_eq!(endpoint, port),
            other => panic!("{other:?}"),
        }
    }
}
