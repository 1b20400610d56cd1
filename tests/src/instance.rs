//! One VM of a group as files on the host: its profile paths (from `vmoat-profile`, the one
//! place that spells them), the pids its agent and qemu recorded, its logs, and the qemu
//! processes running on its disk.

use std::path::PathBuf;

use vmoat_profile::{ColimaHome, ProfilePaths};

use crate::command::tail_of;
use crate::process;

/// The files of one profile in a group's Colima home.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The profile name (`wt-…`).
    pub profile: String,
    /// Every path of the profile.
    pub paths: ProfilePaths,
}

impl Instance {
    /// The profile `profile` under `colima_home`.
    pub fn new(colima_home: &std::path::Path, profile: &str) -> Instance {
        Instance {
            profile: profile.to_owned(),
            paths: ColimaHome::at(colima_home).profile(profile),
        }
    }

    /// The agent's pid from `ha.pid`, if the file is there.
    pub fn ha_pid(&self) -> Option<u32> {
        process::read_pid(&self.paths.ha_pid())
    }

    /// qemu's pid from `qemu.pid`, if the file is there.
    pub fn qemu_pid(&self) -> Option<u32> {
        process::read_pid(&self.paths.qemu_pid())
    }

    /// The VM's own disk (the qcow2 over the shared image).
    pub fn disk(&self) -> PathBuf {
        self.paths.diffdisk()
    }

    /// The live qemu processes started on this VM's disk.
    pub fn qemu_processes(&self) -> Vec<u32> {
        process::qemu_processes_on(&self.disk())
    }

    /// The guest's SSH host public key vmoat pinned (`vmoat-host-key.pub`).
    pub fn pinned_host_key(&self) -> String {
        std::fs::read_to_string(self.paths.host_key_pub())
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.paths.host_key_pub().display()))
            .trim()
            .to_owned()
    }

    /// The last `lines` lines of the serial console log.
    pub fn serial_tail(&self, lines: usize) -> String {
        tail_of(&self.paths.serial_log(), lines)
    }

    /// The last `lines` lines of the agent's stderr log.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        tail_of(&self.paths.ha_stderr_log(), lines)
    }

    /// The agent's and qemu's pids, each when its file names a live process.
    pub fn live_pids(&self) -> Vec<u32> {
        [self.ha_pid(), self.qemu_pid()]
            .into_iter()
            .flatten()
            .filter(|&pid| process::alive(pid))
            .collect()
    }
}
