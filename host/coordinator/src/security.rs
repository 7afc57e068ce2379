//! The cluster's authority: its CA, its tokens, the certificates it issues
//! to workers and who holds them (see `mr_core::tls` for the picture).
//!
//! In the state directory (private to its user, `0700`; the secrets
//! `0600`):
//!
//! ```text
//! ca.crt, ca.key      the cluster CA (made on first start, kept)
//! worker.token        what `mr worker --token-file` needs to join
//! client.token        what `mr submit/status/cancel/shutdown` need
//! metrics.token       what reads /metrics (coordinator and workers)
//! lock                held while a coordinator uses the directory
//! ```
//!
//! The coordinator's own certificate is made afresh at each start. A
//! worker's certificate is issued at each registration, for the public key
//! the worker sent, and names the worker (`<id>.worker.mr`); the authority
//! remembers which certificate is whose, so a call is taken as worker
//! `id`'s only on a connection that presented `id`'s current certificate.
//! That record lives in memory: after a restart every worker registers
//! again (with its token), as it does anyway.
//!
//! Rotating a token: `mr coordinator --rotate-tokens` (or deleting the
//! token file) writes a new one at start; the old one stops working.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mr_core::ids::{JobId, WorkerId};
use mr_core::rpc::{Credentials, RpcError};
use mr_core::tls::{self, Fingerprint, Grant, Identity, Token, TokenKind};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long a worker's certificate is valid (it gets a new one whenever it
/// registers again; the authority's record is what revokes it).
const WORKER_CERT_DAYS: i64 = 366;
/// How long the CA is valid.
const CA_DAYS: i64 = 10 * 366;
/// The web page's certificate is made at each start; browsers refuse
/// leaf certificates valid much longer than a year.
const WEB_CERT_DAYS: i64 = 365;
/// What a web session cookie signs (see [`Authority::web_session`]).
const WEB_SESSION: &[u8] = b"mr web session v1";

/// Why the authority could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Damaged(String),
    #[error("another coordinator uses the state directory {0}; stop it, or give this one another --state-dir")]
    Busy(PathBuf),
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SecurityError {
    move |source| SecurityError::Io { what, source }
}

/// A worker's public key as sent in its registration.
struct WorkerKey<'a>(&'a [u8]);

impl PublicKeyData for WorkerKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A worker holding a certificate.
#[derive(Clone)]
struct Member {
    worker: WorkerId,
    shuffle_key: [u8; 32],
}

#[derive(Default)]
struct Members {
    by_cert: HashMap<Fingerprint, Member>,
    by_worker: HashMap<WorkerId, Fingerprint>,
}

/// The CA, the tokens and the members.
pub struct Authority {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    worker_token: Token,
    client_token: Token,
    metrics_token: Token,
    server: Arc<rustls::ServerConfig>,
    members: Mutex<Members>,
    _lock: std::fs::File,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authority({}, CA {:?})", self.dir.display(), self.ca())
    }
}

/// Writes `text` to `path` readable by its owner only, atomically (a new
/// file of a random name, `0600`, then renamed over `path`).
fn write_private(path: &Path, text: &str) -> Result<(), SecurityError> {
    let what = || format!("cannot write {}", path.display());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut f = tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io(what()))?;
    f.write_all(text.as_bytes()).map_err(io(what()))?;
    f.as_file().sync_all().map_err(io(what()))?;
    f.persist(path).map_err(|e| io(what())(e.error))?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams, SecurityError> {
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| SecurityError::Damaged(format!("cannot make the CA: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mr cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CA_DAYS);
    Ok(p)
}

fn leaf_params(name: &str, days: i64) -> Result<CertificateParams, SecurityError> {
    let mut p = CertificateParams::new(vec![name.to_string()]).map_err(|e| {
        SecurityError::Damaged(format!("cannot make a certificate for {name}: {e}"))
    })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(|e| {
        SecurityError::Damaged(format!("{name} is not a certificate name: {e}"))
    })?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .expect("the system's random source works");
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

/// Makes `dir` (owner only), or checks an existing one is this user's
/// and nobody else can write it (they could have planted a CA or tokens);
/// one others can only read is made private (rotate its tokens).
fn private_dir(dir: &Path) -> Result<(), SecurityError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!(
            "cannot create the state directory {}",
            dir.display()
        )))?;
    let meta = std::fs::metadata(dir).map_err(io(format!("cannot read {}", dir.display())))?;
    let me = tempfile::tempfile_in(dir)
        .and_then(|f| f.metadata())
        .map_err(io(format!(
            "cannot write the state directory {}",
            dir.display()
        )))?
        .uid();
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(SecurityError::Damaged(format!(
            "the state directory {} belongs to another user or others may write it, so its CA and tokens cannot be trusted; use a directory of your own (mode 0700)",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(
            format!(
                "the state directory {} is open to other users and cannot be made private",
                dir.display()
            ),
        ))?;
        tracing::warn!(dir = %dir.display(), "the state directory was readable by other users; it is now private to this one (its secrets may have been read: rotate the tokens with --rotate-tokens, and remove ca.crt and ca.key for a new CA)");
    }
    Ok(())
}

/// Locks the state directory for this process.
///
/// Fails if another process holds it.
pub fn lock_state_dir(dir: &Path) -> Result<std::fs::File, SecurityError> {
    private_dir(dir)?;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("cannot open {}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(SecurityError::Busy(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io(format!("cannot lock {}", path.display()))(e))
        }
    }
}

