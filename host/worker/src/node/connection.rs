//! Reaching the coordinator: connecting (TCP or in process), registering
//! (again, under the old id, after the coordinator restarted), calls that
//! reconnect, and giving up after `give_up_after`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::Arc;

use mr_core::ids::WorkerId;
use mr_core::rpc::{context, CoordinatorClient, Credentials, Register, RpcError, Transport};
use mr_core::tls::{self, rustls, Fingerprint, Identity};
use mr_runtime::LoadError;

use super::{Worker, WorkerOptions};
use crate::shuffle::ShuffleAuth;

/// Longest wait between two tries to reach the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the coordinator at {addr} (tried for {waited:?}): {last}\nis `mr coordinator` running there, and can this machine reach it?")]
    Unreachable {
        addr: String,
        waited: Duration,
        last: String,
    },
    #[error("the coordinator at {addr} refused this worker: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] LoadError),
    #[error("the coordinator at {addr} is not of the cluster this worker's token is for: {why}; use the token in the coordinator's DIR/worker.token")]
    WrongCluster { addr: String, why: String },
}

/// The connection to the coordinator and this worker's id there.
pub(crate) struct Link {
    pub client: Option<CoordinatorClient>,
    pub id: Option<WorkerId>,
    /// The TLS settings with this worker's certificate, once it has one.
    pub member_tls: Option<Arc<rustls::ClientConfig>>,
    /// The last id, asked back after the coordinator restarts.
    pub previous: Option<WorkerId>,
    /// How long the coordinator holds a heartbeat without news.
    pub heartbeat: Duration,
    /// Counts registrations: a call made before the last one that hears
    /// "unknown worker" does not make the worker register once more.
    pub registrations: u64,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            client: None,
            id: None,
            member_tls: None,
            previous: None,
            heartbeat: Duration::from_secs(1),
            registrations: 0,
        }
    }
}

type Call<T> = Result<Result<T, RpcError>, tarpc::client::RpcError>;

/// Finds the address this machine uses to reach the coordinator (over
/// TCP), retrying until it answers or `give_up_after` passes.
pub(super) async fn probe(options: &WorkerOptions) -> Result<IpAddr, WorkerError> {
    let Transport::Tcp { addr, .. } = &options.coordinator else {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut warned = None::<Instant>;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                return s
                    .local_addr()
                    .map(|a| a.ip())
                    .map_err(|source| WorkerError::Io {
                        what: "cannot read the local address".into(),
                        source,
                    })
            }
            Err(e) => {
                retry_or_give_up(options, started, &mut backoff, &mut warned, e.to_string()).await?
            }
        }
    }
}

