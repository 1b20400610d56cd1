//! What is on disk under a directory, entry by entry (path, kind, size, modification time,
//! mode, symlink target), so a test can say that a refused command changed nothing, and show
//! what did change when it did.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One entry as it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    size: u64,
    mtime: (i64, i64),
    mode: u32,
    target: Option<PathBuf>,
}

/// Every entry under one or more roots, by path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Snapshot {
    /// Walks `roots` (each may be missing; symlinks are recorded, not followed).
    pub fn of(roots: &[&Path]) -> Snapshot {
        let mut entries = BTreeMap::new();
        for root in roots {
            walk(root, &mut entries);
        }
        Snapshot { entries }
    }

    /// The same snapshot with the size and times of the files under `dir` left out: vmoat's
    /// profile lock files, which every command holding the lock writes its record into, by
    /// design. Their presence and mode still count.
    pub fn contents_ignored_under(mut self, dir: &Path) -> Snapshot {
        for (path, entry) in &mut self.entries {
            if path.starts_with(dir) && entry.kind == "file" {
                entry.size = 0;
                entry.mtime = (0, 0);
            }
        }
        self
    }

    /// What differs from `before`, one line per path; empty when nothing does.
    pub fn changes_since(&self, before: &Snapshot) -> Vec<String> {
        let mut changes = Vec::new();
        for (path, old) in &before.entries {
            match self.entries.get(path) {
                None => changes.push(format!("removed  {}", path.display())),
                Some(new) if new != old => {
                    changes.push(format!("changed  {} ({old:?} → {new:?})", path.display()))
                }
                Some(_) => {}
            }
        }
        for path in self.entries.keys() {
            if !before.entries.contains_key(path) {
                changes.push(format!("added    {}", path.display()));
            }
        }
        changes
    }

    /// How many entries were seen.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn walk(path: &Path, entries: &mut BTreeMap<PathBuf, Entry>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let kind = meta.file_type();
    let kind_name = if kind.is_symlink() {
        "symlink"
    } else if kind.is_dir() {
        "dir"
    } else if kind.is_file() {
        "file"
    } else {
        "special"
    };
    entries.insert(
        path.to_owned(),
        Entry {
            kind: kind_name,
            // A directory's size and times change with its entries, which are compared anyway.
            size: if kind.is_dir() { 0 } else { meta.size() },
            mtime: if kind.is_dir() {
                (0, 0)
            } else {
                (meta.mtime(), meta.mtime_nsec())
            },
            mode: meta.mode(),
            target: kind
                .is_symlink()
                .then(|| std::fs::read_link(path).unwrap_or_default()),
        },
    );
    if kind.is_dir() {
        let Ok(children) = std::fs::read_dir(path) else {
            return;
        };
        for child in children.flatten() {
            walk(&child.path(), entries);
        }
    }
}
