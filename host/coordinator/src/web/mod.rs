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

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State as Extract};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use mr_core::ids::JobId;
use mr_core::rpc::RpcError;
use mr_core::tls::TokenKind;
use mr_http::HttpError;
use tokio::net::TcpListener;

use crate::engine::Shared;
use crate::state::Now;

/// How often an event stream looks for changes it was not told about
/// (heartbeat ages, progress), and how long it gathers changes.
const TICK: Duration = Duration::from_secs(1);
const GATHER: Duration = Duration::from_millis(150);
/// How long a browser keeps its session cookie.
const SESSION_SECONDS: u64 = 30 * 24 * 3600;
const INDEX: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

#[derive(Clone)]
struct Web {
    shared: Arc<Shared>,
    /// The session cookie's name: `mr_session_<port>`.
    cookie: Arc<str>,
    /// Job details, shared by the event streams.
    details: Arc<tokio::sync::Mutex<HashMap<JobId, Detail>>>,
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
    let port = listener.local_addr().map_or(0, |a| a.port());
    let web = Web {
        shared,
        cookie: format!("mr_session_{port}").into(),
        details: Arc::default(),
    };
    let tls = tls.map(|c| Arc::new(move || Some(c.clone())) as mr_http::TlsSource);
    mr_http::serve(router(web), listener, tls, Some(names), "web").await
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

/// What to send, said to one refused.
const HINT: &str = "Open the URL `mr coordinator` logged at start (it ends in ?token=...), or send Authorization: Bearer <the client token>: the token is client.token in the coordinator's state directory.";

fn rpc_error(e: RpcError) -> HttpError {
    let status = match &e {
        RpcError::UnknownJob(_) => StatusCode::NOT_FOUND,
        RpcError::Invalid(_) | RpcError::Refused(_) => StatusCode::BAD_REQUEST,
        RpcError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        RpcError::UnknownWorker | RpcError::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    HttpError::new(status, e.to_string())
}

fn refused(why: impl std::fmt::Display) -> HttpError {
    HttpError::unauthorized(why, HINT)
}

impl Web {
    /// Lets the request through if it carries the client token or the
    /// session cookie (anything goes with `--insecure`).
    fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        self.check_for(headers, &[TokenKind::Client])
    }

    /// Like [`Web::check`], taking tokens of the kinds `kinds` as bearers.
    fn check_for(&self, headers: &HeaderMap, kinds: &[TokenKind]) -> Result<(), HttpError> {
        let Some(authority) = &self.shared.authority else {
            return Ok(());
        };
        if let Some(token) = mr_http::bearer(headers) {
            let token = token.map_err(refused)?;
            // Checked as the kind it says it is, if that is one taken here.
            let kind = mr_core::tls::Token::parse(token)
                .ok()
                .map(|t| t.kind)
                .filter(|k| kinds.contains(k))
                .unwrap_or(kinds[0]);
            return authority.check_token(kind, token).map_err(refused);
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
) -> Result<Response, HttpError> {
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

async fn jobs(Extract(web): Extract<Web>, headers: HeaderMap) -> Result<Response, HttpError> {
    web.check(&headers)?;
    Ok(Json(job_list(&web).await.map_err(rpc_error)?).into_response())
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

fn job_id(text: String) -> Result<JobId, HttpError> {
    let id = JobId(text);
    if id.is_valid() {
        Ok(id)
    } else {
        Err(HttpError::new(StatusCode::BAD_REQUEST, "not a job id"))
    }
}

async fn job(
    Extract(web): Extract<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    web.check(&headers)?;
    Ok(Json(job_detail(&web, job_id(id)?).await.map_err(rpc_error)?).into_response())
}

async fn cancel(
    Extract(web): Extract<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    web.check(&headers)?;
    if headers.get("x-requested-by").and_then(|v| v.to_str().ok()) != Some("mr") {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "a POST needs the header X-Requested-By: mr",
        ));
    }
    let id = job_id(id)?;
    tracing::info!(job = %id, "cancelled from the web page");
    let s = web
        .shared
        .state(move |s, now| s.cancel(now, &id, false))
        .await
        .map_err(rpc_error)?
        .map_err(rpc_error)?;
    Ok(Json(job_json(s)).into_response())
}

async fn worker_list(web: &Web) -> Result<Vec<crate::state::WorkerView>, RpcError> {
    web.shared.state(|s, now: Now| s.worker_views(now.at)).await
}

async fn workers(Extract(web): Extract<Web>, headers: HeaderMap) -> Result<Response, HttpError> {
    web.check(&headers)?;
    Ok(Json(worker_list(&web).await.map_err(rpc_error)?).into_response())
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

/// A job's detail as last made, shared by every event stream: made again
/// only when the job changed, or (a running job, for its attempts'
/// progress) when it is older than [`TICK`]. So many open tabs cost the
/// event loop no more than one.
struct Detail {
    version: u64,
    made: std::time::Instant,
    value: Arc<serde_json::Value>,
}

/// Details kept at most (the jobs open in some tab).
const DETAILS_KEPT: usize = 64;

impl Web {
    async fn detail_of(
        &self,
        id: &JobId,
        version: u64,
        over: bool,
    ) -> Result<Arc<serde_json::Value>, RpcError> {
        {
            let details = self.details.lock().await;
            if let Some(d) = details.get(id) {
                if d.version == version && (over || d.made.elapsed() < TICK) {
                    return Ok(d.value.clone());
                }
            }
        }
        let value = Arc::new(job_detail(self, id.clone()).await?);
        let mut details = self.details.lock().await;
        if details.len() >= DETAILS_KEPT && !details.contains_key(id) {
            details.clear();
        }
        details.insert(
            id.clone(),
            Detail {
                version,
                made: std::time::Instant::now(),
                value: value.clone(),
            },
        );
        Ok(value)
    }
}

async fn events(
    Extract(web): Extract<Web>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    web.check(&headers)?;
    let job = query.get("job").cloned().map(job_id).transpose()?;
    let stream = changes(web, "overview", move |web: Web| {
        let job = job.clone();
        async move {
            let jobs = job_list(&web).await?;
            let workers = worker_list(&web).await?;
            let mut out = serde_json::json!({ "jobs": jobs, "workers": workers, "now_ms": mr_core::now_ms() });
            if let Some(id) = job {
                out["job"] = match jobs.iter().find(|j| j["job"] == id.0.as_str()) {
                    // Forgotten (or never was): the page closes it.
                    None => serde_json::Value::Null,
                    Some(s) => {
                        let version = s["version"].as_u64().unwrap_or(0);
                        let over = s["finished_ms"].as_u64().is_some();
                        (*web.detail_of(&id, version, over).await?).clone()
                    }
                };
            }
            Ok(out)
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
