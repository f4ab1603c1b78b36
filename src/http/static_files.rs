//! The web app in `public/`, read into memory at startup and served from there.
//!
//! Loading once means a request never opens a file: an HTTP/2 client that opens 100 streams and
//! then stops reading holds no descriptor (it used to hold one per stream), and a response body is
//! a reference-counted slice of the loaded bytes. The price is a bound on the directory's size
//! (`public-dir-max-bytes`, startup fails with a clear error past it) and a restart to publish a
//! new version, which a deploy does anyway.
//!
//! What is served: content types by extension, strong ETags (a hash of the bytes) with
//! `If-None-Match`, `Last-Modified` with `If-Modified-Since`, `HEAD`, precompressed `.br`/`.gz`
//! siblings for clients that accept them, and ranges as [`super::ranges`] decides. What is never
//! served: dotfiles, anything whose real path (after symlinks) is outside the directory, and any
//! request path with `..`, encoded slashes, backslashes or NUL, which is refused before lookup.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::ranges::{self, RangePlan};
use super::{text_response, Body};

/// The most files `public/` may hold; more is a mistake (a build directory, a `node_modules`).
pub const MAX_FILES: usize = 10_000;

/// How deep directories may nest, which also stops symlink loops.
const MAX_DEPTH: usize = 32;

/// Why the web app directory cannot be served. Each names the directory and what to change.
#[derive(Debug, thiserror::Error)]
pub enum PublicDirError {
    /// The directory or one of its files cannot be read.
    #[error("public-dir {path}: {source}")]
    Read {
        /// The directory or file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The path is not a directory.
    #[error("public-dir {0}: not a directory")]
    NotADirectory(PathBuf),
    /// The files add up to more than the configured budget.
    #[error(
        "public-dir {dir}: the files add up to more than {max_bytes} bytes, which callgate would \
         hold in memory; remove what the web app does not need or raise public-dir-max-bytes"
    )]
    TooLarge {
        /// The directory.
        dir: PathBuf,
        /// The budget (`public-dir-max-bytes`).
        max_bytes: u64,
    },
    /// More files than [`MAX_FILES`].
    #[error("public-dir {dir}: more than {max} files; point public-dir at the built web app only")]
    TooManyFiles {
        /// The directory.
        dir: PathBuf,
        /// The limit.
        max: usize,
    },
}

/// One stored body: a file, or a precompressed sibling of it.
#[derive(Debug, Clone)]
struct Representation {
    /// The bytes, shared by every response that sends them.
    bytes: Bytes,
    /// A strong validator: a hash of `bytes`.
    etag: HeaderValue,
    /// The file's modification time, whole seconds since the epoch (HTTP dates have no more).
    modified: u64,
    /// `modified` as an HTTP date.
    last_modified: HeaderValue,
}

/// A file and its precompressed siblings.
#[derive(Debug, Clone)]
struct Entry {
    /// `Content-Type`, with `charset=utf-8` for text.
    content_type: HeaderValue,
    /// Whether this is an HTML page (revalidated on every use rather than cached).
    is_html: bool,
    /// The file itself.
    identity: Representation,
    /// `<file>.br`, if present.
    brotli: Option<Representation>,
    /// `<file>.gz`, if present.
    gzip: Option<Representation>,
}

/// The files of one directory, held in memory.
pub struct StaticFiles {
    /// Relative paths with `/` separators (`scripts/client.js`) to their content.
    files: HashMap<String, Entry>,
    /// Relative paths of directories (`scripts`), to redirect `/scripts` to `/scripts/`.
    dirs: HashSet<String>,
    /// Total bytes held.
    total_bytes: u64,
}

impl std::fmt::Debug for StaticFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticFiles")
            .field("files", &self.files.len())
            .field("total_bytes", &self.total_bytes)
            .finish_non_exhaustive()
    }
}

/// Whether a request path may be looked up at all.
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

