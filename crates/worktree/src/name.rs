//! VM names: the seed's derivation from the worktree directory, the rule every name must meet,
//! the collision suffix and the shortening that keeps unix socket paths under the OS limit.
//!
//! A name is also a Colima profile name and part of the Lima instance name
//! (`colima-<name>`), so it stays within `[a-z0-9-]`, starts and ends with a letter or digit
//! and never holds `--` (Lima's instance-name rule forbids repeated separators).

use std::path::Path;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The longest unix socket path the OS takes, counting the terminating NUL (`sun_path`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SOCKET_PATH_MAX: usize = 108;

/// The longest unix socket path the OS takes, counting the terminating NUL (`sun_path`).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub const SOCKET_PATH_MAX: usize = 104;

/// The rule a VM name follows, as shown in error messages.
pub const NAME_RULE: &str = "lower-case letters a-z, digits and '-', starting and ending with \
                             a letter or digit, no '--'";

/// A name that cannot be used or derived.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    /// The directory's basename has no character the rule keeps.
    #[error(
        "the worktree directory name {dir:?} leaves nothing for a VM name (only letters, digits \
         and '-' are kept); set VM_NAME in vmoat.conf or vmoat.local.conf"
    )]
    NothingLeft {
        /// The directory basename that was tried.
        dir: String,
    },

    /// A name given in full (`VM_NAME`) breaks the rule.
    #[error("{name:?} is not a valid VM name: {problem}; use {NAME_RULE}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// A prefix (`VM_PREFIX`) that could not start a valid name.
    #[error(
        "{prefix:?} is not a valid VM name prefix: {problem}; use lower-case letters a-z, digits \
         and '-', starting with a letter or digit (or leave it empty)"
    )]
    InvalidPrefix {
        /// The prefix as given.
        prefix: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Derives the VM name from `prefix` and the worktree directory's basename: the basename is
/// lower-cased, every character outside `[a-z0-9-]` becomes `-`, runs of `-` are squeezed and
/// leading and trailing `-` removed; the prefix goes in front unchanged.
/// `("wt-", "My_Feature.v2")` gives `wt-my-feature-v2`.
pub fn derive_name(prefix: &str, dir_basename: &str) -> Result<String, NameError> {
    validate_prefix(prefix)?;

    let mut stem = String::with_capacity(dir_basename.len());
    for c in dir_basename.chars().flat_map(char::to_lowercase) {
        let kept = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        // Squeezing as we go: a `-` never follows another one.
        if kept == '-' && (stem.is_empty() || stem.ends_with('-')) {
            continue;
        }
        stem.push(kept);
    }
    let stem = stem.trim_end_matches('-');

    if stem.is_empty() {
        return Err(NameError::NothingLeft {
            dir: dir_basename.to_owned(),
        });
    }
    Ok(format!("{prefix}{stem}"))
}

/// Checks a full name (`VM_NAME`, or one read from a profile) against the rule.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    match problem(name, false) {
        Some(problem) => Err(NameError::InvalidName {
            name: name.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// Checks a name prefix (`VM_PREFIX`): the same characters as a name, not starting with `-`
/// and without `--`; it may be empty and may end with `-`.
pub fn validate_prefix(prefix: &str) -> Result<(), NameError> {
    match problem(prefix, true) {
        Some(problem) => Err(NameError::InvalidPrefix {
            prefix: prefix.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// What breaks the name rule in `text`, if anything; a prefix may be empty and end in `-`.
fn problem(text: &str, prefix: bool) -> Option<&'static str> {
    let bad = |c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if text.is_empty() && !prefix {
        Some("it is empty")
    } else if text.chars().any(|c| c.is_ascii_uppercase()) {
        Some("it has upper-case letters")
    } else if text.chars().any(bad) {
        Some("it has characters other than a-z, 0-9 and '-'")
    } else if text.starts_with('-') {
        Some("it starts with '-'")
    } else if text.ends_with('-') && !prefix {
        Some("it ends with '-'")
    } else if text.contains("--") {
        Some("it contains '--'")
    } else {
        None
    }
}

/// The first 6 hex digits of the SHA-256 of the path's bytes. The path is canonicalised first
/// when it exists, so a path given through a symlink hashes like its target; a path that does
/// not exist is hashed as given.
pub fn path_hash6(path: &Path) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..3])
}

/// The name with the collision suffix of this worktree: `name-<path_hash6(worktree)>`. Used
/// when the derived name is taken by a profile that another worktree owns.
pub fn with_collision_suffix(name: &str, canonical_worktree: &Path) -> String {
    format!("{name}-{}", path_hash6(canonical_worktree))
}

/// Keeps every unix socket of the VM under [`SOCKET_PATH_MAX`].
///
/// `longest_path_for(name)` returns the length in bytes (without the NUL) of the longest socket
/// path a VM called `name` would use. If `name` fits, it is returned unchanged. Otherwise it is
/// cut short and `-` + [`path_hash6`] of the worktree is appended, keeping as much of the name
/// as fits; a name that already ends in this worktree's suffix is not suffixed twice. The
/// result depends only on the inputs, so it is the same on every run. If not even the bare
/// hash fits, the directories themselves are too deep and the bare hash is returned: creating
/// the socket then fails with the path in the error.
pub fn shorten_for_sockets(
    name: &str,
    canonical_worktree: &Path,
    longest_path_for: impl Fn(&str) -> usize,
) -> String {
    let fits = |candidate: &str| longest_path_for(candidate) < SOCKET_PATH_MAX;
    if fits(name) {
        return name.to_owned();
    }

    let hash = path_hash6(canonical_worktree);
    let base = name
        .strip_suffix(hash.as_str())
        .and_then(|rest| rest.strip_suffix('-'))
        .unwrap_or(name);

    // Longest stem first: the first candidate that fits keeps the most of the name.
    for keep in (0..=base.len()).rev() {
        if !base.is_char_boundary(keep) {
            continue;
        }
        let stem = base[..keep].trim_end_matches('-');
        if stem.is_empty() {
            break;
        }
        let candidate = format!("{stem}-{hash}");
        if fits(&candidate) {
            tracing::debug!(name, shortened = %candidate, "name shortened for socket paths");
            return candidate;
        }
    }

    tracing::warn!(
        name,
        "socket paths stay too long even for the bare hash {hash}; the home directory is too deep"
    );
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derive(dir: &str) -> Result<String, NameError> {
        derive_name("wt-", dir)
    }

    #[test]
    fn spec_example() {
        assert_eq!(derive("My_Feature.v2").unwrap(), "wt-my-feature-v2");
    }

    #[test]
    fn non_ascii_letters_become_dashes_and_are_trimmed() {
        // The nested `feat/ü-umlaut` worktree has the basename `ü-umlaut`.
        assert_eq!(derive("ü-umlaut").unwrap(), "wt-umlaut");
        assert_eq!(derive("Ärger-Über").unwrap(), "wt-rger-ber");
    }

    #[test]
    fn leading_dash_upper_and_dots() {
        assert_eq!(derive("-leading-dash").unwrap(), "wt-leading-dash");
        assert_eq!(derive("UPPER").unwrap(), "wt-upper");
        assert_eq!(derive("a..b").unwrap(), "wt-a-b");
        assert_eq!(derive("trailing--").unwrap(), "wt-trailing");
        assert_eq!(derive("a  b__c").unwrap(), "wt-a-b-c");
    }

    #[test]
    fn nothing_left_says_to_set_vm_name() {
        let err = derive("___").unwrap_err();
        assert_eq!(err, NameError::NothingLeft { dir: "___".into() });
        let text = err.to_string();
        assert!(text.contains("\"___\""), "{text}");
        assert!(text.contains("set VM_NAME in vmoat.conf"), "{text}");
        assert!(derive("ü").is_err());
        assert!(derive("").is_err());
    }

    #[test]
    fn prefix_goes_in_front_unchanged() {
        assert_eq!(derive_name("", "api").unwrap(), "api");
        assert_eq!(derive_name("dev", "api").unwrap(), "devapi");
        assert!(matches!(
            derive_name("Wt-", "api"),
            Err(NameError::InvalidPrefix { .. })
        ));
        assert!(derive_name("-x", "api").is_err());
        assert!(derive_name("a--", "api").is_err());
    }

    #[test]
    fn derived_names_pass_the_rule() {
        for dir in [
            "My_Feature.v2",
            "ü-umlaut",
            "-leading-dash",
            "UPPER",
            "a..b",
            "x",
        ] {
            validate_name(&derive(dir).unwrap()).unwrap();
        }
    }

    #[test]
    fn name_rule() {
        validate_name("wt-api-3f2a1b").unwrap();
        validate_name("7").unwrap();
        for bad in ["", "-a", "a-", "a--b", "A", "a_b", "a.b", "ü"] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains("a-z"), "{bad}: {err}");
        }
    }

    #[test]
    fn hash_is_six_hex_of_sha256() {
        // `printf %s /nonexistent/api | sha256sum` starts with 1b8552.
        let hash = path_hash6(Path::new("/nonexistent/api"));
        assert_eq!(hash, "1b8552");
        assert_ne!(hash, path_hash6(Path::new("/nonexistent/api2")));
    }

    #[test]
    fn hash_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(path_hash6(&link), path_hash6(&real));
    }

    #[test]
    fn two_repos_named_api_get_distinct_names() {
        let one = with_collision_suffix("wt-api", Path::new("/nonexistent/one/api"));
        let two = with_collision_suffix("wt-api", Path::new("/nonexistent/two/api"));
        assert_ne!(one, two);
        assert!(one.starts_with("wt-api-") && one.len() == "wt-api-".len() + 6);
        validate_name(&one).unwrap();
    }

    /// The socket paths of a profile as the profile layout makes them, for a home at `home`.
    fn longest_under(home: &Path) -> impl Fn(&str) -> usize + '_ {
        move |name: &str| {
            let instance = home.join("_lima").join(format!("colima-{name}"));
            let profile = home.join(name);
            [
                instance.join("virtiofsd-0.sock"),
                instance.join("ha.sock"),
                profile.join("containerd.sock"),
            ]
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap()
        }
    }

    #[test]
    fn short_names_are_kept() {
        let home = Path::new("/home/me/.colima");
        let name = shorten_for_sockets("wt-api", Path::new("/w/api"), longest_under(home));
        assert_eq!(name, "wt-api");
    }

    #[test]
    fn long_home_shortens_the_name_stably() {
        // A long HOME: 46 bytes up to and with `.colima`, leaving 30 for the name.
        let home = Path::new("/home/a-user-with-a-long-name/projects/.colima");
        let worktree = Path::new("/home/a-user/projects/clients/acme/feature-with-long-name");
        let name = "wt-feature-with-a-very-long-descriptive-branch-name";
        let longest = longest_under(home);
        assert!(
            longest(name) >= SOCKET_PATH_MAX,
            "the test must need shortening"
        );

        let short = shorten_for_sockets(name, worktree, &longest);
        assert!(longest(&short) < SOCKET_PATH_MAX, "{short}");
        assert!(
            short.ends_with(&format!("-{}", path_hash6(worktree))),
            "{short}"
        );
        assert!(
            name.starts_with(short.rsplit_once('-').unwrap().0),
            "{short}"
        );
        validate_name(&short).unwrap();

        // Stable: same inputs, same name; and keeping one more byte would not have fitted.
        assert_eq!(short, shorten_for_sockets(name, worktree, &longest));
        // (A `-` at the cut is dropped, so one more means one more letter.)
        let kept = short.len() - 7;
        let more = if name.as_bytes()[kept] == b'-' {
            kept + 2
        } else {
            kept + 1
        };
        let one_more = format!("{}-{}", &name[..more], path_hash6(worktree));
        assert!(longest(&one_more) >= SOCKET_PATH_MAX, "{one_more}");

        // A name already carrying this worktree's suffix is not suffixed twice.
        let suffixed = with_collision_suffix(name, worktree);
        assert_eq!(shorten_for_sockets(&suffixed, worktree, &longest), short);
    }

    #[test]
    fn hopelessly_deep_home_gives_the_bare_hash() {
        let deep = "/d".repeat(60);
        let home = Path::new(&deep);
        let worktree = Path::new("/w/api");
        let short = shorten_for_sockets("wt-api", worktree, longest_under(home));
        assert_eq!(short, path_hash6(worktree));
    }
}
