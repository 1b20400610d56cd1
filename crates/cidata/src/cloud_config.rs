//! The `user-data` and `meta-data` documents, as typed structs rendered with serde-saphyr.
//!
//! Every key here is one cloud-init's schema knows (checked against cloud-init 25.1's
//! `schema-cloud-config-v1.json`); a key it did not know would make `cloud-init status` report
//! "degraded done". Lists that the schema requires to be non-empty are left out when empty.

use std::collections::BTreeMap;

use serde::Serialize;
use vmoat_driver::MountType;

use crate::{
    CidataError, GUEST_AUTHORIZED_KEYS_DIR, GUEST_SSHD_DROP_IN, GuestUser, Seed, SeedMount, User,
};

/// The whole `#cloud-config` document.
#[derive(Serialize)]
struct CloudConfig {
    hostname: String,
    preserve_hostname: bool,
    /// `localhost` adds `127.0.1.1 <hostname>` every boot; without it sudo waits on DNS
    /// under restricted networking.
    manage_etc_hosts: &'static str,
    /// An empty list keeps the image's default user (`debian`, `ubuntu`) from being made.
    users: Vec<UserEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bootcmd: Vec<Vec<String>>,
    /// No `ssh_pwauth`: cloud-init would edit sshd_config and restart sshd in the middle of
    /// the boot, resetting the agent's first connections. The drop-in turns passwords off.
    write_files: Vec<WriteFile>,
    ssh_deletekeys: bool,
    /// Never empty: cloud-init's schema rejects `[]`; the given key already exists, so
    /// nothing is generated.
    ssh_genkeytypes: Vec<String>,
    ssh_keys: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<[String; 6]>,
    growpart: Growpart,
    resize_rootfs: bool,
}

/// One `users:` entry.
#[derive(Serialize)]
struct UserEntry {
    name: String,
    uid: u32,
    /// The gid as a number: useradd's `--gid` takes either, and the group may have another
    /// name in the guest (macOS's `staff` is gid 20, `dialout` in Debian).
    primary_group: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    /// Off, or cloud-init would try to create a group *named* after the numeric gid;
    /// `bootcmd` makes the groups instead.
    create_groups: bool,
    homedir: String,
    shell: String,
    sudo: &'static str,
    lock_passwd: bool,
}

/// One `write_files:` entry.
#[derive(Serialize)]
struct WriteFile {
    path: String,
    content: String,
    owner: &'static str,
    permissions: &'static str,
}

#[derive(Serialize)]
struct Growpart {
    mode: &'static str,
    devices: Vec<String>,
}

/// The `meta-data` document.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct MetaData {
    instance_id: String,
    local_hostname: String,
}

/// Renders `user-data`.
pub(crate) fn user_data(seed: &Seed) -> Result<String, CidataError> {
    seed.validate()?;

    let key_type = host_key_type(seed)?;
    let (login, users, bootcmd) = match &seed.user {
        GuestUser::Root => ("root".to_owned(), Vec::new(), Vec::new()),
        GuestUser::User(user) => (user.name.clone(), vec![user_entry(user)], bootcmd(user)),
    };

    let mut ssh_keys = BTreeMap::new();
    ssh_keys.insert(
        format!("{key_type}_private"),
        ensure_newline(&seed.host_key.private_openssh),
    );
    ssh_keys.insert(
        format!("{key_type}_public"),
        seed.host_key.public_openssh.trim().to_owned(),
    );

    let config = CloudConfig {
        hostname: seed.hostname(),
        preserve_hostname: false,
        manage_etc_hosts: "localhost",
        users,
        bootcmd,
        write_files: write_files(seed, &login),
        ssh_deletekeys: true,
        ssh_genkeytypes: vec![key_type.to_owned()],
        ssh_keys,
        mounts: seed.mounts.iter().map(fstab_entry).collect(),
        growpart: Growpart {
            mode: if seed.grow_root { "auto" } else { "off" },
            devices: vec!["/".to_owned()],
        },
        resize_rootfs: seed.grow_root,
    };

    let yaml = render(&config).map_err(|source| CidataError::Render {
        file: "user-data",
        instance: seed.instance.clone(),
        source,
    })?;
    Ok(format!("#cloud-config\n{yaml}"))
}

