//! Writes the seed as an ISO9660 image with hadris-iso, atomically (temp file + rename).
//!
//! Rock Ridge and Joliet are both on: the plain ISO9660 names are 8.3 (`USER_DAT;1`), and a
//! guest reading only those would not find `user-data` (see `cidata-check.md`).

use std::fs;
use std::io::{Cursor, Write};
use std::path::Path;
use std::sync::Arc;

use hadris_iso::read::PathSeparator;
use hadris_iso::write::options::{CreationFeatures, IsoFormatOptions};
use hadris_iso::write::{File as IsoFile, InputFiles, IsoImageWriter};

use crate::{CidataError, Seed, VOLUME_LABEL};

/// Renders `seed` and writes it to `path` as an ISO9660 volume labelled `cidata` holding
/// `user-data` and `meta-data`. The file appears whole or not at all: it is written beside
/// `path` under a temporary name, synced, then renamed over it.
pub fn write_iso(seed: &Seed, path: &Path) -> Result<(), CidataError> {
    let user_data = seed.user_data()?;
    let meta_data = seed.meta_data()?;
    let image = build_image(
        &seed.instance,
        &[
            ("user-data", user_data.into_bytes()),
            ("meta-data", meta_data.into_bytes()),
        ],
    )?;

    write_atomically(path, &image)
}

/// The ISO image holding `files` at its root.
fn build_image(instance: &str, files: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, CidataError> {
    let options = IsoFormatOptions {
        volume_name: VOLUME_LABEL.to_owned(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("vmoat".to_owned()),
        // ISO9660 logical sectors; cidata-check.md found other sizes fail.
        sector_size: 2048,
        path_separator: PathSeparator::ForwardSlash,
        features: CreationFeatures::extensions(),
        // Keep the label lower-case, as Lima writes it.
        strict_charset: false,
    };
    let input = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files: files
            .iter()
            .map(|(name, contents)| IsoFile::File {
                name: Arc::new((*name).to_owned()),
                contents: contents.clone(),
            })
            .collect(),
    };

    let mut cursor = Cursor::new(Vec::new());
    IsoImageWriter::create(&mut cursor, input, options).map_err(|e| CidataError::Iso {
        instance: instance.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(cursor.into_inner())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CidataError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CidataError::Io {
            action,
            path,
            source,
        }
    };

    let file_name = path.file_name().ok_or_else(|| CidataError::Io {
        action: "writing cidata image to",
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let mut temp_name = file_name.to_owned();
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);

    let result = (|| {
        let mut file = fs::File::create(&temp).map_err(io("creating", &temp))?;
        file.write_all(bytes).map_err(io("writing", &temp))?;
        file.sync_all().map_err(io("syncing", &temp))?;
        fs::rename(&temp, path).map_err(io("renaming temporary image to", path))
    })();

    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_the_label_and_sectors() {
        let image = build_image("t", &[("user-data", b"#cloud-config\n".to_vec())]).unwrap();
        assert_eq!(image.len() % 2048, 0);

        // Primary volume descriptor at sector 16: type 1, "CD001", volume id at offset 40.
        let pvd = &image[16 * 2048..17 * 2048];
        assert_eq!(pvd[0], 1);
        assert_eq!(&pvd[1..6], b"CD001");
        assert_eq!(&pvd[40..46], b"cidata");
    }

    #[test]
    fn a_missing_directory_fails_with_its_path() {
        let err = write_atomically(Path::new("/nonexistent-vmoat-dir/cidata.iso"), b"x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent-vmoat-dir/"), "{err}");
    }
}
