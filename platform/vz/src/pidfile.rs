//! `vz.pid`: on vz the VM lives inside the host agent, so the pid Lima and Colima look for is
//! the agent's own. Lima writes it once the VM runs, as decimal digits and a newline.

use std::fs;
use std::io::Write;
use std::path::Path;

use vmoat_driver::DriverError;

/// Writes this process's pid to `path` (the profile's `vz.pid`) as Lima does, replacing the
/// file atomically so a reader never sees it half-written.
///
/// The agent calls it right after [`VzDriver::start`] returns and removes the file once the VM
/// has ended.
///
/// [`VzDriver::start`]: vmoat_driver::Driver::start
pub fn write_pid_file(path: &Path) -> Result<(), DriverError> {
    let io_err = |source| DriverError::Io {
        action: "writing pid file",
        path: path.to_path_buf(),
        source,
    };

    // Lima's temp suffix, so `limactl` and vmoat's cleanup both treat a leftover as junk.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);

    let mut file = fs::File::create(tmp).map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    drop(file);

    fs::rename(tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_own_pid_with_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vz.pid");
        fs::write(&path, "1\n").unwrap();

        write_pid_file(&path).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        assert!(!dir.path().join("vz.pid.tmp").exists());
    }

    #[test]
    fn missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone").join("vz.pid");

        let err = write_pid_file(&path).unwrap_err();

        assert!(err.to_string().contains("writing pid file"), "{err}");
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
