//! The backend HTTP API: pushes, rooms, presence, batches, stats, metrics,
//! health and readiness, for services in any language (docs/API.md, with
//! the OpenAPI file docs/openapi.yaml).
//!
//! Owns: the API listener and its thread (`sb-admin`), which runs hyper
//! (HTTP/1.1, keep-alive) on a current-thread tokio runtime of its own,
//! away from the io_uring workers. Each client connection is a task, so a
//! slow or silent client holds only its own task: no head-of-line
//! blocking. The event loop reads and checks requests and answers
//! `/healthz` and `/readyz` itself; every other route runs on the
//! runtime's blocking pool (`WAIT_THREADS` threads), where a large batch
//! or a wait for the store (reliable pushes, inbox queries) holds one
//! thread and nothing else.
//! Must not: touch a worker's state. Every route maps to `Handle` methods
//! (mailboxes and direct writes), as an embedder's code would call them.
//!
//! Framing is hyper's (RFC 9112): a body is delimited by
//! `Transfer-Encoding: chunked` or by one `Content-Length`; different
//! `Content-Length`s are a 400; with both headers the body is framed by
//! `Transfer-Encoding` alone and the connection closed after the answer,
//! so bytes a front end might have framed otherwise are never read as a
//! request.
//!
//! Order of checks, each before anything is buffered past the head:
//! the route (404/405), then for every route each header those checks
//! read at most once (`guard::single_valued`, 400), then for every route
//! but `/healthz` and `/readyz`: `Host` (`guard::Hosts`), cross-site
//! (`guard::cross_site`), the key (`guard::Keys`), the content type of a
//! write (`guard::body_kind`), the body's declared length (413), and last
//! the body, read within `admin.body_timeout_ms` and at most its limit.
//! Bodies of batch and list routes longer than `admin.max_body_bytes`
//! (or chunked) are read and run `LARGE_AT_ONCE` at a time; a single-payload body is at most
//! `admin.max_body_bytes`, so what bodies hold is bounded whatever the
//! number of clients. The blocking pool's queue is bounded by
//! `admin.max_connections` (hyper runs one request per connection at a
//! time).
//! The head is bounded by hyper itself (`HEAD_BUF_BYTES`,
//! `MAX_HEADERS`) and must arrive within `admin.header_timeout_ms`, which
//! also closes a keep-alive connection left idle that long.

mod guard;
mod routes;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use serde_json::{json, Value};

use crate::config::AdminConfig;
use crate::proto::http as h1;
use crate::server::Handle;
use routes::{Route, Style};

/// Largest request head hyper buffers (its read buffer): a longer head is
/// answered 431 and the connection closed, whatever its bytes.
const HEAD_BUF_BYTES: usize = 16 * 1024;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 64;
/// Threads that run requests (and wait for the store on their behalf).
const WAIT_THREADS: usize = 64;
/// Batch and list requests (bodies up to `admin.max_batch_bytes`) read and
/// run at once; more wait their turn. Bounds what large bodies hold in
/// memory to this many times `max_batch_bytes` (and their parsed
/// commands), whatever the number of clients.
const LARGE_AT_ONCE: usize = 4;

/// The limits the API holds every client to (`[admin]`).
struct Limits {
    max_connections: usize,
    max_body: usize,
    max_batch_body: usize,
    header_timeout: Duration,
    body_timeout: Duration,
    lists: routes::Lists,
}

/// What every request task shares.
struct Ctx {
    handle: Handle,
    keys: guard::Keys,
    hosts: guard::Hosts,
    limits: Limits,
    bench: bool,
    /// Connections open now.
    open: AtomicUsize,
    /// Permits for large requests ([`LARGE_AT_ONCE`]).
    large: tokio::sync::Semaphore,
}

