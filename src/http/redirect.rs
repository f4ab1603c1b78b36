//! The plain-HTTP listener: `/healthz`, ACME HTTP-01 challenge files when `acme-challenge-dir` is
//! set, and a 308 to the same path over HTTPS for everything else.
//!
//! It never serves the app over plain HTTP: challenge tokens are the only files it reads. The redirect target is the configured public URL, or
//! the request's `Host` with the HTTPS port; a `Host` that is not a plain hostname or address is
//! refused rather than echoed into `Location`.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::routes::health;
use super::{text_response, Admission, Body, ConnectionSettings};
use crate::config::values::PublicUrl;
use crate::metrics::{Metrics, RouteClass};
use crate::shutdown::Shutdown;

/// Where redirects point.
#[derive(Debug, Clone)]
pub struct RedirectTarget {
    /// The configured public origin, if any.
    pub public_url: Option<PublicUrl>,
    /// The HTTPS port to put after the client's host when there is no public URL.
    pub https_port: u16,
    /// Where an ACME client (certbot `--webroot`) writes HTTP-01 challenge tokens, if anywhere.
    pub acme_dir: Option<std::path::PathBuf>,
    /// The built-in ACME client's HTTP-01 answers, when `acme-domain` is set.
    pub acme_answers: Option<Arc<crate::acme::ChallengeAnswers>>,
}

/// The token of `/.well-known/acme-challenge/<token>`, if the path is one and the token is
/// made of the base64url characters ACME uses (so it can never name another file).
fn acme_token(path: &str) -> Option<&str> {
    let token = path.strip_prefix("/.well-known/acme-challenge/")?;
    let valid = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then_some(token)
}

/// Answers one plain-HTTP request.
async fn answer<B>(target: &RedirectTarget, req: &Request<B>) -> Response<Body> {
    let token = acme_token(req.uri().path());
    if let Some(key_authorization) = token.and_then(|t| target.acme_answers.as_ref()?.http01(t)) {
        return octets(key_authorization.into_bytes());
    }
    if let (Some(dir), Some(token)) = (&target.acme_dir, token) {
        return match tokio::fs::read(dir.join(token)).await {
            Ok(bytes) => octets(bytes),
            Err(_) => text_response(StatusCode::NOT_FOUND, "no such challenge\n"),
        };
    }
    redirect(target, req)
}

/// A 200 with `bytes` as an `application/octet-stream` body (a challenge answer).
fn octets(bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(super::boxed(
        http_body_util::Full::new(bytes::Bytes::from(bytes))
            .map_err(|never: Infallible| match never {}),
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
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
    admission: Admission,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let target = Arc::new(target);
    let builder = Arc::new(http1_builder(&settings));
    let gate = admission.clone();
    super::accept_until_shutdown(listener, &gate, shutdown, |accepted, shutdown| {
        let target = target.clone();
        let builder = builder.clone();
        let metrics = metrics.clone();
        let settings = settings.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let Some((_, tcp, _hold)) = admission.client(accepted).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let target = target.clone();
                let metrics = metrics.clone();
                async move {
                    let response = answer(&target, &req).await;
                    metrics
                        .http
                        .record(RouteClass::Redirect, response.status().as_u16());
                    Ok::<_, Infallible>(response)
                }
            });
            super::serve_connection(&builder, tcp, service, &settings, shutdown).await;
        });
    })
    .await;
}

/// An HTTP/1.1-only builder with the header timeout, for the plain-HTTP listeners.
pub(super) fn http1_builder(settings: &ConnectionSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_tokens_cannot_name_other_files() {
        assert_eq!(
            acme_token("/.well-known/acme-challenge/abc-DEF_123"),
            Some("abc-DEF_123")
        );
        for bad in [
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/../secret",
            "/.well-known/acme-challenge/a/b",
            "/.well-known/acme-challenge/a.b",
            "/.well-known/acme-challenge/%2e%2e",
            "/other/abc",
        ] {
            assert_eq!(acme_token(bad), None, "{bad}");
        }
    }

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
            acme_dir: None,
            acme_answers: None,
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
                .http
                .public_url
                .unwrap(),
            ),
            https_port: 8443,
            acme_dir: None,
            acme_answers: None,
        };
        assert_eq!(
            location(&public, "anything", "/x").as_deref(),
            Some("https://call.example.com/x")
        );
    }

    #[tokio::test]
    async fn answers_http01_from_the_built_in_acme_client() {
        let answers = crate::acme::ChallengeAnswers::new();
        answers.add_http01("tok-1".into(), "tok-1.thumbprint".into());
        let target = RedirectTarget {
            public_url: None,
            https_port: 443,
            acme_dir: None,
            acme_answers: Some(answers.clone()),
        };
        let request = |path: &str| {
            Request::builder()
                .uri(path)
                .header("host", "call.example.com")
                .body(())
                .unwrap()
        };
        let found = answer(&target, &request("/.well-known/acme-challenge/tok-1")).await;
        assert_eq!(found.status(), StatusCode::OK);
        let body = found.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"tok-1.thumbprint");
        answers.clear();
        let gone = answer(&target, &request("/.well-known/acme-challenge/tok-1")).await;
        assert_eq!(gone.status(), StatusCode::PERMANENT_REDIRECT);
    }
}
