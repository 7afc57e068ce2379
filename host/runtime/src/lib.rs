//! The sandbox: the only crate of `mr` that depends on wasmtime.
//!
//! It narrows wasmtime to what a task needs and switches the protections on
//! by default:
//! - [`SandboxEngine`]: one wasmtime engine per process, with epoch
//!   interruption (a ticker thread advances the epoch every
//!   [`EPOCH_TICK`]) and a bounded wasm stack.
//! - [`Sandbox`]: one app, compiled once (and cached on disk by the
//!   component's sha256) and pre-linked into an `InstancePre`; every task
//!   instantiates a fresh store from it, so nothing survives a trap.
//! - [`Sandbox::run_map`] and [`Reducer`]: the calls a task makes. Apps of
//!   either contract run: `mr:app@0.2.0` (data in batches of bytes, the
//!   run-file records of `mr_core::records`) and `mr:app@0.1.x` (lists of
//!   records of strings), whose batches the host converts; the rest of
//!   `mr` sees only the byte batches.
//! - [`GuestFailure`]: every way a guest can fail, in words for users.
//!
//! What a guest gets (see `wasi` module): no files, no network, no
//! environment or arguments, stdout/stderr captured (bounded) into the
//! task's log; a wall clock frozen at the epoch, a monotonic clock frozen at
//! zero and a fixed random sequence unless the job grants `clock` or
//! `random`; at most `memory_limit` bytes of linear memory; at most
//! `attempt_timeout` of wall time per attempt.

mod cache;
mod failure;
mod wasi;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, Store, UpdateDeadline};

pub use failure::{FailureKind, GuestFailure, LoadError};
pub use wasi::{Grants, TaskControl, MALFORMED};

/// The current contract, `mr:app@0.2.1` (`wit/mr.wit`; 0.2.0 apps link to
/// it too).
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "mr:app/mapreduce",
        imports: { default: trappable },
    });
}

/// The first contract, `mr:app@0.1.x` (`wit/0.1/mr.wit`), for apps built
/// against it.
mod bindings01 {
    wasmtime::component::bindgen!({
        path: "../../wit/0.1",
        world: "mr:app/mapreduce",
        imports: { default: trappable },
    });
}

use mr_core::records::{self, Groups};

/// An app's exports, of either contract.
enum Exports {
    V2(bindings::Mapreduce),
    V1(bindings01::Mapreduce),
}

/// An app linked, of either contract.
enum Pre {
    V2(bindings::MapreducePre<wasi::TaskState>),
    V1(bindings01::MapreducePre<wasi::TaskState>),
}

/// The most key and value bytes one `emit` call may hand over: the host
/// copies a batch out of the guest, outside the guest's memory limit, so
/// it is kept well below that (the SDKs send about 1 MiB).
pub const MAX_EMIT_BATCH: usize = 16 << 20;

/// The name and version of the world apps implement (those built for
/// `mr:app/mapreduce@0.1.x` run too).
pub const WORLD: &str = "mr:app/mapreduce@0.2.1";
/// How often the epoch advances.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Epoch ticks between a running guest's checks of its time limit and
/// cancel flag (each check also counts as progress): the granularity of
/// time limits and how soon a cancelled guest stops.
pub const PROGRESS_TICKS: u64 = 10;

/// Limits and grants for every task of a job.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Linear memory one task's instance may use, in bytes (all memories of
    /// the component together).
    pub memory_limit: usize,
    /// Wall time one attempt may spend in the guest (`--attempt-timeout`).
    pub attempt_timeout: Duration,
    /// Capabilities granted beyond the default-deny sandbox.
    pub grants: Grants,
    /// Bytes of guest stdout/stderr kept per task (the rest is dropped).
    pub output_limit: usize,
    /// Where compiled apps are cached (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_limit: 512 << 20,
            attempt_timeout: Duration::from_secs(600),
            grants: Grants::default(),
            output_limit: 64 << 10,
            cache_dir: None,
        }
    }
}

/// Native stack for wasm code: room for deep but sane recursion; beyond it
/// a guest fails with a stack overflow instead of crashing the host.
const MAX_WASM_STACK: usize = 1 << 20;

