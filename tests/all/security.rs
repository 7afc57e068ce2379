//! The trust boundary, attacked: real coordinator and worker processes on
//! 127.0.0.1, and a test that plays the stranger on the network, the
//! client without the right token, and the worker that speaks for another.
//! Meanwhile a real job runs and its output must stay exact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mr_core::ids::WorkerId;
use mr_core::rpc::{context, Heartbeat, Register, RpcError, PROTOCOL_VERSION};
use mr_core::tls::{self, Identity, Token};
use mr_tests::*;

use crate::cluster::{book_args, ok, strs, Cluster, JOB_LIMIT, QUICK};
use crate::{mr, output_within, wait_for};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A token of `kind` read from the cluster's state directory.
fn token(c: &Cluster, kind: &str) -> String {
    std::fs::read_to_string(c.state.join(format!("{kind}.token"))).unwrap()
}

/// Registers as a worker over RPC (as `mr worker` does) and returns a
/// client that presents the certificate it was given, and its id.
async fn join(c: &Cluster) -> (mr_core::rpc::CoordinatorClient, WorkerId, Identity) {
    let text = token(c, "worker");
    let t = Token::parse(&text).unwrap();
    let anon = tls::client_config(t.ca, None).unwrap();
    let client = mr_core::rpc::connect(&c.addr, Some(&anon)).await.unwrap();
    let (key, public_key) = tls::new_key();
    let reg = client
        .register(context(QUICK), register(text, public_key))
        .await
        .unwrap()
        .unwrap();
    let creds = reg.credentials.expect("a certificate");
    let identity = Identity {
        chain: vec![creds.cert.into(), creds.ca.into()],
        key,
    };
    let member = tls::client_config(t.ca, Some(&identity)).unwrap();
    let client = mr_core::rpc::connect(&c.addr, Some(&member)).await.unwrap();
    (client, reg.worker, identity)
}

fn register(token: String, public_key: Vec<u8>) -> Register {
    Register {
        version: PROTOCOL_VERSION,
        host: "intruder".into(),
        pid: 1,
        slots: 1,
        shuffle_addr: None,
        previous: None,
        token,
        public_key,
    }
}

/// The shuffle address and id a worker's log announces.
fn shuffle_of(log: &Path) -> (std::net::SocketAddr, WorkerId) {
    let mut found = None;
    wait_for(QUICK, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        found = text
            .lines()
            .find(|l| l.contains("registered worker="))
            .map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .unwrap()
                        .to_string()
                };
                (
                    field("shuffle=").parse().unwrap(),
                    WorkerId(field("worker=")),
                )
            });
        found.is_some()
    });
    found.expect("the worker registered")
}

#[test]
fn clients_without_the_client_token_are_refused_at_once() {
    let c = Cluster::start(&[]);
    let elsewhere = tempfile::tempdir().unwrap();
    let ca = token(&c, "client")
        .trim()
        .rsplit('.')
        .next()
        .unwrap()
        .to_string();
    let forged = format!("mr1.client.{}.{ca}", "0".repeat(64));
    let other_ca = format!("mr1.client.{}.{}", "0".repeat(64), "1".repeat(64));
    let out_dir = c.out("never");
    let submit_args = book_args(WC, &out_dir, &[]);
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("submit", strs(&submit_args)),
        ("status", vec![]),
        ("cancel", vec!["job-1-1"]),
        ("shutdown", vec![]),
    ];
    let worker_file = c.state.join("worker.token").display().to_string();
    for (sub, args) in &commands {
        for (how, env, file, says) in [
            ("no token", None, None, "no client token given"),
            (
                "a forged token",
                Some(&forged),
                None,
                "wrong or was revoked",
            ),
            (
                "another cluster's token",
                Some(&other_ca),
                None,
                "another cluster's token",
            ),
            (
                "the worker token",
                None,
                Some(&worker_file),
                "a client token is needed here",
            ),
        ] {
            let mut cmd = mr();
            cmd.args([sub, "--coordinator", &c.addr])
                .args(args)
                .env("XDG_STATE_HOME", elsewhere.path());
            if let Some(t) = env {
                cmd.env("MR_TOKEN", t);
            }
            if let Some(f) = file {
                cmd.args(["--token-file", f]);
            }
            let started = Instant::now();
            let out = output_within(&mut cmd, QUICK);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{sub} with {how}: {err}");
            assert!(err.contains("not authorized"), "{sub} with {how}: {err}");
            assert!(err.contains(says), "{sub} with {how}: {err}");
            assert!(err.contains("client.token"), "{sub} with {how}: {err}");
            assert!(started.elapsed() < Duration::from_secs(10), "{sub} {how}");
        }
    }
    assert!(!out_dir.exists(), "nothing was submitted");
    // The coordinator is still up, and the right token works.
    let status = output_within(&mut c.cmd("status", &[]), QUICK);
    assert!(status.status.success(), "{}", stderr(&status));
    // A plaintext client on the TLS port is dropped at the handshake and
    // the coordinator says so.
    let mut plain = mr();
    plain.args(["status", "--coordinator", &c.addr, "--insecure"]);
    let plain = output_within(&mut plain, QUICK);
    assert_eq!(plain.status.code(), Some(1));
    assert!(
        stderr(&plain).contains("drop --insecure"),
        "{}",
        stderr(&plain)
    );
    assert!(wait_for(QUICK, || c
        .logs()
        .contains("dropped a connection at the TLS handshake")));
}

