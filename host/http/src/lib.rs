//! HTTP for mr's web surfaces: the coordinator's page and `/metrics`
//! (`mr coordinator --http`) and a worker's `/metrics` (`mr worker
//! --metrics`). Each builds an axum [`Router`] and hands it to [`serve`],
//! which adds what every surface needs:
//!
//! - a bounded accept loop: at most [`MAX_CONNECTIONS`] connections, and
//!   [`PER_ADDRESS`] from one address; a TLS handshake and a request's
//!   headers must arrive within [`HANDSHAKE_TIMEOUT`]; every connection is
//!   owned by the serving future, so dropping it ends them all;
//! - TLS from a [`TlsSource`] asked at each connection (a worker's
//!   certificate changes when it registers again), or plain HTTP;
//! - the `Host` header must name the server (one of its names, or an IP
//!   address), which stops DNS rebinding; and `nosniff`, `no-referrer` and
//!   a strict content security policy on every answer.
//!
//! Who may call is each surface's business: [`HttpError::unauthorized`]
//! is the answer to refuse with (it closes the connection).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;

/// At most this many connections at once, and from one address.
pub const MAX_CONNECTIONS: usize = 256;
pub const PER_ADDRESS: usize = 32;
/// A connection must finish its TLS handshake, and send a request's
/// headers, within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// What a page may load: its own scripts and styles, nothing else.
const CSP: &str = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The TLS settings for the next connection; `None`: refuse it (a worker
/// not registered yet has no certificate).
pub type TlsSource = Arc<dyn Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync>;

/// Serves `router` on `listener` until the future is dropped (every
/// connection with it): over TLS from `tls`, else plain HTTP. `hosts` are
/// the host names (any case, no port) a request's `Host` may name besides
/// an IP address (DNS rebinding needs a name); `None`: any (a surface that
/// only takes bearer tokens, which a rebound page does not have).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<TlsSource>,
    hosts: Option<Vec<String>>,
    what: &'static str,
) {
    let hosts: Option<HashSet<String>> =
        hosts.map(|h| h.into_iter().map(|n| n.to_ascii_lowercase()).collect());
    let app = router.layer(axum::middleware::from_fn_with_state(Arc::new(hosts), guard));
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{what}: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&per_address, peer.ip(), connections.len()) else {
            tracing::debug!(%peer, "{what}: too many connections; dropped one");
            continue;
        };
        let acceptor = match &tls {
            None => None,
            Some(source) => match source() {
                Some(config) => Some(tokio_rustls::TlsAcceptor::from(config)),
                None => {
                    tracing::debug!(%peer, "{what}: no certificate yet; dropped a connection");
                    continue;
                }
            },
        };
        let app = app.clone();
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
                                    tracing::debug!(%peer, "{what}: TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => return,
                            };
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                };
            if let Err(e) = served {
                tracing::debug!(%peer, "{what}: connection ended: {e}");
            }
        });
    }
}

/// A connection's place among [`MAX_CONNECTIONS`] and its address's
/// [`PER_ADDRESS`], given back when dropped.
struct Slot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Slot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, open: usize) -> Option<Slot> {
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
pub fn host_of(header: &str) -> String {
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

/// Refuses a request whose `Host` is not the server's (DNS rebinding),
/// and puts the security headers on every answer.
async fn guard(
    State(hosts): State<Arc<Option<HashSet<String>>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of)
        .or_else(|| request.uri().host().map(str::to_ascii_lowercase));
    let allowed = match (&*hosts, host) {
        (None, _) => true,
        (Some(names), Some(h)) => names.contains(&h) || h.parse::<IpAddr>().is_ok(),
        (Some(_), None) => false,
    };
    let mut response = if allowed {
        next.run(request).await
    } else {
        HttpError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this server does not answer to that host name: use its address, or a name it was started with (mr coordinator --http-name NAME)",
        )
        .into_response()
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

/// Why a request was not answered, as its answer.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    /// A refusal: `why`, then `hint` (which token to send, and how).
    pub fn unauthorized(why: impl std::fmt::Display, hint: &str) -> Self {
        HttpError::new(
            StatusCode::UNAUTHORIZED,
            format!("not authorized: {why}\n\n{hint}"),
        )
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        if unauthorized {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mr\""),
            );
            // A stranger does not keep a connection open.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// The token of an `Authorization: Bearer <token>` header: `None` without
/// the header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<Result<&str, &'static str>> {
    let auth = headers.get(header::AUTHORIZATION)?;
    Some(
        auth.to_str()
            .ok()
            .and_then(|t| t.strip_prefix("Bearer "))
            .ok_or("the Authorization header is not `Bearer <token>`"),
    )
}

/// An answer in the Prometheus text format (0.0.4).
pub fn prometheus(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_header_is_its_name_without_the_port() {
        assert_eq!(host_of("Example.COM:8080"), "example.com");
        assert_eq!(host_of("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("evil.example:80x"), "evil.example:80x");
    }

    #[test]
    fn connections_are_capped_per_address_and_given_back() {
        let counts = Arc::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..PER_ADDRESS)
            .map(|i| Slot::take(&counts, ip, i).unwrap())
            .collect();
        assert!(Slot::take(&counts, ip, PER_ADDRESS).is_none());
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(Slot::take(&counts, other, PER_ADDRESS).is_some());
        assert!(Slot::take(&counts, other, MAX_CONNECTIONS).is_none());
        drop(held);
        assert!(Slot::take(&counts, ip, 0).is_some());
        assert!(counts.lock().unwrap().get(&ip).is_none(), "given back");
    }
}