/// A wasmtime engine configured for untrusted guests, with its epoch ticker.
#[derive(Clone)]
pub struct SandboxEngine {
    engine: Engine,
    _ticker: Arc<Ticker>,
}

struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl SandboxEngine {
    /// Creates the engine and starts its epoch ticker thread.
    ///
    /// Fails only if wasmtime rejects the configuration (a bug).
    pub fn new() -> Result<Self, LoadError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        // Deterministic execution (wasmtime's "deterministic execution"
        // guide), so that two hosts running one attempt compute the same
        // bytes, as `--verify` and backup attempts rely on: NaNs are
        // canonical, relaxed SIMD behaves the same on every CPU (threads are
        // not built in). The rest (same memory limits, stack size, no clock or
        // randomness unless granted) holds for every job already.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        let engine = Engine::new(&config).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("mr-epoch".into())
            .spawn(move || {
                // The epoch follows real time: a late wake-up catches up, so
                // tick counts (task time limits) do not drift.
                let start = std::time::Instant::now();
                let mut ticks: u128 = 0;
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    let due = start.elapsed().as_nanos() / EPOCH_TICK.as_nanos();
                    while ticks < due {
                        e.increment_epoch();
                        ticks += 1;
                    }
                }
            })
            .map_err(|e| LoadError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(SandboxEngine {
            engine,
            _ticker: Arc::new(Ticker(stop)),
        })
    }
}

/// One app, compiled and linked, ready to run tasks.
pub struct Sandbox {
    engine: SandboxEngine,
    pre: Pre,
    config: SandboxConfig,
    name: String,
    sha256: String,
}

