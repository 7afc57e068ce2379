//! Who may talk to whom: tokens, certificates and the TLS settings of every
//! connection of a cluster. No logic about jobs lives here.
//!
//! A coordinator is the cluster's certificate authority (its state
//! directory keeps the CA; see `mr_coordinator::security`). It hands out
//! two [`Token`]s, one for workers and one for clients; each carries a
//! secret and the [`Fingerprint`] of the CA, so a newcomer verifies the
//! very first connection (as `kubeadm join --discovery-token-ca-cert-hash`
//! does) and nobody in between can pose as the coordinator.
//!
//! ```text
//! client ──TLS(pinned CA)──▶ coordinator   hello(token = client token)
//! worker ──TLS(pinned CA)──▶ coordinator   register(token = worker token, public key)
//!                                          ◀── a certificate for `<id>.worker.mr`
//! worker ══mTLS═══════════▶ coordinator   heartbeat / request_tasks / report / goodbye
//! reducer ══mTLS══════════▶ worker        fetch(grant: HMAC(worker's key, job, partition,
//!                                                              reducer's certificate, expiry))
//! ```
//!
//! Certificates name their holder: the coordinator's is for
//! [`COORDINATOR_NAME`], a worker's for [`worker_name`], so a worker can
//! neither pose as the coordinator nor as another worker. Keys are ECDSA
//! P-256 and are made where they are used (a worker's never leaves it);
//! the crypto is `ring`'s, which builds with cargo alone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{JobId, WorkerId};

pub use rustls;
pub use tokio_rustls;

/// The name in the coordinator's certificate.
pub const COORDINATOR_NAME: &str = "coordinator.mr";

/// The name in worker `id`'s certificate (its shuffle server's too).
pub fn worker_name(id: &WorkerId) -> String {
    format!("{id}.worker.mr")
}

/// The crypto every TLS connection of mr uses (ring's).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A certificate's SHA-256 (of its DER bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate of a TLS peer, if it sent one.
    pub fn of_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        certs.and_then(|c| c.first()).map(|c| Fingerprint::of(c))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Join as a worker (`DIR/worker.token`).
    Worker,
    /// Submit, watch and cancel jobs, shut the cluster down
    /// (`DIR/client.token`).
    Client,
    /// Read `/metrics` of the coordinator and of every worker, and nothing
    /// else (`DIR/metrics.token`): what a Prometheus server holds, and
    /// what a hostile worker posing as another's metrics could learn.
    Metrics,
}

impl TokenKind {
    fn word(self) -> &'static str {
        match self {
            TokenKind::Worker => "worker",
            TokenKind::Client => "client",
            TokenKind::Metrics => "metrics",
        }
    }

    /// The token file of this kind in a state directory.
    pub fn file_in(self, state_dir: &Path) -> PathBuf {
        state_dir.join(format!("{}.token", self.word()))
    }
}

/// A token: `mr1.<kind>.<secret: 64 hex>.<CA fingerprint: 64 hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub secret: [u8; 32],
    /// The cluster CA's fingerprint: the coordinator must prove it holds a
    /// certificate from that CA before the secret is sent.
    pub ca: Fingerprint,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, not even in a debug log.
        write!(f, "Token({} for CA {:?})", self.kind.word(), self.ca)
    }
}

impl fmt::Display for Token {
    /// The token as written to its file (it includes the secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mr1.{}.{}.{}",
            self.kind.word(),
            hex::encode(self.secret),
            self.ca
        )
    }
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "not an mr token (expected mr1.<worker|client|metrics>.<64 hex digits>.<64 hex digits>)"
    )]
    Malformed,
    #[error("this is a {found} token; a {wanted} token is needed here")]
    WrongKind {
        found: &'static str,
        wanted: &'static str,
    },
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl Token {
    /// A new random token of `kind` for the CA `ca`.
    pub fn generate(kind: TokenKind, ca: Fingerprint) -> Self {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .expect("the system's random source works");
        Token { kind, secret, ca }
    }

    /// Parses a token's text (surrounding white space ignored).
    ///
    /// Fails if it is not a well-formed token.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > 256 {
            return Err(TokenError::Malformed);
        }
        let mut parts = text.split('.');
        let (Some("mr1"), Some(kind), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let kind = match kind {
            "worker" => TokenKind::Worker,
            "client" => TokenKind::Client,
            "metrics" => TokenKind::Metrics,
            _ => return Err(TokenError::Malformed),
        };
        let (Some(secret), Some(ca)) = (hex32(secret), hex32(ca)) else {
            return Err(TokenError::Malformed);
        };
        Ok(Token {
            kind,
            secret,
            ca: Fingerprint(ca),
        })
    }

    /// Parses a token that must be of `kind`.
    ///
    /// Fails if it is malformed or of the other kind.
    pub fn parse_as(text: &str, kind: TokenKind) -> Result<Self, TokenError> {
        let t = Token::parse(text)?;
        if t.kind != kind {
            return Err(TokenError::WrongKind {
                found: t.kind.word(),
                wanted: kind.word(),
            });
        }
        Ok(t)
    }

    /// Whether `other` is this very token (compared in constant time).
    pub fn matches(&self, other: &Token) -> bool {
        let same = self
            .secret
            .iter()
            .zip(other.secret.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        same == 0 && self.kind == other.kind && self.ca == other.ca
    }
}

