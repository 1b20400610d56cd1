//! Every key vmoat reads from a config, with its default and meaning (the table `vmoat init`
//! writes and the README shows), and the close-match search behind "did you mean".

/// How a key's value is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// One value: a bash string (a one-element array is taken too).
    Scalar,
    /// Several values: a bash array, or a string split on whitespace.
    List,
}

/// One config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// The variable name.
    pub name: &'static str,
    /// How its value is read.
    pub kind: KeyKind,
    /// The default, as a reader sees it.
    pub default: &'static str,
    /// An example value in bash syntax (the right-hand side of `KEY=`).
    pub example: &'static str,
    /// What the key does.
    pub meaning: &'static str,
}

const fn key(
    name: &'static str,
    kind: KeyKind,
    default: &'static str,
    example: &'static str,
    meaning: &'static str,
) -> KeySpec {
    KeySpec {
        name,
        kind,
        default,
        example,
        meaning,
    }
}

use KeyKind::{List, Scalar};

/// Every key, in the order `vmoat init` writes them.
pub const KEYS: &[KeySpec] = &[
    key(
        "CMD_UP",
        Scalar,
        "auto-detected (compose file, Makefile `up:`, package.json `dev`)",
        "\"docker compose up -d\"",
        "run by `vmoat up` inside the VM, in the worktree directory",
    ),
    key(
        "CMD_TEST",
        Scalar,
        "none",
        "\"make test\"",
        "run by `vmoat test ARGS…` inside the VM, ARGS appended shell-quoted",
    ),
    key(
        "VM_CPU",
        Scalar,
        "4, or the host's CPU count if lower",
        "4",
        "CPUs of the VM (a warning above the host's count)",
    ),
    key(
        "VM_MEMORY",
        Scalar,
        "8, or half the host's RAM if lower",
        "8",
        "RAM of the VM in GiB, decimals allowed (1.5); warned above 75% of the host's RAM, \
         refused above all of it",
    ),
    key(
        "VM_DISK",
        Scalar,
        "60",
        "60",
        "disk of the VM in GiB, allocated as it fills; Docker images want 20 or more",
    ),
    key(
        "VM_MOUNT",
        Scalar,
        "$HOME (the worktree itself when it lies outside $HOME)",
        "\"$HOME\"",
        "host directory mounted writable at the same path in the VM; must contain the \
         worktree",
    ),
    key(
        "VM_TYPE",
        Scalar,
        "vz on macOS, qemu on Linux",
        "qemu",
        "hypervisor: qemu or vz (macOS only)",
    ),
    key(
        "MOUNT_TYPE",
        Scalar,
        "virtiofs on macOS; on Linux virtiofs if virtiofsd is installed, else 9p",
        "virtiofs",
        "how VM_MOUNT is shared: 9p or virtiofs",
    ),
    key(
        "VM_IMAGE",
        Scalar,
        "colima",
        "debian",
        "colima (Colima's image, downloaded), a local image name (debian), or a path to a \
         raw or qcow2 disk",
    ),
    key(
        "VM_PREFIX",
        Scalar,
        "wt-",
        "\"wt-\"",
        "put before the worktree directory's name to make the VM name",
    ),
    key(
        "VM_NAME",
        Scalar,
        "the prefix + the worktree directory's name",
        "\"wt-api\"",
        "the VM (and Colima profile) name, overriding the derived one",
    ),
    key(
        "PROVISION_APT",
        List,
        "none",
        "(git jq)",
        "Debian packages installed in the VM when missing",
    ),
    key(
        "PROVISION_SCRIPT",
        Scalar,
        "none",
        "'./scripts/setup-vm.sh'",
        "run with `bash -lc` in the VM after the packages; a failure stops `up`",
    ),
    key(
        "PROVISION_SEED",
        List,
        "none",
        "(.env)",
        "worktree-relative paths copied from the main worktree when absent here",
    ),
    key(
        "HEALTH_URL",
        Scalar,
        "none",
        "\"http://127.0.0.1:8080/health\"",
        "`vmoat up` waits until this URL answers 2xx, as seen inside the VM",
    ),
    key(
        "HEALTH_TIMEOUT",
        Scalar,
        "1800",
        "1800",
        "seconds `vmoat up` waits for HEALTH_URL",
    ),
    key(
        "EXPOSE_PORTS",
        List,
        "none (the published ports of running containers)",
        "(8080)",
        "ports inside the VM that `vmoat tunnel` forwards to the host",
    ),
    key(
        "VM_NETWORK",
        Scalar,
        "nat",
        "restricted",
        "nat (the VM reaches out) or restricted (no outbound traffic)",
    ),
];

/// The spec of a known key.
pub fn spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

/// The known key an unknown name most likely meant: one it abbreviates, else the nearest by
/// edit distance if that is close (at most 2 edits, 3 for long names).
pub fn close_match(name: &str) -> Option<&'static str> {
    if name.len() >= 4
        && let Some(k) = KEYS.iter().find(|k| k.name.starts_with(name))
    {
        return Some(k.name);
    }

    let limit = if name.len() >= 10 { 3 } else { 2 };
    KEYS.iter()
        .map(|k| (edit_distance(name, k.name), k.name))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Edit distance with adjacent transpositions counted as one edit (optimal string
/// alignment), on bytes: keys are ASCII.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }

    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(close_match("EXPOSE_PORT"), Some("EXPOSE_PORTS"));
        assert_eq!(close_match("VM_CPUS"), Some("VM_CPU"));
        assert_eq!(close_match("VM_MEM"), Some("VM_MEMORY"));
        assert_eq!(close_match("CMD_TSET"), Some("CMD_TEST"));
        assert_eq!(close_match("HEALTH_TIMOUT"), Some("HEALTH_TIMEOUT"));
        assert_eq!(close_match("PROVISION_APTS"), Some("PROVISION_APT"));
        assert_eq!(close_match("DOCKER_BUILDKIT"), None);
        assert_eq!(close_match("X"), None);
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("abc", "acb"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn table_is_complete_and_unique() {
        let mut names: Vec<_> = KEYS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 18);
        assert_eq!(spec("EXPOSE_PORTS").unwrap().kind, List);
    }
}
