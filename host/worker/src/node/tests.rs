//! The worker's modules against a scripted coordinator (the real RPC
//! service over tarpc's in-memory transport; no sockets, no wasm).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::AppRef;
use mr_core::rpc::{
    Assignment, AttemptKey, AttemptResult, Chunk, Coordinator, CoordinatorClient, Heartbeat,
    HeartbeatReply, JobDetail, JobSummary, MapHost, MapOutputRef, Register, Registered, RpcError,
    TaskLimits, Transport, Work,
};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};

use super::*;
use crate::runfile::RunFileWriter;

/// What the fake coordinator saw and will say.
#[derive(Default)]
struct Script {
    registrations: Vec<Register>,
    /// Answers to `heartbeat`, in order (then: nothing to say).
    replies: VecDeque<Result<HeartbeatReply, RpcError>>,
    beats: Vec<Heartbeat>,
    /// The app's bytes, as `fetch_app` serves them.
    app: Vec<u8>,
    next: u64,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<Script>>);

fn unused<T>() -> Result<T, RpcError> {
    Err(RpcError::Internal("not in this script".into()))
}

impl Coordinator for Fake {
    async fn register(self, _: Context, req: Register) -> Result<Registered, RpcError> {
        let mut s = self.0.lock().unwrap();
        s.registrations.push(req.clone());
        s.next += 1;
        Ok(Registered {
            worker: req.previous.unwrap_or(WorkerId(format!("w{}", s.next))),
            heartbeat: Duration::from_millis(50),
            credentials: None,
            data_roots: None,
            excluded: Vec::new(),
            object_roots: Vec::new(),
        })
    }
    async fn heartbeat(
        self,
        _: Context,
        _: WorkerId,
        beat: Heartbeat,
    ) -> Result<HeartbeatReply, RpcError> {
        let next = {
            let mut s = self.0.lock().unwrap();
            s.beats.push(beat);
            s.replies.pop_front()
        };
        match next {
            Some(r) => r,
            None => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(HeartbeatReply::default())
            }
        }
    }
    async fn request_tasks(
        self,
        _: Context,
        _: WorkerId,
        _: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Vec::new())
    }
    async fn report(self, _: Context, _: WorkerId, _: AttemptResult) -> Result<(), RpcError> {
        Ok(())
    }
    async fn goodbye(self, _: Context, _: WorkerId) -> Result<(), RpcError> {
        Ok(())
    }
    async fn fetch_app(self, _: Context, _: String, offset: u64) -> Result<Chunk, RpcError> {
        let s = self.0.lock().unwrap();
        Ok(Chunk(s.app[offset as usize..].to_vec()))
    }
    async fn hello(self, _: Context, _: u32, _: String) -> Result<String, RpcError> {
        unused()
    }
    async fn upload_app(self, _: Context, _: AppRef, _: u64, _: Chunk) -> Result<bool, RpcError> {
        unused()
    }
    async fn has_app(self, _: Context, _: String) -> Result<bool, RpcError> {
        unused()
    }
    async fn submit(self, _: Context, _: mr_core::job::JobSpec) -> Result<JobId, RpcError> {
        unused()
    }
    async fn jobs(self, _: Context) -> Result<Vec<JobSummary>, RpcError> {
        unused()
    }
    async fn summary(self, _: Context, _: JobId) -> Result<JobSummary, RpcError> {
        unused()
    }
    async fn watch(self, _: Context, _: JobId, _: u64) -> Result<JobSummary, RpcError> {
        unused()
    }
    async fn job(self, _: Context, _: JobId) -> Result<JobDetail, RpcError> {
        unused()
    }
    async fn cancel(self, _: Context, _: JobId, _: bool) -> Result<JobSummary, RpcError> {
        unused()
    }
    async fn shutdown(self, _: Context) -> Result<(), RpcError> {
        unused()
    }

    async fn workers(self, _: Context) -> Result<Vec<mr_core::rpc::WorkerSummary>, RpcError> {
        unused()
    }

    async fn release_worker(self, _: Context, _: WorkerId) -> Result<(), RpcError> {
        unused()
    }
}

