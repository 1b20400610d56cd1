//! Reads a written seed back with tools that share no code with vmoat: `isoinfo` (genisoimage)
//! for the label and the Rock Ridge and Joliet names, `bsdtar` for the file contents, and
//! Python's PyYAML (what cloud-init itself parses with) for the YAML.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmoat_cidata::{GuestUser, HostKey, Seed, SeedMount, User, write_iso};
use vmoat_driver::MountType;

fn seed(user: GuestUser) -> Seed {
    Seed {
        instance: "colima-wt-readback".into(),
        instance_id: None,
        user,
        authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIlima lima".into()],
        host_key: HostKey {
            private_openssh: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n\
                              -----END OPENSSH PRIVATE KEY-----\n"
                .into(),
            public_openssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIhost vmoat-host".into(),
        },
        mounts: vec![SeedMount::new(
            "lima-0123456789abcdef",
            Path::new("/home/alice/src"),
            MountType::Virtiofs,
            true,
        )],
        grow_root: true,
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write(seed: &Seed) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("cidata.iso");
    write_iso(seed, &iso).unwrap();
    (dir, iso)
}

/// Parses YAML with PyYAML and prints it back as JSON.
fn yaml_to_json(text: &str) -> serde_json::Value {
    let script = "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML rejected:\n{text}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn isoinfo_sees_the_label_and_long_names() {
    let (_dir, iso) = write(&seed(GuestUser::Root));

    let pvd = run(Command::new("isoinfo").arg("-d").arg("-i").arg(&iso));
    assert!(pvd.contains("Volume id: cidata"), "{pvd}");
    assert!(pvd.contains("Rock Ridge signatures version"), "{pvd}");
    assert!(pvd.contains("Joliet with UCS level 3"), "{pvd}");
    assert!(pvd.contains("Logical block size is: 2048"), "{pvd}");

    for mode in ["-R", "-J"] {
        let listing = run(Command::new("isoinfo").args(["-f", mode, "-i"]).arg(&iso));
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/user-data"], "isoinfo {mode}");
    }

    // No stray temporary file is left beside the image.
    let entries: Vec<_> = std::fs::read_dir(iso.parent().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn contents_parse_as_the_cloud_config_cloud_init_needs() {
    let user = GuestUser::User(User {
        name: "alice".into(),
        uid: 1234,
        gid: 1234,
        home: "/home/alice.guest".into(),
        shell: "/bin/bash".into(),
        groups: vec!["docker".into()],
    });
    let seed = seed(user);
    let (_dir, iso) = write(&seed);

    let user_data = run(Command::new("bsdtar")
        .args(["-xOf"])
        .arg(&iso)
        .arg("user-data"));
    assert!(user_data.starts_with("#cloud-config\n"));
    let ud = yaml_to_json(&user_data);

    assert_eq!(ud["hostname"], "lima-colima-wt-readback");
    assert_eq!(ud["manage_etc_hosts"], "localhost");
    assert_eq!(ud["ssh_deletekeys"], true);
    assert_eq!(ud["ssh_genkeytypes"], serde_json::json!(["ed25519"]));
    assert_eq!(
        ud["ssh_keys"]["ed25519_private"],
        seed.host_key.private_openssh
    );
    assert_eq!(
        ud["ssh_keys"]["ed25519_public"],
        seed.host_key.public_openssh
    );

    let u = &ud["users"][0];
    assert_eq!(u["name"], "alice");
    assert_eq!(u["uid"], 1234);
    assert_eq!(u["primary_group"], "1234");
    assert_eq!(u["groups"], serde_json::json!(["docker"]));
    assert_eq!(u["homedir"], "/home/alice.guest");
    assert_eq!(u["sudo"], "ALL=(ALL) NOPASSWD:ALL");

    assert_eq!(
        ud["mounts"][0],
        serde_json::json!([
            "lima-0123456789abcdef",
            "/home/alice/src",
            "virtiofs",
            "rw,nofail",
            "0",
            "0"
        ])
    );
    assert_eq!(ud["growpart"]["mode"], "auto");
    assert_eq!(ud["resize_rootfs"], true);

    let files = ud["write_files"].as_array().unwrap();
    let keys = files
        .iter()
        .find(|f| f["path"] == "/etc/ssh/vmoat_authorized_keys/alice");
    assert_eq!(
        keys.unwrap()["content"],
        format!("{}\n", seed.authorized_keys[0])
    );

    let meta = run(Command::new("bsdtar")
        .args(["-xOf"])
        .arg(&iso)
        .arg("meta-data"));
    let md = yaml_to_json(&meta);
    assert_eq!(md["instance-id"], seed.instance_id().unwrap());
    assert_eq!(md["local-hostname"], "lima-colima-wt-readback");
}

#[test]
fn rewriting_replaces_the_image() {
    let mut s = seed(GuestUser::Root);
    let (_dir, iso) = write(&s);
    let first = run(Command::new("bsdtar")
        .args(["-xOf"])
        .arg(&iso)
        .arg("meta-data"));

    s.mounts.clear();
    write_iso(&s, &iso).unwrap();
    let second = run(Command::new("bsdtar")
        .args(["-xOf"])
        .arg(&iso)
        .arg("meta-data"));
    assert_ne!(first, second, "a changed seed gets a new instance-id");
}