/// What a worker checks a metrics token against (`mr worker --metrics`):
/// a MAC of the token's secret, which the coordinator hands each worker
/// at registration. A worker can tell the right token from a wrong one
/// without ever holding it, and what it holds opens nothing.
pub fn metrics_check(token: &Token) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &token.secret);
    let tag = ring::hmac::sign(&key, METRICS_CHECK);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `presented` is the metrics token of the CA `ca` whose
/// [`metrics_check`] is `check` (compared in constant time).
pub fn is_metrics_token(presented: &str, ca: &Fingerprint, check: &[u8; 32]) -> bool {
    let Ok(t) = Token::parse_as(presented, TokenKind::Metrics) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &t.secret);
    t.ca == *ca && ring::hmac::verify(&key, METRICS_CHECK, check).is_ok()
}

/// What [`metrics_check`] signs.
const METRICS_CHECK: &[u8] = b"mr worker metrics check v1";

/// The name every worker's certificate also holds, for its `/metrics`
/// (worker ids change at each registration; a scraper checks this name).
pub const METRICS_NAME: &str = "metrics.worker.mr";

/// The default state directory: `$XDG_STATE_HOME/mr`, else
/// `~/.local/state/mr` (where `mr coordinator` keeps its CA, tokens,
/// journal and apps, and where clients on the same machine find the
/// tokens, as `kubectl` finds `~/.kube/config`).
pub fn default_state_dir() -> Option<PathBuf> {
    let from = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    from("XDG_STATE_HOME")
        .filter(|p| p.is_absolute())
        .map(|p| p.join("mr"))
        .or_else(|| from("HOME").map(|h| h.join(".local/state/mr")))
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The holder's certificate first, then the CA's.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// The fingerprint of the holder's certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }
}

/// A new ECDSA P-256 key: its PKCS#8 form, and its public key (the
/// uncompressed point, 65 bytes) for a certificate request.
pub fn new_key() -> (PrivateKeyDer<'static>, Vec<u8>) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .expect("the system's random source works");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .expect("a key just made parses");
    let public = pair.public_key().as_ref().to_vec();
    (
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec())),
        public,
    )
}

/// Verifies a server against a CA known only by its fingerprint: the
/// server's chain must contain a certificate with that fingerprint, and
/// its own certificate must be signed by it and name the server.
#[derive(Debug)]
struct Pinned {
    ca: Fingerprint,
    /// The verifier for that CA, once its certificate has been seen.
    inner: OnceLock<Arc<WebPkiServerVerifier>>,
}

/// The message of a handshake refused because the server's CA is not the
/// token's (see [`is_wrong_ca`]).
const WRONG_CA: &str = "the server's certificate is not from the cluster CA the token names";

impl Pinned {
    fn verifier(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        if let Some(v) = self.inner.get() {
            return Ok(v.clone());
        }
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == self.ca)
            .ok_or_else(|| rustls::Error::General(WRONG_CA.into()))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| rustls::Error::General(WRONG_CA.into()))?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("cannot use the cluster CA: {e}")))?;
        Ok(self.inner.get_or_init(|| v).clone())
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a failed connection was refused because the server is not of
/// the cluster the token is for.
pub fn is_wrong_ca(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::General(m) if m == WRONG_CA))
}

/// Why a TLS configuration could not be made (a damaged key or
/// certificate).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct TlsError(#[from] pub rustls::Error);

