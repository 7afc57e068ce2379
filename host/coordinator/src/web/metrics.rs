//! `/metrics`: the coordinator in the Prometheus text format (0.0.4),
//! written by `prometheus-client` from a snapshot of the state taken per
//! scrape ([`crate::state::State::overview`]).

use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use mr_core::tls::TokenKind;
use mr_http::HttpError;

use super::Web;
use crate::state::Overview;

pub(super) async fn metrics(
    Extract(web): Extract<Web>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    // Prometheus may hold the metrics token instead of the client's.
    web.check_for(&headers, &[TokenKind::Client, TokenKind::Metrics])?;
    let overview = web
        .shared
        .state(|s, _| s.overview())
        .await
        .map_err(super::rpc_error)?;
    let text = render(overview).map_err(|_| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        )
    })?;
    Ok(mr_http::prometheus(text))
}

/// The text of one scrape.
pub(super) fn render(o: Overview) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(o)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Debug)]
struct Snapshot(Overview);

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let o = &self.0;
        {
            let mut m = e.encode_descriptor(
                "mr_jobs",
                "Jobs the coordinator holds, by state (finished ones until they are forgotten)",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in &o.jobs {
                m.encode_family(&[("state", state.as_str())])?
                    .encode_gauge(n)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "mr_tasks_running",
                "Attempts running now, by kind of task",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in &o.running {
                m.encode_family(&[("kind", kind.word())])?.encode_gauge(n)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "mr_tasks_waiting",
                "Tasks of unfinished jobs waiting to be handed out, by kind",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in &o.waiting {
                m.encode_family(&[("kind", kind.word())])?.encode_gauge(n)?;
            }
        }
        e.encode_descriptor("mr_workers", "Live workers", None, MetricType::Gauge)?
            .encode_gauge(&o.workers)?;
        e.encode_descriptor(
            "mr_slots",
            "Task slots of the live workers",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&o.slots)?;
        e.encode_descriptor(
            "mr_workers_quarantined",
            "Workers given no tasks because their results lost votes (--verify)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&o.quarantined)?;
        {
            let mut m = e.encode_descriptor(
                "mr_attempts",
                "Attempts ended since the coordinator started, by kind and outcome",
                None,
                MetricType::Counter,
            )?;
            for ((kind, outcome), n) in &o.tallies.attempts {
                m.encode_family(&[("kind", kind.word()), ("outcome", outcome.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "mr_attempt_duration_seconds",
                "How long ended attempts ran, by kind",
                None,
                MetricType::Histogram,
            )?;
            for (kind, d) in &o.tallies.durations {
                m.encode_family(&[("kind", kind.word())])?
                    .encode_histogram::<NoLabelSet>(d.sum_seconds, d.count(), &d.buckets(), None)?;
            }
        }
        e.encode_descriptor(
            "mr_shuffle_bytes",
            "Bytes of keys and values done map attempts emitted for the shuffle",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&o.tallies.shuffle_bytes, None)?;
        Ok(())
    }
}
