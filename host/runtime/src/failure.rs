//! Every way loading an app or running a task can fail, in words a user
//! understands; wasmtime's errors are converted here and nowhere else.

use std::fmt;

use wasmtime::{Store, Trap};

use crate::wasi::TaskState;
use crate::SandboxConfig;

/// Why an app could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read app {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly file (it does not start with the bytes \\0asm)")]
    NotWasm { path: String },
    #[error(
        "{path} is a core WebAssembly module, not a component: build the app with \
         `cargo build --release --target wasm32-wasip2` (which makes a component), \
         or wrap a module with `wasm-tools component new`"
    )]
    CoreModule { path: String },
    #[error("{path} is not a valid WebAssembly component: {detail}")]
    Invalid { path: String, detail: String },
    #[error(
        "{path} does not implement the {world} world (nor the older mr:app/mapreduce@0.1.2): \
         {detail}\n\
         An mr app exports `map`, `reduce` and `combine` and imports `mr:app/host` \
         (the Rust SDK's `mr_sdk::export_app!` does all of this)",
        world = crate::WORLD
    )]
    WrongWorld { path: String, detail: String },
    #[error(
        "{path} imports `{import}`, which the sandbox does not provide (it gives guests mr:app/host \
         and WASI 0.2 without files, network or environment); build the app without it \
         (e.g. componentize-js with --disable http,fetch-event)"
    )]
    ExtraImport { path: String, import: String },
    #[error("cannot set up the sandbox: {0}")]
    Engine(String),
}

/// What kind of failure stopped a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The guest trapped (a panic, `unreachable`, a bad memory access, ...).
    Trap,
    /// It tried to grow its memory past the limit.
    OutOfMemory,
    /// It ran past the task's time limit.
    Timeout,
    /// It recursed past the stack limit.
    StackOverflow,
    /// It called `exit`.
    Exit,
    /// It returned an error of its own.
    AppError,
    /// The host side failed during a guest call (e.g. a spill write).
    Host,
    /// It broke the contract (e.g. returned the wrong number of values).
    Protocol,
    /// The host cancelled the attempt (another attempt won, or the job
    /// stopped); not the guest's fault.
    Cancelled,
}

impl FailureKind {
    /// Whether running the same guest on the same input is bound to fail
    /// the same way when the guest has neither clock nor randomness (it is
    /// then a pure function of its input). Timeouts and host failures
    /// depend on the machine, so they are worth retrying.
    pub fn deterministic(self) -> bool {
        !matches!(
            self,
            FailureKind::Timeout | FailureKind::Host | FailureKind::Cancelled
        )
    }
}

/// A failed guest call: what happened, and what the guest printed.
#[derive(Clone, Debug)]
pub struct GuestFailure {
    pub kind: FailureKind,
    pub message: String,
    /// The guest's stdout/stderr (bounded), e.g. a Rust panic message.
    pub guest_output: String,
    /// Out of memory before it ran: its initial memory is over the limit
    /// (the input's size has nothing to do with it).
    pub at_start: bool,
}

impl GuestFailure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > QUOTE_CHARS {
            let mut cut = QUOTE_CHARS;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("... (truncated)");
        }
        GuestFailure {
            kind,
            message,
            guest_output: String::new(),
            at_start: false,
        }
    }

    pub(crate) fn with_output(mut self, output: String) -> Self {
        self.guest_output = output;
        self
    }
}

