//! Path containment by components, after resolving symlinks and `..`: the test behind
//! `VM_MOUNT` (it must contain the worktree) and behind mounting the git common dir too.

use std::path::{Component, Path, PathBuf};

use crate::Worktree;

/// Whether `inner` is `outer` or lies below it. Both are canonicalised first (symlinks and
/// `..` resolved); a path that does not exist is made absolute and its `.` and `..` components
/// are resolved by text instead. The comparison is by components, so `/home/a` does not
/// contain `/home/ab`.
pub fn contains(outer: &Path, inner: &Path) -> bool {
    resolve(inner).starts_with(resolve(outer))
}

/// The git common dir when `mount` does not contain it: a linked worktree under `VM_MOUNT`
/// whose repository lives elsewhere needs that directory mounted as well, or git in the VM
/// cannot find its objects.
pub fn common_dir_outside(worktree: &Worktree, mount: &Path) -> Option<PathBuf> {
    if contains(mount, &worktree.common_dir) {
        None
    } else {
        Some(worktree.common_dir.clone())
    }
}

/// The canonical form of `path`, or its lexical normal form when it does not exist.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return canonical;
    }

    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };

    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_components_not_prefix() {
        assert!(contains(
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent/a/b")
        ));
        assert!(contains(
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent/a")
        ));
        assert!(contains(
            Path::new("/nonexistent/a/"),
            Path::new("/nonexistent/a/b/")
        ));
        assert!(!contains(
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent/ab")
        ));
        assert!(!contains(
            Path::new("/nonexistent/a/b"),
            Path::new("/nonexistent/a")
        ));
    }

    #[test]
    fn dot_dot_is_resolved() {
        assert!(!contains(
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent/a/../b")
        ));
        assert!(contains(
            Path::new("/nonexistent/a/x/.."),
            Path::new("/nonexistent/a/./b")
        ));
    }

    #[test]
    fn symlinks_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(home.join("proj")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();

        // A link inside home pointing out of it: its target is not under home.
        std::os::unix::fs::symlink(&elsewhere, home.join("out")).unwrap();
        assert!(!contains(&home, &home.join("out")));

        // A link to home outside it: what it points at is under home.
        let alias = dir.path().join("alias");
        std::os::unix::fs::symlink(&home, &alias).unwrap();
        assert!(contains(&home, &alias.join("proj")));
        assert!(contains(&alias, &home.join("proj")));
    }
}
