//! Heartbeats: the running attempts and their progress go to the
//! coordinator, which holds the call until it has news for this worker or a
//! heartbeat interval has passed; the reply cancels attempts, forgets
//! finished jobs' data, or shuts the worker down.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mr_core::rpc::{Heartbeat, HeartbeatReply, RunningAttempt};

use super::{Worker, WorkerError};

/// Least time between two heartbeats, however much news there is.
const MIN_GAP: Duration = Duration::from_millis(20);
/// How much longer than the coordinator's hold a heartbeat may take.
const MARGIN: Duration = Duration::from_secs(5);

impl Worker {
    /// What this worker says in a heartbeat now.
    pub(super) fn beat(&self) -> Heartbeat {
        // Read `received` first: every attempt it covers is in `running`
        // (attempts are listed before they are counted).
        let received = self.received.load(Ordering::SeqCst);
        let jobs = self.outputs.jobs();
        let running = self
            .running
            .lock()
            .expect("running lock")
            .iter()
            .map(|(key, t)| {
                if t.preparing.load(Ordering::SeqCst) {
                    t.control.bump();
                }
                RunningAttempt {
                    key: key.clone(),
                    progress: t.control.progress(),
                    done_ppm: t.control.done_ppm(),
                }
            })
            .collect();
        Heartbeat {
            running,
            received,
            jobs,
            served: self.outputs.served.load(Ordering::Relaxed),
        }
    }

    pub(super) async fn heartbeat_loop(self: Arc<Self>) -> Result<(), WorkerError> {
        loop {
            let started = Instant::now();
            let hold = self.link.lock().await.heartbeat;
            // Made afresh for every try: a try after registering again must
            // not carry the old registration's count of assignments.
            let reply = self
                .rpc(hold + MARGIN, |c, ctx, id| {
                    let beat = self.beat();
                    async move { c.heartbeat(ctx, id, beat).await }
                })
                .await?;
            match reply {
                Ok(r) => {
                    if self.apply(r) {
                        tracing::info!("the coordinator asked this worker to shut down");
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::warn!("heartbeat refused: {e}");
                    tokio::time::sleep(hold).await;
                }
            }
            tokio::time::sleep(MIN_GAP.saturating_sub(started.elapsed())).await;
        }
    }

    /// Carries out a heartbeat reply; returns whether to shut down.
    pub(super) fn apply(&self, reply: HeartbeatReply) -> bool {
        {
            let running = self.running.lock().expect("running lock");
            for key in &reply.cancel {
                if let Some(t) = running.get(key) {
                    tracing::info!(%key, "cancelling attempt (the coordinator no longer wants it)");
                    t.control.cancel();
                }
            }
        }
        for job in reply.forget_jobs {
            if !job.is_valid() {
                continue;
            }
            self.outputs.forget(&job);
            let dir = self.outputs.job_dir(&job);
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::debug!(%job, "removed the job's map output"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
            });
        }
        reply.shutdown
    }
}
