//! The admin listener: Prometheus metrics at `/metrics`, optionally behind a bearer token.
//!
//! It binds 127.0.0.1:9100 by default, never the public port, and serves plain HTTP/1.1 for
//! scrapers on the host or a private network. It serves nothing but metrics.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{text_response, Admission, Body, ConnectionSettings};
use crate::config::values::Secret;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

fn answer<B>(req: &Request<B>, metrics: &Metrics, token: Option<&Secret>) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return text_response(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return super::routes::method_not_allowed();
    }
    if let Some(token) = token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !presented.is_some_and(|p| token.matches(p)) {
            let mut response = text_response(StatusCode::UNAUTHORIZED, "bearer token required\n");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"callgate metrics\""),
            );
            return response;
        }
    }
    let text = metrics.encode();
    let mut response = Response::new(super::boxed(
        Full::new(Bytes::from(text)).map_err(|never: Infallible| match never {}),
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves `/metrics` on `listener` until shutdown, with the same per-address cap, header timeout,
/// idle and stall limits as the public listeners (and a global cap of its own, so a flood on the
/// public port cannot keep the scraper out).
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    token: Option<Secret>,
    settings: ConnectionSettings,
    admission: Admission,
    shutdown: Shutdown,
) {
    let token = Arc::new(token);
    let builder = Arc::new(super::redirect::http1_builder(&settings));
    let gate = admission.clone();
    super::accept_until_shutdown(listener, &gate, shutdown, |accepted, shutdown| {
        let metrics = metrics.clone();
        let token = token.clone();
        let builder = builder.clone();
        let settings = settings.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let Some((_, tcp, _hold)) = admission.client(accepted).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&req, &metrics, token.as_ref().as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            super::serve_connection(&builder, tcp, service, &settings, shutdown).await;
        });
    })
    .await;
}
