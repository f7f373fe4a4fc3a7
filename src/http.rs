//! The small HTTP/1 server behind `/metrics`, `/healthz`, `/livez` and the per-service
//! health-check node ports: plain hyper, one task per connection, handlers that answer from
//! memory without awaiting anything.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A response body held in memory.
pub type Body = Full<Bytes>;

/// Answers one request; must not block.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Body> + Send + Sync>;

/// A server socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}")]
pub struct BindError {
    /// What the server is for (`metrics`, `healthz`, `health check node port of ns/name`).
    pub what: String,
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds `addr` now (so a port clash is reported to the caller at once) and serves
/// `handler` on the current tokio runtime until the returned task is aborted; aborting closes
/// the listening socket.
pub fn spawn_server(
    what: &str,
    addr: SocketAddr,
    handler: Handler,
) -> Result<(JoinHandle<()>, SocketAddr), BindError> {
    let bind_err = |source| BindError {
        what: what.to_string(),
        addr,
        source,
    };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let listener = TcpListener::from_std(std_listener).map_err(bind_err)?;
    let what = what.to_string();
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(server = %what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handler(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((task, local))
}

/// A response with `status`, `content_type` and `body`.
pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// 404 for paths a server does not have.
pub fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, "text/plain", "404 page not found\n")
}
