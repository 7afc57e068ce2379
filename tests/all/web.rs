//! The coordinator's web page and `/metrics` (`mr coordinator --http`):
//! real TLS checked against the cluster CA by curl, the client token and
//! the session cookie it is traded for, `/metrics` read by the Prometheus
//! project's own text-format parser (`tests/web/prometheus.sh`), and the
//! page itself in headless Chromium driven over WebDriver
//! (`tests/web/chromium.sh` installs Debian's Chromium and chromedriver):
//! a job's tasks turn from running to done without a reload, a killed
//! worker's attempts show as lost, a wrong token sees nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mr_tests::*;
use serde_json::Value;

use crate::cluster::{Cluster, JOB_LIMIT, QUICK};
use crate::languages::build_step;
use crate::{output_within, wait_for};

/// An HTTP answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// `curl URL` with `args`, checking the server's certificate against
/// `ca` (`None`: curl's own trust, or plain HTTP).
fn fetch(url: &str, ca: Option<&Path>, args: &[&str]) -> Answer {
    let headers = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D"])
        .arg(headers.path())
        .args(["-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = output_within(cmd.args(args).arg(url), QUICK);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(headers.path())
            .unwrap_or_default()
            .to_lowercase(),
        body: body.to_string(),
    }
}

/// `curl` against the cluster's web page, checking its certificate against
/// the cluster CA (`ca.crt`); `args` add headers, a method, ...
fn curl(c: &Cluster, path: &str, args: &[&str]) -> Answer {
    let base = c.web.as_deref().expect("started with --http");
    fetch(
        &format!("{base}{path}"),
        Some(&c.state.join("ca.crt")),
        args,
    )
}

fn token(c: &Cluster, kind: &str) -> String {
    std::fs::read_to_string(c.state.join(format!("{kind}.token")))
        .unwrap()
        .trim()
        .to_string()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `text` with its last hex digit changed (a token or cookie of the right
/// form that is not the right one).
fn forged(text: &str) -> String {
    let mut t = text.to_string();
    let last = t.pop().unwrap();
    t.push(if last == '0' { '1' } else { '0' });
    t
}

#[test]
fn the_page_and_metrics_need_the_client_token_over_tls() {
    let c = Cluster::start(&["--http", "127.0.0.1:0"]);
    let base = c.web.clone().unwrap();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let client = token(&c, "client");
    // The URL with the token is logged once, as Jupyter does.
    let log = std::fs::read_to_string(&c.logs[0]).unwrap();
    assert_eq!(
        log.matches(&format!("{base}/?token={client}")).count(),
        1,
        "{log}"
    );

    for path in [
        "/",
        "/api/jobs",
        "/api/workers",
        "/api/events",
        "/metrics",
        "/api/jobs/job-1-1",
    ] {
        let a = curl(&c, path, &[]);
        assert_eq!(a.status, 401, "{path} without a token: {}", a.body);
        assert!(a.body.contains("client.token"), "{}", a.body);
        assert!(
            !a.body.contains("mr_jobs") && !a.body.contains("<html"),
            "{}",
            a.body
        );
        for wrong in [token(&c, "worker"), forged(&client), "nonsense".to_string()] {
            let a = curl(&c, path, &["-H", &bearer(&wrong)]);
            assert_eq!(a.status, 401, "{path} with {wrong}: {}", a.body);
        }
    }
    let a = curl(&c, "/api/jobs", &["-H", &bearer(&client)]);
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));

    // A wrong token in the URL gets no cookie.
    let a = curl(&c, &format!("/?token={}", forged(&client)), &[]);
    assert_eq!(a.status, 401);
    assert!(!a.headers.contains("set-cookie"), "{}", a.headers);
    // The right one is traded for a cookie, and the URL cleaned of it (a
    // page that goes on to `/`).
    let a = curl(&c, &format!("/?token={client}"), &[]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("url=/\""), "{}", a.body);
    assert!(!a.body.contains(&client), "{}", a.body);
    let cookie = a
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {}", a.headers))
        .to_string();
    let port = base.rsplit(':').next().unwrap();
    assert!(
        cookie.starts_with(&format!("mr_session_{port}=")),
        "{cookie}"
    );
    for attr in [
        "httponly",
        "secure",
        "samesite=strict",
        "path=/",
        "max-age=",
    ] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    for h in [
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "content-security-policy",
    ] {
        assert!(a.headers.contains(h), "{}", a.headers);
    }
    let session = cookie.split(';').next().unwrap().trim().to_string();
    assert!(
        !session.contains(&client[5..]),
        "the cookie is not the token"
    );
    let page = curl(&c, "/", &["-H", &format!("Cookie: {session}")]);
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<title>mr coordinator</title>"),
        "{}",
        page.body
    );
    assert!(
        page.headers.contains("content-security-policy"),
        "{}",
        page.headers
    );
    let a = curl(
        &c,
        "/api/jobs",
        &["-H", &format!("Cookie: {}", forged(&session))],
    );
    assert_eq!(a.status, 401);
    // A POST from the page must say so (a cross-site form cannot).
    let a = curl(
        &c,
        "/api/jobs/job-1-1/cancel",
        &["-X", "POST", "-H", &format!("Cookie: {session}")],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = curl(
        &c,
        "/api/jobs/job-1-1/cancel",
        &[
            "-X",
            "POST",
            "-H",
            &format!("Cookie: {session}"),
            "-H",
            "X-Requested-By: mr",
        ],
    );
    assert_eq!(a.status, 404, "{}", a.body);

    // Cancel, as the page does: a job with no worker to run it.
    let out = c.out("cancelled");
    let book = names(&books()).remove(0);
    let submitted = output_within(
        &mut c.cmd(
            "submit",
            &[WC, &book, "-o", out.to_str().unwrap(), "--detach"],
        ),
        QUICK,
    );
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let jobs: Vec<Value> =
        serde_json::from_str(&curl(&c, "/api/jobs", &["-H", &bearer(&client)]).body).unwrap();
    let job = jobs[0]["job"].as_str().unwrap().to_string();
    assert_eq!(jobs[0]["state"], "running");
    assert_eq!(jobs[0]["running"], 0, "no worker: the page shows it queued");
    let a = curl(
        &c,
        &format!("/api/jobs/{job}/cancel"),
        &[
            "-X",
            "POST",
            "-H",
            &format!("Cookie: {session}"),
            "-H",
            "X-Requested-By: mr",
        ],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(wait_for(QUICK, || {
        let d: Value = serde_json::from_str(
            &curl(&c, &format!("/api/jobs/{job}"), &["-H", &bearer(&client)]).body,
        )
        .unwrap_or(Value::Null);
        d["summary"]["state"] == "cancelled"
    }));

    // A name this coordinator was not started with (DNS rebinding) is
    // refused, even with the token.
    let a = curl(
        &c,
        "/api/jobs",
        &["-H", &bearer(&client), "-H", "Host: evil.example"],
    );
    assert_eq!(a.status, 421, "{}", a.body);
    let a = curl(
        &c,
        "/api/jobs",
        &[
            "-H",
            &bearer(&client),
            "-H",
            &format!("Host: localhost:{port}"),
        ],
    );
    assert_eq!(a.status, 200, "{}", a.body);

    // Only TLS: plain HTTP to the port gets no page.
    let plain = fetch(
        &(base.replace("https://", "http://") + "/metrics"),
        None,
        &[],
    );
    assert!(!plain.body.contains("mr_jobs"), "{}", plain.body);
    // The certificate names 127.0.0.1 and chains to the cluster CA (curl
    // checked it above); without the CA it is refused.
    let untrusted = fetch(&format!("{base}/metrics"), None, &[]);
    assert_eq!(untrusted.status, 0, "no answer: {}", untrusted.body);
}

/// Every sample of `/metrics`, as the Prometheus Python client's parser
/// read them; `None` (said) if it cannot be installed outside CI.
fn scrape(c: &Cluster) -> Option<Vec<Value>> {
    let venv = prometheus_venv()?;
    let a = curl(c, "/metrics", &["-H", &bearer(&token(c, "client"))]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        a.headers
    );
    Some(parse(&venv, &a.body))
}

/// The virtualenv of the Prometheus Python client (`tests/web/prometheus.sh`
/// installs it); `None` (said) if it cannot be installed outside CI.
fn prometheus_venv() -> Option<PathBuf> {
    let out = build_step(
        "the /metrics tests (Prometheus' Python client)",
        Command::new("bash").arg(Path::new(REPO_ROOT).join("tests/web/prometheus.sh")),
    )?;
    Some(PathBuf::from(out.lines().last().unwrap().trim()))
}

/// The value of sample `name` with exactly `labels` (0 if absent).
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .find(|s| {
            let l = s["labels"].as_object().unwrap();
            l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k) == Some(&Value::from(*v)))
        })
        .map_or(0.0, |s| s["value"].as_f64().unwrap())
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_every_attempt() {
    let mut c = Cluster::start(&["--http", "127.0.0.1:0"]);
    c.worker(&["--slots", "1"]);
    c.worker(&["--slots", "2"]);
    assert!(wait_for(QUICK, || {
        let a = curl(&c, "/api/workers", &["-H", &bearer(&token(&c, "client"))]);
        serde_json::from_str::<Value>(&a.body).is_ok_and(|w| w.as_array().unwrap().len() == 2)
    }));
    let books = names(&books());
    let out = c.out("wc");
    let mut args = vec![WC, "-r", "3", "-o", out.to_str().unwrap()];
    args.extend(books.iter().map(String::as_str));
    assert!(c.submit(&args).status.success());
    // And a job whose guest always traps: three failed map attempts.
    let bad = c.dir.path().join("trap");
    std::fs::write(&bad, "x\n").unwrap();
    let failed = c.out("failed");
    let run = c.submit(&[
        HOSTILE,
        "--allow",
        "random",
        "--max-attempts",
        "3",
        "-o",
        failed.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));

    let Some(s) = scrape(&c) else { return };
    let types: std::collections::BTreeMap<&str, &str> = s
        .iter()
        .map(|x| (x["family"].as_str().unwrap(), x["type"].as_str().unwrap()))
        .collect();
    assert_eq!(types["mr_attempts"], "counter");
    assert_eq!(types["mr_attempt_duration_seconds"], "histogram");
    assert_eq!(types["mr_jobs"], "gauge");
    assert_eq!(sample(&s, "mr_jobs", &[("state", "succeeded")]), 1.0);
    assert_eq!(sample(&s, "mr_jobs", &[("state", "failed")]), 1.0);
    assert_eq!(sample(&s, "mr_jobs", &[("state", "running")]), 0.0);
    assert_eq!(sample(&s, "mr_workers", &[]), 2.0);
    assert_eq!(sample(&s, "mr_slots", &[]), 3.0);
    assert_eq!(sample(&s, "mr_tasks_running", &[("kind", "map")]), 0.0);
    let maps = books.len() as f64;
    let ok_maps = sample(
        &s,
        "mr_attempts_total",
        &[("kind", "map"), ("outcome", "succeeded")],
    );
    let ok_reduces = sample(
        &s,
        "mr_attempts_total",
        &[("kind", "reduce"), ("outcome", "succeeded")],
    );
    let failed_maps = sample(
        &s,
        "mr_attempts_total",
        &[("kind", "map"), ("outcome", "failed")],
    );
    assert_eq!(
        (ok_maps, ok_reduces, failed_maps),
        (maps, 3.0, 3.0),
        "{s:?}"
    );
    // The histogram: as many observations as attempts, buckets growing to +Inf.
    let count = sample(&s, "mr_attempt_duration_seconds_count", &[("kind", "map")]);
    assert_eq!(count, maps + 3.0);
    let inf = sample(
        &s,
        "mr_attempt_duration_seconds_bucket",
        &[("kind", "map"), ("le", "+Inf")],
    );
    assert_eq!(inf, count);
    let buckets: Vec<f64> = s
        .iter()
        .filter(|x| {
            x["name"] == "mr_attempt_duration_seconds_bucket" && x["labels"]["kind"] == "map"
        })
        .map(|x| x["value"].as_f64().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert!(sample(&s, "mr_attempt_duration_seconds_sum", &[("kind", "map")]) > 0.0);
    // Shuffled bytes: what the job's map tasks emitted.
    let report = crate::report(&out, "_SUCCESS");
    assert_eq!(
        sample(&s, "mr_shuffle_bytes_total", &[]),
        report["counters"]["map_output_bytes"].as_f64().unwrap()
    );

    // Restarted on the same state directory: the finished jobs are still
    // listed, and the counters start from zero (nothing counted twice).
    c.kill_coordinator();
    c.start_coordinator("127.0.0.1:0");
    let a = curl(&c, "/api/jobs", &["-H", &bearer(&token(&c, "client"))]);
    assert_eq!(a.status, 200, "{}", a.body);
    let states: Vec<String> = serde_json::from_str::<Vec<Value>>(&a.body)
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["succeeded", "failed"], "{}", a.body);
    let s = scrape(&c).unwrap();
    assert_eq!(sample(&s, "mr_jobs", &[("state", "succeeded")]), 1.0);
    assert_eq!(
        sample(
            &s,
            "mr_attempts_total",
            &[("kind", "map"), ("outcome", "succeeded")]
        ),
        0.0
    );
}

