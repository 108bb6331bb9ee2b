//! The metrics endpoint (`/stats/prometheus` and `/metrics`, Istio's port 15090).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;

/// Serves `registry` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&request, &registry)) }
            });
            if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%error, %peer, "metrics connection ended");
            }
        });
    }
}

fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/stats/prometheus" | "/metrics" => {
            let mut body = String::new();
            match encode(&mut body, registry) {
                Ok(()) => Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                    .body(Full::new(Bytes::from(body)))
                    .expect("static headers are valid"),
                Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n"),
            }
        }
        _ => status(StatusCode::NOT_FOUND, "not found: try /stats/prometheus\n"),
    }
}

fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("static response is valid")
}