#[test]
fn workers_need_the_worker_token_and_cannot_speak_for_another() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    let real = shuffle_of(&c.logs[1]).1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Token::parse(&token(&c, "worker")).unwrap();
        let anon = tls::client_config(t.ca, None).unwrap();
        let client = mr_core::rpc::connect(&c.addr, Some(&anon)).await.unwrap();
        let (_, public_key) = tls::new_key();
        // Registering with no token, the client token, a forged one.
        for (text, says) in [
            (String::new(), "no token"),
            (token(&c, "client"), "a worker token is needed"),
            (
                format!("mr1.worker.{}.{}", "0".repeat(64), t.ca),
                "wrong or was revoked",
            ),
        ] {
            let got = client
                .register(context(QUICK), register(text, public_key.clone()))
                .await
                .unwrap();
            match got {
                Err(RpcError::Unauthorized(m)) => {
                    assert!(m.contains(says), "{m}");
                    assert!(m.contains("worker.token"), "{m}");
                }
                other => panic!("registered without the worker token: {other:?}"),
            }
        }
        // Without a certificate, no worker call is taken.
        let beat = client
            .heartbeat(context(QUICK), real.clone(), Heartbeat::default())
            .await
            .unwrap();
        assert!(matches!(beat, Err(RpcError::Unauthorized(_))), "{beat:?}");
        // A member cannot speak for another: heartbeat, report, goodbye.
        let (member, me, _) = join(&c).await;
        assert_ne!(me, real);
        let beat = member
            .heartbeat(context(QUICK), real.clone(), Heartbeat::default())
            .await
            .unwrap();
        match beat {
            Err(RpcError::Unauthorized(m)) => {
                assert!(m.contains("cannot speak for another"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let forged = mr_core::rpc::AttemptResult {
            key: mr_core::rpc::AttemptKey {
                job: mr_core::ids::JobId("job-1-1".into()),
                task: mr_core::ids::TaskId::Map(0),
                attempt: 1,
            },
            outcome: mr_core::rpc::Outcome::MapDone,
            counters: Default::default(),
            digests: Vec::new(),
            upload: None,
        };
        let r = member
            .report(context(QUICK), real.clone(), forged)
            .await
            .unwrap();
        assert!(matches!(r, Err(RpcError::Unauthorized(_))), "{r:?}");
        let r = member.goodbye(context(QUICK), real.clone()).await.unwrap();
        assert!(matches!(r, Err(RpcError::Unauthorized(_))), "{r:?}");
        // Nor use the client's calls.
        let r = member.jobs(context(QUICK)).await.unwrap();
        assert!(matches!(r, Err(RpcError::Unauthorized(_))), "{r:?}");
        // Its own calls work.
        let r = member
            .heartbeat(context(QUICK), me.clone(), Heartbeat::default())
            .await
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    });
    // The real worker was not sent away: a job runs on it.
    let out = c.out("after");
    ok(&c.submit(&strs(&book_args(WC, &out, &[]))));
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
}

/// Sends a shuffle request for `job`'s partition 0 over `stream` and
/// returns what came back.
fn ask<S: Read + Write>(stream: &mut S, job: &str, grant: Option<tls::Grant>) -> Vec<u8> {
    let body = postcard::to_stdvec(&mr_worker::shuffle::FetchRequest {
        job: mr_core::ids::JobId(job.into()),
        partition: 0,
        maps: vec![(0, 1)],
        grant,
        compress: false,
        limits: Vec::new(),
    })
    .unwrap();
    let mut msg = b"MRS3".to_vec();
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(&body);
    let _ = stream.write_all(&msg);
    let _ = stream.flush();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[test]
fn map_output_goes_only_to_members_with_a_grant() {
    let mut c = Cluster::start(&["--worker-timeout", "60s"]);
    c.worker(&["--slots", "1"]);
    let (addr, holder) = shuffle_of(&c.logs[1]);
    // A real job, so the worker holds map output (kept until it ends).
    let out = c.out("held");
    let mut job = c.spawn_submit(&strs(&book_args(
        TIMING,
        &out,
        &["--allow", "clock", "-r", "2"],
    )));
    let id = {
        let mut id = None;
        assert!(wait_for(QUICK, || {
            id = c.jobs().pop();
            id.is_some()
        }));
        id.unwrap()
    };
    // A stranger in plain text: dropped at the handshake, nothing read.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(QUICK)).unwrap();
    let got = ask(&mut plain, &id, None);
    assert!(!got.windows(4).any(|w| w == b"MRS2"), "{got:?}");
    assert!(
        got.is_empty() || got[0] == 0x15,
        "a TLS alert at most: {got:?}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_member, _, identity) = rt.block_on(join(&c));
    let t = Token::parse(&token(&c, "worker")).unwrap();
    let name = rustls_name(&holder);
    // A TLS client without a certificate: refused at the handshake.
    let anon = tls::client_config(t.ca, None).unwrap();
    let got = tls_ask(&anon, addr, &name, &id, None);
    assert!(got.is_err() || got.as_ref().unwrap().is_empty(), "{got:?}");
    // A member without a grant, or with a forged one: refused.
    let member = tls::client_config(t.ca, Some(&identity)).unwrap();
    for grant in [
        None,
        Some(tls::Grant {
            expires_ms: u64::MAX,
            mac: [7; 32],
        }),
    ] {
        let got = tls_ask(&member, addr, &name, &id, grant).unwrap();
        assert_eq!(got.first(), Some(&1), "refused: {got:?}");
        let text = String::from_utf8_lossy(&got[5..]);
        assert!(text.contains("not authorized"), "{text}");
    }
    assert!(wait_for(QUICK, || c
        .logs()
        .contains("without a valid grant")));
    c.finished(&mut job, JOB_LIMIT);
    assert!(out.join("_SUCCESS").exists());
}

fn rustls_name(w: &WorkerId) -> String {
    tls::worker_name(w)
}

/// A shuffle request over TLS with `config`; what came back.
fn tls_ask(
    config: &Arc<tls::rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    name: &str,
    job: &str,
    grant: Option<tls::Grant>,
) -> std::io::Result<Vec<u8>> {
    let server = tls::rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = tls::rustls::ClientConnection::new(config.clone(), server)
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(QUICK))?;
    let mut s = tls::rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(ask(&mut s, job, grant))
}

#[test]
fn paths_outside_the_data_roots_are_refused_at_submit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let secret = tmp.path().join("secret.txt");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(&secret, "the secret\n").unwrap();
    std::fs::write(root.join("in.txt"), "a b a\n").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("link.txt")).unwrap();
    let root_s = root.display().to_string();
    let c = Cluster::start(&["--data-root", &root_s]);
    let out = root.join("out");
    for (input, output) in [
        (secret.clone(), out.clone()),
        (root.join("../secret.txt"), out.clone()),
        (root.join("link.txt"), out.clone()),
        (PathBuf::from("/etc/passwd"), out.clone()),
        (root.join("in.txt"), tmp.path().join("out-elsewhere")),
        (root.join("in.txt"), root.join("../out-up")),
    ] {
        let o = output.display().to_string();
        let i = input.display().to_string();
        let got = output_within(&mut c.cmd("submit", &[WC, "-o", &o, &i]), QUICK);
        let err = stderr(&got);
        assert_eq!(got.status.code(), Some(1), "{i} -> {o}: {err}");
        assert!(err.contains("outside the data roots"), "{i} -> {o}: {err}");
        assert!(err.contains(&root_s), "names the roots: {err}");
    }
    assert!(!tmp.path().join("out-elsewhere").exists());
    assert!(!out.exists());
    // Inside, it runs.
    let o = out.display().to_string();
    let i = root.join("in.txt").display().to_string();
    let mut c = c;
    c.worker(&[]);
    let got = output_within(&mut c.cmd("submit", &[WC, "-o", &o, &i]), JOB_LIMIT);
    ok(&got);
    assert_eq!(
        read_output(&out),
        vec!["a 2".to_string(), "b 1".to_string()]
    );
}

