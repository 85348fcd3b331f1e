//! The admin listener: `/healthz` (alive), `/readyz` (ready to serve), `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward::GateBody;
use crate::server::Gate;

/// Serves the admin endpoints until shutdown.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(gate.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(
    gate: Arc<Gate>,
    req: Request<Incoming>,
) -> Result<Response<GateBody>, Infallible> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => {
            if gate.ready.load(Ordering::Acquire) {
                (
                    StatusCode::OK,
                    "application/json",
                    r#"{"ready":true}"#.to_string(),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    r#"{"ready":false,"reason":"store not reached or invalidation not live yet"}"#
                        .to_string(),
                )
            }
        }
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            gate.metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(GateBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}