/// Renders `meta-data`.
pub(crate) fn meta_data(seed: &Seed) -> Result<String, CidataError> {
    let meta = MetaData {
        instance_id: seed.instance_id()?,
        local_hostname: seed.hostname(),
    };
    render(&meta).map_err(|source| CidataError::Render {
        file: "meta-data",
        instance: seed.instance.clone(),
        source,
    })
}

/// The cloud-init name of the host key's type (`ed25519`, `ecdsa`, `rsa`), from the public
/// key line.
pub(crate) fn host_key_type(seed: &Seed) -> Result<&'static str, CidataError> {
    let public = seed.host_key.public_openssh.trim();
    let algorithm = public.split_whitespace().next().unwrap_or("");
    let key_type = match algorithm {
        "ssh-ed25519" => "ed25519",
        "ssh-rsa" => "rsa",
        a if a.starts_with("ecdsa-sha2-") => "ecdsa",
        _ => {
            return Err(CidataError::Invalid {
                instance: seed.instance.clone(),
                what: format!(
                    "SSH host public key {public:?} is not an OpenSSH ed25519, ecdsa or rsa key \
                     line"
                ),
            });
        }
    };

    if !seed.host_key.private_openssh.contains("PRIVATE KEY-----") {
        return Err(CidataError::Invalid {
            instance: seed.instance.clone(),
            what: "SSH host private key is not in OpenSSH PEM format".into(),
        });
    }
    Ok(key_type)
}

fn user_entry(user: &User) -> UserEntry {
    UserEntry {
        name: user.name.clone(),
        uid: user.uid,
        primary_group: user.gid.to_string(),
        groups: user.groups.clone(),
        create_groups: false,
        homedir: user.home.display().to_string(),
        shell: user.shell.clone(),
        sudo: "ALL=(ALL) NOPASSWD:ALL",
        lock_passwd: true,
    }
}

/// Commands run early on every boot, before users are made: the user's primary group with the
/// host gid (unless the guest has that gid already), then the supplementary groups as system
/// groups. Names are validated, so they need no shell quoting.
fn bootcmd(user: &User) -> Vec<Vec<String>> {
    let gid = user.gid;
    let name = &user.name;
    let mut script = format!(
        "getent group {gid} >/dev/null || groupadd --gid {gid} {name} \
         || groupadd --gid {gid} vmoat-{gid}"
    );
    for group in &user.groups {
        script.push_str(&format!("; groupadd --force --system {group}"));
    }
    vec![vec!["sh".into(), "-c".into(), script]]
}

/// The login key file and the sshd drop-in that points sshd at it.
fn write_files(seed: &Seed, login: &str) -> Vec<WriteFile> {
    let mut keys = seed
        .authorized_keys
        .iter()
        .map(|k| k.trim())
        .collect::<Vec<_>>()
        .join("\n");
    keys.push('\n');

    let mut sshd = String::from(
        "# Written by vmoat through cloud-init. Login keys live outside home directories,\n\
         # which may be host directories shared into the guest.\n",
    );
    sshd.push_str(&format!(
        "AuthorizedKeysFile {GUEST_AUTHORIZED_KEYS_DIR}/%u .ssh/authorized_keys\n"
    ));
    sshd.push_str("PasswordAuthentication no\n");
    if matches!(seed.user, GuestUser::Root) {
        sshd.push_str("PermitRootLogin prohibit-password\n");
    }

    vec![
        WriteFile {
            path: format!("{GUEST_AUTHORIZED_KEYS_DIR}/{login}"),
            content: keys,
            owner: "root:root",
            permissions: "0644",
        },
        WriteFile {
            path: GUEST_SSHD_DROP_IN.to_owned(),
            content: sshd,
            owner: "root:root",
            permissions: "0644",
        },
    ]
}

fn fstab_entry(mount: &SeedMount) -> [String; 6] {
    let fstype = match mount.fstype {
        MountType::NineP => "9p",
        MountType::Virtiofs => "virtiofs",
    };
    [
        mount.tag.clone(),
        mount.path.display().to_string(),
        fstype.to_owned(),
        mount.options.clone(),
        "0".to_owned(),
        "0".to_owned(),
    ]
}

