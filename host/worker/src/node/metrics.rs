//! A worker's `/metrics` (`mr worker --metrics ADDR`), in the Prometheus
//! text format: its slots and how many are busy, the guest memory its
//! running attempts hold, apps compiled and reused, attempts ended, and
//! map output bytes served to reducers and fetched from other workers.
//!
//! Secure by default: over TLS with the worker's cluster certificate,
//! which also names [`mr_core::tls::METRICS_NAME`] (ids change at each
//! registration; a scraper checks that name against the cluster CA), and
//! only for `Authorization: Bearer <metrics token>` (`metrics.token` in the
//! coordinator's state directory), which the worker checks against what
//! the coordinator handed it without ever holding the token. With
//! `--insecure`, plain HTTP and no token.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use mr_http::HttpError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::Worker;

/// Counts since the worker started.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Map output bytes fetched from other workers.
    pub fetched: AtomicU64,
    /// Apps loaded (compiled, or read from the compile cache) and loaded
    /// apps used again.
    pub app_loads: AtomicU64,
    pub app_reuses: AtomicU64,
    /// Attempts ended, by kind and outcome.
    attempts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Stats {
    pub fn ended(&self, map: bool, outcome: &'static str) {
        let kind = if map { "map" } else { "reduce" };
        *self
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind, outcome))
            .or_default() += 1;
    }
}

const HINT: &str = "Send Authorization: Bearer <the metrics token>: metrics.token in the coordinator's state directory.";

/// Serves `/metrics` on `listener` until the future is dropped.
pub(crate) async fn serve(worker: Weak<Worker>, listener: TcpListener) {
    let secure = worker.upgrade().is_some_and(|w| w.options.token.is_some());
    let tls = secure.then(|| {
        let w = worker.clone();
        Arc::new(move || {
            let w = w.upgrade()?;
            let auth = w.shuffle_auth.read().expect("shuffle auth lock").clone()?;
            Some(auth.metrics_server.clone())
        }) as mr_http::TlsSource
    });
    // With TLS, a scraper must send the metrics token, which a rebound
    // page cannot: any Host (Prometheus sends the target's name). Open
    // (--insecure): only this machine's names (and addresses).
    let hosts = (!secure).then(|| {
        let mut hosts = vec![mr_core::tls::METRICS_NAME.to_string(), "localhost".into()];
        hosts.extend(mr_core::hostname());
        hosts
    });
    let router = Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics here\n") })
        .with_state(worker);
    mr_http::serve(router, listener, tls, hosts, "metrics").await
}

async fn metrics(
    State(worker): State<Weak<Worker>>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let Some(w) = worker.upgrade() else {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is stopping",
        ));
    };
    if w.options.token.is_some() {
        let auth = w.shuffle_auth.read().expect("shuffle auth lock").clone();
        let token = match mr_http::bearer(&headers) {
            None => return Err(HttpError::unauthorized("no token", HINT)),
            Some(Err(why)) => return Err(HttpError::unauthorized(why, HINT)),
            Some(Ok(t)) => t,
        };
        let ok =
            auth.is_some_and(|a| mr_core::tls::is_metrics_token(token, &a.ca, &a.metrics_check));
        if !ok {
            return Err(HttpError::unauthorized(
                "the token is not this cluster's metrics token",
                HINT,
            ));
        }
    }
    let text = render(&w).map_err(|_| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        )
    })?;
    Ok(mr_http::prometheus(text))
}

/// A snapshot of the worker for one scrape.
#[derive(Debug)]
struct Snapshot {
    slots: u64,
    busy: u64,
    memory: u64,
    registered: bool,
    served: u64,
    fetched: u64,
    loads: u64,
    reuses: u64,
    attempts: BTreeMap<(&'static str, &'static str), u64>,
}

fn render(w: &Worker) -> Result<String, std::fmt::Error> {
    let (busy, memory) = {
        let running = w.running.lock().expect("running lock");
        let memory: usize = running.values().map(|t| t.control.memory_used()).sum();
        (running.len() as u64, memory as u64)
    };
    let snapshot = Snapshot {
        slots: u64::from(w.options.slots),
        busy,
        memory,
        registered: w.shuffle_auth.read().expect("shuffle auth lock").is_some()
            || w.options.token.is_none(),
        served: w.outputs.served.load(Ordering::Relaxed),
        fetched: w.stats.fetched.load(Ordering::Relaxed),
        loads: w.stats.app_loads.load(Ordering::Relaxed),
        reuses: w.stats.app_reuses.load(Ordering::Relaxed),
        attempts: w
            .stats
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            e.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)
        };
        let counter = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            e.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)
        };
        gauge(
            &mut e,
            "mr_worker_slots",
            "Task slots of this worker",
            self.slots,
        )?;
        gauge(
            &mut e,
            "mr_worker_slots_busy",
            "Slots running an attempt now",
            self.busy,
        )?;
        gauge(
            &mut e,
            "mr_worker_sandbox_memory_bytes",
            "Guest memory the running attempts hold",
            self.memory,
        )?;
        gauge(
            &mut e,
            "mr_worker_registered",
            "1 once the worker holds its cluster certificate",
            u64::from(self.registered),
        )?;
        counter(
            &mut e,
            "mr_worker_served_bytes",
            "Map output bytes sent to reducers",
            self.served,
        )?;
        counter(
            &mut e,
            "mr_worker_fetched_bytes",
            "Map output bytes fetched from other workers",
            self.fetched,
        )?;
        counter(
            &mut e,
            "mr_worker_app_loads",
            "Apps loaded for a task (compiled, or read from the compile cache)",
            self.loads,
        )?;
        counter(
            &mut e,
            "mr_worker_app_reuses",
            "Tasks that found their app already loaded (compile-cache hits in memory)",
            self.reuses,
        )?;
        let mut m = e.encode_descriptor(
            "mr_worker_attempts",
            "Attempts ended on this worker, by kind and outcome",
            None,
            MetricType::Counter,
        )?;
        for ((kind, outcome), n) in &self.attempts {
            m.encode_family(&[("kind", *kind), ("outcome", *outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        Ok(())
    }
}
