//! The plain-HTTP listener: `/healthz`, and a 308 to the same path over HTTPS for everything else.
//!
//! It never serves content over plain HTTP. The redirect target is the configured public URL, or
//! the request's `Host` with the HTTPS port; a `Host` that is not a plain hostname or address is
//! refused rather than echoed into `Location`.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::routes::health;
use super::{text_response, Body, ConnectionSettings};
use crate::config::PublicUrl;
use crate::limits::ConnectionLimit;
use crate::metrics::{Metrics, RouteClass};
use crate::shutdown::Shutdown;

/// Where redirects point.
#[derive(Debug, Clone)]
pub struct RedirectTarget {
    /// The configured public origin, if any.
    pub public_url: Option<PublicUrl>,
    /// The HTTPS port to put after the client's host when there is no public URL.
    pub https_port: u16,
}

impl RedirectTarget {
    fn location<B>(&self, req: &Request<B>) -> Option<String> {
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Some(url) = &self.public_url {
            return Some(format!("{url}{path_and_query}"));
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())?;
        let host = strip_port(host)?;
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !valid {
            return None;
        }
        Some(if self.https_port == 443 {
            format!("https://{host}{path_and_query}")
        } else {
            format!("https://{host}:{}{path_and_query}", self.https_port)
        })
    }
}

/// `example.com:8080` → `example.com`, `[::1]:8080` → `[::1]`.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        let end = host.find(']')?;
        return Some(&host[..=end]);
    }
    Some(host.split(':').next().unwrap_or(host))
}

fn redirect<B>(target: &RedirectTarget, req: &Request<B>) -> Response<Body> {
    if req.uri().path() == "/healthz" {
        return health(req, "ok\n");
    }
    let Some(location) = target.location(req) else {
        return text_response(StatusCode::BAD_REQUEST, "missing or invalid Host header\n");
    };
    let mut response = text_response(StatusCode::PERMANENT_REDIRECT, "use HTTPS\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Accepts plain-HTTP connections until shutdown and redirects them.
pub async fn serve_redirects(
    listener: TcpListener,
    target: RedirectTarget,
    settings: ConnectionSettings,
    limit: Arc<ConnectionLimit>,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let target = Arc::new(target);
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let builder = Arc::new(builder);
    loop {
        let tcp = tokio::select! {
            _ = shutdown.recv() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    super::accept_error(e).await;
                    continue;
                }
            },
        };
        let Some(permit) = limit.try_admit() else {
            continue;
        };
        let target = target.clone();
        let builder = builder.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let idle_timeout = settings.idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = redirect(&target, &req);
                metrics
                    .http
                    .record(RouteClass::Redirect, response.status().as_u16());
                async move { Ok::<_, Infallible>(response) }
            });
            super::serve_connection(&builder, tcp, service, idle_timeout, shutdown).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(target: &RedirectTarget, host: &str, path: &str) -> Option<String> {
        let req = Request::builder()
            .uri(path)
            .header("host", host)
            .body(())
            .unwrap();
        target.location(&req)
    }

    #[test]
    fn keeps_host_and_path_and_swaps_the_port() {
        let target = RedirectTarget {
            public_url: None,
            https_port: 8443,
        };
        assert_eq!(
            location(&target, "example.com:8080", "/a/b?c=1").as_deref(),
            Some("https://example.com:8443/a/b?c=1")
        );
        assert_eq!(
            location(&target, "[::1]:8080", "/").as_deref(),
            Some("https://[::1]:8443/")
        );
        assert_eq!(location(&target, "evil.com/x", "/"), None);
        let public = RedirectTarget {
            public_url: Some(
                crate::config::Config::from_options(crate::config::Options {
                    public_url: Some("https://call.example.com".into()),
                    ..Default::default()
                })
                .unwrap()
                .public_url
                .unwrap(),
            ),
            https_port: 8443,
        };
        assert_eq!(
            location(&public, "anything", "/x").as_deref(),
            Some("https://call.example.com/x")
        );
    }
}