#[test]
fn a_coordinator_without_data_roots_refuses_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut c = Cluster {
        addr: String::new(),
        state: state.clone(),
        coordinator_args: vec!["--state-dir".into(), state.display().to_string()],
        dir,
        insecure: false,
        coordinator: None,
        workers: Vec::new(),
        logs: Vec::new(),
        env: Vec::new(),
        web: None,
    };
    c.start_coordinator("127.0.0.1:0");
    let o = c.out("out").display().to_string();
    let got = output_within(
        &mut c.cmd("submit", &[WC, "-o", &o, &books()[0].display().to_string()]),
        QUICK,
    );
    assert_eq!(got.status.code(), Some(1));
    assert!(
        stderr(&got).contains("without --data-root"),
        "{}",
        stderr(&got)
    );
    assert!(
        c.logs()
            .contains("no --data-root: every job will be refused"),
        "{}",
        c.logs()
    );
    // A root that does not exist stops a coordinator at start.
    let out = output_within(
        mr().args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(c.dir.path().join("s2"))
            .args(["--data-root", "/nonexistent-root-for-mr-tests"]),
        QUICK,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--data-root /nonexistent-root-for-mr-tests"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn idle_sockets_and_huge_frames_do_not_stop_a_real_job() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    c.worker(&[]);
    let (shuffle, _) = shuffle_of(&c.logs[1]);
    let coordinator: std::net::SocketAddr = c.addr.parse().unwrap();
    // 10,000 idle connections to the coordinator, and a few hundred to a
    // worker's shuffle port, held open while the job runs.
    let mut idle = Vec::new();
    for i in 0..10_000 {
        if let Ok(s) = TcpStream::connect_timeout(&coordinator, Duration::from_secs(2)) {
            idle.push(s);
        } else {
            panic!("connection {i} failed");
        }
    }
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(shuffle) {
            idle.push(s);
        }
    }
    // A client with the token announces a 1 GiB frame: dropped at once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dropped = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let t = Token::parse(&token(&c, "client")).unwrap();
        let config = tls::client_config(t.ca, None).unwrap();
        let tcp = tokio::net::TcpStream::connect(&c.addr).await.unwrap();
        let name = tls::rustls::pki_types::ServerName::try_from(tls::COORDINATOR_NAME).unwrap();
        let mut s = tls::tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        s.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        s.write_all(&[0u8; 4096]).await.unwrap();
        s.flush().await.unwrap();
        let mut buf = [0u8; 16];
        tokio::time::timeout(QUICK, s.read(&mut buf)).await
    });
    assert!(
        matches!(dropped, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is closed: {dropped:?}"
    );
    // And a stranger that keeps opening fresh sockets to both ports while
    // the job runs (each pushed out, it opens another).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            let mut opened = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for to in [shuffle, coordinator] {
                    if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                        held.push_back(s);
                        opened += 1;
                        count.store(opened, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                if held.len() > 600 {
                    held.pop_front();
                    held.pop_front();
                }
            }
            opened
        })
    };
    // The job starts once the flood is under way (however fast this
    // machine opens sockets), and runs while it goes on.
    assert!(wait_for(QUICK, || count
        .load(std::sync::atomic::Ordering::Relaxed)
        >= 200));
    let out = c.out("busy");
    ok(&c.submit(&strs(&book_args(WC, &out, &["-r", "4"]))));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.join().unwrap();
    assert!(opened >= 200, "the flood ran: {opened} sockets");
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
    drop(idle);
}