/// Waits before the next try to reach the coordinator (logging why, at
/// most every 10 s), or gives up.
async fn retry_or_give_up(
    options: &WorkerOptions,
    started: Instant,
    backoff: &mut Duration,
    warned: &mut Option<Instant>,
    why: String,
) -> Result<(), WorkerError> {
    if started.elapsed() >= options.give_up_after {
        return Err(WorkerError::Unreachable {
            addr: options.coordinator.to_string(),
            waited: options.give_up_after,
            last: why,
        });
    }
    if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
        tracing::warn!(
            "cannot reach the coordinator at {}: {why}; retrying (giving up after {:?})",
            options.coordinator,
            options.give_up_after
        );
        *warned = Some(Instant::now());
    }
    let left = options.give_up_after.saturating_sub(started.elapsed());
    tokio::time::sleep((*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(())
}

impl Worker {
    /// The connection and id, connecting and registering as needed.
    pub async fn client(&self) -> Result<(CoordinatorClient, WorkerId), WorkerError> {
        let mut link = self.link.lock().await;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut warned = None;
        let mut hung_up = 0u32;
        loop {
            if let (Some(c), Some(id)) = (&link.client, &link.id) {
                return Ok((c.clone(), id.clone()));
            }
            if link.client.is_none() {
                let transport = match (&self.options.coordinator, &link.member_tls) {
                    (Transport::Tcp { addr, tls: Some(_) }, Some(member)) => Transport::Tcp {
                        addr: addr.clone(),
                        tls: Some(member.clone()),
                    },
                    (t, _) => t.clone(),
                };
                match transport.connect().await {
                    Ok(c) => link.client = Some(c),
                    Err(e) if tls::is_wrong_ca(&e) => {
                        return Err(WorkerError::WrongCluster {
                            addr: self.options.coordinator.to_string(),
                            why: e.to_string(),
                        })
                    }
                    Err(e) => {
                        let why = e.to_string();
                        retry_or_give_up(&self.options, started, &mut backoff, &mut warned, why)
                            .await?;
                        continue;
                    }
                }
            }
            let client = link.client.clone().expect("connected above");
            if let Some(id) = &link.id {
                // Connected again with the certificate just issued.
                return Ok((client, id.clone()));
            }
            let req = Register {
                previous: link.previous.clone(),
                ..self.register.clone()
            };
            match client.register(context(Duration::from_secs(10)), req).await {
                Ok(Ok(r)) => {
                    match self.register.shuffle_addr {
                        Some(addr) => {
                            tracing::info!(worker = %r.worker, coordinator = %self.options.coordinator, shuffle = %addr, slots = self.options.slots, "registered")
                        }
                        None => {
                            tracing::debug!(worker = %r.worker, slots = self.options.slots, "registered in process")
                        }
                    }
                    // Assignments are numbered afresh for each registration.
                    self.received.store(0, Ordering::SeqCst);
                    if let Some(c) = &r.credentials {
                        // Later calls go over a connection that presents
                        // the new certificate.
                        link.member_tls = Some(self.certified(&r.worker, c)?);
                        link.client = None;
                    }
                    *self.roots.lock().expect("roots lock") =
                        mr_core::roots::DataRoots::from_resolved(
                            r.data_roots.clone(),
                            r.object_roots.clone(),
                        )
                        .excluding(&r.excluded);
                    link.previous = Some(r.worker.clone());
                    link.id = Some(r.worker);
                    link.heartbeat = r.heartbeat;
                    link.registrations += 1;
                }
                Ok(Err(e)) => {
                    return Err(WorkerError::Refused {
                        addr: self.options.coordinator.to_string(),
                        reason: e.to_string(),
                    })
                }
                Err(e) => {
                    link.client = None;
                    // In plain text, a coordinator that hangs up on every
                    // registration at once speaks TLS (the default).
                    let plain =
                        matches!(&self.options.coordinator, Transport::Tcp { tls: None, .. });
                    hung_up += 1;
                    if plain && hung_up >= 3 {
                        return Err(WorkerError::Refused {
                            addr: self.options.coordinator.to_string(),
                            reason: format!(
                                "it hangs up on every registration ({e}); it most likely requires TLS (the default): drop --insecure and give this worker the coordinator's worker token"
                            ),
                        });
                    }
                    let why = format!("registration failed: {e}");
                    retry_or_give_up(&self.options, started, &mut backoff, &mut warned, why)
                        .await?;
                }
            }
        }
    }

    /// Takes the certificate the coordinator issued: checks it is from
    /// the CA the token names, and makes the TLS settings of this worker's
    /// calls and of its shuffle server and fetches from it.
    ///
    /// Fails if the coordinator sent a CA other than the token's.
    fn certified(
        &self,
        id: &WorkerId,
        c: &Credentials,
    ) -> Result<Arc<rustls::ClientConfig>, WorkerError> {
        let wrong = |why: String| WorkerError::WrongCluster {
            addr: self.options.coordinator.to_string(),
            why,
        };
        let (Some(token), Some(key)) = (&self.options.token, &self.key) else {
            return Err(wrong(
                "it sent a certificate to a worker without a token".into(),
            ));
        };
        if Fingerprint::of(&c.ca) != token.ca {
            return Err(wrong("its CA is not the one the token names".into()));
        }
        let ca = rustls::pki_types::CertificateDer::from(c.ca.clone());
        let identity = Identity {
            chain: vec![c.cert.clone().into(), ca.clone()],
            key: key.clone_key(),
        };
        let client =
            tls::client_config(token.ca, Some(&identity)).map_err(|e| wrong(e.to_string()))?;
        let server = tls::server_config(&ca, &identity, true).map_err(|e| wrong(e.to_string()))?;
        let mut metrics_server = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            })
            .map_err(|e| wrong(e.to_string()))?;
        metrics_server.alpn_protocols = vec![b"http/1.1".to_vec()];
        *self.shuffle_auth.write().expect("shuffle auth lock") = Some(Arc::new(ShuffleAuth {
            me: id.clone(),
            server,
            client: client.clone(),
            key: c.shuffle_key,
            metrics_server: Arc::new(metrics_server),
            metrics_check: c.metrics_check,
            ca: token.ca,
        }));
        Ok(client)
    }

    /// This worker's id, if registered.
    pub async fn id(&self) -> Option<WorkerId> {
        self.link.lock().await.id.clone()
    }

    /// Calls the coordinator, reconnecting (and registering again if the
    /// coordinator forgot this worker) as long as the give-up time allows.
    pub async fn rpc<T, Fut>(
        &self,
        timeout: Duration,
        call: impl Fn(CoordinatorClient, tarpc::context::Context, WorkerId) -> Fut,
    ) -> Result<Result<T, RpcError>, WorkerError>
    where
        Fut: Future<Output = Call<T>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut warned = None;
        loop {
            // Read before `client()`: a registration it makes (or one in
            // between) makes this call's "unknown worker" stale, so at worst
            // it is tried once more, never registers twice.
            let generation = self.link.lock().await.registrations;
            let (client, id) = self.client().await?;
            match call(client, context(timeout), id.clone()).await {
                Ok(Err(RpcError::UnknownWorker)) => {
                    let mut link = self.link.lock().await;
                    if link.id.as_ref() == Some(&id) && link.registrations == generation {
                        tracing::warn!(worker = %id, "the coordinator no longer knows this worker (it restarted?); registering again");
                        link.id = None;
                    }
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.link.lock().await.client = None;
                    let why = format!("lost the connection ({e})");
                    retry_or_give_up(&self.options, started, &mut backoff, &mut warned, why)
                        .await?;
                }
            }
        }
    }

    /// Tells the coordinator this worker leaves, if it can be reached at
    /// once (a call retrying against a coordinator that is down may hold
    /// the link: then it is not waited for).
    pub async fn goodbye(&self) {
        let Ok(link) = tokio::time::timeout(Duration::from_secs(2), self.link.lock()).await else {
            tracing::info!("the coordinator is unreachable; leaving without saying goodbye");
            return;
        };
        if let (Some(c), Some(id)) = (&link.client, &link.id) {
            match c.goodbye(context(Duration::from_secs(2)), id.clone()).await {
                Ok(Ok(())) => tracing::info!(worker = %id, "left the coordinator"),
                Ok(Err(e)) => tracing::debug!("goodbye refused: {e}"),
                Err(e) => tracing::debug!("cannot say goodbye: {e}"),
            }
        }
    }
}
