//! The coordinator's web page and `/metrics` (`mr coordinator --http
//! ADDR`): axum on hyper, over TLS with a certificate of the cluster CA
//! (plain HTTP with `--insecure`).
//!
//! Who may look: a request with `Authorization: Bearer <client token>`
//! (scripts, Prometheus), or a browser holding the session cookie it got
//! by opening `/?token=<client token>`, the URL the coordinator logs at
//! start (as Jupyter does). The cookie is derived from the token, not the
//! token itself, and is `HttpOnly`, `Secure`, `SameSite=Strict`, named
//! for the port (two coordinators on one host keep theirs apart); a POST
//! must also carry `X-Requested-By: mr`, which a cross-site form cannot.
//! Every request must name this coordinator in its `Host` header (one of
//! `--http-name`, this machine's names, the address it listens on), which
//! stops DNS rebinding, with `--insecure` too.
//!
//! ```text
//! /                          the page (index.html, app.js, style.css)
//! /api/jobs                  every job's summary (JSON)
//! /api/jobs/JOB              one job: summary, report, each task's state
//! /api/jobs/JOB/cancel       POST: cancel it
//! /api/workers               live workers
//! /api/events[?job=JOB]      server-sent events: `overview` (jobs, workers,
//!                            and JOB as /api/jobs/JOB) on every change
//! /metrics                   Prometheus text format
//! ```

mod metrics;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use mr_core::ids::JobId;
use mr_core::rpc::RpcError;
use mr_core::tls::TokenKind;
use tokio::net::TcpListener;

use crate::engine::Shared;
use crate::state::Now;

/// At most this many connections at once (a browser tab holds one event
/// stream), and from one address.
const MAX_CONNECTIONS: usize = 256;
const PER_ADDRESS: usize = 32;
/// A connection must finish its TLS handshake, and send a request's
/// headers, within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an event stream looks for changes it was not told about
/// (heartbeat ages, progress), and how long it gathers changes.
const TICK: Duration = Duration::from_secs(1);
const GATHER: Duration = Duration::from_millis(150);
/// How long a browser keeps its session cookie.
const SESSION_SECONDS: u64 = 30 * 24 * 3600;
/// Headers on every answer: no sniffing, no referrer (a URL never leaves
/// with a token), and what the page may load.
const CSP: &str = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

#[derive(Clone)]
struct Web {
    shared: Arc<Shared>,
    /// What the `Host` header may name (lower case, no port).
    hosts: Arc<HashSet<String>>,
    /// The session cookie's name: `mr_session_<port>`.
    cookie: Arc<str>,
}

/// Serves the page on `listener` (TLS with `tls`) until the future is
/// dropped (which drops every connection with it); `names` are the host
/// names and addresses requests may name.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    names: Vec<String>,
) {
    let local = listener.local_addr().ok();
    let mut hosts: HashSet<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    if let Some(a) = local.filter(|a| !a.ip().is_unspecified()) {
        hosts.insert(a.ip().to_string());
    }
    let web = Web {
        shared,
        hosts: Arc::new(hosts),
        cookie: format!("mr_session_{}", local.map_or(0, |a| a.port())).into(),
    };
    let app = router(web);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let per_address: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    // Owned here: dropping this future drops every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("web: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&per_address, peer.ip(), connections.len()) else {
            tracing::debug!(%peer, "web: too many connections; dropped one");
            continue;
        };
        let (app, acceptor) = (app.clone(), acceptor.clone());
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let served =
                match acceptor {
                    None => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "web: TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => return,
                            };
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                };
            if let Err(e) = served {
                tracing::debug!(%peer, "web: connection ended: {e}");
            }
        });
    }
}

