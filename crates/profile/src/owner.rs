//! The owner record `<profile dir>/vmoat.json`: which worktree a profile belongs to, which
//! vmoat made it, when, and from which image. A profile with this file is vmoat's; one
//! without it (a profile Colima made) is never claimed by a worktree.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};
use crate::layout::ProfilePaths;
use crate::yaml::Extra;

/// The content of `vmoat.json`. Unknown keys (written by a newer vmoat) are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owning worktree's canonical path.
    pub worktree: PathBuf,
    /// The vmoat version that created the profile.
    pub vmoat_version: String,
    /// When the profile was created, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// The image the VM was created from (`VM_IMAGE`'s resolved name or path), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

impl OwnerRecord {
    /// A record for `worktree` (canonical), created now by `vmoat_version`.
    pub fn new(worktree: &Path, vmoat_version: &str, image: Option<String>) -> OwnerRecord {
        OwnerRecord {
            worktree: worktree.to_owned(),
            vmoat_version: vmoat_version.to_owned(),
            created_unix: unix_now(),
            image,
            extra: Extra::new(),
        }
    }

    /// Reads the owner record of a profile; `Ok(None)` when it has none.
    pub fn read(paths: &ProfilePaths) -> Result<Option<OwnerRecord>, FileError> {
        let path = paths.owner_file();
        let Some(text) = files::read_nonempty(&path)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| FileError::Malformed {
                path,
                format: "JSON",
                source: Box::new(source),
            })
    }

    /// Writes the record atomically, creating the profile directory.
    pub fn write(&self, paths: &ProfilePaths) -> Result<(), FileError> {
        let mut text = serde_json::to_string_pretty(self).expect("JSON of plain data");
        text.push('\n');
        files::write_atomic(&paths.owner_file(), text.as_bytes())
    }
}

/// Seconds since the Unix epoch, now (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ColimaHome;

    #[test]
    fn owner_record_round_trips_and_keeps_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("vmoat-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = ColimaHome::at(&dir).profile("wt-api");

        assert!(OwnerRecord::read(&paths).unwrap().is_none());
        let record = OwnerRecord::new(Path::new("/src/api"), "0.1.0", Some("debian".into()));
        record.write(&paths).unwrap();
        assert_eq!(OwnerRecord::read(&paths).unwrap().unwrap(), record);

        let newer = r#"{"worktree":"/w","vmoat_version":"9.0","created_unix":1,"tunnels":[1]}"#;
        std::fs::write(paths.owner_file(), newer).unwrap();
        let read = OwnerRecord::read(&paths).unwrap().unwrap();
        assert_eq!(read.extra["tunnels"][0], 1);
        read.write(&paths).unwrap();
        let again: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(paths.owner_file()).unwrap()).unwrap();
        assert_eq!(again["tunnels"][0], 1);

        std::fs::write(paths.owner_file(), r#"{"worktree": "/w", "vmo"#).unwrap();
        let err = OwnerRecord::read(&paths).unwrap_err();
        assert!(matches!(err, FileError::Malformed { .. }), "{err:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
