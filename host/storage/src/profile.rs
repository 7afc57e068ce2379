//! The AWS shared configuration files, for what the environment does not
//! set: the profile in `AWS_PROFILE` (else `default`) of
//! `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`: keys and session
//! token) and of `AWS_CONFIG_FILE` (`~/.aws/config`: `region`,
//! `endpoint_url`, and keys too), as the AWS CLI and SDKs read them.
//! Variables in the environment win over the files, as they do there.

use std::io;
use std::path::PathBuf;

/// What a profile says (each `None` when it does not say it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

fn home_file(env: &Env, var: &str, default: &str) -> Option<PathBuf> {
    match env(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => env("HOME").map(|h| PathBuf::from(h).join(".aws").join(default)),
    }
}

/// Reads an environment variable.
type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// The profile named by `AWS_PROFILE` (or `default`) from the two files.
///
/// Fails when a file exists but cannot be read or parsed, or when
/// `AWS_PROFILE` names a profile neither file has.
pub fn load() -> io::Result<Profile> {
    load_from(&|v| std::env::var(v).ok())
}

fn load_from(env: &Env) -> io::Result<Profile> {
    let named = env("AWS_PROFILE").filter(|p| !p.trim().is_empty());
    let name = named.clone().unwrap_or_else(|| "default".into());
    let credentials = home_file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let config = home_file(env, "AWS_CONFIG_FILE", "config");
    let mut p = Profile::default();
    let mut found = false;
    // The credentials file names sections by the profile; the config
    // file writes `[profile NAME]` (and `[default]`).
    // The config file's `[default]` is the default profile's; others are
    // `[profile NAME]` (a bare `[NAME]` there is not a profile).
    let in_config = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    for (file, section) in [
        (credentials.as_ref(), name.clone()),
        (config.as_ref(), in_config),
    ] {
        let Some(file) = file else { continue };
        let Some(ini) = read(file)? else { continue };
        let Some(s) = ini.section(Some(section.as_str())) else {
            continue;
        };
        found = true;
        // Profiles that get credentials some other way: not silently
        // replaced by whatever else is around.
        for other in [
            "role_arn",
            "sso_session",
            "sso_start_url",
            "credential_process",
            "web_identity_token_file",
        ] {
            if s.get(other).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the AWS profile {name} gets its credentials with {other}, which mr does not support: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) instead, e.g. from `aws configure export-credentials --profile {name} --format env`"
                    ),
                ));
            }
        }
        let take = |slot: &mut Option<String>, key: &str| {
            if slot.is_none() {
                *slot = s
                    .get(key)
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty());
            }
        };
        take(&mut p.access_key_id, "aws_access_key_id");
        take(&mut p.secret_access_key, "aws_secret_access_key");
        take(&mut p.session_token, "aws_session_token");
        take(&mut p.region, "region");
        take(&mut p.endpoint_url, "endpoint_url");
    }
    if let (Some(n), false) = (&named, found) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "AWS_PROFILE={n}: no such profile in {} or {} (check the name, or AWS_SHARED_CREDENTIALS_FILE and AWS_CONFIG_FILE)",
                shown(credentials.as_ref()),
                shown(config.as_ref())
            ),
        ));
    }
    Ok(p)
}

fn shown(p: Option<&PathBuf>) -> String {
    p.map_or("(no home directory)".into(), |p| p.display().to_string())
}

/// A file parsed, or `None` if it does not exist.
fn read(file: &PathBuf) -> io::Result<Option<ini::Ini>> {
    match std::fs::read_to_string(file) {
        Ok(text) => ini::Ini::load_from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot parse {}: {e}", file.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", file.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("absent")
    }

    #[test]
    fn profiles_come_from_both_files_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, config) = (dir.path().join("credentials"), dir.path().join("config"));
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = DEF\naws_secret_access_key = defsecret\n\n[test]\naws_access_key_id=TESTKEY\naws_secret_access_key=testsecret\naws_session_token = tok\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-1\n[profile test]\nregion = us-west-2\nendpoint_url = http://127.0.0.1:9000\n[profile only-config]\naws_access_key_id = CFG\naws_secret_access_key = cfgsecret\n",
        )
        .unwrap();
        let with = |profile: Option<&str>, c: &std::path::Path, f: &std::path::Path| {
            let (profile, c, f) = (profile.map(String::from), c.to_owned(), f.to_owned());
            load_from(&move |v: &str| match v {
                "AWS_PROFILE" => profile.clone(),
                "AWS_SHARED_CREDENTIALS_FILE" => Some(c.display().to_string()),
                "AWS_CONFIG_FILE" => Some(f.display().to_string()),
                _ => None,
            })
        };
        let p = with(None, &creds, &config).unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("DEF"));
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        let p = with(Some("test"), &creds, &config).unwrap();
        assert_eq!(
            p,
            Profile {
                access_key_id: Some("TESTKEY".into()),
                secret_access_key: Some("testsecret".into()),
                session_token: Some("tok".into()),
                region: Some("us-west-2".into()),
                endpoint_url: Some("http://127.0.0.1:9000".into()),
            }
        );
        let p = with(Some("only-config"), &creds, &config).unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("CFG"));
        let e = with(Some("nope"), &creds, &config).unwrap_err().to_string();
        assert!(
            e.contains("AWS_PROFILE=nope") && e.contains("no such profile"),
            "{e}"
        );
        // Roles, SSO and processes are refused, not silently replaced.
        let roles = dir.path().join("roles");
        std::fs::write(
            &roles,
            "[profile admin]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n",
        )
        .unwrap();
        let e = with(Some("admin"), &creds, &roles).unwrap_err().to_string();
        assert!(
            e.contains("role_arn") && e.contains("export AWS_ACCESS_KEY_ID"),
            "{e}"
        );
        // A bare [name] in the config file is not a profile.
        std::fs::write(&roles, "[bare]\nregion = x\n").unwrap();
        let e = with(Some("bare"), &absent_file(&dir), &roles)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AWS_PROFILE=bare") && e.contains("no such profile"),
            "{e}"
        );
        let absent = absent_file(&dir);
        assert_eq!(with(None, &absent, &absent).unwrap(), Profile::default());
        std::fs::write(&absent, "[broken\n").unwrap();
        let e = with(None, &absent, &config).unwrap_err().to_string();
        assert!(e.contains("cannot parse"), "{e}");
    }
}