/// A running API listener.
pub struct Admin {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// Serves `handle` on `listener` from a thread of its own, with the
    /// keys and limits of `cfg`. The server binds `listener` before its
    /// workers start, so that the API takes connections before the client
    /// ports do (`ServerBuilder::start`).
    pub fn start(listener: std::net::TcpListener, handle: Handle, cfg: &AdminConfig) -> io::Result<Admin> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(WAIT_THREADS)
            .thread_name("sb-admin-wait")
            .build()?;
        let ctx = Arc::new(Ctx {
            handle,
            keys: guard::Keys { write: cfg.token.clone(), read: cfg.read_token.clone() },
            hosts: guard::Hosts { listen: addr, allowed: cfg.allowed_hosts.clone() },
            limits: Limits {
                max_connections: cfg.max_connections,
                max_body: cfg.max_body_bytes,
                max_batch_body: cfg.max_batch_bytes,
                header_timeout: Duration::from_millis(cfg.header_timeout_ms),
                body_timeout: Duration::from_millis(cfg.body_timeout_ms),
                lists: routes::Lists { max_items: cfg.max_batch_commands },
            },
            bench: cfg.bench_endpoints,
            open: AtomicUsize::new(0),
            large: tokio::sync::Semaphore::new(LARGE_AT_ONCE),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("sb-admin".into()).spawn(move || {
            rt.block_on(serve(listener, ctx, stopped));
            // Requests still waiting for the store are not waited for.
            rt.shutdown_background();
        })?;
        Ok(Admin { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Holds one of `admin.max_connections` while a connection is served.
struct OpenGuard(Arc<Ctx>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(listener: std::net::TcpListener, ctx: Arc<Ctx>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin API: cannot register its listener; the API is off");
            return;
        }
    };
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, most likely: back off rather than spin.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if ctx.open.fetch_add(1, Ordering::Relaxed) >= ctx.limits.max_connections {
            // Over the limit: closed at once, so that a client holding
            // connections open cannot take the process's descriptors.
            ctx.open.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let guard = OpenGuard(ctx.clone());
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let ctx = guard.0.clone();
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(answer(req, &ctx).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(guard.0.limits.header_timeout)
                .max_buf_size(HEAD_BUF_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(true)
                // A client that shut its write side after its request
                // still gets the answer: without this, hyper ended the
                // connection at the read's end of file and dropped the
                // request half-way (a push stored, never answered).
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            drop(guard);
        });
    }
}

/// A JSON response; 503s carry `Retry-After`, a 401 `WWW-Authenticate`.
fn respond(status: u16, body: &Value) -> Response<Full<Bytes>> {
    respond_bytes(status, Bytes::from(body.to_string()))
}

/// A response with a JSON body already serialised.
fn respond_bytes(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == 503 || status == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == 401 {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn refused(r: guard::Refusal) -> Response<Full<Bytes>> {
    respond(r.status, &json!({ "error": r.error }))
}

/// An answer that also ends the connection (its request's framing or head
/// cannot be trusted to find the next one).
fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Decodes the query string; a bad escape or non-UTF-8 is a 400.
fn query(q: Option<&str>) -> Result<Vec<(String, String)>, &'static str> {
    let words = |e| match e {
        h1::PercentError::BadEscape => "a query parameter has a % not followed by two hex digits",
        h1::PercentError::NotUtf8 => "a query parameter is not UTF-8 once percent-decoded",
    };
    h1::query_pairs(q.unwrap_or(""))
        .map(|(k, v)| Ok((h1::percent_decode(k).map_err(words)?, h1::percent_decode(v).map_err(words)?)))
        .collect()
}

async fn answer(req: Request<Incoming>, ctx: &Arc<Ctx>) -> Response<Full<Bytes>> {
    let entry = match routes::find(req.method().as_str(), req.uri().path(), ctx.bench) {
        Ok(e) => e,
        Err(Some(allowed)) => {
            let msg = format!("{} takes {allowed}, not {}", req.uri().path(), req.method());
            let mut r = respond(405, &json!({ "error": msg }));
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
            return r;
        }
        Err(None) => {
            return respond(404, &json!({ "error": format!("no route for {} {}", req.method(), req.uri().path()) }))
        }
    };
    if let Err(r) = guard::single_valued(req.headers()) {
        return refused(r);
    }
    if entry.scope != guard::Scope::Public {
        let checks = ctx
            .hosts
            .check(req.headers())
            .and_then(|()| guard::cross_site(req.headers()))
            .and_then(|()| ctx.keys.check(req.headers(), entry.scope));
        if let Err(r) = checks {
            return refused(r);
        }
    }
    let raw = if req.method() == Method::POST {
        match guard::body_kind(req.headers()) {
            Ok(kind) => kind == guard::Body::Raw,
            Err(r) => return refused(r),
        }
    } else {
        false
    };
    let q = match query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return respond(400, &json!({ "error": e })),
    };
    let big = matches!(entry.route, Route::Batch | Route::Presence | Route::RoomSizes)
        || (entry.route == Route::Push && entry.style == Style::V1 && !raw);
    let limit = if big { ctx.limits.max_batch_body } else { ctx.limits.max_body };
    let body = req.into_body();
    // A body that may be longer than a single payload's limit (declared
    // so, or chunked) takes a permit, held until the answer is built: the
    // bodies, commands and answers of at most LARGE_AT_ONCE such requests
    // are in memory at once. Small ones (a single push) never wait here.
    let large = big && body.size_hint().upper().is_none_or(|n| n > ctx.limits.max_body as u64);
    let _large = if large { ctx.large.acquire().await.ok() } else { None };
    if body.size_hint().lower() > limit as u64 {
        return closing(respond(413, &json!({ "error": format!("body larger than {limit} bytes") })));
    }
    let body = match tokio::time::timeout(ctx.limits.body_timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return closing(respond(413, &json!({ "error": format!("body larger than {limit} bytes") })));
        }
        Ok(Err(_)) => {
            let msg = "the request body ended before its Content-Length (or its last chunk)";
            return closing(respond(400, &json!({ "error": msg })));
        }
        Err(_) => {
            let ms = ctx.limits.body_timeout.as_millis();
            return closing(respond(408, &json!({ "error": format!("request body not complete within {ms} ms") })));
        }
    };
    if entry.route == Route::Metrics {
        // Read from counters, no per-connection walk: cheap enough for the
        // event loop (docs/METRICS.md).
        let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(&ctx.handle))));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
        return r;
    }
    if entry.scope == guard::Scope::Public {
        // Health and readiness answer on the event loop, never queued
        // behind other requests.
        let call = routes::Call { entry, query: &q, body: &body, raw, lists: ctx.limits.lists };
        let (status, json) = routes::finish(routes::call(&ctx.handle, &call), Instant::now());
        return respond_bytes(status, Bytes::from(json));
    }
    // Everything else runs on the blocking pool: a batch of 100,000
    // commands or a wait for the store holds one of its threads, not the
    // event loop that every other client's requests go through.
    // The 10 s bound on a wait for the store counts from the request's
    // arrival, not from when a thread took it: with every thread waiting
    // on a stalled store, a request queued behind them got a wait of its
    // own after theirs (the 65th push's 504 came after 20 s, the 129th's
    // after 30). One that finds its time gone before it starts is answered
    // 503 with nothing done, so a retry is safe.
    let arrived = Instant::now();
    let (handle, lists) = (ctx.handle.clone(), ctx.limits.lists);
    let answered = tokio::task::spawn_blocking(move || {
        let deadline = arrived + routes::STORE_WAIT;
        if Instant::now() >= deadline {
            let refused =
                json!({ "error": "every thread was waiting on the store for this request's 10 s; nothing was done" });
            return (503, Bytes::from(refused.to_string()));
        }
        let call = routes::Call { entry, query: &q, body: &body, raw, lists };
        let (status, json) = routes::finish(routes::call(&handle, &call), deadline);
        (status, Bytes::from(json))
    })
    .await;
    match answered {
        Ok((status, body)) => respond_bytes(status, body),
        Err(_) => respond(500, &json!({ "error": "the request failed inside the server" })),
    }
}
