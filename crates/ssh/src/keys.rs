//! SSH keys: the user key pair Lima and vmoat share (`_lima/_config/user` and `user.pub`),
//! the guest's host key generated on the host (handed over through cidata so it is pinned from
//! the first connection), and public keys parsed from OpenSSH text.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{self, HashAlg, LineEnding};
use russh::keys::{Algorithm, PrivateKey};

use crate::error::KeyError;

/// File name of the shared private key inside Lima's `_config` directory.
pub const USER_KEY_FILE: &str = "user";

/// File name of the shared public key inside Lima's `_config` directory.
pub const USER_PUBLIC_KEY_FILE: &str = "user.pub";

/// The comment Lima's `ssh-keygen -C lima` puts on the shared key.
pub const USER_KEY_COMMENT: &str = "lima";

/// How often to re-read a private key that does not parse yet, in case another tool (Lima's
/// `ssh-keygen`) is still writing it.
const PARSE_RETRIES: u32 = 10;

/// A public SSH key, e.g. the guest's pinned host key.
///
/// Two keys are equal when their algorithm and key material are equal; comments are ignored.
/// Serialised (serde) as its OpenSSH text.
#[derive(Clone)]
pub struct PublicKey(russh::keys::PublicKey);

impl PublicKey {
    /// Parse an OpenSSH public key line (`ssh-ed25519 AAAA… comment`); surrounding whitespace
    /// is ignored.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let trimmed = text.trim();
        russh::keys::PublicKey::from_openssh(trimmed)
            .map(PublicKey)
            .map_err(|source| KeyError::ParsePublic {
                value: trimmed.chars().take(80).collect(),
                source,
            })
    }

    /// The SHA256 fingerprint as OpenSSH prints it (`SHA256:…`).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The key's algorithm name (`ssh-ed25519`).
    pub fn algorithm(&self) -> String {
        self.0.algorithm().as_str().to_owned()
    }

    /// The OpenSSH one-line form (`ssh-ed25519 AAAA… comment`), without a newline.
    pub fn to_openssh(&self) -> String {
        // Encoding a key that was decoded or generated cannot fail; keep a readable fallback.
        self.0.to_openssh().unwrap_or_else(|_| self.fingerprint())
    }

    pub(crate) fn inner(&self) -> &russh::keys::PublicKey {
        &self.0
    }

    pub(crate) fn from_inner(key: russh::keys::PublicKey) -> PublicKey {
        PublicKey(key)
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.0.key_data() == other.0.key_data()
    }
}

impl Eq for PublicKey {}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        PublicKey::parse(s)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_openssh())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {})", self.algorithm(), self.fingerprint())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_openssh())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PublicKey::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The user key pair vmoat logs in with, loaded from disk.
///
/// Cheap to clone. Its `Debug` shows the path and fingerprint, never the secret.
#[derive(Clone)]
pub struct UserKey {
    private: Arc<PrivateKey>,
    public: PublicKey,
    path: PathBuf,
}

impl UserKey {
    /// Load an unencrypted OpenSSH private key file (the public half is derived from it).
    pub fn load(path: &Path) -> Result<UserKey, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        let private = PrivateKey::from_openssh(text.as_bytes())
            .and_then(|key| {
                if key.is_encrypted() {
                    Err(ssh_key::Error::Encrypted)
                } else {
                    Ok(key)
                }
            })
            .map_err(|source| KeyError::ParsePrivate {
                path: path.to_owned(),
                source,
            })?;
        Ok(UserKey::from_private(private, path.to_owned()))
    }

    fn from_private(private: PrivateKey, path: PathBuf) -> UserKey {
        let public = PublicKey(private.public_key().clone());
        UserKey {
            private: Arc::new(private),
            public,
            path,
        }
    }

    /// The private key file this key was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public half as one OpenSSH line (`ssh-ed25519 AAAA… lima`), for `authorized_keys`
    /// and cloud-init's `ssh_authorized_keys`.
    pub fn public_openssh(&self) -> String {
        self.public.to_openssh()
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.private)
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKey")
            .field("path", &self.path)
            .field("public", &self.public)
            .finish()
    }
}

