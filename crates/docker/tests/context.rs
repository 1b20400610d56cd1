//! The docker context file against the docker CLI's own output (golden files captured from
//! `docker context create` of docker 28.2), the `DOCKER_CONFIG` override, and `config.json`
//! left alone.

use std::path::Path;

use vmoat_docker::{
    RemoveOutcome, context_meta_dir, remove_context, remove_context_in, write_context,
    write_context_in,
};

/// `docker context create colima-wt --description 'colima [profile=wt]'
/// --docker host=unix:///h/.colima/wt/docker.sock`, byte for byte.
const GOLDEN_COLIMA: &str = concat!(
    r#"{"Name":"colima-wt","Metadata":{"Description":"colima [profile=wt]"},"#,
    r#""Endpoints":{"docker":{"Host":"unix:///h/.colima/wt/docker.sock","SkipTLSVerify":false}}}"#
);
const GOLDEN_COLIMA_DIR: &str = "ffdc128ed4582c408e753ba2ff1f5305f5435b1c3af32719427b172685a63522";

/// `docker context create x2 --docker 'host=unix:///tmp/a b/d"q<.sock'` (no description).
const GOLDEN_ESCAPED: &str = concat!(
    r#"{"Name":"x2","Metadata":{},"Endpoints":{"docker":"#,
    r#"{"Host":"unix:///tmp/a b/d\"q\u003c.sock","SkipTLSVerify":false}}}"#
);

const CONFIG_JSON: &str = "{\n  \"auths\": {},\n  \"currentContext\": \"default\"\n}\n";

#[test]
fn the_file_matches_the_docker_cli_byte_for_byte() {
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("config.json"), CONFIG_JSON).unwrap();

    let path = write_context_in(
        config.path(),
        "colima-wt",
        "colima [profile=wt]",
        Path::new("/h/.colima/wt/docker.sock"),
    )
    .unwrap();
    assert_eq!(
        path,
        config
            .path()
            .join("contexts/meta")
            .join(GOLDEN_COLIMA_DIR)
            .join("meta.json")
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), GOLDEN_COLIMA);

    let path = write_context_in(config.path(), "x2", "", Path::new("/tmp/a b/d\"q<.sock")).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), GOLDEN_ESCAPED);

    // Rewriting replaces the file and leaves no temporary file behind.
    write_context_in(config.path(), "x2", "", Path::new("/tmp/other.sock")).unwrap();
    let dir = path.parent().unwrap();
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["meta.json"]);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("unix:///tmp/other.sock")
    );

    // The current context is never touched.
    assert_eq!(
        std::fs::read_to_string(config.path().join("config.json")).unwrap(),
        CONFIG_JSON
    );
}

#[test]
fn bad_names_are_refused() {
    let config = tempfile::tempdir().unwrap();
    for bad in ["", "-x", "a b", "x<&>"] {
        let err = write_context_in(config.path(), bad, "", Path::new("/s")).unwrap_err();
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    assert!(!config.path().join("contexts").exists());
}

#[test]
fn removal_leaves_the_current_context_and_config_alone() {
    let config = tempfile::tempdir().unwrap();
    let current = CONFIG_JSON.replace("default", "colima-cur");
    std::fs::write(config.path().join("config.json"), &current).unwrap();
    write_context_in(config.path(), "colima-cur", "", Path::new("/a.sock")).unwrap();
    write_context_in(config.path(), "colima-old", "", Path::new("/b.sock")).unwrap();

    assert_eq!(
        remove_context_in(config.path(), "colima-old").unwrap(),
        RemoveOutcome::Removed
    );
    assert!(!context_meta_dir(config.path(), "colima-old").exists());
    assert_eq!(
        remove_context_in(config.path(), "colima-old").unwrap(),
        RemoveOutcome::Absent
    );

    let kept = remove_context_in(config.path(), "colima-cur").unwrap();
    assert_eq!(kept, RemoveOutcome::KeptCurrent);
    assert!(
        context_meta_dir(config.path(), "colima-cur")
            .join("meta.json")
            .exists()
    );
    assert_eq!(
        std::fs::read_to_string(config.path().join("config.json")).unwrap(),
        current
    );
}

// The only test in this binary that sets environment variables, so no other test races on them.
#[test]
fn docker_config_is_respected() {
    let config = tempfile::tempdir().unwrap();
    // SAFETY: no other thread of this test binary reads or writes the environment.
    unsafe { std::env::set_var("DOCKER_CONFIG", config.path()) };
    let path = write_context("colima-env", "d", Path::new("/c.sock")).unwrap();
    assert!(path.starts_with(config.path()), "{}", path.display());
    assert_eq!(
        remove_context("colima-env").unwrap(),
        RemoveOutcome::Removed
    );
    // SAFETY: as above.
    unsafe { std::env::remove_var("DOCKER_CONFIG") };
}

#[test]
#[ignore = "needs the docker CLI on PATH; run with --ignored to cross-check the format"]
fn the_docker_cli_reads_the_context() {
    let config = tempfile::tempdir().unwrap();
    write_context_in(
        config.path(),
        "colima-check",
        "colima [profile=check]",
        Path::new("/x.sock"),
    )
    .unwrap();
    let out = std::process::Command::new("docker")
        .args([
            "context",
            "inspect",
            "colima-check",
            "--format",
            "{{.Endpoints.docker.Host}}",
        ])
        .env("DOCKER_CONFIG", config.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "unix:///x.sock"
    );
}