/// A WebDriver session on headless Chromium, with chromedriver killed
/// when dropped.
struct Browser {
    driver: std::process::Child,
    client: Option<fantoccini::Client>,
    rt: tokio::runtime::Runtime,
}

impl Browser {
    /// Starts chromedriver and a session of Chromium that accepts the
    /// cluster's certificate (the test's browser does not hold its CA);
    /// `None` (said) if Chromium cannot be installed outside CI.
    fn start(dir: &Path) -> Option<Browser> {
        let out = build_step(
            "the browser test (Chromium and chromedriver)",
            Command::new("bash").arg(Path::new(REPO_ROOT).join("tests/web/chromium.sh")),
        )?;
        let paths: Vec<&str> = out.lines().filter(|l| l.starts_with('/')).collect();
        let [.., chromium, chromedriver] = paths[..] else {
            panic!("chromium.sh printed no paths: {out}");
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut b = Browser {
            driver,
            client: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        assert!(
            wait_for(QUICK, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "chromedriver did not listen"
        );
        let mut caps = serde_json::Map::new();
        caps.insert("acceptInsecureCerts".into(), true.into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--window-size=1280,1400",
                    format!("--user-data-dir={}", dir.join("chromium").display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client =
            b.rt.block_on(
                fantoccini::ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .unwrap_or_else(|e| panic!("no WebDriver session: {e}"));
        b.client = Some(client);
        Some(b)
    }

    fn goto(&self, url: &str) {
        let c = self.client.as_ref().unwrap();
        self.rt.block_on(c.goto(url)).unwrap();
    }

    /// Runs `script` (a function body) in the page; its result.
    fn js(&self, script: &str) -> Value {
        let c = self.client.as_ref().unwrap();
        self.rt
            .block_on(c.execute(script, Vec::new()))
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits (at most `limit`) until `script` returns true.
    fn until(&self, limit: Duration, script: &str) -> bool {
        wait_for(limit, || {
            let ok = self.js(script) == Value::Bool(true);
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        })
    }

    fn url(&self) -> String {
        let c = self.client.as_ref().unwrap();
        self.rt.block_on(c.current_url()).unwrap().to_string()
    }

    fn screenshot(&self, to: &Path) {
        let c = self.client.as_ref().unwrap();
        let png = self.rt.block_on(c.screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_page_shows_a_job_live_and_a_lost_worker_in_headless_chromium() {
    let mut c = Cluster::start(&["--http", "127.0.0.1:0", "--worker-timeout", "2s"]);
    let Some(b) = Browser::start(c.dir.path()) else {
        return;
    };
    let base = c.web.clone().unwrap();
    let client = token(&c, "client");

    // A wrong token sees nothing.
    b.goto(&format!("{base}/?token={}", forged(&client)));
    assert_eq!(
        b.js("return document.getElementById('jobs') === null && document.body.innerText.includes('not authorized')"),
        Value::Bool(true),
        "{}",
        b.js("return document.body.innerText")
    );
    // The token in the URL is traded for a cookie, and the URL cleaned.
    b.goto(&format!("{base}/?token={client}"));
    assert!(
        wait_for(QUICK, || b.url() == format!("{base}/")),
        "{}",
        b.url()
    );
    assert!(b.until(
        QUICK,
        "return document.getElementById('live').textContent === 'live'"
    ));
    // Set once: a reload would lose it.
    b.js("window.mrMarker = 42; window.mrErrors = []; window.addEventListener('error', e => mrErrors.push(e.message)); return true");

    // Eight maps of 1.5 s each on two slots, then two reduces of 1 s.
    let inputs = c.dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut files = Vec::new();
    for i in 0..8 {
        let f = inputs.join(format!("in{i}.txt"));
        std::fs::write(&f, format!("sleep 1500\nalpha beta w{i}\ngamma alpha\n")).unwrap();
        files.push(f.display().to_string());
    }
    let out = c.out("live");
    let mut args = vec![
        TIMING,
        "--allow",
        "clock",
        "-r",
        "2",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(files.iter().map(String::as_str));
    let mut submit = c.spawn_submit(&args);

    // The job appears, queued: no worker yet.
    assert!(
        b.until(
            QUICK,
            "return document.querySelector('#jobs tr[data-state=running] .state.queued') !== null"
        ),
        "{}",
        b.js("return document.getElementById('jobs').innerText")
    );
    c.worker(&["--slots", "1"]);
    c.worker(&["--slots", "1"]);
    assert!(b.until(
        QUICK,
        "return document.querySelectorAll('#workers tr[data-worker]').length === 2"
    ));

    // Its first map runs.
    assert!(b.until(
        QUICK,
        "return document.querySelector('#jobs tr[data-state=running]') !== null"
    ));
    assert!(b.until(
        QUICK,
        "return document.querySelector('#maps .task[data-task=\"map-0\"][data-state=running]') !== null"
    ), "{}\n{}", b.js("return JSON.stringify([window.mrErrors, document.getElementById('job').outerHTML])"), c.logs());
    // A worker running an attempt is killed: its attempts show as lost.
    let busy = b.js(
        "const r = [...document.querySelectorAll('#workers tr[data-worker]')].find(r => r.children[4].textContent !== '0'); return r ? r.dataset.worker : null",
    );
    let busy = busy
        .as_str()
        .unwrap_or_else(|| panic!("no worker runs anything: {busy}"));
    let i = c.worker_index(busy);
    c.kill_worker(i);
    assert!(
        b.until(
            QUICK,
            "return document.querySelector('#timeline .attempt[data-outcome=killed]') !== null"
        ),
        "no killed attempt on the page:\n{}\n{}",
        b.js("return document.getElementById('timeline').innerText"),
        c.logs()
    );
    assert!(b.until(
        QUICK,
        "return document.querySelectorAll('#workers tr[data-worker]').length === 1"
    ));
    let failures = b.js("return document.getElementById('failures').innerText");
    assert!(failures.as_str().unwrap().contains("killed"), "{failures}");

    // The job ends; every task shows done, without a reload.
    c.finished(&mut submit, JOB_LIMIT);
    assert!(b.until(
        QUICK,
        "return document.querySelector('#jobs tr[data-state=succeeded]') !== null && document.getElementById('job-state').textContent === 'succeeded'"
    ));
    assert!(b.until(
        QUICK,
        "return [...document.querySelectorAll('#pipeline .task')].every(t => t.dataset.state === 'done') && document.querySelectorAll('#pipeline .task').length === 10"
    ), "{}", b.js("return document.getElementById('pipeline').innerHTML"));
    assert_eq!(
        b.js("return window.mrMarker"),
        Value::from(42),
        "the page was reloaded"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-pipeline.png");
    b.screenshot(&shot);
    eprintln!("screenshot of the page: {}", shot.display());
}

#[test]
fn an_insecure_page_needs_no_token_but_refuses_other_host_names() {
    let c = Cluster::insecure(&["--http", "127.0.0.1:0"]);
    let base = c.web.clone().unwrap();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let get = |host: &str| {
        fetch(
            &format!("{base}/api/jobs"),
            None,
            &["-H", &format!("Host: {host}")],
        )
        .status
    };
    let port = base.rsplit(':').next().unwrap();
    assert_eq!(get(&format!("127.0.0.1:{port}")), 200);
    // A web site whose name was rebound to this address reads nothing.
    assert_eq!(get(&format!("attacker.example:{port}")), 421);
}

/// The address a worker serves `/metrics` at, from its log.
fn metrics_addr(log: &Path) -> String {
    let mut addr = None;
    let said = wait_for(QUICK, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        addr = text
            .lines()
            .find_map(|l| l.split("/metrics at https://").nth(1))
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string);
        addr.is_some()
    });
    assert!(said, "{}", std::fs::read_to_string(log).unwrap_or_default());
    addr.unwrap()
}

/// `curl` against a worker's `/metrics` as `metrics.worker.mr` (the name
/// its certificate holds), checked against the cluster CA; `args` add
/// headers.
fn worker_metrics(c: &Cluster, addr: &str, args: &[&str]) -> Answer {
    let port = addr.rsplit(':').next().unwrap();
    let resolve = format!("metrics.worker.mr:{port}:127.0.0.1");
    let mut all = vec!["--resolve", &resolve];
    all.extend(args);
    fetch(
        &format!("https://metrics.worker.mr:{port}/metrics"),
        Some(&c.state.join("ca.crt")),
        &all,
    )
}

/// `-H Authorization: Bearer <token>`, or nothing.
fn with_bearer(token: Option<&str>) -> Vec<String> {
    token.map_or_else(Vec::new, |t| vec!["-H".into(), bearer(t)])
}

#[test]
fn workers_serve_metrics_to_the_metrics_token_only() {
    let mut c = Cluster::start(&["--http", "127.0.0.1:0"]);
    let mut addrs = Vec::new();
    for slots in ["2", "1"] {
        c.worker(&["--slots", slots, "--metrics", "127.0.0.1:0"]);
        addrs.push(metrics_addr(c.logs.last().unwrap()));
    }
    let metrics = token(&c, "metrics");
    // Before any job: the slots, nothing busy.
    let auth = ["-H".to_string(), bearer(&metrics)];
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let a = worker_metrics(&c, &addrs[0], &auth);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("mr_worker_slots 2\n"), "{}", a.body);
    assert!(a.body.contains("mr_worker_slots_busy 0\n"), "{}", a.body);
    // Prometheus names its target in Host: any name is fine with TLS and
    // the token (a rebound page has no token).
    let named = [&auth[..], &["-H", "Host: worker-1.example:9400"]].concat();
    assert_eq!(worker_metrics(&c, &addrs[0], &named).status, 200);
    // Any other token, or none, is refused; so is plain HTTP.
    for wrong in [
        None,
        Some(token(&c, "client")),
        Some(token(&c, "worker")),
        Some(forged(&metrics)),
    ] {
        let header = with_bearer(wrong.as_deref());
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let a = worker_metrics(&c, &addrs[0], &header);
        assert_eq!(a.status, 401, "{wrong:?}: {}", a.body);
        assert!(a.body.contains("metrics.token"), "{}", a.body);
    }
    let plain = fetch(&format!("http://{}/metrics", addrs[0]), None, &auth);
    assert!(!plain.body.contains("mr_worker"), "{}", plain.body);
    // The coordinator's /metrics takes the metrics token too (and a wrong
    // one is told it is wrong), but nothing else does.
    let a = curl(&c, "/metrics", &["-H", &bearer(&metrics)]);
    assert_eq!(a.status, 200, "{}", a.body);
    let a = curl(&c, "/metrics", &["-H", &bearer(&forged(&metrics))]);
    assert_eq!(a.status, 401);
    assert!(a.body.contains("wrong or was revoked"), "{}", a.body);
    let a = curl(&c, "/api/jobs", &["-H", &bearer(&metrics)]);
    assert_eq!(a.status, 401, "{}", a.body);

    let books = names(&books());
    let out = c.out("wc");
    let mut args = vec![WC, "-r", "3", "-o", out.to_str().unwrap()];
    args.extend(books.iter().map(String::as_str));
    assert!(c.submit(&args).status.success());
    let report = crate::report(&out, "_SUCCESS");

    // Parsed by Prometheus' own parser, the two workers' counts add up to
    // the job's attempts.
    let Some(venv) = prometheus_venv() else {
        return;
    };
    let mut succeeded = 0.0;
    let (mut served, mut fetched) = (0.0, 0.0);
    for addr in &addrs {
        let a = worker_metrics(&c, addr, &auth);
        assert_eq!(a.status, 200, "{}", a.body);
        let s = parse(&venv, &a.body);
        let ran = sample(
            &s,
            "mr_worker_attempts_total",
            &[("kind", "map"), ("outcome", "succeeded")],
        ) + sample(
            &s,
            "mr_worker_attempts_total",
            &[("kind", "reduce"), ("outcome", "succeeded")],
        );
        succeeded += ran;
        if ran > 0.0 {
            // One app, one set of limits: loaded once, then reused.
            assert_eq!(
                sample(&s, "mr_worker_app_loads_total", &[]),
                1.0,
                "{}",
                a.body
            );
            assert_eq!(
                sample(&s, "mr_worker_app_reuses_total", &[]),
                ran - 1.0,
                "{}",
                a.body
            );
        }
        assert_eq!(sample(&s, "mr_worker_slots_busy", &[]), 0.0);
        served += sample(&s, "mr_worker_served_bytes_total", &[]);
        fetched += sample(&s, "mr_worker_fetched_bytes_total", &[]);
    }
    assert_eq!(succeeded, (books.len() + 3) as f64);
    // The page's workers show what they served, as their heartbeats say.
    let mut seen = Value::Null;
    let shown = wait_for(QUICK, || {
        let a = curl(&c, "/api/workers", &["-H", &bearer(&token(&c, "client"))]);
        seen = serde_json::from_str(&a.body).unwrap_or(Value::Null);
        seen.as_array().is_some_and(|w| {
            w.iter()
                .map(|w| w["served_bytes"].as_f64().unwrap_or(-1.0))
                .sum::<f64>()
                == served
        })
    });
    assert!(shown, "the page shows {seen}, the workers {served}");
    // Output fetched from another worker went over the network both ways.
    let workers_of = |kind: &str| -> std::collections::BTreeSet<String> {
        crate::cluster::attempts(&report, kind)
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .map(|a| a["worker"].as_str().unwrap().to_string())
            .collect()
    };
    let (mappers, reducers) = (workers_of("map"), workers_of("reduce"));
    if reducers.iter().any(|r| mappers.iter().any(|m| m != r)) {
        assert!(
            served > 0.0 && fetched > 0.0,
            "served {served}, fetched {fetched}"
        );
    }
}

/// Prometheus text read by the Prometheus Python client's parser.
fn parse(venv: &Path, text: &str) -> Vec<Value> {
    let mut parse = Command::new(venv.join("bin/python"))
        .arg(Path::new(REPO_ROOT).join("tests/web/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    parse
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = parse.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused it: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