impl Authority {
    /// Opens the authority of the state directory `dir` (locked by `lock`):
    /// makes its CA and tokens on first use, new tokens with `rotate`, and
    /// a new certificate for the coordinator.
    ///
    /// Fails if the directory cannot be used or its CA is damaged.
    pub fn open(dir: &Path, lock: std::fs::File, rotate: bool) -> Result<Self, SecurityError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let fresh = !crt.exists() || !key.exists();
        let (ca_der, ca_key) = if fresh {
            let key_pair = KeyPair::generate()
                .map_err(|e| SecurityError::Damaged(format!("cannot make a key: {e}")))?;
            let cert = ca_params()?
                .self_signed(&key_pair)
                .map_err(|e| SecurityError::Damaged(format!("cannot make the CA: {e}")))?;
            write_private(&key, &key_pair.serialize_pem())?;
            write_private(&crt, &cert.pem())?;
            tracing::info!(dir = %dir.display(), "made a new cluster CA");
            (cert.der().clone(), key_pair)
        } else {
            let damaged = |what: &Path, e: &dyn std::fmt::Display| {
                SecurityError::Damaged(format!(
                    "{} is damaged ({e}); restore it, or remove ca.crt and ca.key to make a new CA (every token then changes)",
                    what.display()
                ))
            };
            let der = CertificateDer::from_pem_file(&crt).map_err(|e| damaged(&crt, &e))?;
            let pem = std::fs::read_to_string(&key).map_err(|e| damaged(&key, &e))?;
            let key_pair = KeyPair::from_pem(&pem).map_err(|e| damaged(&key, &e))?;
            (der, key_pair)
        };
        let fp = Fingerprint::of(&ca_der);
        let token = |kind: TokenKind| -> Result<Token, SecurityError> {
            let path = kind.file_in(dir);
            if !rotate && !fresh {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    match Token::parse_as(&text, kind) {
                        Ok(t) if t.ca == fp => return Ok(t),
                        Ok(_) => {
                            tracing::warn!(file = %path.display(), "the token is for another CA; writing a new one")
                        }
                        Err(e) => {
                            tracing::warn!(file = %path.display(), "the token file is damaged ({e}); writing a new one")
                        }
                    }
                }
            }
            let t = Token::generate(kind, fp);
            write_private(&path, &format!("{t}\n"))?;
            tracing::info!(file = %path.display(), "wrote a new token");
            Ok(t)
        };
        let worker_token = token(TokenKind::Worker)?;
        let client_token = token(TokenKind::Client)?;
        let metrics_token = token(TokenKind::Metrics)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        // The coordinator's own certificate, for this run.
        let own_key = KeyPair::generate()
            .map_err(|e| SecurityError::Damaged(format!("cannot make a key: {e}")))?;
        let own = leaf_params(tls::COORDINATOR_NAME, CA_DAYS)?
            .signed_by(&own_key, &issuer)
            .map_err(|e| SecurityError::Damaged(format!("cannot certify the coordinator: {e}")))?;
        let identity = Identity {
            chain: vec![own.der().clone(), ca_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(own_key.serialize_der())),
        };
        let damaged = |e: &dyn std::fmt::Display| {
            SecurityError::Damaged(format!(
                "{} and {} are damaged or do not belong together ({e}); restore them, or remove both to make a new CA (every token then changes)",
                crt.display(),
                key.display()
            ))
        };
        // The coordinator's certificate must check out against the CA, or
        // no worker or client would accept it.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).map_err(|e| damaged(&e))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            tls::provider(),
        )
        .build()
        .map_err(|e| damaged(&e))?;
        let name = rustls::pki_types::ServerName::try_from(tls::COORDINATOR_NAME).expect("a name");
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            own.der(),
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| damaged(&e))?;
        let server = tls::server_config(&ca_der, &identity, false).map_err(|e| damaged(&e))?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            ca_der,
            issuer,
            worker_token,
            client_token,
            metrics_token,
            server,
            members: Mutex::new(Members::default()),
            _lock: lock,
        })
    }

    /// The TLS settings of the coordinator's port.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The TLS settings of the web page (`mr coordinator --http`): a
    /// certificate of the cluster CA made for this run, naming the
    /// coordinator's cluster name and `names` (host names or IP addresses
    /// a browser may use), HTTP/1.1, no client certificates (a browser
    /// proves itself with the client token).
    ///
    /// Also returns the certificate's SHA-256 fingerprint (to log: a
    /// browser that does not hold the cluster CA shows it to check).
    ///
    /// Fails if a name cannot go in a certificate.
    pub fn web_config(
        &self,
        names: &[String],
    ) -> Result<(Arc<rustls::ServerConfig>, Fingerprint), SecurityError> {
        let mut p = leaf_params(tls::COORDINATOR_NAME, WEB_CERT_DAYS)?;
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|e| {
                    SecurityError::Damaged(format!("{name} is not a certificate name: {e}"))
                })?),
            };
            if !p.subject_alt_names.contains(&san) {
                p.subject_alt_names.push(san);
            }
        }
        let key = KeyPair::generate()
            .map_err(|e| SecurityError::Damaged(format!("cannot make a key: {e}")))?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| SecurityError::Damaged(format!("cannot certify the web page: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_no_client_auth().with_single_cert(
                    vec![cert.der().clone(), self.ca_der.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
            })
            .map_err(|e| SecurityError::Damaged(format!("cannot use the web certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((Arc::new(config), Fingerprint::of(cert.der())))
    }

    /// The web page's session cookie: derived from the client token (a
    /// rotated token ends every session), so the cookie is not the token
    /// itself and opens nothing but the page.
    pub fn web_session(&self) -> String {
        hex::encode(self.web_tag().as_ref())
    }

    /// Whether `value` is the current [`Authority::web_session`]
    /// (compared in constant time).
    pub fn is_web_session(&self, value: &str) -> bool {
        let mut got = [0u8; 32];
        value.len() == 64
            && hex::decode_to_slice(value, &mut got).is_ok()
            && ring::hmac::verify(&self.web_key(), WEB_SESSION, &got).is_ok()
    }

    fn web_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.client_token.secret)
    }

    fn web_tag(&self) -> ring::hmac::Tag {
        ring::hmac::sign(&self.web_key(), WEB_SESSION)
    }

    /// The client token's text (for the web page's URL, logged once at
    /// start, as the token file is readable by this user anyway).
    pub fn client_token_text(&self) -> String {
        self.client_token.to_string()
    }

    /// The cluster CA's fingerprint.
    pub fn ca(&self) -> Fingerprint {
        Fingerprint::of(&self.ca_der)
    }

    /// What to tell a caller with the wrong token: which file, without
    /// telling a stranger where this coordinator keeps it.
    fn token_hint(&self, kind: TokenKind) -> String {
        let file = kind.file_in(Path::new("DIR"));
        format!(
            "use the token in {} of the coordinator's state directory (it logs DIR at start)",
            file.display()
        )
    }

    /// Checks a presented token is the current one of `kind`.
    ///
    /// Fails with [`RpcError::Unauthorized`], saying which file holds the
    /// right one.
    pub fn check_token(&self, kind: TokenKind, text: &str) -> Result<(), RpcError> {
        let hint = self.token_hint(kind);
        if text.trim().is_empty() {
            return Err(RpcError::Unauthorized(format!(
                "no token was given; {hint}"
            )));
        }
        let presented = Token::parse_as(text, kind)
            .map_err(|e| RpcError::Unauthorized(format!("{e}; {hint}")))?;
        let current = match kind {
            TokenKind::Worker => &self.worker_token,
            TokenKind::Client => &self.client_token,
            TokenKind::Metrics => &self.metrics_token,
        };
        if current.matches(&presented) {
            Ok(())
        } else {
            Err(RpcError::Unauthorized(format!(
                "the token is wrong or was revoked; {hint}"
            )))
        }
    }

    /// Certifies `public_key` (an uncompressed P-256 point) as worker
    /// `worker`'s; its earlier certificate, if any, stops being its.
    ///
    /// Fails if the key is malformed.
    pub fn issue(&self, worker: &WorkerId, public_key: &[u8]) -> Result<Credentials, RpcError> {
        self.check_key(public_key)?;
        let name = tls::worker_name(worker);
        let cert = leaf_params(&name, WORKER_CERT_DAYS)
            .and_then(|mut p| {
                // Also the name its /metrics answers to (any worker's).
                p.subject_alt_names.push(SanType::DnsName(
                    tls::METRICS_NAME.try_into().map_err(|e| {
                        SecurityError::Damaged(format!("{}: {e}", tls::METRICS_NAME))
                    })?,
                ));
                Ok(p)
            })
            .and_then(|p| {
                p.signed_by(&WorkerKey(public_key), &self.issuer)
                    .map_err(|e| SecurityError::Damaged(e.to_string()))
            })
            .map_err(|e| RpcError::Internal(format!("cannot certify {worker}: {e}")))?;
        let mut shuffle_key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut shuffle_key)
            .expect("the system's random source works");
        let fp = Fingerprint::of(cert.der());
        let mut m = self.members.lock().expect("members lock");
        if let Some(old) = m.by_worker.insert(worker.clone(), fp) {
            m.by_cert.remove(&old);
        }
        m.by_cert.insert(
            fp,
            Member {
                worker: worker.clone(),
                shuffle_key,
            },
        );
        Ok(Credentials {
            cert: cert.der().to_vec(),
            ca: self.ca_der.to_vec(),
            shuffle_key,
            metrics_check: tls::metrics_check(&self.metrics_token),
        })
    }

    /// Checks a worker's public key is an uncompressed P-256 point.
    ///
    /// Fails with [`RpcError::Invalid`] if it is not.
    pub fn check_key(&self, public_key: &[u8]) -> Result<(), RpcError> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(RpcError::Invalid(
                "a worker's public key must be an uncompressed P-256 point (65 bytes)".into(),
            ));
        }
        Ok(())
    }

    /// The worker whose current certificate this is.
    pub fn member(&self, cert: &Fingerprint) -> Option<WorkerId> {
        let m = self.members.lock().expect("members lock");
        m.by_cert.get(cert).map(|m| m.worker.clone())
    }

    /// Forgets worker `worker`'s certificate (it left or was given up).
    pub fn revoke(&self, worker: &WorkerId) {
        let mut m = self.members.lock().expect("members lock");
        if let Some(fp) = m.by_worker.remove(worker) {
            m.by_cert.remove(&fp);
        }
    }

    /// The grant for the holder of `reducer` to read partition `partition`
    /// of `job` from worker `host` until `expires_ms`; `None` if `host`
    /// holds no certificate now.
    pub fn grant(
        &self,
        host: &WorkerId,
        reducer: &Fingerprint,
        job: &JobId,
        partition: u32,
        expires_ms: u64,
    ) -> Option<Grant> {
        let m = self.members.lock().expect("members lock");
        let key = m
            .by_worker
            .get(host)
            .and_then(|fp| m.by_cert.get(fp))?
            .shuffle_key;
        Some(tls::grant(&key, job, partition, reducer, expires_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_and_tokens_are_kept_rotated_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = Authority::open(&state, lock_state_dir(&state).unwrap(), false).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(state.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("client.token"), 0o600);
        // One coordinator per directory.
        assert!(matches!(
            lock_state_dir(&state),
            Err(SecurityError::Busy(_))
        ));
        let client = std::fs::read_to_string(state.join("client.token")).unwrap();
        let worker = std::fs::read_to_string(state.join("worker.token")).unwrap();
        a.check_token(TokenKind::Client, &client).unwrap();
        a.check_token(TokenKind::Worker, &worker).unwrap();
        let wrong = a.check_token(TokenKind::Client, &worker).unwrap_err();
        assert!(wrong.to_string().contains("client.token"), "{wrong}");
        assert!(a.check_token(TokenKind::Client, "").is_err());
        let ca = a.ca();
        drop(a);
        // Kept across restarts ...
        let b = Authority::open(&state, lock_state_dir(&state).unwrap(), false).unwrap();
        assert_eq!(b.ca(), ca);
        b.check_token(TokenKind::Client, &client).unwrap();
        drop(b);
        // ... until rotated: the old token no longer works.
        let c = Authority::open(&state, lock_state_dir(&state).unwrap(), true).unwrap();
        assert_eq!(c.ca(), ca);
        let e = c.check_token(TokenKind::Client, &client).unwrap_err();
        assert!(e.to_string().contains("wrong or was revoked"), "{e}");
        let new = std::fs::read_to_string(state.join("client.token")).unwrap();
        c.check_token(TokenKind::Client, &new).unwrap();
    }

    /// Damaged CA files are refused with a message, never a panic, and a
    /// certificate a peer presents is parsed safely whatever its bytes.
    #[test]
    fn fuzz_certificates_and_keys_are_refused_cleanly() {
        use mr_core::fuzz::{cases, Rng};
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s");
        let a = Authority::open(&state, lock_state_dir(&state).unwrap(), false).unwrap();
        let (_, public) = tls::new_key();
        let cert = a.issue(&WorkerId("w1".into()), &public).unwrap().cert;
        drop(a);
        let crt = std::fs::read(state.join("ca.crt")).unwrap();
        let key = std::fs::read(state.join("ca.key")).unwrap();
        let seeds = vec![crt.clone(), key.clone(), cert.clone()];
        let mut rng = Rng::new(0x5eed_0006);
        let name = rustls::pki_types::ServerName::try_from("w1.worker.mr").unwrap();
        for i in 0..cases(3_000) {
            let bytes = rng.input(&seeds);
            let der = rustls::pki_types::CertificateDer::from(bytes.clone());
            if let Ok(c) = webpki::EndEntityCert::try_from(&der) {
                let _ = c.verify_is_valid_for_subject_name(&name);
            }
            let _ = rustls::pki_types::CertificateDer::from_pem_slice(&bytes);
            // Now and then, the CA files themselves damaged on disk.
            if i % 50 == 0 {
                let (which, good) = if i % 100 == 0 {
                    ("ca.crt", &crt)
                } else {
                    ("ca.key", &key)
                };
                std::fs::write(state.join(which), &bytes).unwrap();
                match Authority::open(&state, lock_state_dir(&state).unwrap(), false) {
                    Ok(_) => {}
                    Err(e) => assert!(e.to_string().contains("damaged"), "{e}"),
                }
                std::fs::write(state.join(which), good).unwrap();
            }
        }
    }

    #[test]
    fn a_certificate_is_its_workers_until_it_registers_again_or_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), lock_state_dir(dir.path()).unwrap(), false).unwrap();
        let w1 = WorkerId("w1".into());
        let (_, public) = tls::new_key();
        let first = a.issue(&w1, &public).unwrap();
        let fp1 = Fingerprint::of(&first.cert);
        assert_eq!(a.member(&fp1), Some(w1.clone()));
        assert!(a.grant(&w1, &fp1, &JobId("job-1-1".into()), 0, 1).is_some());
        let second = a.issue(&w1, &public).unwrap();
        assert_eq!(a.member(&fp1), None, "the old certificate is revoked");
        assert_eq!(a.member(&Fingerprint::of(&second.cert)), Some(w1.clone()));
        a.revoke(&w1);
        assert_eq!(a.member(&Fingerprint::of(&second.cert)), None);
        assert!(a.grant(&w1, &fp1, &JobId("job-1-1".into()), 0, 1).is_none());
        assert!(matches!(
            a.issue(&w1, &public[..64]),
            Err(RpcError::Invalid(_))
        ));
    }
}
