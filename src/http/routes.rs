//! What each HTTPS request gets: health endpoints, the WebSocket upgrade, or a static file — always
//! with the security headers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::headers::SecurityHeaders;
use super::static_files::StaticFiles;
use super::websocket::WebSocketEndpoint;
use super::{text_response, Body, ConnectionContext};
use crate::config::values::Secret;
use crate::metrics::{Metrics, RouteClass};
use crate::shutdown::Shutdown;
use http_body_util::BodyExt;

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
    signaling: Arc<WebSocketEndpoint>,
    /// Handed to every WebSocket session, which hyper's graceful shutdown does not reach.
    shutdown: Shutdown,
    /// Request counters.
    metrics: Arc<Metrics>,
    /// Enables `/api/turn-credentials` for holders of this key.
    turn_api_key: Option<Secret>,
}

impl App {
    /// An app serving `files`.
    pub fn new(
        files: StaticFiles,
        security_headers: SecurityHeaders,
        readiness: Arc<Readiness>,
        signaling: Arc<WebSocketEndpoint>,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
        turn_api_key: Option<Secret>,
    ) -> Self {
        App {
            files,
            security_headers,
            readiness,
            signaling,
            shutdown,
            metrics,
            turn_api_key,
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
            "/api/turn-credentials" if self.turn_api_key.is_some() => {
                return (RouteClass::Api, self.turn_credentials(&req));
            }
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
        (RouteClass::Static, self.files.serve(&req))
    }
}

impl App {
    /// TURN REST credentials for apps that do their own signaling: `GET
    /// /api/turn-credentials?user=NAME` with `Authorization: Bearer <turn-api-key>`.
    fn turn_credentials<B>(&self, req: &Request<B>) -> Response<Body> {
        if req.method() != Method::GET {
            return method_not_allowed();
        }
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .zip(self.turn_api_key.as_ref())
            .is_some_and(|(presented, key)| key.matches(presented));
        if !authorized {
            let mut response = text_response(StatusCode::UNAUTHORIZED, "API key required\n");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"callgate turn\""),
            );
            return response;
        }
        let user = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
            .unwrap_or("api");
        let valid_user = !user.is_empty()
            && user.len() <= 64
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if !valid_user {
            return text_response(
                StatusCode::BAD_REQUEST,
                "user must be 1-64 characters: letters, digits, - _ . @\n",
            );
        }
        let Some(json) = self
            .signaling
            .ice()
            .and_then(|ice| ice.ice_servers_json(req, user))
        else {
            return text_response(StatusCode::SERVICE_UNAVAILABLE, "the TURN relay is off\n");
        };
        let mut response = Response::new(super::boxed(
            http_body_util::Full::new(bytes::Bytes::from(json))
                .map_err(|never: std::convert::Infallible| match never {}),
        ));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
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
