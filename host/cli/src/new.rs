//! `mr new`: writes a ready-to-build app, word count as the template, in
//! Rust, Python, JavaScript or C, with a README that says how to build and
//! run it (as `cargo new`, `spin new`).
//!
//! The templates are the repository's own tested word-count apps
//! (`apps/wc`, `apps/wc-python`, `apps/wc-js`, `apps/wc-c`), built into
//! `mr`; the new app uses the SDKs of the mr repository this binary was
//! built from (or `--sdk`), by absolute path.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

const RUST_APP: &str = include_str!("../../../apps/wc/src/lib.rs");
const PYTHON_APP: &str = include_str!("../../../apps/wc-python/app.py");
const JS_APP: &str = include_str!("../../../apps/wc-js/app.js");
const C_APP: &str = include_str!("../../../apps/wc-c/wc.c");
/// How the JavaScript template imports the SDK (from `apps/wc-js`).
const JS_SDK_IMPORT: &str = "'../../guest-sdk/js/mr.js'";

/// Write a new app (word count, ready to build and run) in a folder NAME.
///
/// Prints the commands that build it and run it on a few files.
#[derive(Args, Debug)]
pub struct NewArgs {
    /// The app's name: its folder and its .wasm file (a letter, then
    /// letters, digits, `-` or `_`).
    name: String,

    /// The language to write it in.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,

    /// Make the folder NAME here [default: the current directory].
    #[arg(long)]
    dir: Option<PathBuf>,

    /// The mr repository whose SDKs (guest-sdk/) the app builds with
    /// [default: the one this mr was built from].
    #[arg(long, env = "MR_SDK")]
    sdk: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

/// What `mr new` writes: files (relative path, contents, executable) and
/// the commands to build and run the app, from its folder.
struct Plan {
    files: Vec<(String, String, bool)>,
    build: String,
    wasm: String,
}

impl NewArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let name = &self.name;
        let valid = name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            bail!("{name:?} is not an app name: use a letter, then letters, digits, `-` or `_` (at most 64)");
        }
        let sdk = self.sdk_root()?;
        let parent = match &self.dir {
            Some(d) => d.clone(),
            None => std::env::current_dir().context("cannot read the current directory")?,
        };
        let target = parent.join(name);
        if target.exists() {
            bail!(
                "{} already exists: choose another name, or remove it",
                target.display()
            );
        }
        let target_abs = std::path::absolute(&target)
            .with_context(|| format!("cannot make {} absolute", target.display()))?;
        let plan = plan(self.lang, name, &sdk, &target_abs)?;
        // Written into a scratch folder beside it, then renamed: no half
        // app is ever left under its name.
        let scratch = tempfile::Builder::new()
            .prefix(&format!(".{name}-"))
            .tempdir_in(&parent)
            .with_context(|| format!("cannot write in {}", parent.display()))?;
        for (path, text, exec) in &plan.files {
            let p = scratch.path().join(path);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot make {}", d.display()))?;
            }
            std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
            if *exec {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        let scratch = scratch.keep();
        std::fs::rename(&scratch, &target).with_context(|| {
            let _ = std::fs::remove_dir_all(&scratch);
            format!("cannot move the new app to {}", target.display())
        })?;
        println!(
            "wrote {} ({} word count; see its README.md). Build and run it:\n\n    cd {}\n    {}\n    {} run {} INPUT... --output out\n",
            target.display(),
            self.lang.word(),
            shell_word(&target.display().to_string()),
            plan.build,
            this_mr(),
            plan.wasm,
        );
        Ok(())
    }

    /// The mr repository: `--sdk`, else the one this binary was built from.
    fn sdk_root(&self) -> anyhow::Result<PathBuf> {
        let (root, said) = match &self.sdk {
            Some(s) => (s.clone(), "--sdk"),
            None => (
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
                "the repository this mr was built from",
            ),
        };
        let root = root
            .canonicalize()
            .ok()
            .filter(|r| r.join("guest-sdk/Cargo.toml").is_file());
        let Some(root) = root else {
            bail!("cannot find mr's SDKs (guest-sdk/) in {said}: pass --sdk DIR, DIR a checkout of the mr repository");
        };
        if root
            .to_str()
            .is_none_or(|r| r.contains(char::is_whitespace))
        {
            bail!("the mr repository's path {} has spaces or is not UTF-8, which the build files cannot hold: move it, or pass --sdk with another checkout", root.display());
        }
        Ok(root)
    }
}

impl Lang {
    fn word(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
            Lang::C => "C",
        }
    }
}

/// How to call this mr: `mr` if that is what the shell finds, else its path.
fn this_mr() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "mr".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("mr"))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
            .is_some_and(|p| p == me)
    });
    if on_path {
        "mr".into()
    } else {
        shell_word(&me.display().to_string())
    }
}