/// Collects files while walking the directory, within the budgets.
struct Loader {
    /// The canonical root; every file's real path must be inside it.
    root: PathBuf,
    /// The budget in bytes.
    max_bytes: u64,
    /// Relative path → (bytes, mtime).
    raw: HashMap<String, (Bytes, u64)>,
    /// Relative directory paths.
    dirs: HashSet<String>,
    /// Canonical directories already walked (symlink loops).
    walked: HashSet<PathBuf>,
    /// Bytes read so far.
    total: u64,
}

impl Loader {
    fn read_err(path: &Path) -> impl FnOnce(io::Error) -> PublicDirError + '_ {
        move |source| PublicDirError::Read {
            path: path.to_owned(),
            source,
        }
    }

    /// Reads `dir` (canonical, inside the root), whose relative path is `prefix`.
    fn walk(&mut self, dir: &Path, prefix: &str, depth: usize) -> Result<(), PublicDirError> {
        if depth > MAX_DEPTH || !self.walked.insert(dir.to_owned()) {
            return Ok(());
        }
        let entries = std::fs::read_dir(dir).map_err(Self::read_err(dir))?;
        for entry in entries {
            let entry = entry.map_err(Self::read_err(dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            // Symlinks are followed only to places inside the root.
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            if !real.starts_with(&self.root) {
                tracing::debug!(path = %path.display(), "not serving a link that leads outside public-dir");
                continue;
            }
            let relative = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let metadata = std::fs::metadata(&real).map_err(Self::read_err(&real))?;
            if metadata.is_dir() {
                self.dirs.insert(relative.clone());
                self.walk(&real, &relative, depth + 1)?;
            } else if metadata.is_file() {
                if self.raw.len() >= MAX_FILES {
                    return Err(PublicDirError::TooManyFiles {
                        dir: self.root.clone(),
                        max: MAX_FILES,
                    });
                }
                self.total = self.total.saturating_add(metadata.len());
                if self.total > self.max_bytes {
                    return Err(PublicDirError::TooLarge {
                        dir: self.root.clone(),
                        max_bytes: self.max_bytes,
                    });
                }
                let bytes = std::fs::read(&real).map_err(Self::read_err(&real))?;
                let modified = metadata
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                self.raw.insert(relative, (Bytes::from(bytes), modified));
            }
        }
        Ok(())
    }
}

impl Representation {
    fn new(bytes: Bytes, modified: u64) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let date = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(modified));
        Representation {
            bytes,
            etag: HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header"),
            modified,
            last_modified: HeaderValue::from_str(&date).expect("HTTP dates are valid headers"),
        }
    }
}