/// Return the user key pair in Lima's shared config directory (`<LIMA_HOME>/_config`),
/// creating it on first use.
///
/// The pair is what `ssh-keygen -t ed25519 -N "" -C lima` would make: `user` (OpenSSH private
/// key, mode 0600) and `user.pub` (one line, mode 0644), in a directory of mode 0700. An
/// existing pair (made by Lima or Colima) is used as it is; a private key readable by others is
/// narrowed to 0600, and a missing or stale `user.pub` is rewritten from the private key.
///
/// Creation is atomic: the key is written to a temporary file and hard-linked into place,
/// which fails if another process got there first, so racing processes all end up with the
/// one pair that won.
pub fn ensure_user_key(lima_config_dir: &Path) -> Result<UserKey, KeyError> {
    create_private_dir(lima_config_dir)?;
    let key_path = lima_config_dir.join(USER_KEY_FILE);

    for _ in 0..PARSE_RETRIES {
        match load_existing(&key_path) {
            Ok(Some(key)) => {
                sync_public_file(lima_config_dir, &key)?;
                return Ok(key);
            }
            Ok(None) => {}
            // Another tool may be half-way through writing a key it did not publish atomically.
            Err(KeyError::ParsePrivate { .. }) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        }

        if let Some(key) = publish_new_key(lima_config_dir, &key_path)? {
            sync_public_file(lima_config_dir, &key)?;
            return Ok(key);
        }
    }

    // Still unreadable after the retries: report the parse error itself.
    UserKey::load(&key_path)
}

/// Create `dir` (mode 0700) and its parents (default mode).
fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| KeyError::Io {
            action: "create directory",
            path: parent.to_owned(),
            source,
        })?;
    }

    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(source) => Err(KeyError::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Load the key at `path` if it exists, narrowing its mode to 0600 when others can read it.
fn load_existing(path: &Path) -> Result<Option<UserKey>, KeyError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KeyError::Io {
                action: "inspect",
                path: path.to_owned(),
                source,
            });
        }
    };

    if meta.permissions().mode() & 0o077 != 0 {
        // OpenSSH refuses private keys others can read; Lima's own ssh calls would fail too.
        tracing::warn!(path = %path.display(), "private key readable by others; setting mode 0600");
        fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(|source| {
            KeyError::Io {
                action: "set mode 0600 on",
                path: path.to_owned(),
                source,
            }
        })?;
    }

    UserKey::load(path).map(Some)
}

/// Generate a pair and link it into place. `None` when another process published first.
fn publish_new_key(dir: &Path, key_path: &Path) -> Result<Option<UserKey>, KeyError> {
    let mut private =
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|source| {
            KeyError::Crypto {
                action: "generate",
                source,
            }
        })?;
    private.set_comment(USER_KEY_COMMENT);
    let pem = private
        .to_openssh(LineEnding::LF)
        .map_err(|source| KeyError::Crypto {
            action: "encode",
            source,
        })?;

    let tmp = TempFile::create(dir, USER_KEY_FILE, 0o600, pem.as_bytes())?;
    match fs::hard_link(&tmp.path, key_path) {
        Ok(()) => {
            tracing::info!(path = %key_path.display(), "created the SSH user key pair");
            Ok(Some(UserKey::from_private(private, key_path.to_owned())))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(source) => Err(KeyError::Io {
            action: "create",
            path: key_path.to_owned(),
            source,
        }),
    }
}

/// Make `user.pub` hold the public half of `key`, replacing it atomically if it differs.
fn sync_public_file(dir: &Path, key: &UserKey) -> Result<(), KeyError> {
    let pub_path = dir.join(USER_PUBLIC_KEY_FILE);
    let current = fs::read_to_string(&pub_path).ok();
    let matches = current
        .as_deref()
        .and_then(|text| PublicKey::parse(text).ok())
        .is_some_and(|found| found == key.public);
    if matches {
        return Ok(());
    }

    let line = format!("{}\n", key.public_openssh());
    let tmp = TempFile::create(dir, USER_PUBLIC_KEY_FILE, 0o644, line.as_bytes())?;
    tmp.persist(&pub_path)
}

/// A uniquely named file in the destination's directory, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dir: &Path, stem: &str, mode: u32, contents: &[u8]) -> Result<TempFile, KeyError> {
        let name = format!(
            ".{stem}.tmp.{}.{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = dir.join(name);
        let io_err = |source| KeyError::Io {
            action: "write",
            path: path.clone(),
            source,
        };

        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io_err)?;
        let tmp = TempFile {
            path: path.clone(),
            keep: false,
        };
        file.write_all(contents).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(tmp)
    }

    fn persist(mut self, dest: &Path) -> Result<(), KeyError> {
        fs::rename(&self.path, dest).map_err(|source| KeyError::Io {
            action: "replace",
            path: dest.to_owned(),
            source,
        })?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A host key pair for the guest's sshd, in OpenSSH text form.
///
/// Give both halves to the guest through cidata (cloud-init `ssh_keys: {ed25519_private,
/// ed25519_public}`) and pin `public_openssh` in [`crate::Session::connect`]: the first
/// connection then already knows the key, so there is no trust-on-first-use window.
#[derive(Clone)]
pub struct HostKeyPair {
    /// The private key (`-----BEGIN OPENSSH PRIVATE KEY-----` …), newline-terminated.
    pub private_openssh: String,
    /// The public key line (`ssh-ed25519 AAAA…`), without a newline.
    pub public_openssh: String,
}

impl HostKeyPair {
    /// The public half, parsed, ready to pin.
    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::parse(&self.public_openssh)
    }
}