/// How much of the guest's output a failure message quotes.
const QUOTE_CHARS: usize = 2000;

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        let out = self.guest_output.trim();
        if !out.is_empty() {
            let start = out
                .char_indices()
                .rev()
                .nth(QUOTE_CHARS)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let cut = if start > 0 {
                format!("[... {start} earlier bytes not shown ...]\n")
            } else {
                String::new()
            };
            write!(
                f,
                "\nguest output (its last words):\n{cut}{}",
                &out[start..]
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for GuestFailure {}

fn mib(bytes: usize) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Turns a wasmtime error from a guest call into a [`GuestFailure`].
pub(crate) fn classify(
    e: wasmtime::Error,
    store: &mut Store<TaskState>,
    config: &SandboxConfig,
) -> GuestFailure {
    let state = store.data();
    if state.cancelled {
        return GuestFailure::new(FailureKind::Cancelled, "the attempt was cancelled");
    }
    if let Some(p) = &state.protocol_error {
        return GuestFailure::new(FailureKind::Protocol, p.clone());
    }
    if let Some(h) = &state.host_error {
        return GuestFailure::new(
            FailureKind::Host,
            format!("the host failed during a guest call: {h}"),
        );
    }
    if let Some(size) = state.limiter.exceeded {
        if state.limiter.at_start {
            let mut f = GuestFailure::new(
                FailureKind::OutOfMemory,
                format!(
                    "the app needs {} of memory to start, above its limit of {} (raise it with --memory-limit)",
                    mib(size),
                    mib(config.memory_limit)
                ),
            );
            f.at_start = true;
            return f;
        }
        return GuestFailure::new(
            FailureKind::OutOfMemory,
            format!(
                "the guest ran out of memory: it asked for {} but its limit is {} (raise it with --memory-limit)",
                mib(size),
                mib(config.memory_limit)
            ),
        );
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return GuestFailure::new(
            FailureKind::Exit,
            format!("the guest exited with status {}", exit.0),
        );
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => GuestFailure::new(
            FailureKind::Timeout,
            format!(
                "the task ran out of time: it ran longer than its limit of {:?} (raise it with --attempt-timeout)",
                config.attempt_timeout
            ),
        ),
        Some(Trap::StackOverflow) => GuestFailure::new(
            FailureKind::StackOverflow,
            "the guest overflowed its stack (unbounded or very deep recursion)",
        ),
        Some(Trap::UnreachableCodeReached) => GuestFailure::new(
            FailureKind::Trap,
            "the guest trapped: it reached `unreachable` (a panic or abort in the app)",
        ),
        Some(Trap::MemoryOutOfBounds) => GuestFailure::new(
            FailureKind::Trap,
            "the guest trapped: out-of-bounds memory access (a bug in the app, or its own stack overflowed)",
        ),
        Some(trap) => GuestFailure::new(FailureKind::Trap, format!("the guest trapped: {trap}")),
        // The cause first (e.g. a bad value across the boundary), then the
        // wasm backtrace wasmtime wraps it in.
        None => GuestFailure::new(
            FailureKind::Trap,
            format!("the guest failed: {}\n{e:?}", e.root_cause()),
        ),
    }
}

/// Rejects files that are not wasm components before compiling them.
pub(crate) fn check_header(path: &str, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(LoadError::NotWasm { path: path.into() });
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule { path: path.into() });
    }
    Ok(())
}

/// Names the world's exports the component lacks, if any, so the message
/// lists all of them rather than the first one wasmtime trips over.
pub(crate) fn missing_exports(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> Vec<&'static str> {
    let have: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    ["map", "reduce", "combine"]
        .into_iter()
        .filter(|want| !have.iter().any(|h| h == want))
        .collect()
}

/// A component built against another version of our own interfaces would
/// otherwise link as trapping stubs; say so up front instead.
pub(crate) fn check_imports(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
    path: &str,
) -> Result<(), LoadError> {
    for (name, _) in component.component_type().imports(engine) {
        // 0.2.1 is the contract (0.2.0 plus `counter`); 0.1.1 added
        // `progress` to 0.1.0's host, 0.1.2 `counter`: apps built against
        // any of them link (wasmtime matches semver-compatible versions).
        let Some(ours) = name.strip_prefix("mr:app/") else {
            continue;
        };
        // Any 0.2.x or 0.1.x: a later patch version adds functions, and
        // linking checks the ones the app imports exist.
        let version_ok = ["host@0.2.", "host@0.1.", "types@0.1."]
            .iter()
            .any(|p| ours.starts_with(p));
        if !version_ok {
            return Err(LoadError::WrongWorld {
                path: path.into(),
                detail: format!(
                    "it imports `{name}`, but this mr provides mr:app/host@0.2.1 (and 0.2.0, 0.1.2, 0.1.1, 0.1.0)"
                ),
            });
        }
    }
    Ok(())
}

/// The import a component needs that the linker lacks, from wasmtime's
/// message (`... imports instance `X`, but a matching implementation was
/// not found in the linker`).
pub(crate) fn missing_import(e: &wasmtime::Error) -> Option<String> {
    let text = format!("{e:#}");
    if !text.contains("matching implementation was not found") {
        return None;
    }
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_the_sandbox_lacks_is_named() {
        let e = wasmtime::Error::msg("instance not defined").context(
            "component imports instance `wasi:http/types@0.2.0`, but a matching implementation was not found in the linker",
        );
        assert_eq!(missing_import(&e).as_deref(), Some("wasi:http/types@0.2.0"));
        let msg = LoadError::ExtraImport {
            path: "app.wasm".into(),
            import: "wasi:http/types@0.2.0".into(),
        }
        .to_string();
        assert!(
            msg.starts_with(
                "app.wasm imports `wasi:http/types@0.2.0`, which the sandbox does not provide"
            ),
            "{msg}"
        );
        assert_eq!(missing_import(&wasmtime::Error::msg("other")), None);
    }
}
