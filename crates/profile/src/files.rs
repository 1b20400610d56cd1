//! Reading and writing the profile's small files: whole-file reads that say which file failed,
//! atomic writes (a temp file in the same directory, then a rename, so a reader never sees
//! half a file and a crash never leaves one), and the error every file operation returns.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A profile file could not be read, understood or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is empty: most likely a write that was cut short.
    #[error(
        "{} is empty, probably cut short by a crash or a full disk; vmoat leaves it as is: \
         restore it, or remove it and let the owning tool write it again",
        .path.display()
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is not what it should be (bad syntax, a wrong type, a truncated value).
    #[error(
        "{} is not a valid {format} file; vmoat leaves it as is: fix it by hand, or remove it \
         and let the owning tool write it again",
        .path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The expected format (`YAML`, `JSON`, `pid`).
        format: &'static str,
        /// What the parser said, with the line and column where it has them.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The file could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Whether the file is there but its content is wrong (empty or malformed), as when it was
    /// edited by hand or cut short: something the user fixes, unlike a failed read or write.
    pub fn is_bad_content(&self) -> bool {
        matches!(self, FileError::Empty { .. } | FileError::Malformed { .. })
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FileError::Read { path, .. }
            | FileError::Empty { path }
            | FileError::Malformed { path, .. }
            | FileError::Write { path, .. } => path,
        }
    }
}

/// Reads a whole text file; `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads a whole text file that must not be empty; `Ok(None)` when it does not exist.
pub fn read_nonempty(path: &Path) -> Result<Option<String>, FileError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    if text.trim().is_empty() {
        return Err(FileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Some(text))
}

/// Writes `bytes` to `path` atomically, creating the parent directory if needed.
///
/// The data goes to a temp file beside the target (`.<name>.<pid>.<n>.tmp`, the same file
/// system, so the rename is atomic), is synced, then renamed over the target. On any error the
/// temp file is removed and the target is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(err)?;

    let file_name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.{}.{n}.tmp", std::process::id()));

    let written = write_new(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(source));
    }

    // Make the rename itself durable; a failure here loses nothing already written.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Removes a file; a file that is already gone is fine.
pub fn remove_if_present(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmoat-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = temp_dir("atomic");
        let target = dir.join("sub").join("colima.yaml");

        write_atomic(&target, b"cpu: 1\n").unwrap();
        write_atomic(&target, b"cpu: 2\n").unwrap();

        assert_eq!(fs::read_to_string(&target).unwrap(), "cpu: 2\n");
        let names: Vec<_> = fs::read_dir(target.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["colima.yaml"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = temp_dir("keep");
        let target = dir.join("x");
        write_atomic(&target, b"old").unwrap();

        // A directory in the way makes the rename fail; the old content must survive.
        let blocked = dir.join("blocked");
        fs::create_dir_all(blocked.join("inner")).unwrap();
        let err = write_atomic(&blocked, b"new").unwrap_err();
        assert!(matches!(err, FileError::Write { .. }), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            2,
            "no temp file left behind"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn empty_and_missing_files_are_told_apart() {
        let dir = temp_dir("empty");
        assert!(read_nonempty(&dir.join("missing")).unwrap().is_none());
        fs::write(dir.join("empty"), " \n").unwrap();
        let err = read_nonempty(&dir.join("empty")).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        assert_eq!(err.path(), dir.join("empty"));
        assert!(err.is_bad_content());

        // A file that cannot be read at all is not the user's content to fix.
        let unreadable = read_nonempty(&dir).unwrap_err();
        assert!(matches!(unreadable, FileError::Read { .. }), "{unreadable}");
        assert!(!unreadable.is_bad_content());
        fs::remove_dir_all(dir).unwrap();
    }
}