impl fmt::Debug for HostKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKeyPair")
            .field("public_openssh", &self.public_openssh)
            .field("private_openssh", &"<redacted>")
            .finish()
    }
}

/// Generate a fresh ed25519 host key pair for a new guest (no comment).
pub fn generate_host_key() -> Result<HostKeyPair, KeyError> {
    let private = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|source| {
        KeyError::Crypto {
            action: "generate",
            source,
        }
    })?;
    let private_openssh = private
        .to_openssh(LineEnding::LF)
        .map_err(|source| KeyError::Crypto {
            action: "encode",
            source,
        })?
        .to_string();
    let public_openssh = private
        .public_key()
        .to_openssh()
        .map_err(|source| KeyError::Crypto {
            action: "encode",
            source,
        })?;
    Ok(HostKeyPair {
        private_openssh,
        public_openssh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_and_ignores_comment() {
        let pair = generate_host_key().unwrap();
        let key = PublicKey::parse(&pair.public_openssh).unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        assert!(key.fingerprint().starts_with("SHA256:"));

        let with_comment = PublicKey::parse(&format!("  {} root@guest\n", pair.public_openssh));
        assert_eq!(with_comment.unwrap(), key);
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
    }

    #[test]
    fn two_generated_host_keys_differ() {
        let a = generate_host_key().unwrap().public_key().unwrap();
        let b = generate_host_key().unwrap().public_key().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn bad_public_key_is_named() {
        let err = PublicKey::parse("ssh-ed25519 not-base64!").unwrap_err();
        assert!(err.to_string().contains("not-base64!"), "{err}");
    }

    #[test]
    fn host_key_private_half_parses_and_is_redacted_in_debug() {
        let pair = generate_host_key().unwrap();
        let private = PrivateKey::from_openssh(pair.private_openssh.as_bytes()).unwrap();
        assert_eq!(
            PublicKey(private.public_key().clone()),
            pair.public_key().unwrap()
        );
        assert!(!format!("{pair:?}").contains("PRIVATE"));
    }

    #[test]
    fn user_key_is_created_once_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("_lima/_config");
        let first = ensure_user_key(&config).unwrap();
        let second = ensure_user_key(&config).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        assert!(first.public_openssh().ends_with(" lima"));

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&config), 0o700);
        assert_eq!(mode(&config.join(USER_KEY_FILE)), 0o600);
        assert_eq!(mode(&config.join(USER_PUBLIC_KEY_FILE)), 0o644);
        let pub_text = fs::read_to_string(config.join(USER_PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(pub_text, format!("{}\n", first.public_openssh()));
    }

    #[test]
    fn stale_public_file_and_loose_mode_are_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let key = ensure_user_key(dir.path()).unwrap();
        let other = generate_host_key().unwrap();
        fs::write(dir.path().join(USER_PUBLIC_KEY_FILE), &other.public_openssh).unwrap();
        fs::set_permissions(
            dir.path().join(USER_KEY_FILE),
            Permissions::from_mode(0o644),
        )
        .unwrap();

        let again = ensure_user_key(dir.path()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let pub_text = fs::read_to_string(dir.path().join(USER_PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(PublicKey::parse(&pub_text).unwrap(), *key.public_key());
        let mode = fs::metadata(dir.path().join(USER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn garbage_private_key_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USER_KEY_FILE);
        fs::write(&path, "not a key").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        let err = ensure_user_key(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::ParsePrivate { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn racing_creators_agree_on_one_pair() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("_config");
        let keys: Vec<PublicKey> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| ensure_user_key(&config).unwrap().public_key().clone()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));

        let on_disk = UserKey::load(&config.join(USER_KEY_FILE)).unwrap();
        assert_eq!(on_disk.public_key(), &keys[0]);
        let leftovers: Vec<_> = fs::read_dir(&config)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
