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
use hyper_util::rt::TokioIo;
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
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "health/metrics connection ended with an error");
            }
        });
    }
}
