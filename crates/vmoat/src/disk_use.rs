//! How full the guest's root file system is, from `df` in the guest, and what to tell the user
//! when it is (nearly) full: `status` shows it, and `up`/`provision` warn before running
//! anything that needs space.

use std::time::Duration;

use serde::Serialize;
use vmoat_agent::client::AgentClient;
use vmoat_agent::exec_client;
use vmoat_agent::protocol::ExecRequest;

/// From this share of the disk used on, vmoat says the disk is full.
pub const FULL_PERCENT: u8 = 95;

/// The guest's root file system use.
#[derive(Clone, Debug, Serialize)]
pub struct GuestDisk {
    /// Used, in percent, as `df` rounds it.
    pub used_percent: u8,
    /// Free bytes (for unprivileged users).
    pub free_bytes: u64,
    /// The file system's size.
    pub size_bytes: u64,
}

impl GuestDisk {
    /// What to tell the user when the disk is full; `None` when it is not.
    pub fn full_note(&self) -> Option<String> {
        (self.used_percent >= FULL_PERCENT).then(|| {
            format!(
                "the guest's disk is {} % full ({} MiB free); free space in the VM (e.g. `vmoat \
                 ssh -- docker system prune -af`), or recreate the VM with a larger VM_DISK \
                 (`vmoat destroy -f`, then `vmoat up`)",
                self.used_percent,
                self.free_bytes >> 20
            )
        })
    }
}

/// Reads the guest's root file system use with `df`; `None` when the guest does not answer
/// within 10 s or `df` says something unexpected.
pub async fn guest_disk(client: &AgentClient) -> Option<GuestDisk> {
    let request = ExecRequest {
        command: "df -Pk / | tail -n 1".into(),
        ..ExecRequest::default()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        exec_client::capture(client, request),
    )
    .await
    .ok()?
    .ok()?;
    parse_df(std::str::from_utf8(&out.stdout).ok()?)
}

/// The last line of `df -Pk`: file system, size KiB, used, available, use%, mount point.
fn parse_df(line: &str) -> Option<GuestDisk> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let size_kib: u64 = fields.get(1)?.parse().ok()?;
    let free_kib: u64 = fields.get(3)?.parse().ok()?;
    let used: u8 = fields.get(4)?.trim_end_matches('%').parse().ok()?;
    Some(GuestDisk {
        used_percent: used,
        free_bytes: free_kib << 10,
        size_bytes: size_kib << 10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_with_what_to_do() {
        let full = parse_df("/dev/vda 10218772 10202388 0 100% /\n").unwrap();
        assert_eq!(full.used_percent, 100);
        assert_eq!(full.free_bytes, 0);
        let note = full.full_note().unwrap();
        assert!(
            note.contains("100 % full") && note.contains("destroy -f"),
            "{note}"
        );

        let roomy = parse_df("/dev/vda 10218772 402388 9300000 5% /").unwrap();
        assert_eq!(roomy.full_note(), None);
        assert!(parse_df("df: /: No such file").is_none());
    }
}
