//! Finds the git worktree, its main worktree and git common dir, and derives the VM name.
//!
//! The worktree is what `git rev-parse --show-toplevel` says for a directory; the main
//! worktree is the parent of the absolute git common dir (for a linked worktree made with
//! `git worktree add`, the repository it was added to). Every path here is canonical:
//! symlinks are resolved, so a worktree reached through a link has the same identity (and the
//! same VM) as when reached directly.
//!
//! The name rules live in [`name`]: the seed's derivation ([`derive_name`]), the collision
//! suffix ([`with_collision_suffix`]) and the socket-path shortening
//! ([`shorten_for_sockets`]).

mod name;
mod paths;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

pub use crate::name::{
    NAME_RULE, NameError, SOCKET_PATH_MAX, derive_name, path_hash6, shorten_for_sockets,
    validate_name, validate_prefix, with_collision_suffix,
};
pub use crate::paths::{common_dir_outside, contains};

/// The git worktree a command acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worktree {
    /// The worktree's top-level directory, canonical (symlinks resolved).
    pub root: PathBuf,
    /// The main worktree: the parent of the git common dir, canonical.
    pub main_root: PathBuf,
    /// The git common dir (`.git` of the main worktree), absolute and canonical.
    pub common_dir: PathBuf,
    /// Whether this is a linked worktree (made with `git worktree add`).
    pub linked: bool,
}

impl Worktree {
    /// The worktree directory's basename, the input of [`derive_name`]. Bytes that are not
    /// UTF-8 become U+FFFD, which the name rule turns into `-` like any other non-ASCII letter.
    pub fn dir_name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Why the worktree of a directory could not be found.
#[derive(Debug, Error)]
pub enum WorktreeError {
    /// The directory is not inside any git repository.
    #[error(
        "{} is not inside a git repository; run vmoat inside a git worktree or give -C DIR",
        dir.display()
    )]
    NotARepository {
        /// The directory that was searched from.
        dir: PathBuf,
    },

    /// The directory is inside a `.git` directory or a bare repository, which has no worktree.
    #[error(
        "{} is inside a git directory or a bare repository, not a worktree; run vmoat inside a \
         git worktree or give -C DIR",
        dir.display()
    )]
    NotAWorktree {
        /// The directory that was searched from.
        dir: PathBuf,
    },

    /// The directory itself cannot be used.
    #[error("cannot use directory {}; give -C an existing directory", dir.display())]
    NoDirectory {
        /// The directory as given.
        dir: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: io::Error,
    },

    /// `git` could not be started.
    #[error("cannot run git; install git and make sure it is on PATH")]
    GitMissing {
        /// Why the process did not start.
        #[source]
        source: io::Error,
    },

    /// git ran but failed for another reason (its message is kept: it says what to do, e.g.
    /// for a repository owned by another user).
    #[error("git rev-parse failed in {}: {message}", dir.display())]
    Git {
        /// The directory git ran in.
        dir: PathBuf,
        /// git's own message.
        message: String,
    },

    /// A path git printed could not be resolved.
    #[error("cannot resolve {} (printed by git rev-parse)", path.display())]
    Resolve {
        /// The path as git printed it.
        path: PathBuf,
        /// Why it could not be resolved.
        #[source]
        source: io::Error,
    },
}

/// Environment variables that would make git ignore the directory it runs in.
const GIT_LOCATION_VARS: [&str; 4] = [
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
];

/// Finds the worktree that `dir` lies in, by running `git rev-parse` there. The directory
/// decides alone: `GIT_DIR` and its kin, set for example inside git hooks, are cleared for the
/// call.
pub fn discover(dir: &Path) -> Result<Worktree, WorktreeError> {
    let metadata = std::fs::metadata(dir).and_then(|m| {
        if m.is_dir() {
            Ok(m)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ))
        }
    });
    if let Err(source) = metadata {
        return Err(WorktreeError::NoDirectory {
            dir: dir.to_path_buf(),
            source,
        });
    }

    let mut command = Command::new("git");
    command
        .args(["rev-parse", "--path-format=absolute"])
        .args(["--show-toplevel", "--git-dir", "--git-common-dir"])
        .current_dir(dir);
    for var in GIT_LOCATION_VARS {
        command.env_remove(var);
    }
    let output = command
        .output()
        .map_err(|source| WorktreeError::GitMissing { source })?;

    if !output.status.success() {
        return Err(classify_failure(dir, &output.stderr));
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let [toplevel, git_dir, common_dir] = lines[..] else {
        return Err(WorktreeError::Git {
            dir: dir.to_path_buf(),
            message: format!("unexpected output {stdout:?}"),
        });
    };

    let root = canonical(dir, toplevel)?;
    let git_dir = canonical(dir, git_dir)?;
    let common_dir = canonical(dir, common_dir)?;
    let main_root = common_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| common_dir.clone());

    let worktree = Worktree {
        linked: git_dir != common_dir,
        root,
        main_root,
        common_dir,
    };
    tracing::debug!(?worktree, "worktree found");
    Ok(worktree)
}