#[test]
fn insecure_mode_works_and_says_so() {
    let mut c = Cluster::insecure(&[]);
    c.worker(&[]);
    assert!(c.logs().contains("INSECURE"), "{}", c.logs());
    let out = c.out("open");
    ok(&c.submit(&strs(&book_args(WC, &out, &[]))));
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
    let status = output_within(&mut c.cmd("status", &[]), QUICK);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("INSECURE"), "mr status shows it: {text}");
    assert!(
        stderr(&status).contains("runs with --insecure"),
        "{}",
        stderr(&status)
    );
    assert!(!c.state.join("client.token").exists(), "no tokens");
    // A secure client is told what is wrong.
    let mut secure = mr();
    secure.args(["status", "--coordinator", &c.addr]);
    secure.env(
        "MR_TOKEN",
        format!("mr1.client.{}.{}", "0".repeat(64), "1".repeat(64)),
    );
    let got = output_within(&mut secure, QUICK);
    assert_eq!(got.status.code(), Some(1));
    assert!(stderr(&got).contains("pass --insecure"), "{}", stderr(&got));
}

#[test]
fn the_default_state_dir_holds_the_tokens_and_rotation_revokes_them() {
    let home = tempfile::tempdir().unwrap();
    let data = data_dir().display().to_string();
    let start = |extra: &[&str]| {
        let mut child = mr()
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--data-root",
                &data,
            ])
            .args(extra)
            .env("XDG_STATE_HOME", home.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        (child, addr)
    };
    let (mut first, addr) = start(&[]);
    let state = home.path().join("mr");
    assert!(state.join("client.token").exists());
    let status = |addr: &str| {
        let mut cmd = mr();
        cmd.args(["status", "--coordinator", addr])
            .env("XDG_STATE_HOME", home.path());
        output_within(&mut cmd, QUICK)
    };
    // Found by default, as kubectl finds its config.
    let got = status(&addr);
    assert!(got.status.success(), "{}", stderr(&got));
    let old = std::fs::read_to_string(state.join("client.token")).unwrap();
    // One coordinator per state directory.
    let mut second = mr();
    second
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .env("XDG_STATE_HOME", home.path());
    let busy = output_within(&mut second, QUICK);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        stderr(&busy).contains("another coordinator uses the state directory"),
        "{}",
        stderr(&busy)
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // Rotated: the old token is refused, the new one works.
    let (mut rotated, addr) = start(&["--rotate-tokens"]);
    let new = std::fs::read_to_string(state.join("client.token")).unwrap();
    assert_ne!(old, new);
    let got = status(&addr);
    assert!(got.status.success(), "{}", stderr(&got));
    let mut cmd = mr();
    cmd.args(["status", "--coordinator", &addr])
        .env("XDG_STATE_HOME", home.path())
        .env("MR_TOKEN", old.trim());
    let got = output_within(&mut cmd, QUICK);
    assert_eq!(got.status.code(), Some(1));
    assert!(
        stderr(&got).contains("wrong or was revoked"),
        "{}",
        stderr(&got)
    );
    rotated.kill().unwrap();
    rotated.wait().unwrap();
}

