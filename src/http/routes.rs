//! What each HTTPS request gets: health endpoints, the WebSocket upgrade, or a static file — always
//! with the security headers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::headers::SecurityHeaders;
use super::static_files::StaticFiles;
use super::{text_response, Body, ConnectionContext};
use crate::metrics::{Metrics, RouteClass};
use crate::shutdown::Shutdown;
use crate::signaling::session::Signaling;

/// Whether this instance wants new traffic; flipped once when shutdown begins.
#[derive(Debug, Default)]
pub struct Readiness {
    /// `true` from the first shutdown signal on.
    draining: AtomicBool,
}

impl Readiness {
    /// Marks the instance as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The HTTPS application: shared by every connection.
#[derive(Debug)]
pub struct App {
    /// The web app's files.
    files: StaticFiles,
    /// Added to every response.
    security_headers: SecurityHeaders,
    /// Drives `/readyz`.
    readiness: Arc<Readiness>,
    /// WebSocket signaling at `/socket` and `/`.
    signaling: Arc<Signaling>,
    /// Handed to every WebSocket session, which hyper's graceful shutdown does not reach.
    shutdown: Shutdown,
    /// Request counters.
    metrics: Arc<Metrics>,
}

impl App {
    /// An app serving `files`.
    pub fn new(
        files: StaticFiles,
        security_headers: SecurityHeaders,
        readiness: Arc<Readiness>,
        signaling: Arc<Signaling>,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Self {
        App {
            files,
            security_headers,
            readiness,
            signaling,
            shutdown,
            metrics,
        }
    }

    /// Answers one request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnectionContext>,
    ) -> Response<Body> {
        let (route, mut response) = self.route(req, conn).await;
        self.metrics.http.record(route, response.status().as_u16());
        self.security_headers.apply(response.headers_mut());
        response
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnectionContext>,
    ) -> (RouteClass, Response<Body>) {
        let path = req.uri().path();
        if is_websocket_upgrade(&req) && (path == "/socket" || path == "/") {
            let response = self.signaling.upgrade(req, conn, self.shutdown.clone());
            return (RouteClass::WebSocket, response);
        }
        match path {
            "/healthz" => return (RouteClass::Health, health(&req, "ok\n")),
            "/readyz" => {
                let response = if self.readiness.is_draining() {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else {
                    health(&req, "ready\n")
                };
                return (RouteClass::Health, response);
            }
            _ => {}
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return (RouteClass::Static, method_not_allowed());
        }
        (RouteClass::Static, self.files.serve(&req).await)
    }
}

/// Whether the request asks to become a WebSocket.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    req.method() == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
}

/// `/healthz` and `/readyz`: GET or HEAD only, never cached.
pub fn health<B>(req: &Request<B>, text: &'static str) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    let mut response = text_response(StatusCode::OK, text);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 405 with the methods that would work.
pub fn method_not_allowed() -> Response<Body> {
    let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}
