//! `/healthz`, `/readyz` and `/metrics`, served by the agent with hyper (HTTP/1.1).
//!
//! Owns the endpoints and the metrics ([`metrics`]); may read the pinned maps through
//! [`crate::dataplane::inspect`], and calls nothing else.

pub mod metrics;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
pub use metrics::{ErrorKind, Metrics};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// The OpenMetrics text format that prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer to one request.
pub fn respond(metrics: &Metrics, path: &str) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: {}\n", metrics.not_ready_reason()),
        ),
        "/metrics" => (StatusCode::OK, OPENMETRICS, metrics.render()),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Serves the endpoints until the runtime shuts down; starts the metrics' map census.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for health and metrics"))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    metrics.start_census();
    serve_on(listener, metrics).await
}

/// Serves the endpoints on a bound listener.
pub async fn serve_on(listener: TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let (status, content_type, body) = respond(&metrics, req.uri().path());
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "health/metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        sock.write_all(req.as_bytes()).await.expect("send");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_string(&mut out))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        out
    }

    #[tokio::test]
    async fn the_endpoints_answer_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(serve_on(listener, metrics.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.contains("not ready: starting"), "{not_ready}");
        metrics.set_ready(true, None);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("application/openmetrics-text"), "{m}");
        assert!(m.contains("\nst8s_ready 1\n"), "{m}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