/// Quotes `s` for a POSIX shell if it needs it.
fn shell_word(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// An app that its SDK's componentize script builds (Python, JavaScript):
/// the app's file, a `build.sh` that runs `exec` with the output path
/// (`with` names the tool), `.gitignore` and the README `readme` writes
/// from the build command and the .wasm.
fn script_app(
    name: &str,
    (file, text): (&str, String),
    with: &str,
    exec: String,
    ignore: &str,
    readme: impl Fn(&str, &str) -> String,
) -> Plan {
    let wasm = format!("{name}.wasm");
    let build = "./build.sh";
    let script = format!(
        "#!/usr/bin/env bash\n# Builds {wasm} (or the path given) from {file} with\n# {with} the first time.\nhere=$(cd \"$(dirname \"$0\")\" && pwd)\nexec {exec} \"${{1:-$here/{wasm}}}\"\n"
    );
    Plan {
        files: vec![
            (file.into(), text, false),
            ("build.sh".into(), script, true),
            (".gitignore".into(), ignore.into(), false),
            ("README.md".into(), readme(build, &wasm), false),
        ],
        build: build.into(),
        wasm,
    }
}

/// `to` relative to the folder `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

fn plan(lang: Lang, name: &str, sdk: &Path, target: &Path) -> anyhow::Result<Plan> {
    let sdk_dir = sdk.join("guest-sdk");
    let s = |p: &str| sdk_dir.join(p).display().to_string();
    let run_hint = |build: &str, wasm: &str, edit: &str, needs: &str| {
        format!(
            "# {name}\n\nAn mr app in {}: word count (for every word, the number of times it\noccurs), written by `mr new`. Change `{edit}` to make it yours; the SDK's\nREADME ({}) says what an app can do.\n\n**Build** ({needs}):\n\n```sh\n{build}\n```\n\n**Run** on some text files:\n\n```sh\nmr run {wasm} INPUT... --output out\n```\n\n`out/mr-out-*` then hold one `word count` line per word.\n",
            lang.word(),
            match lang {
                Lang::Rust => s("src/lib.rs"),
                Lang::Python => s("python/README.md"),
                Lang::Js => s("js/README.md"),
                Lang::C => s("c/README.md"),
            },
        )
    };
    Ok(match lang {
        Lang::Rust => {
            let krate = name.replace('-', "_");
            let wasm = format!("target/wasm32-wasip2/release/{krate}.wasm");
            let build = "cargo build --release".to_string();
            Plan {
                files: vec![
                    ("Cargo.toml".into(),
                        format!(
                            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nmr-sdk = {{ path = \"{}\" }}\n\n# Its own workspace, not part of one around it.\n[workspace]\n\n[profile.release]\nopt-level = 3\nlto = true\ncodegen-units = 1\n# Panics abort: wasm32-wasip2 does not unwind (mr reports the panic's message).\npanic = \"abort\"\nstrip = \"debuginfo\"\n",
                            sdk_dir.display()
                        ),
                        false,
                    ),
                    (".cargo/config.toml".into(),
                        "# mr apps are WebAssembly components for WASI 0.2, with SIMD\n# (wasmtime compiles it to the host's vector instructions).\n[build]\ntarget = \"wasm32-wasip2\"\n\n[target.wasm32-wasip2]\nrustflags = [\"-C\", \"target-feature=+simd128\"]\n".into(),
                        false,
                    ),
                    ("src/lib.rs".into(), RUST_APP.into(), false),
                    (".gitignore".into(), "/target\n".into(), false),
                    ("README.md".into(),
                        run_hint(
                            &format!("rustup target add wasm32-wasip2\n{build}"),
                            &wasm,
                            "src/lib.rs",
                            "rustup and cargo; the first build compiles the SDK, ~1 min",
                        ),
                        false,
                    ),
                ],
                build,
                wasm,
            }
        }
        Lang::Python => {
            script_app(
                name,
                ("app.py", PYTHON_APP.into()),
                "componentize-py, which mr's Python SDK installs from PyPI",
                format!("{} \"$here\" app", s("python/componentize.sh")),
                "*.wasm\n__pycache__/\n",
                |build, wasm| {
                    run_hint(build, wasm, "app.py", "python3 with venv and pip; the first build installs componentize-py, ~10 s")
                },
            )
        }
        Lang::Js => {
            let import = relative(target, &sdk_dir.join("js/mr.js"));
            let import = import.display().to_string();
            let import = if import.starts_with('.') {
                import
            } else {
                format!("./{import}")
            };
            if !JS_APP.contains(JS_SDK_IMPORT) {
                bail!("the JavaScript template does not import the SDK as {JS_SDK_IMPORT} (a bug in mr)");
            }
            script_app(
                name,
                (
                    "app.js",
                    JS_APP.replace(JS_SDK_IMPORT, &format!("'{import}'")),
                ),
                "componentize-js, which mr's JavaScript SDK installs from npm",
                format!("{} \"$here/app.js\"", s("js/componentize.sh")),
                "*.wasm\n",
                |build, wasm| {
                    run_hint(
                        build,
                        wasm,
                        "app.js",
                        "node and npm; the first build installs componentize-js, ~30 s",
                    )
                },
            )
        }
        Lang::C => {
            let wasm = format!("{name}.wasm");
            let source = format!("{}.c", name.replace('-', "_"));
            Plan {
                files: vec![
                    ("Makefile".into(),
                        format!(
                            "# Builds {wasm} (`make`, or `make OUT=path/app.wasm`); mr's C SDK\n# installs clang and wasi-libc the first time.\nAPP := {name}\nSRCS := {source}\ninclude {}\n",
                            s("c/mr.mk")
                        ),
                        false,
                    ),
                    (source.clone(), C_APP.into(), false),
                    (".gitignore".into(), "*.wasm\n".into(), false),
                    ("README.md".into(),
                        run_hint("make", &wasm, &source, "clang 19 and wasi-libc, which the SDK installs with apt-get the first time"),
                        false,
                    ),
                ],
                build: "make".into(),
                wasm,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        assert_eq!(
            relative(Path::new("/a/b/app"), Path::new("/a/sdk/js/mr.js")),
            PathBuf::from("../../sdk/js/mr.js")
        );
        assert_eq!(
            relative(Path::new("/a"), Path::new("/a/x.js")),
            PathBuf::from("x.js")
        );
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("/tmp/app-1"), "/tmp/app-1");
        assert_eq!(shell_word("/tmp/my app"), "'/tmp/my app'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}