fn ensure_newline(text: &str) -> String {
    let mut text = text.trim_end().to_owned();
    text.push('\n');
    text
}

/// serde-saphyr with literal blocks for multi-line strings (the private key) and no folding
/// of long single lines (public keys stay on one line, as a reader expects).
fn render<T: Serialize>(value: &T) -> Result<String, serde_saphyr::ser::Error> {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    serde_saphyr::to_string_with_options(value, options)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::HostKey;

    pub(crate) fn seed(user: GuestUser) -> Seed {
        Seed {
            instance: "colima-wt-demo".into(),
            instance_id: None,
            user,
            authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIlima lima".into()],
            host_key: HostKey {
                private_openssh: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n\
                                  -----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
                public_openssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIhost vmoat".into(),
            },
            mounts: vec![SeedMount::new(
                "lima-0123456789abcdef",
                &PathBuf::from("/home/alice/src"),
                MountType::NineP,
                true,
            )],
            grow_root: true,
        }
    }

    pub(crate) fn alice() -> GuestUser {
        GuestUser::User(User {
            name: "alice".into(),
            uid: 1000,
            gid: 20,
            home: "/home/alice.guest".into(),
            shell: "/bin/bash".into(),
            groups: vec!["docker".into()],
        })
    }

    #[test]
    fn user_data_has_the_user_and_pinned_key() {
        let text = user_data(&seed(alice())).unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(text.contains("name: alice"), "{text}");
        assert!(text.contains("primary_group: \"20\""), "{text}");
        assert!(text.contains("ed25519_private: |"), "{text}");
        assert!(text.contains("manage_etc_hosts: localhost"), "{text}");
        assert!(text.contains("groupadd --gid 20 alice"), "{text}");
        assert!(
            text.contains("/etc/ssh/vmoat_authorized_keys/alice"),
            "{text}"
        );
        assert!(!text.contains("ssh_authorized_keys"), "{text}");
    }

    #[test]
    fn root_mode_makes_no_user() {
        let text = user_data(&seed(GuestUser::Root)).unwrap();
        assert!(text.contains("users: []"), "{text}");
        assert!(!text.contains("bootcmd"), "{text}");
        assert!(
            text.contains("/etc/ssh/vmoat_authorized_keys/root"),
            "{text}"
        );
        assert!(text.contains("PermitRootLogin prohibit-password"), "{text}");
    }

    #[test]
    fn instance_id_follows_the_content() {
        let a = seed(alice());
        let mut b = a.clone();
        assert_eq!(a.instance_id().unwrap(), b.instance_id().unwrap());
        assert!(a.instance_id().unwrap().starts_with("iid-"));

        b.mounts.clear();
        assert_ne!(a.instance_id().unwrap(), b.instance_id().unwrap());

        b.instance_id = Some("iid-fixed".into());
        assert_eq!(b.instance_id().unwrap(), "iid-fixed");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = seed(alice());
        if let GuestUser::User(u) = &mut s.user {
            u.uid = 0;
        }
        let err = user_data(&s).unwrap_err().to_string();
        assert!(
            err.contains("uid 0") && err.contains("GuestUser::Root"),
            "{err}"
        );

        let mut s = seed(alice());
        s.host_key.public_openssh = "ssh-dss AAAA".into();
        let err = user_data(&s).unwrap_err().to_string();
        assert!(err.contains("ssh-dss"), "{err}");

        let mut s = seed(alice());
        s.authorized_keys.clear();
        let err = user_data(&s).unwrap_err().to_string();
        assert!(err.contains("user.pub"), "{err}");

        let mut s = seed(alice());
        if let GuestUser::User(u) = &mut s.user {
            u.name = "Alice".into();
        }
        let err = user_data(&s).unwrap_err().to_string();
        assert!(err.contains("\"Alice\""), "{err}");
    }

    #[test]
    fn meta_data_names_the_instance() {
        let text = meta_data(&seed(alice())).unwrap();
        assert!(text.contains("instance-id: iid-"), "{text}");
        assert!(
            text.contains("local-hostname: lima-colima-wt-demo"),
            "{text}"
        );
    }
}
