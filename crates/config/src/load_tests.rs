//! Tests of [`load`](crate::load) on real files evaluated by the real bash: the inputs of
//! issue 2 and every validation rule.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{
    ConfigError, HostFacts, ImageChoice, LoadOptions, Loaded, NetworkMode, Source, load, load_with,
};

/// A worktree root inside a home directory, both temporary.
struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let home = std::fs::canonicalize(dir.path()).unwrap().join("home");
        let root = home.join("src/proj");
        std::fs::create_dir_all(&root).unwrap();
        Fixture {
            _dir: dir,
            home,
            root,
        }
    }

    fn host(&self) -> HostFacts {
        HostFacts {
            home: self.home.clone(),
            user: "tester".into(),
            uid: 1000,
            total_memory_bytes: 16 << 30,
            cpus: 4,
        }
    }

    fn base(&self, text: &str) -> &Fixture {
        std::fs::write(self.root.join("vmoat.conf"), text).unwrap();
        self
    }

    fn local(&self, text: &str) -> &Fixture {
        std::fs::write(self.root.join("vmoat.local.conf"), text).unwrap();
        self
    }

    fn base_path(&self) -> PathBuf {
        self.root.join("vmoat.conf")
    }

    fn load(&self) -> Result<Loaded, ConfigError> {
        load(&self.root, &self.host())
    }

    fn ok(&self) -> Loaded {
        self.load().unwrap_or_else(|e| panic!("load failed: {e}"))
    }

    fn err(&self) -> ConfigError {
        match self.load() {
            Ok(loaded) => panic!("loaded although it should fail: {loaded:?}"),
            Err(err) => err,
        }
    }
}

/// Asserts an `Invalid` error for `key` and `value` from `file`, and returns its message.
fn assert_invalid(err: &ConfigError, key: &str, value: &str, file: &Path) -> String {
    match err {
        ConfigError::Invalid {
            key: k,
            value: v,
            file: f,
            ..
        } => {
            assert_eq!((*k, v.as_str(), f.as_path()), (key, value, file), "{err}");
        }
        other => panic!("expected an invalid {key}, got: {other}"),
    }
    assert!(err.is_config_error());
    let text = err.to_string();
    assert!(text.contains(key) && text.contains(value), "{text}");
    assert!(text.contains(&file.display().to_string()), "{text}");
    text
}

/// The file, line and message of a bash-reported error (syntax or command).
fn located(err: &ConfigError) -> (PathBuf, u32, String) {
    match err {
        ConfigError::Syntax {
            file,
            line,
            message,
        }
        | ConfigError::Command {
            file,
            line,
            message,
        } => (file.clone(), *line, message.clone()),
        other => panic!("expected an error with a line, got: {other}"),
    }
}

#[test]
fn no_files_give_the_defaults() {
    let f = Fixture::new();
    let loaded = f.ok();
    let c = &loaded.config;
    assert!(loaded.warnings.is_empty());
    assert_eq!((c.vm_cpu, c.vm_memory_mib, c.vm_disk_gib), (4, 8192, 60));
    assert_eq!(c.vm_mount, f.home);
    assert_eq!(c.vm_image, ImageChoice::Colima);
    assert_eq!(c.vm_prefix, "wt-");
    assert_eq!(c.vm_network, NetworkMode::Nat);
    assert_eq!(c.health_timeout, Duration::from_secs(1800));
    assert!(c.sources.is_empty());
    assert_eq!(*c, crate::default_config(&f.host()));
}

#[test]
fn worktree_outside_home_mounts_the_worktree() {
    let f = Fixture::new();
    let mut host = f.host();
    host.home = f.home.join("elsewhere");
    std::fs::create_dir_all(&host.home).unwrap();
    let loaded = load(&f.root, &host).unwrap();
    assert_eq!(loaded.config.vm_mount, f.root);
}