impl Sandbox {
    /// Loads the component at `path`: checks it is a component implementing
    /// [`WORLD`], compiles it (or loads it from the cache) and links it.
    ///
    /// Fails with a [`LoadError`] that says what is wrong with the file.
    pub fn load(
        engine: &SandboxEngine,
        path: &Path,
        config: SandboxConfig,
    ) -> Result<Sandbox, LoadError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: name.clone(),
            source: e,
        })?;
        failure::check_header(&name, &bytes)?;
        let sha256 = mr_core::sha256_hex(&bytes);
        let component =
            cache::compile(&engine.engine, &bytes, &sha256, config.cache_dir.as_deref()).map_err(
                |e| LoadError::Invalid {
                    path: name.clone(),
                    detail: format!("{e:#}"),
                },
            )?;
        failure::check_imports(&engine.engine, &component, &name)?;
        let mut linker: Linker<wasi::TaskState> = Linker::new(&engine.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        bindings::Mapreduce::add_to_linker::<_, HasSelf<wasi::TaskState>>(&mut linker, |s| s)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        bindings01::Mapreduce::add_to_linker::<_, HasSelf<wasi::TaskState>>(&mut linker, |s| s)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        if !config.grants.clock {
            wasi::freeze_timers(&mut linker).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        }
        let missing = failure::missing_exports(&engine.engine, &component);
        let wrong_world = |e: wasmtime::Error| match failure::missing_import(&e) {
            Some(import) if missing.is_empty() => LoadError::ExtraImport {
                path: name.clone(),
                import,
            },
            _ => LoadError::WrongWorld {
                path: name.clone(),
                detail: if missing.is_empty() {
                    format!("{e:#}")
                } else {
                    format!(
                        "it does not export {}",
                        missing
                            .iter()
                            .map(|m| format!("`{m}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            },
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
        // The current contract's exports, else the first's.
        let pre = match bindings::MapreducePre::new(instance_pre.clone()) {
            Ok(p) => Pre::V2(p),
            Err(e2) => match bindings01::MapreducePre::new(instance_pre) {
                Ok(p) => Pre::V1(p),
                Err(_) => return Err(wrong_world(e2)),
            },
        };
        Ok(Sandbox {
            engine: engine.clone(),
            pre,
            config,
            name,
            sha256,
        })
    }

    /// The app's sha256 (hex), which identifies it.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The app's path, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits tasks run under.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    fn instantiate(
        &self,
        seed: u64,
        sink: Option<wasi::Sink>,
        control: &TaskControl,
    ) -> Result<(Store<wasi::TaskState>, Exports), GuestFailure> {
        let state = wasi::TaskState::new(&self.config, seed, sink, control);
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Every PROGRESS_TICKS the guest, if it is running wasm code, is
        // checked: cancelled or past its time limit, it is interrupted;
        // otherwise that counts as progress.
        // One budget per attempt, whatever its instances.
        let started = control.guest_started();
        let limit = self.config.attempt_timeout;
        let control = control.clone();
        store.set_epoch_deadline(PROGRESS_TICKS);
        store.epoch_deadline_callback(move |mut ctx| {
            if control.is_cancelled() {
                ctx.data_mut().cancelled = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            if started.elapsed() >= limit {
                return Ok(UpdateDeadline::Interrupt);
            }
            control.bump();
            Ok(UpdateDeadline::Continue(PROGRESS_TICKS))
        });
        let exports = match &self.pre {
            Pre::V2(p) => p.instantiate(&mut store).map(Exports::V2),
            Pre::V1(p) => p.instantiate(&mut store).map(Exports::V1),
        }
        .map_err(|e| failure::classify(e, &mut store, &self.config))?;
        Ok((store, exports))
    }

    /// Runs `map(input, contents)` in a fresh instance; every batch the guest
    /// emits goes to `sink` as records (`mr_core::records`: checked, UTF-8),
    /// whose error fails the task. `seed` makes the
    /// not-granted "randomness" differ per task while staying repeatable;
    /// the instance's memory is charged to the task's `control`, which also
    /// records its progress and can cancel it.
    ///
    /// Fails with the guest's failure, classified.
    pub fn run_map(
        &self,
        seed: u64,
        control: &TaskControl,
        input: &str,
        contents: &str,
        sink: impl FnMut(&[u8]) -> Result<(), String> + Send + 'static,
    ) -> Result<TaskOutput, GuestFailure> {
        let (mut store, exports) = self.instantiate(seed, Some(Box::new(sink)), control)?;
        let result = match exports {
            Exports::V2(b) => b.call_map(&mut store, input, contents),
            Exports::V1(b) => b.call_map(&mut store, input, contents),
        };
        let out = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(GuestFailure::new(FailureKind::AppError, msg)),
            Err(e) => Err(failure::classify(e, &mut store, &self.config)),
        };
        let output = store.data().output();
        match out {
            Ok(()) => Ok(TaskOutput {
                guest_output: output,
            }),
            Err(f) => Err(f.with_output(output)),
        }
    }

    /// A fresh instance for one reduce task (or a map task's combiner),
    /// which may call it many times; its memory is charged to `control`.
    ///
    /// Fails if the instance cannot be created (e.g. its start traps).
    pub fn reducer(&self, seed: u64, control: &TaskControl) -> Result<Reducer, GuestFailure> {
        let (store, exports) = self.instantiate(seed, None, control)?;
        Ok(Reducer {
            config: self.config.clone(),
            store,
            exports,
            poisoned: false,
        })
    }
}

/// What a successful task leaves besides its data.
#[derive(Debug, Default)]
pub struct TaskOutput {
    /// What the guest wrote to stdout/stderr (bounded).
    pub guest_output: String,
}

/// A guest instance for one reduce (or combine) task.
pub struct Reducer {
    config: SandboxConfig,
    store: Store<wasi::TaskState>,
    exports: Exports,
    poisoned: bool,
}

/// The values a `reduce` or `combine` call returned, one per last group,
/// each checked to be UTF-8.
#[derive(Debug, Default)]
pub struct Values {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl Values {
    /// Checks `bytes` (value items) hold `want` values of text.
    fn check(bytes: Vec<u8>, want: usize, call: &str) -> Result<Values, GuestFailure> {
        let protocol = |m: String| GuestFailure::new(FailureKind::Protocol, m);
        let mut spans = Vec::with_capacity(want);
        let mut at = 0;
        while at < bytes.len() {
            let len = records::get_varint(&bytes, &mut at)
                .map_err(|e| protocol(format!("{call} returned malformed values: {e}")))?
                as usize;
            let end = at
                .checked_add(len)
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| {
                    protocol(format!(
                        "{call} returned a value past the end of its values"
                    ))
                })?;
            if std::str::from_utf8(&bytes[at..end]).is_err() {
                return Err(protocol(format!(
                    "{call} returned a value that is not UTF-8"
                )));
            }
            spans.push((at, end));
            at = end;
        }
        if spans.len() != want {
            return Err(protocol(format!(
                "{call} returned {} values for {want} keys",
                spans.len()
            )));
        }
        Ok(Values { bytes, spans })
    }

    /// Values of the first contract, as strings.
    fn of(values: Vec<String>, want: usize, call: &str) -> Result<Values, GuestFailure> {
        let mut bytes = Vec::new();
        for v in &values {
            records::put_value(&mut bytes, v.as_bytes());
        }
        Values::check(bytes, want, call)
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Value `i`.
    pub fn get(&self, i: usize) -> &str {
        let (a, b) = self.spans[i];
        std::str::from_utf8(&self.bytes[a..b]).expect("checked when made")
    }
}

/// Groups of the first contract, from encoded ones.
fn groups01(groups: &mut Groups) -> Result<Vec<bindings01::mr::app::types::Group>, GuestFailure> {
    let decoded = Groups::decode(groups.bytes())
        .map_err(|e| GuestFailure::new(FailureKind::Protocol, format!("the host's groups: {e}")))?;
    Ok(decoded
        .into_iter()
        .map(|(key, values, last)| bindings01::mr::app::types::Group {
            key: key.to_string(),
            values: values.into_iter().map(String::from).collect(),
            last,
        })
        .collect())
}

impl Reducer {
    fn fail(&mut self, e: wasmtime::Error) -> GuestFailure {
        self.poisoned = true;
        let f = failure::classify(e, &mut self.store, &self.config);
        f.with_output(self.store.data().output())
    }

    /// Reduces `groups`; returns one value per group marked last.
    ///
    /// Fails with the guest's failure; the instance is unusable afterwards.
    pub fn reduce(&mut self, groups: &mut Groups) -> Result<Values, GuestFailure> {
        assert!(!self.poisoned, "a reducer is not reused after a failure");
        let want = groups.lasts();
        let called = match &self.exports {
            Exports::V2(b) => b
                .call_reduce(&mut self.store, groups.bytes())
                .map(|r| r.map(|v| Values::check(v, want, "reduce"))),
            Exports::V1(b) => {
                let g = groups01(groups)?;
                b.call_reduce(&mut self.store, &g)
                    .map(|r| r.map(|v| Values::of(v, want, "reduce")))
            }
        };
        match called {
            Ok(Ok(Ok(values))) => Ok(values),
            Ok(Ok(Err(f))) => {
                self.poisoned = true;
                Err(f)
            }
            Ok(Err(msg)) => {
                self.poisoned = true;
                Err(GuestFailure::new(FailureKind::AppError, msg)
                    .with_output(self.store.data().output()))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Runs the app's combiner on `groups`; `None` if it has none.
    ///
    /// Fails with the guest's failure; the instance is unusable afterwards.
    pub fn combine(&mut self, groups: &mut Groups) -> Result<Option<Values>, GuestFailure> {
        assert!(!self.poisoned, "a reducer is not reused after a failure");
        let want = groups.lasts();
        let called = match &self.exports {
            Exports::V2(b) => b
                .call_combine(&mut self.store, groups.bytes())
                .map(|r| r.map(|o| o.map(|v| Values::check(v, want, "combine")))),
            Exports::V1(b) => {
                let g = groups01(groups)?;
                b.call_combine(&mut self.store, &g)
                    .map(|r| r.map(|o| o.map(|v| Values::of(v, want, "combine"))))
            }
        };
        match called {
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(Ok(values)))) => Ok(Some(values)),
            Ok(Ok(Some(Err(f)))) => {
                self.poisoned = true;
                Err(f)
            }
            Ok(Err(msg)) => {
                self.poisoned = true;
                Err(GuestFailure::new(FailureKind::AppError, msg))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// What the guest wrote to stdout/stderr so far (bounded).
    pub fn guest_output(&self) -> String {
        self.store.data().output()
    }
}