/// Regression: after a coordinator restart anyone with the worker token
/// could ask for a live worker's id back (`previous`) before it rejoined,
/// and get its certificate and grant key.
#[test]
fn an_id_goes_back_only_to_the_holder_of_its_certificate() {
    let mut c = Cluster::start(&["--worker-timeout", "60s"]);
    c.worker(&["--slots", "1"]);
    let (_, real) = shuffle_of(&c.logs[1]);
    let addr = c.addr.clone();
    c.kill_coordinator();
    c.start_coordinator(&addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stolen = rt.block_on(async {
        let text = token(&c, "worker");
        let t = Token::parse(&text).unwrap();
        let anon = tls::client_config(t.ca, None).unwrap();
        let client = mr_core::rpc::connect(&c.addr, Some(&anon)).await.unwrap();
        let (_, public_key) = tls::new_key();
        let mut ids = Vec::new();
        for spelling in [
            real.0.clone(),
            real.0.replace('w', "w0"),
            real.0.replace('w', "w+"),
        ] {
            let mut req = register(text.clone(), public_key.clone());
            req.previous = Some(WorkerId(spelling));
            let reg = client.register(context(QUICK), req).await.unwrap().unwrap();
            ids.push(reg.worker);
        }
        ids
    });
    for id in &stolen {
        assert_ne!(id, &real, "an intruder got {real}'s id");
        assert!(!id.0.contains('+') && !id.0.starts_with("w0"), "{id}");
    }
    // The real worker rejoins under its own id and runs a job.
    let out = c.out("after-restart");
    ok(&c.submit(&strs(&book_args(WC, &out, &[]))));
    let r = crate::cluster::success(&out);
    let workers: Vec<&str> = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["attempts"].as_array().unwrap())
        .map(|a| a["worker"].as_str().unwrap())
        .collect();
    assert!(workers.iter().all(|w| *w == real.0), "{workers:?}");
}