/// `Content-Type` for a file name, with `charset=utf-8` for text (the app's files are UTF-8).
fn content_type(name: &str) -> HeaderValue {
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let essence = mime.essence_str();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || essence == "application/javascript"
        || essence == "application/json"
        || essence == "image/svg+xml";
    let value = if textual {
        format!("{essence}; charset=utf-8")
    } else {
        essence.to_owned()
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

impl StaticFiles {
    /// Reads every file under `root` (which must be a directory) into memory, refusing more than
    /// `max_bytes` in total or more than [`MAX_FILES`] files.
    pub fn load(root: &Path, max_bytes: u64) -> Result<Self, PublicDirError> {
        let root = root.canonicalize().map_err(|source| PublicDirError::Read {
            path: root.to_owned(),
            source,
        })?;
        if !root.is_dir() {
            return Err(PublicDirError::NotADirectory(root));
        }
        let mut loader = Loader {
            root: root.clone(),
            max_bytes,
            raw: HashMap::new(),
            dirs: HashSet::new(),
            walked: HashSet::new(),
            total: 0,
        };
        loader.walk(&root, "", 0)?;
        let sibling = |name: &str, ext: &str| {
            loader
                .raw
                .get(&format!("{name}.{ext}"))
                .map(|(bytes, modified)| Representation::new(bytes.clone(), *modified))
        };
        let files = loader
            .raw
            .iter()
            .map(|(name, (bytes, modified))| {
                let content_type = content_type(name);
                let entry = Entry {
                    is_html: content_type.as_bytes().starts_with(b"text/html"),
                    content_type,
                    identity: Representation::new(bytes.clone(), *modified),
                    brotli: sibling(name, "br"),
                    gzip: sibling(name, "gz"),
                };
                (name.clone(), entry)
            })
            .collect();
        Ok(StaticFiles {
            files,
            dirs: loader.dirs,
            total_bytes: loader.total,
        })
    }

    /// How many files are held, and how many bytes they take.
    pub fn size(&self) -> (usize, u64) {
        (self.files.len(), self.total_bytes)
    }

    /// Answers a GET or HEAD for a file.
    pub fn serve<B>(&self, req: &Request<B>) -> Response<Body> {
        let raw_path = req.uri().path();
        if !path_is_safe(raw_path) {
            return text_response(StatusCode::BAD_REQUEST, "bad path\n");
        }
        let Some(decoded) = percent_decode(raw_path) else {
            return text_response(StatusCode::BAD_REQUEST, "bad path\n");
        };
        let relative = decoded.trim_start_matches('/');
        let key = if relative.is_empty() || relative.ends_with('/') {
            format!("{relative}index.html")
        } else {
            relative.to_owned()
        };
        let Some(entry) = self.files.get(&key) else {
            if self.dirs.contains(relative) {
                return redirect_to_directory(req);
            }
            return text_response(StatusCode::NOT_FOUND, "not found\n");
        };
        respond(entry, req)
    }
}

/// `/scripts` → 301 to `/scripts/` (keeping the query), as file servers do for directories.
fn redirect_to_directory<B>(req: &Request<B>) -> Response<Body> {
    let location = match req.uri().query() {
        Some(query) => format!("{}/?{query}", req.uri().path()),
        None => format!("{}/", req.uri().path()),
    };
    let mut response = text_response(StatusCode::MOVED_PERMANENTLY, "moved\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Which stored representation the client accepts best: Brotli, then gzip, then the file itself.
fn negotiate<'e>(
    entry: &'e Entry,
    headers: &HeaderMap,
) -> (&'e Representation, Option<&'static str>) {
    let accepts = |coding: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .any(|value| {
                value.to_str().is_ok_and(|list| {
                    list.split(',').any(|item| {
                        let mut parts = item.split(';');
                        let name = parts.next().unwrap_or("").trim();
                        let refused = parts.any(|p| {
                            p.trim()
                                .strip_prefix("q=")
                                .and_then(|q| q.trim().parse::<f32>().ok())
                                .is_some_and(|q| q <= 0.0)
                        });
                        name.eq_ignore_ascii_case(coding) && !refused
                    })
                })
            })
    };
    if let Some(br) = entry.brotli.as_ref().filter(|_| accepts("br")) {
        return (br, Some("br"));
    }
    if let Some(gz) = entry.gzip.as_ref().filter(|_| accepts("gzip")) {
        return (gz, Some("gzip"));
    }
    (&entry.identity, None)
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 §8.8.3.2).
fn etag_matches(condition: &HeaderValue, etag: &HeaderValue) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    let etag = opaque(etag);
    condition.to_str().is_ok_and(|list| {
        list.split(',')
            .any(|candidate| candidate.trim() == "*" || opaque(candidate) == etag)
    })
}

/// Whether the client's copy is current (RFC 9110 §13.2.2: If-None-Match wins over
/// If-Modified-Since).
fn not_modified(headers: &HeaderMap, representation: &Representation) -> bool {
    if let Some(condition) = headers.get(header::IF_NONE_MATCH) {
        return etag_matches(condition, &representation.etag);
    }
    headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|since| since.duration_since(UNIX_EPOCH).ok())
        .is_some_and(|since| representation.modified <= since.as_secs())
}

/// Whether a `Range` may be honoured: no `If-Range`, or one naming this exact representation
/// (strong comparison, §13.1.5) or its date.
fn if_range_holds(headers: &HeaderMap, representation: &Representation) -> bool {
    let Some(condition) = headers.get(header::IF_RANGE) else {
        return true;
    };
    if condition.as_bytes().starts_with(b"\"") {
        return condition == representation.etag;
    }
    condition
        .to_str()
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .is_some_and(|date| {
            date == UNIX_EPOCH + std::time::Duration::from_secs(representation.modified)
        })
}

