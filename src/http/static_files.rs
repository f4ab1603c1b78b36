//! The web app in `public/`, served with hyper-staticfile, confined to that directory.
//!
//! hyper-staticfile handles content types, ETag/If-None-Match, Last-Modified, Range, HEAD and
//! precompressed `.br`/`.gz` siblings. This module adds what it does not: every path is checked
//! before it reaches the filesystem (no `..`, encoded slashes, backslashes, NUL or dotfiles), and the
//! file opener resolves symlinks and refuses anything whose real path is outside the root.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_staticfile::vfs::{FileOpener, FileWithMetadata};
use hyper_staticfile::{AcceptEncoding, ResolveResult, Resolver, ResponseBuilder};
use tokio::fs::File;

use super::{text_response, Body};

/// Opens files only if their canonical path lies inside the canonical root.
#[derive(Debug)]
struct ConfinedOpener {
    /// `public/`, canonicalised at startup.
    root: PathBuf,
}

impl FileOpener for ConfinedOpener {
    type File = File;
    type Future = Pin<Box<dyn Future<Output = io::Result<FileWithMetadata<File>>> + Send>>;

    fn open(&self, path: &Path) -> Self::Future {
        let root = self.root.clone();
        let requested = root.join(path);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let real = requested.canonicalize()?;
                if !real.starts_with(&root) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "path resolves outside the public directory",
                    ));
                }
                let handle = std::fs::File::open(&real)?;
                let metadata = handle.metadata()?;
                Ok(FileWithMetadata {
                    handle: File::from_std(handle),
                    size: metadata.len(),
                    modified: metadata.modified().ok(),
                    is_dir: metadata.is_dir(),
                })
            })
            .await
            .map_err(io::Error::other)?
        })
    }
}

/// Serves files from one directory.
pub struct StaticFiles {
    /// hyper-staticfile's resolver over the confined opener.
    resolver: Resolver<ConfinedOpener>,
}

impl std::fmt::Debug for StaticFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticFiles").finish_non_exhaustive()
    }
}

/// Why a request path is refused before touching the filesystem.
fn path_is_safe(raw_path: &str) -> bool {
    let lowered = raw_path.to_ascii_lowercase();
    // Encoded separators and NUL have no business in a file URL; refuse rather than interpret.
    if ["%2f", "%5c", "%00", "\\"]
        .iter()
        .any(|bad| lowered.contains(bad))
    {
        return false;
    }
    let decoded = match percent_decode(raw_path) {
        Some(decoded) => decoded,
        None => return false,
    };
    !decoded.contains('\0')
        && !decoded.contains('\\')
        && decoded.split('/').all(|segment| !segment.starts_with('.'))
}

/// Percent-decodes a path; `None` if the escapes are malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl StaticFiles {
    /// Serves `root`, which must exist.
    pub fn new(root: &Path) -> io::Result<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| io::Error::new(e.kind(), format!("public-dir {}: {e}", root.display())))?;
        if !root.is_dir() {
            return Err(io::Error::other(format!(
                "public-dir {}: not a directory",
                root.display()
            )));
        }
        let mut resolver = Resolver::with_opener(ConfinedOpener { root });
        resolver.allowed_encodings = AcceptEncoding::all();
        Ok(StaticFiles { resolver })
    }

    /// Answers a GET or HEAD for a file.
    pub async fn serve<B>(&self, req: &Request<B>) -> Response<Body> {
        if !path_is_safe(req.uri().path()) {
            return text_response(StatusCode::BAD_REQUEST, "bad path\n");
        }
        let resolved = match self.resolver.resolve_request(req).await {
            Ok(ResolveResult::PermissionDenied) => ResolveResult::NotFound,
            Ok(resolved) => resolved,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => ResolveResult::NotFound,
            Err(e) => {
                tracing::error!(path = req.uri().path(), "reading static file: {e}");
                return text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        };
        let (is_html, found) = match &resolved {
            ResolveResult::Found(file) => (
                file.content_type
                    .as_deref()
                    .is_some_and(|t| t.starts_with("text/html")),
                true,
            ),
            ResolveResult::NotFound => return text_response(StatusCode::NOT_FOUND, "not found\n"),
            _ => (false, false),
        };
        // hyper-staticfile answers If-Modified-Since but not If-None-Match. RFC 9110 §13.2.2: when
        // If-None-Match is present, If-Modified-Since is ignored; the ETag is compared below.
        let if_none_match = req.headers().get(header::IF_NONE_MATCH).cloned();
        let mut headers = req.headers().clone();
        if if_none_match.is_some() {
            headers.remove(header::IF_MODIFIED_SINCE);
        }
        let response = ResponseBuilder::new()
            .request_parts(req.method(), req.uri(), &headers)
            .cache_headers(Some(600))
            .build(resolved);
        let mut response = match response {
            Ok(response) => response.map(super::boxed),
            Err(e) => {
                tracing::error!(path = req.uri().path(), "building static response: {e}");
                return text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        };
        if found {
            let headers = response.headers_mut();
            headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
            // The page must be revalidated so a deploy is seen at once; assets may be cached briefly.
            let cache = if is_html {
                "no-cache"
            } else {
                "public, max-age=600, must-revalidate"
            };
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
            add_utf8_charset(headers);
            if let Some(condition) = if_none_match {
                let status_ok = response.status() == StatusCode::OK
                    || response.status() == StatusCode::PARTIAL_CONTENT;
                if status_ok && etag_matches(&condition, response.headers()) {
                    return not_modified(response);
                }
            }
        }
        response
    }
}

/// Whether an `If-None-Match` value matches the response's ETag (weak comparison, RFC 9110 §8.8.3.2).
fn etag_matches(condition: &HeaderValue, headers: &hyper::HeaderMap) -> bool {
    let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let etag = opaque(etag);
    condition.to_str().is_ok_and(|list| {
        list.split(',')
            .any(|candidate| candidate.trim() == "*" || opaque(candidate) == etag)
    })
}

/// Turns a 200 into a 304 that keeps the validators and caching headers and drops the body.
fn not_modified(response: Response<Body>) -> Response<Body> {
    let (mut parts, _body) = response.into_parts();
    parts.status = StatusCode::NOT_MODIFIED;
    for dropped in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_RANGE,
        header::CONTENT_ENCODING,
    ] {
        parts.headers.remove(dropped);
    }
    Response::from_parts(
        parts,
        super::boxed(http_body_util::Empty::new().map_err(|never| match never {})),
    )
}

/// Text files in `public/` are UTF-8; say so, so browsers never guess.
fn add_utf8_charset(headers: &mut hyper::HeaderMap) {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let textual = content_type.starts_with("text/") || content_type == "application/javascript";
    if textual && !content_type.contains("charset") {
        if let Ok(value) = HeaderValue::from_str(&format!("{content_type}; charset=utf-8")) {
            headers.insert(header::CONTENT_TYPE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_forms_are_refused() {
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E/%2E%2E/etc/passwd",
            "/scripts/..%2fclient.js",
            "/..%5cetc",
            "/a\\..\\b",
            "/%00",
            "/.git/config",
            "/%2e/x",
            "/%zz",
        ] {
            assert!(!path_is_safe(bad), "{bad} must be refused");
        }
        for good in ["/", "/index.html", "/scripts/client.js", "/a%20b.txt"] {
            assert!(path_is_safe(good), "{good} must be allowed");
        }
    }
}
