//! The files qemu and virtiofsd use in a Lima instance directory.
//!
//! The names are Lima's (`pkg/limatype/filenames`) where Lima has one, and the same as
//! `vmoat-profile`'s layout, so Lima's tools find them; `qemu.stderr.log` and
//! `virtiofsd-<i>.{pid,log}` are vmoat's own. The driver only gets the instance directory in a
//! [`VmSpec`](vmoat_driver::VmSpec), so it names these itself.

use std::path::{Path, PathBuf};

/// The paths of one instance's hypervisor files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceFiles {
    dir: PathBuf,
}

impl InstanceFiles {
    /// The files in `instance_dir`.
    pub fn new(instance_dir: &Path) -> InstanceFiles {
        InstanceFiles {
            dir: instance_dir.to_owned(),
        }
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// qemu's pid, written by qemu itself (`-pidfile`), as Lima's is.
    pub fn qemu_pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The QMP control socket.
    pub fn qmp_sock(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The serial console socket (the console log goes to the spec's `serial_log`).
    pub fn serial_sock(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }

    /// The qemu guest agent's socket.
    pub fn ga_sock(&self) -> PathBuf {
        self.dir.join("ga.sock")
    }

    /// qemu's stdout and stderr, the source of `ExitInfo::detail`.
    pub fn qemu_stderr_log(&self) -> PathBuf {
        self.dir.join("qemu.stderr.log")
    }

    /// The vhost-user socket of the i-th virtiofsd.
    pub fn virtiofsd_sock(&self, index: usize) -> PathBuf {
        self.dir.join(format!("virtiofsd-{index}.sock"))
    }

    /// The pid of the i-th virtiofsd, so an agent that adopts the VM can stop it.
    pub fn virtiofsd_pid(&self, index: usize) -> PathBuf {
        self.dir.join(format!("virtiofsd-{index}.pid"))
    }

    /// The log of the i-th virtiofsd.
    pub fn virtiofsd_log(&self, index: usize) -> PathBuf {
        self.dir.join(format!("virtiofsd-{index}.log"))
    }

    /// Sockets qemu creates, removed once it has exited (a dead qemu leaves them behind).
    pub fn qemu_sockets(&self) -> [PathBuf; 3] {
        [self.qmp_sock(), self.serial_sock(), self.ga_sock()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_lima() {
        let f = InstanceFiles::new(Path::new("/i"));
        assert_eq!(f.qemu_pid(), Path::new("/i/qemu.pid"));
        assert_eq!(f.qmp_sock(), Path::new("/i/qmp.sock"));
        assert_eq!(f.virtiofsd_sock(2), Path::new("/i/virtiofsd-2.sock"));
        assert_eq!(f.ga_sock(), Path::new("/i/ga.sock"));
    }
}