/// TLS 1.3 only: every mr peer speaks it.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A client's TLS settings: servers must prove they hold a certificate
/// from the CA `ca`; `identity`, if given, is presented to them.
///
/// Fails if `identity` is damaged.
pub fn client_config(
    ca: Fingerprint,
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            ca,
            inner: OnceLock::new(),
        }));
    let config = match identity {
        Some(id) => b.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A server's TLS settings: it presents `identity`; clients may present
/// a certificate of the CA `ca` (and must, with `require_member`).
///
/// Fails if `ca` or `identity` is damaged.
pub fn server_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
    require_member: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let b =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let b = if require_member {
        b
    } else {
        b.allow_unauthenticated()
    };
    let verifier = b
        .build()
        .map_err(|e| rustls::Error::General(format!("cannot use the cluster CA: {e}")))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// A coordinator's permission for the holder of one certificate to read
/// one partition of one job's map output from one worker, until
/// `expires_ms` (ms since the epoch, on the serving worker's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub expires_ms: u64,
    pub mac: [u8; 32],
}

fn grant_message(job: &JobId, partition: u32, reducer: &Fingerprint, expires_ms: u64) -> Vec<u8> {
    let mut m = b"mr-shuffle-grant-1\0".to_vec();
    m.extend_from_slice(job.0.as_bytes());
    m.push(0);
    m.extend_from_slice(&partition.to_le_bytes());
    m.extend_from_slice(&reducer.0);
    m.extend_from_slice(&expires_ms.to_le_bytes());
    m
}

/// The grant, under the serving worker's `key`, for `reducer` to read
/// partition `partition` of `job`.
pub fn grant(
    key: &[u8; 32],
    job: &JobId,
    partition: u32,
    reducer: &Fingerprint,
    expires_ms: u64,
) -> Grant {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, &grant_message(job, partition, reducer, expires_ms));
    let mut mac = [0u8; 32];
    mac.copy_from_slice(tag.as_ref());
    Grant { expires_ms, mac }
}

/// Whether `g` lets `reducer` read partition `partition` of `job` now
/// (`now_ms`), under the serving worker's `key` (checked in constant time).
pub fn grant_allows(
    key: &[u8; 32],
    g: &Grant,
    job: &JobId,
    partition: u32,
    reducer: &Fingerprint,
    now_ms: u64,
) -> bool {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let msg = grant_message(job, partition, reducer, g.expires_ms);
    ring::hmac::verify(&k, &msg, &g.mac).is_ok() && now_ms < g.expires_ms
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_what_is_not_one() {
        let t = Token::generate(TokenKind::Worker, Fingerprint([7; 32]));
        let text = t.to_string();
        assert!(text.starts_with("mr1.worker."), "{text}");
        assert!(Token::parse(&format!("  {text}\n")).unwrap().matches(&t));
        assert!(!format!("{t:?}").contains(&hex::encode(t.secret)));
        assert_eq!(
            Token::parse_as(&text, TokenKind::Client),
            Err(TokenError::WrongKind {
                found: "worker",
                wanted: "client"
            })
        );
        let other = Token::generate(TokenKind::Worker, Fingerprint([7; 32]));
        assert!(!t.matches(&other));
        for bad in [
            "",
            "mr1",
            "mr1.worker..",
            &text.replace("mr1.", "mr2."),
            &text.replace("worker", "admin"),
            &format!("{text}.x"),
            &text[..text.len() - 1],
            &format!("{}g", &text[..text.len() - 1]),
            &"a".repeat(100_000),
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn fuzz_token_parsing_refuses_cleanly() {
        use crate::fuzz::{cases, Rng};
        let t = Token::generate(TokenKind::Client, Fingerprint([3; 32])).to_string();
        let seeds = vec![t.into_bytes()];
        let mut rng = Rng::new(0x5eed_0002);
        for _ in 0..cases(20_000) {
            let bytes = rng.input(&seeds);
            let _ = Token::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn a_grant_is_for_one_job_partition_reducer_and_time() {
        let key = [1u8; 32];
        let job = JobId("job-1-1".into());
        let me = Fingerprint([2; 32]);
        let g = grant(&key, &job, 3, &me, 1_000);
        assert!(grant_allows(&key, &g, &job, 3, &me, 999));
        assert!(!grant_allows(&key, &g, &job, 3, &me, 1_000), "expired");
        assert!(
            !grant_allows(&key, &g, &job, 4, &me, 0),
            "another partition"
        );
        let other_job = JobId("job-1-2".into());
        assert!(!grant_allows(&key, &g, &other_job, 3, &me, 0));
        assert!(!grant_allows(&key, &g, &job, 3, &Fingerprint([3; 32]), 0));
        assert!(!grant_allows(&[9; 32], &g, &job, 3, &me, 0), "another key");
        let later = Grant {
            expires_ms: 10_000,
            ..g
        };
        assert!(
            !grant_allows(&key, &later, &job, 3, &me, 999),
            "forged expiry"
        );
    }
}
