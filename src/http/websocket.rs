//! The WebSocket endpoint at `/socket` (and `/`): the checks before an upgrade — the origin
//! (cross-site WebSocket hijacking), the per-address upgrade rate — the upgrade itself, and the
//! ICE servers (STUN/TURN with credentials) each client is handed. Once upgraded, the connection
//! belongs to a [`Sessions`] task in `signaling`, which knows nothing of HTTP.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::{text_response, Body, ConnectionContext};
use crate::limits::{IpKey, PerIpLimits};
use crate::metrics::{Limit, Metrics};
use crate::shutdown::Shutdown;
use crate::signaling::connections::Joining;
use crate::signaling::hub::IceServersFor;
use crate::signaling::protocol::ClientId;
use crate::signaling::session::SessionRunner;
use crate::turn::{TurnCredentials, TurnEndpoints};
use std::time::Duration;

/// Which browser origins may open a WebSocket.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Origins allowed to open a WebSocket; empty means "the server's own host".
    pub allowed_origins: Vec<String>,
    /// The configured public origin's authority (`host[:port]`), also allowed.
    pub public_authority: Option<String>,
}

/// Accepts WebSocket upgrades and hands them to the signaling sessions.
pub struct WebSocketEndpoint {
    /// Runs the upgraded connections (over whatever registry and bus the node uses).
    sessions: Arc<dyn SessionRunner>,
    /// Who may connect from a browser.
    origins: OriginPolicy,
    /// Per-address upgrade rate (the open-socket cap is the session's).
    per_ip: Arc<PerIpLimits>,
    /// Counts refused upgrades.
    metrics: Arc<Metrics>,
    /// ICE servers for the `id` message, when the TURN relay runs.
    ice: Option<Arc<IceProvider>>,
}

impl std::fmt::Debug for WebSocketEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketEndpoint")
            .field("sessions", &self.sessions)
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

impl WebSocketEndpoint {
    /// An endpoint starting `sessions`.
    pub fn new(
        sessions: Arc<dyn SessionRunner>,
        origins: OriginPolicy,
        per_ip: Arc<PerIpLimits>,
        metrics: Arc<Metrics>,
        ice: Option<IceProvider>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sessions,
            origins,
            per_ip,
            metrics,
            ice: ice.map(Arc::new),
        })
    }

    /// The ICE server provider, when the TURN relay runs.
    pub fn ice(&self) -> Option<&Arc<IceProvider>> {
        self.ice.as_ref()
    }

    /// The sessions, for the expiry task.
    pub fn sessions(&self) -> &Arc<dyn SessionRunner> {
        &self.sessions
    }

    /// Answers an upgrade request: refuses it (403, 429, 400) or switches protocols and starts the
    /// session in its own task.
    pub fn upgrade(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ConnectionContext>,
        shutdown: Shutdown,
    ) -> Response<Body> {
        if !self.origin_allowed(&req) {
            return text_response(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
        let ip = conn.peer.ip();
        if self.per_ip.check_upgrade(ip).is_err() {
            self.metrics.limits.rejected(Limit::UpgradeRate);
            let mut response = text_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connection attempts; retry in a second\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, "bad WebSocket upgrade: {e}");
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "invalid WebSocket upgrade request\n",
                );
            }
        };
        let ice = self.ice.as_ref().and_then(|ice| ice.for_request(&req));
        let joining = Joining {
            address: Some(IpKey::of(ip)),
            acks: wants_seq(req.uri().query()),
        };
        let sessions = self.sessions.clone();
        // This task ends once the upgrade is done: the session runs in a task of its own, so an
        // idle connection holds one task, not this one too.
        tokio::spawn(async move {
            match upgrade.await {
                // fastwebsockets only did the handshake; frames are read and written in `wire`.
                // The HTTP connection's accounting (open connections, per-address slot) lasts
                // as long as the session: it holds `conn`.
                Ok(ws) => sessions.spawn(ws.into_inner(), ip, joining, ice, shutdown, conn),
                Err(e) => tracing::debug!("WebSocket upgrade did not complete: {e}"),
            }
        });
        response.map(|body| super::boxed(body.map_err(|never| match never {})))
    }

    /// Cross-site WebSocket hijacking guard: a browser always sends `Origin`; it must name this
    /// server (or a configured origin). Clients without `Origin` are not browsers and are allowed.
    fn origin_allowed<B>(&self, req: &Request<B>) -> bool {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self
            .origins
            .allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&origin))
        {
            return true;
        }
        let Some(authority) = origin.strip_prefix("https://") else {
            return false;
        };
        if let Some(public) = &self.origins.public_authority {
            return authority == public;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        host.is_some_and(|host| host.eq_ignore_ascii_case(authority))
    }
}

/// Hands each client its ICE servers: STUN and TURN URLs of the embedded relay, with TURN REST
/// credentials whose user is the client's ID, valid for `ttl`.
pub struct IceProvider {
    /// Signs the credentials.
    credentials: TurnCredentials,
    /// The relay's ports; `host` is filled per connection unless configured.
    endpoints: TurnEndpoints,
    /// A fixed host for the URLs (`turn-host`, or the public URL's host).
    host: Option<String>,
    /// Credential lifetime.
    ttl: Duration,
}

impl IceProvider {
    /// A provider for a relay listening on `endpoints`' ports.
    pub fn new(
        credentials: TurnCredentials,
        endpoints: TurnEndpoints,
        host: Option<String>,
        ttl: Duration,
    ) -> Self {
        IceProvider {
            credentials,
            endpoints,
            host,
            ttl,
        }
    }

    /// `{"iceServers":[...],"expiresAt":N}` for `user`, for apps that do their own signaling
    /// (`/api/turn-credentials`). `None` if no host is configured and the request names none.
    pub fn ice_servers_json<B>(&self, req: &Request<B>, user: &str) -> Option<String> {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => request_host(req)?,
        };
        let endpoints = TurnEndpoints {
            host,
            ..self.endpoints.clone()
        };
        let servers =
            self.credentials
                .ice_servers(user, std::time::SystemTime::now(), self.ttl, &endpoints);
        serde_json::to_string(&servers).ok()
    }

    /// The generator for one connection: the URLs name the configured host, or else the host the
    /// browser used to reach this server (which is what it can reach the relay by, too).
    fn for_request<B>(self: &Arc<Self>, req: &Request<B>) -> Option<IceServersFor> {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => request_host(req)?,
        };
        let provider = self.clone();
        Some(Arc::new(move |id: ClientId| {
            let endpoints = TurnEndpoints {
                host: host.clone(),
                ..provider.endpoints.clone()
            };
            let servers = provider.credentials.ice_servers(
                &id.to_string(),
                std::time::SystemTime::now(),
                provider.ttl,
                &endpoints,
            );
            serde_json::value::to_raw_value(&servers.ice_servers).ok()
        }))
    }
}

/// The host name (without port) the client addressed, if it is a plain name or address.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    let host = if host.starts_with('[') {
        &host[1..host.find(']')?]
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    plain.then(|| host.to_ascii_lowercase())
}

/// Whether the upgrade's query string opts in to sequence numbers and acknowledgements (`seq=1`).
fn wants_seq(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair == "seq=1"))
}
