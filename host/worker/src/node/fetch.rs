//! Gathering a reduce's input: partition `p` of every map output, in map
//! order. Output this worker holds is read in place; the rest is fetched
//! from the workers that hold it, one batch per worker (a few workers at a
//! time), each batch into one file of the reduce's scratch directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use mr_core::ids::JobId;
use mr_core::rpc::MapOutputs;
use mr_runtime::TaskControl;

use super::Worker;
use crate::runfile::{SegmentInfo, Source};
use crate::shuffle::{self, Dial, FetchError, FetchRequest, Partial, MAX_BATCH};
use mr_core::tls::Grant;

/// Workers fetched from at once.
const FETCH_PARALLEL: usize = 4;
/// Tries per batch (after a failure, from the first segment missing)
/// before the reduce attempt reports a fetch failure.
const FETCH_TRIES: u32 = 3;

/// A map output that could not be had: the map task, its attempt, why.
pub(crate) type Missing = (u32, u32, FetchError);

/// What a reduce's input cost to fetch: its segments' bytes fetched from
/// other workers, and the bytes they took on the wire.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Fetched {
    pub bytes: u64,
    pub wire: u64,
}

impl Worker {
    /// Partition `partition` of every map output in `outputs`, in map
    /// order (so equal keys meet the reducer in the same order wherever
    /// the maps ran): the segments this worker holds where they are, the
    /// others fetched into `dir`.
    ///
    /// Fails with the first map output that cannot be had, or, past
    /// `deadline`, the first one not fetched yet from a host.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn gather(
        &self,
        job: &JobId,
        partition: u32,
        outputs: &MapOutputs,
        grants: &[Option<Grant>],
        dir: &Path,
        control: &TaskControl,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<(Source, SegmentInfo)>, Fetched), Missing> {
        let me = self.id().await;
        let compression = self.options.shuffle_compression;
        let my_ip = self.register.shuffle_addr.map(|a| a.ip());
        let mut got: Vec<Option<(Source, SegmentInfo)>> = vec![None; outputs.maps.len()];
        // Maps to fetch, by the host that has them.
        let mut remote: BTreeMap<u32, Vec<(u32, u32, u64)>> = BTreeMap::new();
        let mut local = Vec::new();
        for (m, r) in outputs.maps.iter().enumerate() {
            let host = outputs.hosts.get(r.host as usize).ok_or_else(|| {
                let e = FetchError::Peer(format!("map-{m}'s output has no known host (a bug)"));
                (m as u32, r.attempt, e)
            })?;
            let shared =
                host.addr.is_none() && matches!(self.options.shuffle, super::Shuffle::Shared(_));
            if Some(&host.worker) == me.as_ref() || shared {
                local.push((m as u32, r.attempt));
            } else {
                remote
                    .entry(r.host)
                    .or_default()
                    .push((m as u32, r.attempt, r.bytes));
            }
        }
        if !local.is_empty() {
            let (o, j) = (self.outputs.clone(), job.clone());
            let found = tokio::task::spawn_blocking(move || {
                local
                    .into_iter()
                    .map(|(m, a)| {
                        o.segment(&j, m, a, partition).map(|s| (m, s)).map_err(|e| {
                            let why = format!("this worker lost it: {e}");
                            (m, a, FetchError::Peer(why))
                        })
                    })
                    .collect::<Result<Vec<_>, Missing>>()
            })
            .await
            .map_err(|e| {
                (
                    0,
                    0,
                    FetchError::Local(format!("a worker task failed: {e}")),
                )
            })??;
            for (m, s) in found {
                got[m as usize] = Some(s);
            }
        }
        let auth = self.shuffle_auth.read().expect("shuffle auth lock").clone();
        let secure = self.options.token.is_some();
        let fetches = remote.into_iter().map(|(h, maps)| {
            let host = &outputs.hosts[h as usize];
            let dest = dir.join(format!("from-{h}.seg"));
            let grant = grants.get(h as usize).copied().flatten();
            let dial = match &auth {
                Some(a) => Some(Dial::Tls {
                    config: a.client.clone(),
                    worker: host.worker.clone(),
                }),
                None if secure => None,
                None => Some(Dial::Plain),
            };
            async move {
                let Some(addr) = host.addr else {
                    let (m, a, _) = maps[0];
                    let why = format!("worker {} serves no map output", host.worker);
                    return Err((m, a, FetchError::Peer(why)));
                };
                let Some(dial) = dial else {
                    let (m, a, _) = maps[0];
                    let why = "this worker has no certificate yet".to_string();
                    return Err((m, a, FetchError::Local(why)));
                };
                let compress = compression.wanted(addr, my_ip);
                fetch_host(
                    addr, &dial, grant, job, partition, maps, &dest, control, deadline, compress,
                )
                .await
                .map(|(segs, wire)| (dest, segs, wire))
            }
        });
        let mut results = futures::stream::iter(fetches).buffer_unordered(FETCH_PARALLEL);
        let mut fetched = Fetched::default();
        while let Some(r) = results.next().await {
            let (dest, segs, wire) = r?;
            fetched.wire += wire;
            for (m, s) in segs {
                self.stats.fetched.fetch_add(s.len, Ordering::Relaxed);
                fetched.bytes += s.len;
                got[m as usize] = Some((Source::File(dest.clone()), s));
            }
        }
        // One per map, in map order, empty ones too: a verified job's
        // digests are per map (the caller drops the empty ones).
        Ok((got.into_iter().flatten().collect(), fetched))
    }
}

