//! The docker CLI context for a VM, in the CLI's own on-disk format.
//!
//! The docker CLI keeps each context in `<config>/contexts/meta/<sha256hex(name)>/meta.json`,
//! where `<config>` is `$DOCKER_CONFIG` or `~/.docker`, as compact JSON:
//!
//! ```text
//! {"Name":"colima-wt","Metadata":{"Description":"colima [profile=wt]"},
//!  "Endpoints":{"docker":{"Host":"unix:///…/docker.sock","SkipTLSVerify":false}}}
//! ```
//!
//! (one line on disk; an empty description gives `"Metadata":{}`). Writing this file is what
//! `docker context create` does; the active context lives in `config.json`'s `currentContext`,
//! which this module only ever reads.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The file name of a context's metadata.
const META_FILE: &str = "meta.json";

/// An error writing or removing a docker context.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The name is not one the docker CLI accepts.
    #[error(
        "docker context name {name:?} is invalid: the docker CLI wants a letter or digit, then \
         at least one of letters, digits and `_.+-`"
    )]
    InvalidName {
        /// The name.
        name: String,
    },

    /// Neither `DOCKER_CONFIG` nor a home directory is known.
    #[error("cannot find the docker config directory: set DOCKER_CONFIG or HOME")]
    NoConfigDir,

    /// The socket path cannot be written as a docker host.
    #[error("docker socket path {path} is not valid UTF-8")]
    NotUtf8 {
        /// The socket path.
        path: PathBuf,
    },

    /// A file could not be read, written or removed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// What [`remove_context`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// The context was removed.
    Removed,
    /// There was no such context.
    Absent,
    /// It is the docker CLI's current context, so it was left in place (removing it would
    /// break `docker` until the user picks another; vmoat never changes the current context).
    KeptCurrent,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Meta<'a> {
    name: &'a str,
    metadata: Metadata<'a>,
    endpoints: Endpoints,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Metadata<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

#[derive(Serialize)]
struct Endpoints {
    docker: Endpoint,
}

#[derive(Serialize)]
struct Endpoint {
    #[serde(rename = "Host")]
    host: String,
    #[serde(rename = "SkipTLSVerify")]
    skip_tls_verify: bool,
}

/// The docker CLI's config directory: `$DOCKER_CONFIG` if set, else `~/.docker`.
pub fn docker_config_dir() -> Result<PathBuf, ContextError> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::home_dir()
        .map(|home| home.join(".docker"))
        .ok_or(ContextError::NoConfigDir)
}

/// The directory of context `name` under `config_dir`.
pub fn context_meta_dir(config_dir: &Path, name: &str) -> PathBuf {
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    config_dir.join("contexts").join("meta").join(digest)
}

/// Whether the docker CLI accepts `name` (`^[a-zA-Z0-9][a-zA-Z0-9_.+-]+$`).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c))
}

/// Write context `name` pointing at `unix://<socket>` in the docker config directory (see
/// [`docker_config_dir`]). Returns the path of its `meta.json`.
pub fn write_context(
    name: &str,
    description: &str,
    socket: &Path,
) -> Result<PathBuf, ContextError> {
    write_context_in(&docker_config_dir()?, name, description, socket)
}

/// [`write_context`] under an explicit config directory.
///
/// The file is replaced atomically (written beside it, then renamed), so the docker CLI never
/// reads half a file. `config.json` is not touched: the context is never made current.
pub fn write_context_in(
    config_dir: &Path,
    name: &str,
    description: &str,
    socket: &Path,
) -> Result<PathBuf, ContextError> {
    if !valid_name(name) {
        return Err(ContextError::InvalidName {
            name: name.to_owned(),
        });
    }
    let socket = socket.to_str().ok_or_else(|| ContextError::NotUtf8 {
        path: socket.to_owned(),
    })?;
    let meta = Meta {
        name,
        metadata: Metadata { description },
        endpoints: Endpoints {
            docker: Endpoint {
                host: format!("unix://{socket}"),
                skip_tls_verify: false,
            },
        },
    };
    // Serialising these plain structs cannot fail.
    let json = go_escape(&serde_json::to_string(&meta).unwrap_or_default());

    let dir = context_meta_dir(config_dir, name);
    std::fs::create_dir_all(&dir).map_err(|source| ContextError::Io {
        action: "create directory",
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(META_FILE);
    let io_err = |action| {
        let path = path.clone();
        move |source| ContextError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".meta.json.")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(&dir)
        .map_err(io_err("write"))?;
    tmp.write_all(json.as_bytes()).map_err(io_err("write"))?;
    tmp.as_file().sync_all().map_err(io_err("write"))?;
    tmp.persist(&path).map_err(|e| io_err("replace")(e.error))?;

    tracing::debug!(context = name, path = %path.display(), "wrote docker context");
    Ok(path)
}

/// Escape like Go's `encoding/json` (which the docker CLI uses): `<`, `>`, `&`, U+2028 and
/// U+2029 become `\u` escapes, so the file is byte-identical to the CLI's. These characters
/// only ever occur inside JSON strings, where the escapes mean the same.
fn go_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            other => out.push(other),
        }
    }
    out
}

/// Remove context `name` from the docker config directory, unless it is the current context.
pub fn remove_context(name: &str) -> Result<RemoveOutcome, ContextError> {
    remove_context_in(&docker_config_dir()?, name)
}

/// [`remove_context`] under an explicit config directory. The current context is read from
/// `DOCKER_CONTEXT`, else `config.json`'s `currentContext`.
pub fn remove_context_in(config_dir: &Path, name: &str) -> Result<RemoveOutcome, ContextError> {
    if !valid_name(name) {
        return Err(ContextError::InvalidName {
            name: name.to_owned(),
        });
    }
    let dir = context_meta_dir(config_dir, name);
    if !dir.exists() {
        return Ok(RemoveOutcome::Absent);
    }
    if current_context(config_dir).as_deref() == Some(name) {
        tracing::warn!(
            context = name,
            "docker context is the current one; left in place (run `docker context use default`)"
        );
        return Ok(RemoveOutcome::KeptCurrent);
    }

    std::fs::remove_dir_all(&dir).map_err(|source| ContextError::Io {
        action: "remove",
        path: dir,
        source,
    })?;
    Ok(RemoveOutcome::Removed)
}

/// The docker CLI's current context, if one other than the default is selected.
fn current_context(config_dir: &Path) -> Option<String> {
    if let Some(name) = std::env::var("DOCKER_CONTEXT")
        .ok()
        .filter(|n| !n.is_empty())
    {
        return Some(name);
    }
    let text = std::fs::read_to_string(config_dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config.get("currentContext")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_docker_cli() {
        for good in ["colima-wt", "colima", "a1", "x_y.z+w-v"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "a", "-x", "_x", "a b", "x<&>", "é-x"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn go_style_escapes() {
        assert_eq!(go_escape(r#"{"a":"<&>"}"#), r#"{"a":"\u003c\u0026\u003e"}"#);
    }
}