fn empty_body() -> Body {
    super::boxed(Empty::new().map_err(|never| match never {}))
}

/// Largest body frame handed to the connection: bodies move in steps of this size, so a client
/// that stops reading stops the progress [`super::lifetime`] watches, and HTTP/2 buffers at most
/// a few frames per stream rather than the whole file.
pub const CHUNK: usize = 16 * 1024;

/// A stored body sent in [`CHUNK`]-sized, reference-counted slices (no copy).
struct Chunks {
    /// What is still to send.
    rest: Bytes,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, io::Error>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let take = self.rest.len().min(CHUNK);
        let chunk = self.rest.split_to(take);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

fn full_body(bytes: Bytes) -> Body {
    super::boxed(Chunks { rest: bytes })
}

/// The response for a found file.
fn respond<B>(entry: &Entry, req: &Request<B>) -> Response<Body> {
    let (representation, encoding) = negotiate(entry, req.headers());
    let mut response = Response::new(empty_body());
    let headers = response.headers_mut();
    headers.insert(header::ETAG, representation.etag.clone());
    headers.insert(header::LAST_MODIFIED, representation.last_modified.clone());
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    // The page must be revalidated so a deploy is seen at once; assets may be cached briefly.
    let cache = if entry.is_html {
        "no-cache"
    } else {
        "public, max-age=600, must-revalidate"
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if not_modified(req.headers(), representation) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    headers.insert(header::CONTENT_TYPE, entry.content_type.clone());
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(encoding) = encoding {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
    }
    let len = representation.bytes.len() as u64;
    let plan = match req.headers().get(header::RANGE) {
        Some(range) if if_range_holds(req.headers(), representation) => range
            .to_str()
            .map_or(RangePlan::Whole, |r| ranges::plan(r, len)),
        _ => RangePlan::Whole,
    };
    let head = req.method() == Method::HEAD;
    let (status, body) = match plan {
        RangePlan::Whole => (StatusCode::OK, representation.bytes.clone()),
        RangePlan::Unsatisfiable => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("valid header"),
            );
            headers.remove(header::CONTENT_ENCODING);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            (
                StatusCode::RANGE_NOT_SATISFIABLE,
                Bytes::from_static(b"range not satisfiable\n"),
            )
        }
        RangePlan::Partial(parts) if parts.len() == 1 => {
            let range = parts[0].clone();
            headers.insert(header::CONTENT_RANGE, content_range(&range, len));
            (
                StatusCode::PARTIAL_CONTENT,
                representation
                    .bytes
                    .slice(range.start as usize..range.end as usize),
            )
        }
        RangePlan::Partial(parts) => {
            let boundary = format!("{:016x}", rand::random::<u64>());
            let body = multipart(
                &representation.bytes,
                &parts,
                &entry.content_type,
                &boundary,
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
                    .expect("valid header"),
            );
            (StatusCode::PARTIAL_CONTENT, body)
        }
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if !head {
        *response.body_mut() = full_body(body);
    }
    response
}

/// `Content-Range: bytes first-last/len`.
fn content_range(range: &Range<u64>, len: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes {}-{}/{len}", range.start, range.end - 1))
        .expect("valid header")
}

/// A `multipart/byteranges` body (RFC 9110 §14.6). The ranges are disjoint and within the file, so
/// this is never larger than the file plus a short header per part.
fn multipart(
    bytes: &Bytes,
    parts: &[Range<u64>],
    content_type: &HeaderValue,
    boundary: &str,
) -> Bytes {
    let mut out = BytesMut::new();
    let content_type = content_type.to_str().unwrap_or("application/octet-stream");
    for range in parts {
        out.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\ncontent-type: {content_type}\r\ncontent-range: bytes {}-{}/{}\r\n\r\n",
                range.start,
                range.end - 1,
                bytes.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&bytes[range.start as usize..range.end as usize]);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out.freeze()
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

    fn app(files: &[(&str, &[u8])]) -> (tempfile::TempDir, StaticFiles) {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let files = StaticFiles::load(dir.path(), 1 << 20).unwrap();
        (dir, files)
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::get(path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap()
    }

    async fn body(response: Response<Body>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn serves_ranges_within_the_policy() {
        let (_dir, files) = app(&[("a.txt", b"0123456789")]);
        let one = files.serve(&request("/a.txt", &[("range", "bytes=2-4")]));
        assert_eq!(one.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(one.headers()["content-range"], "bytes 2-4/10");
        assert_eq!(&body(one).await[..], b"234");

        let two = files.serve(&request("/a.txt", &[("range", "bytes=0-0,-2")]));
        assert_eq!(two.status(), StatusCode::PARTIAL_CONTENT);
        let content_type = two.headers()["content-type"].to_str().unwrap().to_owned();
        let boundary = content_type.split("boundary=").nth(1).unwrap().to_owned();
        let text = String::from_utf8(body(two).await.to_vec()).unwrap();
        assert_eq!(
            text,
            format!(
                "\r\n--{boundary}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-range: bytes 0-0/10\r\n\r\n0\
                 \r\n--{boundary}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-range: bytes 8-9/10\r\n\r\n89\
                 \r\n--{boundary}--\r\n"
            )
        );

        let flood = format!("bytes={}", vec!["0-"; 2000].join(","));
        let whole = files.serve(&request("/a.txt", &[("range", &flood)]));
        assert_eq!(whole.status(), StatusCode::OK);
        assert_eq!(
            body(whole).await.len(),
            10,
            "the file once, not 2,000 times"
        );

        let beyond = files.serve(&request("/a.txt", &[("range", "bytes=10-")]));
        assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(beyond.headers()["content-range"], "bytes */10");

        let stale = files.serve(&request(
            "/a.txt",
            &[("range", "bytes=0-0"), ("if-range", "\"other\"")],
        ));
        assert_eq!(
            stale.status(),
            StatusCode::OK,
            "If-Range mismatch sends all"
        );
    }

    #[tokio::test]
    async fn conditional_requests_precompressed_siblings_and_directories() {
        let (_dir, files) = app(&[
            ("index.html", b"<p>hi</p>"),
            ("s/x.js", b"plain"),
            ("s/x.js.br", b"brotli"),
            ("s/x.js.gz", b"gzip"),
        ]);
        let page = files.serve(&request("/", &[]));
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(page.headers()["cache-control"], "no-cache");
        let etag = page.headers()["etag"].to_str().unwrap().to_owned();
        let again = files.serve(&request("/", &[("if-none-match", &etag)]));
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(body(again).await.is_empty());
        let date = page.headers()["last-modified"].to_str().unwrap().to_owned();
        let since = files.serve(&request("/", &[("if-modified-since", &date)]));
        assert_eq!(since.status(), StatusCode::NOT_MODIFIED);

        let br = files.serve(&request("/s/x.js", &[("accept-encoding", "gzip, br")]));
        assert_eq!(br.headers()["content-encoding"], "br");
        assert_eq!(&body(br).await[..], b"brotli");
        let gz = files.serve(&request("/s/x.js", &[("accept-encoding", "gzip, br;q=0")]));
        assert_eq!(gz.headers()["content-encoding"], "gzip");
        let plain = files.serve(&request("/s/x.js", &[]));
        assert!(!plain.headers().contains_key("content-encoding"));
        assert_eq!(&body(plain).await[..], b"plain");

        let dir = files.serve(&request("/s?a=1", &[]));
        assert_eq!(dir.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(dir.headers()["location"], "/s/?a=1");
        assert_eq!(
            files.serve(&request("/nope", &[])).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn refuses_a_directory_over_budget() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), vec![0u8; 600]).unwrap();
        std::fs::write(dir.path().join("b.bin"), vec![0u8; 600]).unwrap();
        let err = StaticFiles::load(dir.path(), 1000).unwrap_err();
        assert!(matches!(
            err,
            PublicDirError::TooLarge {
                max_bytes: 1000,
                ..
            }
        ));
        assert!(err.to_string().contains("public-dir-max-bytes"), "{err}");
        assert!(StaticFiles::load(dir.path(), 1200).is_ok());
    }
}
