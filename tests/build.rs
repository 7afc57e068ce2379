//! Builds every guest app in `apps/` for wasm32-wasip2 (release) so the
//! end-to-end tests need nothing built by hand, and exports their paths as
//! `MR_GUEST_<NAME>` for `lib.rs`. Adds the wasm32-wasip2 target through
//! rustup if it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const APPS: &[&str] = &[
    "wc",
    "indexer",
    "nocrash",
    "crash",
    "early_exit",
    "hostile",
    "timing",
    "wc_wit010",
    "wc_nocombiner",
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let apps = root.join("apps");
    for p in [
        "wit",
        "guest-sdk/src",
        "guest-sdk/Cargo.toml",
        "apps/Cargo.toml",
        "apps/Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for app in APPS {
        // A package's directory is its name, with `-` where the wasm
        // file's name has `_` (`wc-nocombiner`, `wc_nocombiner.wasm`).
        let dir = [app.to_string(), app.replace('_', "-")]
            .into_iter()
            .map(|d| apps.join(d))
            .find(|d| d.exists())
            .unwrap_or_else(|| panic!("no directory in apps/ for {app}"));
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_target();
    let target_dir = apps.join("target");
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(apps.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir);
    // Don't leak this build's settings (flags, target, jobserver) into the
    // nested one.
    for (k, _) in std::env::vars() {
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "MAKEFLAGS"
            || k == "MFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the guest apps");
    assert!(
        status.success(),
        "building the guest apps (apps/) for wasm32-wasip2 failed"
    );
    for app in APPS {
        let wasm = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{app}.wasm"));
        assert!(wasm.exists(), "{} was not built", wasm.display());
        println!(
            "cargo:rustc-env=MR_GUEST_{}={}",
            app.to_uppercase(),
            wasm.display()
        );
    }
    println!("cargo:rustc-env=MR_REPO_ROOT={}", root.display());
}

/// Installs the wasm32-wasip2 standard library through rustup if it is
/// missing (a fresh machine with only rustup and cargo).
fn ensure_target() {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output();
    if let Ok(out) = sysroot {
        let dir = Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/wasm32-wasip2");
        if dir.exists() {
            return;
        }
    }
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        println!("cargo:warning=could not add the wasm32-wasip2 target; run `rustup target add wasm32-wasip2`");
    }
}