/// A connection to `fake`, in process.
fn transport(fake: Fake) -> Transport {
    Transport::InProcess(Arc::new(move || -> CoordinatorClient {
        let (client, server) = tarpc::transport::channel::unbounded();
        let serving = fake.clone();
        tokio::spawn(
            BaseChannel::with_defaults(server)
                .execute(serving.serve())
                .for_each(|call| async {
                    tokio::spawn(call);
                }),
        );
        CoordinatorClient::new(tarpc::client::Config::default(), client).spawn()
    }))
}

/// A worker of `fake`, not running its loops, with its data in `dir`.
fn worker(fake: &Fake, dir: &std::path::Path) -> Arc<Worker> {
    let options = WorkerOptions {
        data_dir: Some(dir.to_path_buf()),
        shuffle: Shuffle::InPlace,
        give_up_after: Duration::from_secs(2),
        ..WorkerOptions::new(transport(fake.clone()), 2)
    };
    std::fs::create_dir_all(dir.join("jobs")).unwrap();
    std::fs::create_dir_all(dir.join("apps")).unwrap();
    Arc::new(Worker {
        register: Register {
            version: options.protocol_version,
            host: "test".into(),
            pid: 1,
            slots: options.slots,
            shuffle_addr: None,
            previous: None,
            token: String::new(),
            public_key: Vec::new(),
        },
        link: tokio::sync::Mutex::new(connection::Link::default()),
        running: Mutex::new(Default::default()),
        free: Mutex::new((0..options.slots).collect()),
        freed: tokio::sync::Notify::new(),
        received: std::sync::atomic::AtomicU64::new(0),
        stopping: std::sync::atomic::AtomicBool::new(false),
        apps: apps::AppCache::new(dir.join("apps"), &[]),
        engine: SandboxEngine::new().unwrap(),
        outputs: Arc::new(MapOutputs::new(dir.join("jobs"))),
        stats: super::metrics::Stats::default(),
        key: None,
        shuffle_auth: std::sync::RwLock::new(None),
        roots: Mutex::new(mr_core::roots::DataRoots::unlimited()),
        private_dirs: Vec::new(),
        options,
    })
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

fn key(task: TaskId, attempt: u32) -> AttemptKey {
    AttemptKey {
        job: JobId("job-1-1".into()),
        task,
        attempt,
    }
}

/// Lists `key` as running, as `accept` does.
fn running(w: &Worker, key: &AttemptKey) -> TaskControl {
    let control = TaskControl::default();
    w.running.lock().unwrap().insert(
        key.clone(),
        RunningTask {
            control: control.clone(),
            preparing: Arc::new(AtomicBool::new(false)),
        },
    );
    control
}

#[tokio::test]
async fn a_coordinator_that_forgot_the_worker_gets_it_back_under_its_old_id() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script::default())));
    fake.0
        .lock()
        .unwrap()
        .replies
        .push_back(Err(RpcError::UnknownWorker));
    let w = worker(&fake, dir.path());
    let (_, id) = w.client().await.unwrap();
    w.received.store(7, Ordering::SeqCst);
    // The first heartbeat is refused (the coordinator restarted): the
    // worker registers again, asking for its id back, then carries on.
    let reply = w
        .rpc(Duration::from_secs(5), |c, ctx, id| async move {
            c.heartbeat(ctx, id, Heartbeat::default()).await
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, HeartbeatReply::default());
    let s = fake.0.lock().unwrap();
    assert_eq!(s.registrations.len(), 2);
    assert_eq!(s.registrations[1].previous, Some(id.clone()));
    assert_eq!(
        w.received.load(Ordering::SeqCst),
        0,
        "numbering starts afresh"
    );
}