/// A connection's place among [`MAX_CONNECTIONS`] and its address's
/// [`PER_ADDRESS`], given back when dropped.
struct Slot {
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Slot {
    fn take(
        counts: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        open: usize,
    ) -> Option<Slot> {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(ip).or_default();
        if open >= MAX_CONNECTIONS || *n >= PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// The host a `Host` header names, without its port, lower case.
fn host_of(header: &str) -> String {
    let h = header.trim();
    let bare = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => h,
        }
    };
    bare.to_ascii_lowercase()
}

/// Refuses a request whose `Host` is not this coordinator's (DNS
/// rebinding), and puts the security headers on every answer.
async fn guard(
    Extract(web): Extract<Web>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of)
        .or_else(|| request.uri().host().map(str::to_ascii_lowercase));
    let mut response = match host {
        Some(h) if web.hosts.contains(&h) => next.run(request).await,
        _ => (
            StatusCode::MISDIRECTED_REQUEST,
            "this coordinator does not answer to that host name: use one it was started with (mr coordinator --http-name NAME)\n",
        )
            .into_response(),
    };
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/style.css", get(|| async { asset("text/css", STYLE) }))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/cancel", post(cancel))
        .route("/api/workers", get(workers))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page\n") })
        .layer(axum::middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Why a request was not answered.
#[derive(Debug)]
pub(super) struct WebError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if self.status != StatusCode::UNAUTHORIZED {
            return (self.status, format!("{}\n", self.message)).into_response();
        }
        let mut r = (
            self.status,
            format!(
                "not authorized: {}\n\nOpen the URL `mr coordinator` logged at start (it ends in ?token=...), or send Authorization: Bearer <the client token>: the token is client.token in the coordinator's state directory.\n",
                self.message
            ),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"mr\""),
        );
        // A stranger does not keep a connection open.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

impl From<RpcError> for WebError {
    fn from(e: RpcError) -> Self {
        let status = match &e {
            RpcError::UnknownJob(_) => StatusCode::NOT_FOUND,
            RpcError::Invalid(_) | RpcError::Refused(_) => StatusCode::BAD_REQUEST,
            RpcError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RpcError::UnknownWorker | RpcError::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        WebError {
            status,
            message: e.to_string(),
        }
    }
}

fn refused(why: impl std::fmt::Display) -> WebError {
    WebError {
        status: StatusCode::UNAUTHORIZED,
        message: why.to_string(),
    }
}

impl Web {
    /// Lets the request through if it carries the client token or the
    /// session cookie (anything goes with `--insecure`).
    fn check(&self, headers: &HeaderMap) -> Result<(), WebError> {
        let Some(authority) = &self.shared.authority else {
            return Ok(());
        };
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let text = auth.to_str().unwrap_or("");
            let Some(token) = text.strip_prefix("Bearer ") else {
                return Err(refused("the Authorization header is not `Bearer <token>`"));
            };
            return authority
                .check_token(TokenKind::Client, token)
                .map_err(refused);
        }
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(k, v)| k == &*self.cookie && authority.is_web_session(v));
        if session {
            Ok(())
        } else {
            Err(refused("no token and no session"))
        }
    }
}

async fn index(
    Extract(web): Extract<Web>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if let (Some(token), Some(authority)) = (query.get("token"), &web.shared.authority) {
        // The token is traded for a cookie, and the URL cleaned of it: a
        // page (not a redirect, after which a link followed from another
        // site would not send a SameSite=Strict cookie) that goes to `/`.
        authority
            .check_token(TokenKind::Client, token)
            .map_err(refused)?;
        let cookie = format!(
            "{}={}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; Secure; SameSite=Strict",
            web.cookie,
            authority.web_session()
        );
        return Ok((
            [
                (header::SET_COOKIE, cookie),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
            Html(
                "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0; url=/\"><title>mr coordinator</title><p>Signed in; <a href=\"/\">go on to the page</a>.</p>",
            ),
        )
            .into_response());
    }
    web.check(&headers)?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(INDEX)).into_response())
}

/// Every job, as the page lists them.
async fn job_list(web: &Web) -> Result<Vec<serde_json::Value>, RpcError> {
    let summaries = web.shared.state(|s, _| s.summaries()).await?;
    Ok(summaries.into_iter().map(job_json).collect())
}

/// A job summary in JSON.
fn job_json(s: mr_core::rpc::JobSummary) -> serde_json::Value {
    serde_json::to_value(&s).expect("a summary serializes")
}

async fn jobs(Extract(web): Extract<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    web.check(&headers)?;
    Ok(Json(job_list(&web).await?).into_response())
}

/// One job: its summary, report and each task's state.
async fn job_detail(web: &Web, job: JobId) -> Result<serde_json::Value, RpcError> {
    let (summary, report, states) = web
        .shared
        .state(move |s, _| {
            let (summary, report) = s.detail(&job)?;
            Ok::<_, RpcError>((summary, report, s.task_states(&job)?))
        })
        .await??;
    Ok(serde_json::json!({
        "summary": job_json(summary),
        "report": report,
        "states": states,
        "now_ms": mr_core::now_ms(),
    }))
}