fn classify_failure(dir: &Path, stderr: &[u8]) -> WorktreeError {
    let message = String::from_utf8_lossy(stderr).trim().to_owned();
    let dir = dir.to_path_buf();
    if message.contains("not a git repository") {
        WorktreeError::NotARepository { dir }
    } else if message.contains("must be run in a work tree") {
        WorktreeError::NotAWorktree { dir }
    } else {
        let message = message
            .strip_prefix("fatal: ")
            .unwrap_or(&message)
            .to_owned();
        WorktreeError::Git { dir, message }
    }
}

/// Canonicalises a path printed by git; a relative one (from a git too old for
/// `--path-format`) is taken relative to the directory git ran in.
fn canonical(dir: &Path, printed: &str) -> Result<PathBuf, WorktreeError> {
    let path = dir.join(OsStr::new(printed));
    std::fs::canonicalize(&path).map_err(|source| WorktreeError::Resolve { path, source })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs git with no user or system config, so tests behave the same for root and for any
    /// user, and whatever the machine's git config says.
    fn git(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=vmoat test",
                "-c",
                "user.email=test@vmoat.invalid",
            ])
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "protocol.file.allow=always",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// A repository with one commit at `dir`.
    fn repo(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q"]);
        std::fs::write(dir.join("README"), "hello\n").unwrap();
        git(dir, &["add", "README"]);
        git(dir, &["commit", "-q", "-m", "first"]);
    }

    /// Adds a linked worktree at `path` on a new `branch`, with extra `git worktree add` flags.
    fn add_worktree(main: &Path, flags: &[&str], branch: &str, path: &str) {
        let mut args = vec!["worktree", "add", "-q"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["-b", branch, path]);
        git(main, &args);
    }

    fn real(path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap()
    }

    /// Whether the git on PATH knows `git worktree add --relative-paths` (git 2.48+).
    fn git_has_relative_paths(dir: &Path) -> bool {
        let output = Command::new("git")
            .args(["worktree", "add", "-h"])
            .current_dir(dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).contains("--relative-paths")
            || String::from_utf8_lossy(&output.stderr).contains("--relative-paths")
    }

    #[test]
    fn main_worktree_from_a_subdirectory() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("proj");
        repo(&main);
        std::fs::create_dir_all(main.join("src/deep")).unwrap();

        let wt = discover(&main.join("src/deep")).unwrap();
        assert_eq!(wt.root, real(&main));
        assert_eq!(wt.main_root, real(&main));
        assert_eq!(wt.common_dir, real(&main.join(".git")));
        assert!(!wt.linked);
        assert_eq!(wt.dir_name(), "proj");
    }

    #[test]
    fn linked_worktree_finds_main_and_common_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("main");
        repo(&main);
        let linked = tmp.path().join("trees/My_Feature.v2");
        add_worktree(&main, &[], "feature", linked.to_str().unwrap());

        let wt = discover(&linked).unwrap();
        assert_eq!(wt.root, real(&linked));
        assert_eq!(wt.main_root, real(&main));
        assert_eq!(wt.common_dir, real(&main.join(".git")));
        assert!(wt.linked);
        assert_eq!(
            derive_name("wt-", &wt.dir_name()).unwrap(),
            "wt-my-feature-v2"
        );
    }

    #[test]
    fn nested_worktree_with_non_ascii_name() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("main");
        repo(&main);
        let linked = main.join("feat/ü-umlaut");
        add_worktree(&main, &[], "ü", linked.to_str().unwrap());

        let wt = discover(&linked).unwrap();
        assert_eq!(wt.root, real(&linked));
        assert_eq!(wt.main_root, real(&main));
        assert_eq!(wt.dir_name(), "ü-umlaut");
        assert_eq!(derive_name("wt-", &wt.dir_name()).unwrap(), "wt-umlaut");
    }

    /// A linked worktree whose `.git` file and gitdir back-link hold relative paths, as
    /// `git worktree add --relative-paths` (git 2.48+) writes them. With an older git the
    /// files are rewritten by hand to the same form.
    #[test]
    fn linked_worktree_with_relative_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("main");
        repo(&main);
        let linked = tmp.path().join("rel");

        if git_has_relative_paths(&main) {
            add_worktree(&main, &["--relative-paths"], "rel", "../rel");
        } else {
            add_worktree(&main, &[], "rel", "../rel");
            std::fs::write(linked.join(".git"), "gitdir: ../main/.git/worktrees/rel\n").unwrap();
            std::fs::write(
                main.join(".git/worktrees/rel/gitdir"),
                "../../../../rel/.git\n",
            )
            .unwrap();
        }
        let dot_git = std::fs::read_to_string(linked.join(".git")).unwrap();
        assert!(dot_git.starts_with("gitdir: ../"), "{dot_git}");

        let wt = discover(&linked).unwrap();
        assert_eq!(wt.root, real(&linked));
        assert_eq!(wt.main_root, real(&main));
        assert_eq!(wt.common_dir, real(&main.join(".git")));
        assert!(wt.linked);
        assert!(wt.common_dir.is_absolute());
    }

    #[test]
    fn worktree_reached_through_a_symlink_resolves() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("real/proj");
        repo(&main);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("real"), &link).unwrap();

        let wt = discover(&link.join("proj")).unwrap();
        assert_eq!(wt.root, real(&main));
        assert!(!wt.root.starts_with(&link));
        assert_eq!(path_hash6(&wt.root), path_hash6(&link.join("proj")));
    }

    #[test]
    fn outside_a_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("plain");
        std::fs::create_dir(&dir).unwrap();

        // The test needs a temp dir outside every repository; say so if it is not.
        let above = Command::new("git")
            .args(["rev-parse", "--show-toplevel"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            !above.status.success(),
            "TMPDIR must not lie inside a git repository"
        );

        let err = discover(&dir).unwrap_err();
        assert!(matches!(err, WorktreeError::NotARepository { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(text.contains("-C DIR"), "{text}");
    }

    #[test]
    fn inside_the_git_dir_is_not_a_worktree() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("proj");
        repo(&main);
        let err = discover(&main.join(".git")).unwrap_err();
        assert!(matches!(err, WorktreeError::NotAWorktree { .. }), "{err}");
    }

    #[test]
    fn missing_directory() {
        let err = discover(Path::new("/nonexistent/vmoat/dir")).unwrap_err();
        assert!(matches!(err, WorktreeError::NoDirectory { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/vmoat/dir"));
    }

    #[test]
    fn common_dir_outside_the_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("repos/main");
        repo(&main);
        let home = tmp.path().join("home");
        let linked = home.join("wt");
        std::fs::create_dir_all(&home).unwrap();
        add_worktree(&main, &[], "wt", linked.to_str().unwrap());

        let wt = discover(&linked).unwrap();
        assert_eq!(
            common_dir_outside(&wt, &home),
            Some(real(&main.join(".git")))
        );
        assert_eq!(common_dir_outside(&wt, tmp.path()), None);
    }

    #[test]
    fn long_home_path_keeps_sockets_short_and_name_stable() {
        let tmp = tempfile::tempdir().unwrap();
        // HOME padded so that `$HOME/.colima` is 60 bytes, whatever the temp dir's length.
        let tmp_len = tmp.path().as_os_str().len();
        let pad = 60usize
            .saturating_sub(tmp_len + "/.colima".len() + 1)
            .max(1);
        let home = tmp.path().join("h".repeat(pad));
        let main = home.join("src/github.com/some-organisation/a-repository-name");
        repo(&main);
        let linked = home.join("wt/feature-branch-with-a-long-descriptive-name");
        add_worktree(&main, &[], "f", linked.to_str().unwrap());

        let colima = home.join(".colima");
        let longest = |name: &str| {
            colima
                .join("_lima")
                .join(format!("colima-{name}"))
                .join("virtiofsd-0.sock")
                .as_os_str()
                .len()
        };
        let first = {
            let wt = discover(&linked).unwrap();
            let name = derive_name("wt-", &wt.dir_name()).unwrap();
            assert!(
                longest(&name) >= SOCKET_PATH_MAX,
                "the test must need shortening"
            );
            shorten_for_sockets(&name, &wt.root, longest)
        };
        assert!(longest(&first) < SOCKET_PATH_MAX);
        validate_name(&first).unwrap();

        let again = {
            let wt = discover(&linked).unwrap();
            let name = derive_name("wt-", &wt.dir_name()).unwrap();
            shorten_for_sockets(&name, &wt.root, longest)
        };
        assert_eq!(first, again);
    }
}
