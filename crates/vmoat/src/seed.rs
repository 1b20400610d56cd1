//! `PROVISION_SEED`: gitignored files (`.env`, keys) copied from the main worktree into a
//! fresh linked worktree. Entries must stay inside the worktree: an absolute path, a `..`
//! component or a symlink leading out is refused by name, and nothing is copied then.
//! Directories are copied whole; a file that already exists here is never overwritten.

use std::path::{Component, Path, PathBuf};

/// Why the seed list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// An entry points outside the worktree.
    #[error(
        "PROVISION_SEED entry {entry:?} {why}; entries are paths relative to the worktree \
         root that stay inside it"
    )]
    Escapes {
        /// The entry as written.
        entry: String,
        /// How it escapes.
        why: String,
    },
    /// Copying failed.
    #[error("copying PROVISION_SEED entry {entry:?} from {} failed", .from.display())]
    Copy {
        /// The entry.
        entry: String,
        /// The source path.
        from: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a seed run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Files copied, relative to the worktree.
    pub copied: Vec<PathBuf>,
    /// Files left alone because they already exist here.
    pub kept: Vec<PathBuf>,
    /// Entries the main worktree does not have.
    pub missing: Vec<String>,
}

/// Checks every entry without copying anything: `up` and `provision` call it before any VM
/// work, so a bad entry fails at once instead of after a boot.
pub fn check_seeds(main: &Path, worktree: &Path, entries: &[String]) -> Result<(), SeedError> {
    for entry in entries {
        check_entry(main, worktree, entry)?;
    }
    Ok(())
}

/// Copies every entry from `main` into `worktree`. Every entry is checked before anything is
/// copied, so a bad entry leaves the worktree untouched.
pub fn copy_seeds(
    main: &Path,
    worktree: &Path,
    entries: &[String],
) -> Result<SeedReport, SeedError> {
    let mut checked = Vec::new();
    for entry in entries {
        checked.push((entry, check_entry(main, worktree, entry)?));
    }

    let mut report = SeedReport::default();
    for (entry, relative) in checked {
        let from = main.join(&relative);
        if std::fs::symlink_metadata(&from).is_err() {
            report.missing.push(entry.clone());
            continue;
        }
        copy_tree(&from, &worktree.join(&relative), &relative, &mut report).map_err(|source| {
            SeedError::Copy {
                entry: entry.clone(),
                from: from.clone(),
                source,
            }
        })?;
    }
    Ok(report)
}

fn check_entry(main: &Path, worktree: &Path, entry: &str) -> Result<PathBuf, SeedError> {
    let escapes = |why: &str| SeedError::Escapes {
        entry: entry.to_owned(),
        why: why.to_owned(),
    };
    let path = Path::new(entry);
    if entry.is_empty() {
        return Err(escapes("is empty"));
    }
    if path.is_absolute() {
        return Err(escapes("is an absolute path"));
    }
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(escapes("contains `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(escapes("is an absolute path"));
            }
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(escapes("names the worktree root itself"));
    }

    // A symlink anywhere on the way (in the main worktree or here) may lead out.
    for root in [main, worktree] {
        let mut walked = root.to_path_buf();
        for part in relative.components() {
            walked.push(part);
            let Ok(meta) = std::fs::symlink_metadata(&walked) else {
                break;
            };
            if meta.file_type().is_symlink() {
                let target =
                    std::fs::canonicalize(&walked).map_err(|_| escapes("is a dangling symlink"))?;
                let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
                if !vmoat_worktree::contains(&root, &target) {
                    return Err(escapes(&format!(
                        "goes through a symlink to {}, outside {}",
                        target.display(),
                        root.display()
                    )));
                }
            }
        }
    }
    Ok(relative)
}

fn copy_tree(
    from: &Path,
    to: &Path,
    relative: &Path,
    report: &mut SeedReport,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        let mut children: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let name = child.file_name();
            copy_tree(
                &child.path(),
                &to.join(&name),
                &relative.join(&name),
                report,
            )?;
        }
        return Ok(());
    }

    if std::fs::symlink_metadata(to).is_ok() {
        report.kept.push(relative.to_owned());
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if meta.file_type().is_symlink() {
        // Copied as a link; check_entry made sure the top-level entry stays inside, and a
        // link inside a seeded directory is recreated as written.
        let target = std::fs::read_link(from)?;
        std::os::unix::fs::symlink(target, to)?;
    } else {
        std::fs::copy(from, to)?;
    }
    report.copied.push(relative.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trees() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main");
        let wt = dir.path().join("wt");
        std::fs::create_dir_all(main.join("conf/keys")).unwrap();
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(main.join(".env"), "A=1").unwrap();
        std::fs::write(main.join("conf/keys/k1"), "secret").unwrap();
        std::fs::write(main.join("conf/app.ini"), "x").unwrap();
        (dir, main, wt)
    }

    #[test]
    fn files_and_directories_are_copied_and_existing_ones_kept() {
        let (_dir, main, wt) = trees();
        std::fs::create_dir_all(wt.join("conf")).unwrap();
        std::fs::write(wt.join("conf/app.ini"), "mine").unwrap();

        let entries = [".env".to_owned(), "conf".to_owned(), "absent".to_owned()];
        let report = copy_seeds(&main, &wt, &entries).unwrap();
        assert_eq!(std::fs::read_to_string(wt.join(".env")).unwrap(), "A=1");
        assert_eq!(
            std::fs::read_to_string(wt.join("conf/keys/k1")).unwrap(),
            "secret"
        );
        assert_eq!(
            std::fs::read_to_string(wt.join("conf/app.ini")).unwrap(),
            "mine"
        );
        assert_eq!(report.kept, [PathBuf::from("conf/app.ini")]);
        assert_eq!(report.missing, ["absent"]);
        assert_eq!(report.copied.len(), 2);
    }

    #[test]
    fn escaping_entries_are_refused_and_nothing_is_copied() {
        let (dir, main, wt) = trees();
        for bad in ["../../etc/passwd", "/etc/passwd", "conf/../../x", "", "."] {
            let entries = [".env".to_owned(), bad.to_owned()];
            let err = copy_seeds(&main, &wt, &entries).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
            assert!(
                !wt.join(".env").exists(),
                "nothing is copied when {bad} is refused"
            );
        }

        std::fs::write(dir.path().join("outside"), "o").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), main.join("link")).unwrap();
        let err = copy_seeds(&main, &wt, &["link".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");

        let err = check_seeds(
            &main,
            &wt,
            &[".env".to_owned(), "../../etc/passwd".to_owned()],
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"../../etc/passwd\""), "{err}");
        check_seeds(&main, &wt, &[".env".to_owned(), "absent".to_owned()]).unwrap();
        assert!(!wt.join(".env").exists(), "checking copies nothing");

        std::os::unix::fs::symlink(dir.path(), wt.join("up")).unwrap();
        let err = copy_seeds(&main, &wt, &["up/x".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }
}