#[tokio::test]
async fn an_unreachable_coordinator_is_given_up_after_the_time_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = WorkerOptions {
        give_up_after: Duration::from_millis(300),
        ..WorkerOptions::new(
            Transport::Tcp {
                addr: format!("127.0.0.1:{port}"),
                tls: None,
            },
            1,
        )
    };
    let started = std::time::Instant::now();
    let err = connection::probe(&options).await.unwrap_err();
    assert!(matches!(err, WorkerError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(dir);
}

#[tokio::test]
async fn heartbeats_list_what_runs_and_their_replies_cancel_and_forget() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script::default())));
    let w = worker(&fake, dir.path());
    let (a, b) = (key(TaskId::Map(0), 1), key(TaskId::Map(1), 1));
    let (ca, cb) = (running(&w, &a), running(&w, &b));
    w.received.store(2, Ordering::SeqCst);
    let beat = w.beat();
    assert_eq!(beat.received, 2);
    assert_eq!(beat.running.len(), 2);
    // A job's map output, on disk and in memory.
    let job = JobId("job-1-1".into());
    let job_dir = w.outputs.make_job_dir(&job).unwrap();
    let mut run = RunFileWriter::in_memory(1);
    run.write(0, b"k", b"v").unwrap();
    let (bytes, idx) = run.finish_bytes();
    w.outputs
        .keep(&job, 0, 1, Source::Memory(bytes.into()), &idx)
        .unwrap();
    let shutdown = w.apply(HeartbeatReply {
        cancel: vec![a.clone()],
        forget_jobs: vec![job.clone(), JobId("../etc".into())],
        shutdown: false,
    });
    assert!(!shutdown);
    assert!(ca.is_cancelled() && !cb.is_cancelled());
    assert!(w.outputs.segment(&job, 0, 1, 0).is_err(), "forgotten");
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while job_dir.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the job's directory is removed");
    assert!(w.apply(HeartbeatReply {
        shutdown: true,
        ..HeartbeatReply::default()
    }));
}

use crate::runfile::Source;

fn assignment(seq: u64, slot: u32) -> Assignment {
    Assignment {
        key: key(TaskId::Map(seq as u32), 1),
        seq,
        slot,
        app: AppRef {
            name: "a".into(),
            sha256: "ab".repeat(32),
            size: 1,
        },
        limits: TaskLimits {
            memory_limit: 1 << 20,
            attempt_timeout: Duration::from_secs(1),
            grants: Default::default(),
            sort_buffer: 1 << 20,
            reduces: 1,
            digests: false,
        },
        work: Work::Map {
            splits: vec![mr_core::split::Split {
                input: "i".into(),
                path: std::path::PathBuf::from("/nonexistent/i").into(),
                start: 0,
                end: 1,
            }],
        },
    }
}

#[tokio::test]
async fn an_assignment_is_listed_before_it_is_counted_received() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script::default())));
    let w = worker(&fake, dir.path());
    w.client().await.unwrap();
    w.stopping.store(true, Ordering::SeqCst); // its attempt ends at once
                                              // (A current-thread runtime: the attempt's task runs only once this
                                              // test awaits, so what `accept` did can be seen first.)
    w.accept(assignment(3, 1));
    let beat = w.beat();
    assert_eq!(beat.received, 3);
    assert_eq!(beat.running.len(), 1);
    assert_eq!(beat.running[0].key.task, TaskId::Map(3));
    assert!(!w.free.lock().unwrap().contains(&1), "its slot is taken");
    // It ends (cancelled: the worker is stopping) and frees its slot.
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        while !w.free.lock().unwrap().contains(&1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(freed.is_ok());
    assert!(w.running.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_app_that_does_not_match_its_sha256_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script {
        app: b"not the app".to_vec(),
        ..Script::default()
    })));
    let w = worker(&fake, dir.path());
    let app = AppRef {
        name: "a".into(),
        sha256: "ab".repeat(32),
        size: 11,
    };
    let err = w
        .sandbox(&app, &assignment(1, 0).limits)
        .await
        .err()
        .unwrap();
    assert!(err.contains("does not match its sha256"), "{err}");
    let bad = AppRef {
        sha256: "../x".into(),
        ..app
    };
    let err = w
        .sandbox(&bad, &assignment(1, 0).limits)
        .await
        .err()
        .unwrap();
    assert!(err.contains("not a sha256"), "{err}");
}

