//! The `mr` command. One file per subcommand; this file parses arguments,
//! sets up logging and turns errors into a message and an exit code.

mod cancel;
mod client;
mod coordinator;
mod job_args;
mod new;
mod progress;
mod run;
mod shutdown;
mod status;
mod submit;
mod watch;
mod worker;
mod worker_release;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mr: MapReduce with user code in a WebAssembly sandbox.
///
/// Apps are WebAssembly components implementing the mr:app/mapreduce world
/// (see guest-sdk/ for the Rust SDK). Logs go to stderr; set RUST_LOG
/// (e.g. RUST_LOG=info or RUST_LOG=mr_worker=debug) to see more.
#[derive(Parser)]
#[command(name = "mr", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(run::RunArgs),
    Coordinator(coordinator::CoordinatorArgs),
    Worker(worker::WorkerArgs),
    Submit(submit::SubmitArgs),
    Status(status::StatusArgs),
    Cancel(cancel::CancelArgs),
    Shutdown(shutdown::ShutdownArgs),
    WorkerRelease(worker_release::WorkerReleaseArgs),
    New(new::NewArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Services say what they do by default; one-shot commands only warn.
    // tarpc warns of every connection that closes; only its errors count.
    let level = match cli.command {
        Command::Coordinator(_) | Command::Worker(_) => {
            "warn,tarpc=error,mr=info,mr_coordinator=info,mr_worker=info,mr_runtime=info"
        }
        _ => "warn,tarpc=error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_open_file_limit();
    let result = match cli.command {
        Command::Run(args) => args.run(),
        Command::Coordinator(args) => args.run(),
        Command::Worker(args) => args.run(),
        Command::Submit(args) => args.run(),
        Command::Status(args) => args.run(),
        Command::Cancel(args) => args.run(),
        Command::Shutdown(args) => args.run(),
        Command::WorkerRelease(args) => args.run(),
        Command::New(args) => args.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A reduce task keeps one map output open per map task, so jobs with
/// thousands of inputs need more descriptors than the usual soft limit of
/// 1024: raise it to the hard limit, as servers commonly do.
#[allow(unsafe_code)]
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("cannot raise the open file limit");
            }
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
