//! The README stays true to the binary: every command `vmoat --help` lists has a row in its
//! command table, every config key vmoat knows has a row in its config table, and the exit-code
//! table matches `vmoat --help`'s.

use std::process::Command;

fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    std::fs::read_to_string(path).expect("README.md at the repository root")
}

fn help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmoat"))
        .arg("--help")
        .output()
        .expect("run vmoat --help");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The command names of `vmoat --help`'s "Commands:" section.
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_has_a_row() {
    let readme = readme();
    let commands = commands(&help());
    assert!(
        commands.len() >= 15,
        "parsed too few commands: {commands:?}"
    );
    for command in commands {
        let row = format!("| `{command}");
        let in_row = readme.lines().any(|l| {
            l.starts_with("| `") && l.split('|').nth(1).is_some_and(|c| c.contains(&command))
        });
        assert!(
            in_row,
            "README has no command-table row for `{command}` (looked for {row})"
        );
    }
}

#[test]
fn every_config_key_has_a_row() {
    let readme = readme();
    for key in vmoat_config::KEYS {
        let row = format!("| `{}` |", key.name);
        assert!(
            readme.contains(&row),
            "README's config table lacks {}",
            key.name
        );
    }
}

#[test]
fn exit_codes_match_the_help() {
    let readme = readme();
    let help = help();
    for code in 0..=6 {
        let in_help = help
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{code} ")));
        let in_readme = readme.contains(&format!("| {code} |"));
        assert!(
            in_help && in_readme,
            "exit code {code}: help {in_help}, README {in_readme}"
        );
    }
}