fn job_id(text: String) -> Result<JobId, WebError> {
    let id = JobId(text);
    if id.is_valid() {
        Ok(id)
    } else {
        Err(WebError {
            status: StatusCode::BAD_REQUEST,
            message: "not a job id".into(),
        })
    }
}

async fn job(
    Extract(web): Extract<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    web.check(&headers)?;
    Ok(Json(job_detail(&web, job_id(id)?).await?).into_response())
}

async fn cancel(
    Extract(web): Extract<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    web.check(&headers)?;
    if headers.get("x-requested-by").and_then(|v| v.to_str().ok()) != Some("mr") {
        return Err(WebError {
            status: StatusCode::FORBIDDEN,
            message: "a POST needs the header X-Requested-By: mr".into(),
        });
    }
    let id = job_id(id)?;
    tracing::info!(job = %id, "cancelled from the web page");
    let s = web
        .shared
        .state(move |s, now| s.cancel(now, &id, false))
        .await??;
    Ok(Json(job_json(s)).into_response())
}

async fn worker_list(web: &Web) -> Result<Vec<crate::state::WorkerView>, RpcError> {
    web.shared.state(|s, now: Now| s.worker_views(now.at)).await
}

async fn workers(Extract(web): Extract<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    web.check(&headers)?;
    Ok(Json(worker_list(&web).await?).into_response())
}

/// An event stream: `next` makes the event's data; it is sent when it
/// differs from the last one sent, looked at when a job changes (gathered
/// for [`GATHER`]) and every [`TICK`]. It ends when the coordinator
/// stops (or the job is forgotten).
fn changes<F, Fut>(
    web: Web,
    name: &'static str,
    next: F,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: Fn(Web) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, RpcError>> + Send,
{
    let next = Arc::new(next);
    futures::stream::unfold((web, String::new(), true), move |(web, last, first)| {
        let next = next.clone();
        async move {
            loop {
                if !first || !last.is_empty() {
                    let changed = web.shared.jobs.notified();
                    tokio::select! {
                        _ = changed => tokio::time::sleep(GATHER).await,
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
                let data = match next(web.clone()).await {
                    Ok(v) => v.to_string(),
                    Err(e) => {
                        let gone = Event::default().event("gone").data(e.to_string());
                        // Told once; the stream then ends.
                        return if last == "gone" {
                            None
                        } else {
                            Some((Ok(gone), (web, "gone".to_string(), false)))
                        };
                    }
                };
                if data != last {
                    let event = Event::default().event(name).data(&data);
                    return Some((Ok(event), (web, data, false)));
                }
            }
        }
    })
}

/// What an event stream keeps between looks: the open job's detail and
/// the version it was made at (a finished job's detail is made once; a
/// running one's once per look, for its attempts' progress).
#[derive(Default)]
struct Seen {
    detail: Option<(u64, serde_json::Value)>,
}

async fn events(
    Extract(web): Extract<Web>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    web.check(&headers)?;
    let job = query.get("job").cloned().map(job_id).transpose()?;
    let seen = Arc::new(tokio::sync::Mutex::new(Seen::default()));
    let stream = changes(web, "overview", move |web: Web| {
        let (job, seen) = (job.clone(), seen.clone());
        async move {
            let jobs = job_list(&web).await?;
            let workers = worker_list(&web).await?;
            let mut out = serde_json::json!({ "jobs": jobs, "workers": workers, "now_ms": mr_core::now_ms() });
            if let Some(id) = job {
                let summary = jobs.iter().find(|j| j["job"] == id.0.as_str());
                match summary {
                    None => out["job"] = serde_json::Value::Null,
                    Some(s) => {
                        let version = s["version"].as_u64().unwrap_or(0);
                        let over = s["finished_ms"].as_u64().is_some();
                        let mut seen = seen.lock().await;
                        let fresh = matches!(&seen.detail, Some((v, _)) if *v == version && over);
                        if !fresh {
                            seen.detail = Some((version, job_detail(&web, id).await?));
                        }
                        out["job"] = seen
                            .detail
                            .as_ref()
                            .map(|d| d.1.clone())
                            .unwrap_or_default();
                    }
                }
            }
            Ok(out)
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