#[test]
fn expose_ports_as_array_or_string() {
    let f = Fixture::new();
    f.base("EXPOSE_PORTS=(8080 9229)\n");
    assert_eq!(f.ok().config.expose_ports, [8080, 9229]);
    f.base("EXPOSE_PORTS=\"8080  9229\n3000\"\n");
    assert_eq!(f.ok().config.expose_ports, [8080, 9229, 3000]);
    f.base("EXPOSE_PORTS=8080\n");
    assert_eq!(f.ok().config.expose_ports, [8080]);
    f.base("EXPOSE_PORTS=()\n");
    assert!(f.ok().config.expose_ports.is_empty());
}

#[test]
fn quotes_spaces_hashes_and_home() {
    let f = Fixture::new();
    f.base(concat!(
        "# a comment\n",
        "CMD_UP=\"INSTANCE_NAME=local ./deploy.sh 'a b' \\\"c\\\" # not a comment\"  # one\n",
        "CMD_TEST='make test # $HOME stays'\n",
        "VM_MOUNT=\"$HOME\"\n",
        "PROVISION_SCRIPT=$'line one\\nline \"two\"\\t$'\n",
        "PROVISION_SEED=(\".env keys\" config/local.json)\n",
    ));
    let c = f.ok().config;
    assert_eq!(
        c.cmd_up.as_deref(),
        Some("INSTANCE_NAME=local ./deploy.sh 'a b' \"c\" # not a comment")
    );
    assert_eq!(c.cmd_test.as_deref(), Some("make test # $HOME stays"));
    assert_eq!(c.vm_mount, f.home);
    assert_eq!(
        c.provision_script.as_deref(),
        Some("line one\nline \"two\"\t$")
    );
    assert_eq!(c.provision_seed, [".env keys", "config/local.json"]);
}

#[test]
fn command_substitution_and_arithmetic() {
    let f = Fixture::new();
    f.base(concat!(
        "CMD_TEST=\"$(echo make test)\"\n",
        "VM_CPU=$(( 1 + 1 ))\n",
        "cores=3; VM_DISK=$((cores * 10))\n",
        "CMD_UP=\"$(pwd)\"\n",
    ));
    let c = f.ok().config;
    assert_eq!(c.cmd_test.as_deref(), Some("make test"));
    assert_eq!((c.vm_cpu, c.vm_disk_gib), (2, 30));
    // bash runs in the worktree root.
    assert_eq!(c.cmd_up.as_deref(), Some(f.root.to_str().unwrap()));
}

#[test]
fn local_file_overrides_an_array_and_sees_the_base() {
    let f = Fixture::new();
    f.base("EXPOSE_PORTS=(30001 38003)\nVM_MEMORY=4\nCMD_UP=\"make up\"\n");
    f.local("EXPOSE_PORTS=(30001 38003 9229)\nVM_MEMORY=$((VM_MEMORY * 2))\n");
    let c = f.ok().config;
    assert_eq!(c.expose_ports, [30001, 38003, 9229]);
    assert_eq!(c.vm_memory_mib, 8192);
    let local = Source::File(f.root.join("vmoat.local.conf"));
    assert_eq!(c.sources["EXPOSE_PORTS"], local);
    assert_eq!(c.sources["VM_MEMORY"], local);
    assert_eq!(c.sources["CMD_UP"], Source::File(f.base_path()));

    f.local("EXPOSE_PORTS+=(9229)\nunset CMD_UP\n");
    let c = f.ok().config;
    assert_eq!(c.expose_ports, [30001, 38003, 9229]);
    assert_eq!(c.cmd_up, None);
    assert!(!c.sources.contains_key("CMD_UP"));
}