#[tokio::test]
async fn a_reduce_reads_its_own_workers_output_in_place_and_fetches_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script::default())));
    let w = worker(&fake, dir.path());
    let (_, me) = w.client().await.unwrap();
    let job = JobId("job-1-1".into());
    w.outputs.make_job_dir(&job).unwrap();
    // Map 0 ran here (in memory), map 1 here too (a file).
    let mut run = RunFileWriter::in_memory(2);
    run.write(1, b"a", b"1").unwrap();
    let (bytes, idx) = run.finish_bytes();
    w.outputs
        .keep(&job, 0, 1, Source::Memory(bytes.into()), &idx)
        .unwrap();
    let mut file = RunFileWriter::create(&w.outputs.path(&job, 1, 2), 2).unwrap();
    file.write(1, b"b", b"1").unwrap();
    let idx = file.finish().unwrap();
    w.outputs
        .keep(&job, 1, 2, Source::File(w.outputs.path(&job, 1, 2)), &idx)
        .unwrap();
    let mine = mr_core::rpc::MapOutputs {
        hosts: vec![MapHost {
            worker: me.clone(),
            addr: None,
        }],
        maps: vec![
            MapOutputRef {
                host: 0,
                attempt: 1,
                bytes: u64::MAX,
            },
            MapOutputRef {
                host: 0,
                attempt: 2,
                bytes: u64::MAX,
            },
        ],
    };
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let control = TaskControl::default();
    let got = w
        .gather(&job, 1, &mine, &[], &scratch, &control, far())
        .await
        .unwrap()
        .0;
    assert_eq!(got.len(), 2);
    assert!(matches!(got[0].0, Source::Memory(_)));
    assert!(matches!(got[1].0, Source::File(_)));
    // An output this worker should hold but does not: reported, with the
    // map and attempt at fault.
    let mut lost = mine.clone();
    lost.maps[1].attempt = 9;
    let (map, attempt, _) = w
        .gather(&job, 1, &lost, &[], &scratch, &control, far())
        .await
        .unwrap_err();
    assert_eq!((map, attempt), (1, 9));
    // Another worker's output, where nobody serves it.
    let mut elsewhere = mine;
    elsewhere.hosts.push(MapHost {
        worker: WorkerId("w99".into()),
        addr: None,
    });
    elsewhere.maps[0].host = 1;
    let (map, _, e) = w
        .gather(&job, 1, &elsewhere, &[], &scratch, &control, far())
        .await
        .unwrap_err();
    assert_eq!(map, 0);
    assert!(e.to_string().contains("serves no map output"), "{e}");
}

#[tokio::test]
async fn a_host_that_does_not_send_within_the_attempts_budget_is_blamed() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake(Arc::new(Mutex::new(Script::default())));
    let w = worker(&fake, dir.path());
    w.client().await.unwrap();
    // Accepts, then sends nothing (a stopped or trickling peer).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (_s, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await
    });
    let outputs = mr_core::rpc::MapOutputs {
        hosts: vec![MapHost {
            worker: WorkerId("w99".into()),
            addr: Some(addr),
        }],
        maps: vec![MapOutputRef {
            host: 0,
            attempt: 3,
            bytes: u64::MAX,
        }],
    };
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let job = JobId("job-1-1".into());
    let (map, attempt, e) = w
        .gather(
            &job,
            0,
            &outputs,
            &[],
            &scratch,
            &TaskControl::default(),
            deadline,
        )
        .await
        .unwrap_err();
    assert_eq!((map, attempt), (0, 3), "the map output at fault");
    assert!(
        matches!(&e, crate::shuffle::FetchError::Stalled(m) if m.contains("time budget")),
        "{e:?}"
    );
}