/// Fetches `maps` (map, attempt) from the worker at `addr` into `dest`, in
/// batches, trying a batch again (a few times, with backoff, from its
/// first missing segment) when the serving worker refused or failed, but
/// not when it stalled, or this worker's disk failed. Also returns the
/// bytes the segments took on the wire (asked `compress`ed: fewer).
#[allow(clippy::too_many_arguments)]
async fn fetch_host(
    addr: std::net::SocketAddr,
    dial: &Dial,
    grant: Option<Grant>,
    job: &JobId,
    partition: u32,
    maps: Vec<(u32, u32, u64)>,
    dest: &Path,
    control: &TaskControl,
    deadline: tokio::time::Instant,
    compress: bool,
) -> Result<(Vec<(u32, SegmentInfo)>, u64), Missing> {
    let mut out = Vec::with_capacity(maps.len());
    let mut wire = 0;
    let mut end = 0u64;
    for batch in maps.chunks(MAX_BATCH) {
        let mut from = 0;
        let mut tries = 0;
        while from < batch.len() {
            let req = FetchRequest {
                job: job.clone(),
                partition,
                maps: batch[from..].iter().map(|&(m, a, _)| (m, a)).collect(),
                grant,
                compress,
                limits: batch[from..].iter().map(|&(_, _, b)| b).collect(),
            };
            let fetched = tokio::time::timeout_at(
                deadline,
                shuffle::fetch(addr, dial, &req, dest, end, control, &mut wire),
            )
            .await;
            let (done, error) = match fetched {
                Ok(Ok(done)) => (done, None),
                Ok(Err(Partial { done, error })) => (done, Some(error)),
                Err(_) => {
                    let (m, a, _) = batch[from];
                    let why = format!(
                        "{addr} did not send map-{m}'s output within the reduce attempt's time budget (--attempt-timeout)"
                    );
                    return Err((m, a, FetchError::Stalled(why)));
                }
            };
            for (s, &(m, _, _)) in done.iter().zip(&batch[from..]) {
                end = s.offset + s.len;
                out.push((m, *s));
            }
            from += done.len();
            let Some(e) = error else { break };
            let (m, a, _) = batch[from.min(batch.len() - 1)];
            match e {
                FetchError::Peer(why) if tries + 1 < FETCH_TRIES && !control.is_cancelled() => {
                    tracing::debug!(map = m, "fetch failed, trying again: {why}");
                    // With jitter: a host's reduces do not retry in lockstep.
                    let jitter = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos() as u64 % 250);
                    tokio::time::sleep(Duration::from_millis((250 << (2 * tries)) + jitter)).await;
                    tries += 1;
                }
                e => return Err((m, a, e)),
            }
        }
    }
    Ok((out, wire))
}