#[test]
fn crlf_and_bom_are_accepted_with_warnings() {
    let f = Fixture::new();
    f.base("\u{feff}VM_CPU=2\r\nEXPOSE_PORTS=(80 443)\r\nCMD_UP=\"make up\"\r\n");
    let loaded = f.ok();
    assert_eq!(loaded.config.vm_cpu, 2);
    assert_eq!(loaded.config.expose_ports, [80, 443]);
    assert_eq!(loaded.config.cmd_up.as_deref(), Some("make up"));
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("byte-order mark"));
    assert!(loaded.warnings[1].contains("CRLF"));
    assert!(loaded.warnings.iter().all(|w| w.contains("vmoat.conf")));
    // The source stays the real file, not the cleaned copy.
    assert_eq!(loaded.config.sources["VM_CPU"], Source::File(f.base_path()));
}

#[test]
fn errors_in_a_cleaned_file_name_the_real_file() {
    let f = Fixture::new();
    f.base("VM_CPU=2\r\nnosuchcommand-vmoat\r\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Command { .. }), "{err}");
    let (file, line, message) = located(&err);
    assert_eq!((file, line), (f.base_path(), 2));
    assert!(message.contains("command not found"), "{message}");
}

#[test]
fn unknown_keys_warn_with_a_close_match() {
    let f = Fixture::new();
    f.base("EXPOSE_PORT=(8080)\nmy_helper=1\nDOCKER_BUILDKIT=1\nPATH=\"$PATH:/x\"\n");
    f.local("VM_MEM=4\n");
    let loaded = f.ok();
    assert_eq!(loaded.warnings.len(), 3, "{:?}", loaded.warnings);
    let expose = loaded
        .warnings
        .iter()
        .find(|w| w.contains("EXPOSE_PORT,"))
        .unwrap();
    assert!(expose.contains("did you mean EXPOSE_PORTS?"), "{expose}");
    assert!(
        expose.contains(&f.base_path().display().to_string()),
        "{expose}"
    );
    let other = loaded
        .warnings
        .iter()
        .find(|w| w.contains("DOCKER_BUILDKIT"))
        .unwrap();
    assert!(other.contains("vmoat ignores it"), "{other}");
    let local = loaded
        .warnings
        .iter()
        .find(|w| w.contains("VM_MEM,"))
        .unwrap();
    assert!(local.contains("vmoat.local.conf") && local.contains("VM_MEMORY"));
    assert!(loaded.config.expose_ports.is_empty());
}

#[test]
fn bad_memory_names_file_key_and_value() {
    let f = Fixture::new();
    f.base("VM_MEMORY=lots\n");
    let text = assert_invalid(&f.err(), "VM_MEMORY", "lots", &f.base_path());
    assert!(text.contains("GiB"), "{text}");
}

#[test]
fn out_of_range_port_is_named() {
    let f = Fixture::new();
    f.base("EXPOSE_PORTS=(80 99999)\n");
    assert_invalid(&f.err(), "EXPOSE_PORTS", "99999", &f.base_path());
    f.base("EXPOSE_PORTS=\"80 0\"\n");
    assert_invalid(&f.err(), "EXPOSE_PORTS", "0", &f.base_path());
    f.base("EXPOSE_PORTS=(http)\n");
    assert_invalid(&f.err(), "EXPOSE_PORTS", "http", &f.base_path());
}

#[test]
fn stdout_of_the_config_does_not_corrupt_the_values() {
    let f = Fixture::new();
    f.base(concat!(
        "echo 'VM_CPU=7'\n",
        "printf 'S\\0-\\0N\\0K\\0VM_CPU\\0declare -- VM_CPU=\"9\"\\0001\\0009\\0'\n",
        "echo \"declare -a EXPOSE_PORTS=([0]=\\\"1\\\")\"\n",
        "echo to stderr >&2\n",
        "VM_CPU=3\n",
        "EXPOSE_PORTS=(8080)\n",
    ));
    let loaded = f.ok();
    assert_eq!(loaded.config.vm_cpu, 3);
    assert_eq!(loaded.config.expose_ports, [8080]);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn syntax_error_names_the_line() {
    let f = Fixture::new();
    f.base("VM_CPU=2\n\nif then\nVM_DISK=3\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    let (file, line, message) = located(&err);
    assert_eq!((file, line), (f.base_path(), 3));
    assert!(message.contains("syntax error"), "{message}");

    f.base("VM_CPU=2\nEXPOSE_PORTS=(80\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert!(err.to_string().contains("vmoat.conf"), "{err}");

    f.base("CMD_UP=\"unterminated\nVM_CPU=1\n");
    let err = f.err();
    assert!(err.to_string().contains("unexpected EOF"), "{err}");
}

#[test]
fn failing_commands_name_file_and_line() {
    let f = Fixture::new();
    f.base("VM_CPU=2\nX=$(false)\nVM_DISK=3\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Command { .. }), "{err}");
    let (file, line, message) = located(&err);
    assert_eq!((file, line), (f.base_path(), 2));
    assert!(message.contains("exit status 1"), "{message}");

    f.base("VM_CPU=2\n\nnosuchcommand-vmoat --flag\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Command { line: 3, .. }), "{err}");
    assert!(
        err.to_string()
            .contains("nosuchcommand-vmoat: command not found"),
        "{err}"
    );

    f.base("X=$(ls /nonexistent-vmoat-dir)\n");
    let text = f.err().to_string();
    assert!(
        text.contains("line 1") && text.contains("nonexistent-vmoat-dir"),
        "{text}"
    );

    f.local("VM_CPU=$((1/0))\n");
    f.base("VM_CPU=1\n");
    let err = f.err();
    assert!(
        err.to_string().contains("vmoat.local.conf, line 1"),
        "{err}"
    );
    assert!(err.to_string().contains("division by 0"), "{err}");
}

#[test]
fn failures_inside_conditions_are_fine() {
    let f = Fixture::new();
    f.base(concat!(
        "command -v nosuchcommand-vmoat >/dev/null && CMD_UP=never\n",
        "if ! type nosuchcommand-vmoat >/dev/null 2>&1; then VM_CPU=1; fi\n",
        "X=$(false) || true\n",
        "check() { false; }\n",
        "check || VM_DISK=20\n",
        "[ -n \"\" ] && VM_NAME=never\n",
    ));
    let c = f.ok().config;
    assert_eq!(
        (c.cmd_up, c.vm_cpu, c.vm_disk_gib, c.vm_name),
        (None, 1, 20, None)
    );
}

#[test]
fn failures_in_functions_and_sourced_helpers() {
    let f = Fixture::new();
    std::fs::create_dir(f.root.join("scripts")).unwrap();
    std::fs::write(f.root.join("scripts/env.sh"), "x=1\n\nfalse\n").unwrap();
    f.base("VM_CPU=1\n. ./scripts/env.sh\n");
    match f.err() {
        ConfigError::Command { file, line, .. } => {
            assert_eq!((file, line), (f.root.join("./scripts/env.sh"), 3));
        }
        other => panic!("{other}"),
    }

    f.base("setup() {\n  true\n  false\n}\nsetup\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Command { line: 3, .. }), "{err}");
}

#[test]
fn unset_variable_under_set_u() {
    let f = Fixture::new();
    f.base("set -u\nCMD_UP=\"$NOT_SET_ANYWHERE\"\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Command { line: 2, .. }), "{err}");
    assert!(err.to_string().contains("unbound variable"), "{err}");
}

#[test]
fn exit_in_a_config_is_an_error() {
    let f = Fixture::new();
    f.base("VM_CPU=1\nexit 3\n");
    let err = f.err();
    assert!(
        matches!(err, ConfigError::Exited { status: 3, .. }),
        "{err}"
    );
    f.base("VM_CPU=1\nexit\n");
    assert!(matches!(f.err(), ConfigError::Exited { status: 0, .. }));
    // `return` stops reading the file and is fine.
    f.base("VM_CPU=1\nreturn\nVM_CPU=2\n");
    assert_eq!(f.ok().config.vm_cpu, 1);
}

#[test]
fn a_hung_config_is_killed_with_its_children() {
    let f = Fixture::new();
    let pid_file = f.root.join("sleep.pid");
    f.local(&format!(
        "sleep 999 &\necho $! > {}\nwait\n",
        pid_file.display()
    ));
    f.base("VM_CPU=1\n");

    let started = Instant::now();
    let options = LoadOptions {
        timeout: Duration::from_millis(700),
    };
    let err = load_with(&f.root, &f.host(), &options).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    match &err {
        ConfigError::TimedOut { file, .. } => assert_eq!(*file, f.root.join("vmoat.local.conf")),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("did not finish"), "{err}");

    // The background sleep was in bash's process group and is gone too.
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        nix::sys::signal::kill(pid, None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "sleep {pid} survived");
}

#[test]
fn clean_environment_and_no_stdin() {
    let f = Fixture::new();
    f.base(concat!(
        "CMD_UP=\"$(env | cut -d= -f1 | sort | tr '\\n' ' ')\"\n",
        "CMD_TEST=\"$USER $HOME\"\n",
        "read -r line || PROVISION_SCRIPT=eof\n",
    ));
    let c = f.ok().config;
    let names: Vec<&str> = c.cmd_up.as_deref().unwrap().split_whitespace().collect();
    for name in &names {
        assert!(
            ["HOME", "PATH", "USER", "PWD", "SHLVL", "_", "OLDPWD"].contains(name),
            "{name} leaked into the config's environment: {names:?}"
        );
    }
    assert_eq!(c.cmd_test, Some(format!("tester {}", f.home.display())));
    assert_eq!(c.provision_script.as_deref(), Some("eof"));
}

#[test]
fn array_for_a_single_value_key() {
    let f = Fixture::new();
    f.base("VM_CPU=(2 4)\n");
    let err = f.err();
    assert!(
        matches!(err, ConfigError::Shape { key: "VM_CPU", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("vmoat.conf"), "{err}");
    f.base("VM_CPU=(2)\n");
    assert_eq!(f.ok().config.vm_cpu, 2);
    f.base("declare -A EXPOSE_PORTS=([web]=80)\n");
    let err = f.err();
    assert!(matches!(err, ConfigError::Shape { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("give an array, EXPOSE_PORTS=(a b)"),
        "{err}"
    );
}

#[test]
fn empty_values_mean_the_default() {
    let f = Fixture::new();
    f.base("VM_CPU=\nCMD_UP=''\nVM_MOUNT=\nVM_IMAGE=\n");
    let c = f.ok().config;
    assert_eq!(c, crate::default_config(&f.host()));
}

#[test]
fn sizes_against_the_host() {
    let f = Fixture::new();
    f.base("VM_CPU=8\nVM_MEMORY=13\nVM_DISK=5\n");
    let loaded = f.ok();
    assert_eq!(loaded.config.vm_cpu, 8);
    assert_eq!(loaded.config.vm_memory_mib, 13 * 1024);
    assert_eq!(loaded.warnings.len(), 3, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("4 CPUs"));
    assert!(loaded.warnings[1].contains("75%"));
    assert!(loaded.warnings[2].contains("20 GiB or more"));

    f.base("VM_MEMORY=1.5\n");
    assert_eq!(f.ok().config.vm_memory_mib, 1536);
    f.base("VM_MEMORY=17\n");
    let text = assert_invalid(&f.err(), "VM_MEMORY", "17", &f.base_path());
    assert!(text.contains("16.0 GiB"), "{text}");
    f.base("VM_MEMORY=0.25\n");
    assert_invalid(&f.err(), "VM_MEMORY", "0.25", &f.base_path());
    f.base("VM_CPU=0\n");
    assert_invalid(&f.err(), "VM_CPU", "0", &f.base_path());
    f.base("VM_CPU=two\n");
    assert_invalid(&f.err(), "VM_CPU", "two", &f.base_path());
    f.base("VM_DISK=0\n");
    assert_invalid(&f.err(), "VM_DISK", "0", &f.base_path());
    f.base("VM_DISK=1.5\n");
    assert_invalid(&f.err(), "VM_DISK", "1.5", &f.base_path());
}

#[test]
fn mount_must_contain_the_worktree() {
    let f = Fixture::new();
    f.base("VM_MOUNT=\"$HOME/src\"\n");
    assert_eq!(f.ok().config.vm_mount, f.home.join("src"));
    f.base("VM_MOUNT=..\n");
    assert_eq!(f.ok().config.vm_mount, f.home.join("src"));
    f.base("VM_MOUNT=~\n");
    assert_eq!(f.ok().config.vm_mount, f.home);

    // A sibling whose name extends the worktree's is not a parent of it.
    std::fs::create_dir_all(f.home.join("src/proj-other")).unwrap();
    f.base("VM_MOUNT=\"$HOME/src/proj-other\"\n");
    let value = format!("{}/src/proj-other", f.home.display());
    let text = assert_invalid(&f.err(), "VM_MOUNT", &value, &f.base_path());
    assert!(text.contains("does not contain the worktree"), "{text}");

    f.base("VM_MOUNT=/nonexistent/vmoat\n");
    assert_invalid(&f.err(), "VM_MOUNT", "/nonexistent/vmoat", &f.base_path());

    // Through a symlink to a parent: resolved, then compared.
    std::os::unix::fs::symlink(f.home.join("src"), f.home.join("link")).unwrap();
    f.base("VM_MOUNT=\"$HOME/link\"\n");
    assert_eq!(f.ok().config.vm_mount, f.home.join("src"));
}

#[test]
fn enumerations_and_names() {
    let f = Fixture::new();
    f.base("VM_TYPE=qemu\nMOUNT_TYPE=9p\nVM_NETWORK=restricted\nVM_PREFIX=dev-\n");
    let c = f.ok().config;
    assert_eq!(c.vm_type.as_deref(), Some("qemu"));
    assert_eq!(c.mount_type.as_deref(), Some("9p"));
    assert_eq!(c.vm_network, NetworkMode::Restricted);
    assert_eq!(c.vm_prefix, "dev-");

    for (text, key, value) in [
        ("VM_TYPE=xen", "VM_TYPE", "xen"),
        ("MOUNT_TYPE=nfs", "MOUNT_TYPE", "nfs"),
        ("VM_NETWORK=bridged", "VM_NETWORK", "bridged"),
        ("VM_PREFIX=Wt_", "VM_PREFIX", "Wt_"),
        ("VM_NAME=my_vm", "VM_NAME", "my_vm"),
        ("VM_NAME=-x", "VM_NAME", "-x"),
        ("HEALTH_URL=localhost:8080", "HEALTH_URL", "localhost:8080"),
        (
            "HEALTH_URL=http://h:99999/",
            "HEALTH_URL",
            "http://h:99999/",
        ),
        ("HEALTH_TIMEOUT=0", "HEALTH_TIMEOUT", "0"),
        ("HEALTH_TIMEOUT=10m", "HEALTH_TIMEOUT", "10m"),
        ("PROVISION_APT=\"git Jq\"", "PROVISION_APT", "Jq"),
        ("PROVISION_APT=(git 'curl;rm')", "PROVISION_APT", "curl;rm"),
        ("PROVISION_SEED=(../secret)", "PROVISION_SEED", "../secret"),
        (
            "PROVISION_SEED=/etc/passwd",
            "PROVISION_SEED",
            "/etc/passwd",
        ),
        ("VM_IMAGE=Ubuntu", "VM_IMAGE", "Ubuntu"),
        ("VM_IMAGE=./missing.qcow2", "VM_IMAGE", "./missing.qcow2"),
    ] {
        f.base(&format!("{text}\n"));
        let message = assert_invalid(&f.err(), key, value, &f.base_path());
        assert!(message.len() > key.len() + value.len() + 30, "{message}");
    }

    if cfg!(not(target_os = "macos")) {
        f.base("VM_TYPE=vz\n");
        let text = assert_invalid(&f.err(), "VM_TYPE", "vz", &f.base_path());
        assert!(text.contains("macOS"), "{text}");
    }
}

#[test]
fn image_names_and_paths() {
    let f = Fixture::new();
    f.base("VM_IMAGE=debian\n");
    assert_eq!(f.ok().config.vm_image, ImageChoice::Named("debian".into()));
    f.base("VM_IMAGE=colima\n");
    assert_eq!(f.ok().config.vm_image, ImageChoice::Colima);

    std::fs::write(f.root.join("disk.qcow2"), b"").unwrap();
    f.base("VM_IMAGE=./disk.qcow2\n");
    assert_eq!(
        f.ok().config.vm_image,
        ImageChoice::Path(f.root.join("disk.qcow2"))
    );
}

#[test]
fn lists_and_urls_that_pass() {
    let f = Fixture::new();
    f.base(concat!(
        "PROVISION_APT=\"git jq  ca-certificates libstdc++6 g++\"\n",
        "HEALTH_URL=\"http://127.0.0.1:38003/health\"\n",
        "HEALTH_TIMEOUT=600\n",
        "VM_NAME=wt-api-1\n",
        "EXPOSE_PORTS=(80 80 443)\n",
    ));
    let loaded = f.ok();
    let c = &loaded.config;
    assert_eq!(
        c.provision_apt,
        ["git", "jq", "ca-certificates", "libstdc++6", "g++"]
    );
    assert_eq!(
        c.health_url.as_deref(),
        Some("http://127.0.0.1:38003/health")
    );
    assert_eq!(c.health_timeout, Duration::from_secs(600));
    assert_eq!(c.vm_name.as_deref(), Some("wt-api-1"));
    assert_eq!(c.expose_ports, [80, 443]);
    assert!(
        loaded.warnings[0].contains("80 twice"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn seed_example_from_the_readme() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.home.join("github")).unwrap();
    let root = f.home.join("github/rag");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("vmoat.conf"),
        r#"VM_CPU=4; VM_MEMORY=12; VM_DISK=80
VM_MOUNT="$HOME/github"
PROVISION_APT="git jq curl ca-certificates"
PROVISION_SCRIPT='command -v dotenvx >/dev/null 2>&1 || curl -sfS https://dotenvx.sh | sudo sh'
PROVISION_SEED=".env.keys"
CMD_UP="INSTANCE_NAME=local VERSION=local ./deploy.sh local"
CMD_TEST="INSTANCE_NAME=local VERSION=local ./deploy.sh test"
HEALTH_URL="http://127.0.0.1:38003/health"
EXPOSE_PORTS=(30001 38003)
"#,
    )
    .unwrap();
    let loaded = load(&root, &f.host()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(
        (c.vm_cpu, c.vm_memory_mib, c.vm_disk_gib),
        (4, 12 * 1024, 80)
    );
    assert_eq!(c.vm_mount, f.home.join("github"));
    assert_eq!(c.provision_seed, [".env.keys"]);
    assert_eq!(c.expose_ports, [30001, 38003]);
    assert_eq!(c.sources.len(), 11);
}

#[test]
fn unreadable_config_is_a_read_error() {
    let f = Fixture::new();
    std::fs::create_dir(f.root.join("vmoat.conf")).unwrap();
    let err = f.err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.is_config_error());
}

#[test]
fn a_local_file_alone() {
    let f = Fixture::new();
    f.local("VM_CPU=3\nFOO_BAR=1\n");
    let loaded = f.ok();
    assert_eq!(loaded.config.vm_cpu, 3);
    let local = f.root.join("vmoat.local.conf");
    assert_eq!(loaded.config.sources["VM_CPU"], Source::File(local.clone()));
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].contains(&local.display().to_string()));
}
