//! The Claude Code plugin: its manifests against Claude Code's documented fields and the
//! workspace version, its skill and `/vmoat` command against the real CLI definition, and the
//! `bin/vmoat` launcher run in a temporary HOME against fake vmoat binaries and a fake cargo.
//!
//! Nothing here boots a VM, so it runs without the `e2e` feature.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

/// The repository root (the workspace), one level above this crate.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// `author` / `owner` as Claude Code documents them: a name, optionally email and url.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Person {
    name: String,
    email: Option<String>,
    url: Option<String>,
}

/// `plugin/.claude-plugin/plugin.json`, limited to documented fields so a typo fails here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginManifest {
    name: String,
    version: String,
    description: String,
    author: Person,
    homepage: Option<String>,
    repository: Option<String>,
    license: Option<String>,
    keywords: Option<Vec<String>>,
}

/// `.claude-plugin/marketplace.json` at the repository root.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marketplace {
    name: String,
    owner: Person,
    metadata: Option<MarketplaceMetadata>,
    plugins: Vec<MarketplaceEntry>,
}

/// The marketplace's optional `metadata` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarketplaceMetadata {
    description: Option<String>,
    version: Option<String>,
}

/// One plugin entry of the marketplace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarketplaceEntry {
    name: String,
    source: String,
    description: String,
    version: String,
    author: Person,
    homepage: Option<String>,
    repository: Option<String>,
    license: Option<String>,
    keywords: Option<Vec<String>>,
    category: Option<String>,
}

fn plugin_manifest() -> PluginManifest {
    let path = repo().join("plugin/.claude-plugin/plugin.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn marketplace() -> Marketplace {
    let path = repo().join(".claude-plugin/marketplace.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// True for the kebab-case names Claude Code accepts for plugins, marketplaces and skills.
fn is_kebab(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('-').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// `[workspace.package] version` of the root `Cargo.toml`.
fn workspace_version() -> String {
    let manifest = read(&repo().join("Cargo.toml"));
    let mut in_section = false;

    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && key.trim() == "version"
        {
            return value.trim().trim_matches('"').to_string();
        }
    }
    panic!("the root Cargo.toml has no [workspace.package] version");
}

fn is_semver(version: &str) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

#[test]
fn plugin_manifest_carries_the_documented_fields() {
    let plugin = plugin_manifest();

    assert_eq!(plugin.name, "vmoat");
    assert!(
        is_kebab(&plugin.name),
        "plugin name {:?} is not kebab-case",
        plugin.name
    );
    assert!(
        is_semver(&plugin.version),
        "plugin version {:?} is not semver",
        plugin.version
    );
    assert!(
        (20..=300).contains(&plugin.description.len()),
        "plugin description should say what it does in a sentence: {:?}",
        plugin.description
    );
    assert!(
        !plugin.author.name.trim().is_empty(),
        "plugin author has no name"
    );
    for url in [&plugin.homepage, &plugin.repository].into_iter().flatten() {
        assert!(
            url.starts_with("https://"),
            "plugin URL {url:?} is not https"
        );
    }
    assert!(plugin.author.email.is_none() && plugin.author.url.is_none());
    assert_eq!(plugin.license.as_deref(), Some("MIT"));
    assert!(plugin.keywords.is_some_and(|k| !k.is_empty()));
}

#[test]
fn marketplace_lists_the_plugin_from_its_directory() {
    let market = marketplace();
    let plugin = plugin_manifest();

    assert!(
        is_kebab(&market.name),
        "marketplace name {:?} is not kebab-case",
        market.name
    );
    assert!(
        !market.owner.name.trim().is_empty(),
        "marketplace owner has no name"
    );
    assert!(market.metadata.is_some_and(|m| m.description.is_some()));
    assert_eq!(
        market.plugins.len(),
        1,
        "the marketplace lists exactly the vmoat plugin"
    );

    let entry = &market.plugins[0];
    assert_eq!(entry.source, "./plugin", "relative sources start with ./");
    let source = repo().join(entry.source.trim_start_matches("./"));
    assert!(
        source.join(".claude-plugin/plugin.json").is_file(),
        "the entry's source {} holds no .claude-plugin/plugin.json",
        source.display()
    );

    assert_eq!(entry.name, plugin.name, "entry and plugin.json name differ");
    assert_eq!(
        entry.description, plugin.description,
        "entry and plugin.json differ"
    );
    assert_eq!(entry.author.name, plugin.author.name);
    assert_eq!(entry.homepage, plugin.homepage);
    assert_eq!(entry.repository, plugin.repository);
    assert_eq!(entry.license, plugin.license);
    assert_eq!(entry.keywords, plugin.keywords);
    assert!(entry.category.is_some());
}

#[test]
fn plugin_version_is_the_workspace_version() {
    let workspace = workspace_version();

    assert_eq!(
        plugin_manifest().version,
        workspace,
        "plugin/.claude-plugin/plugin.json must carry the workspace version of Cargo.toml"
    );
    let market = marketplace();
    if let Some(version) = market.metadata.and_then(|m| m.version) {
        assert_eq!(version, workspace, "the marketplace's metadata.version");
    }
    for entry in market.plugins {
        assert_eq!(
            entry.version, workspace,
            "marketplace entry {} must carry the workspace version of Cargo.toml",
            entry.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Skill and command
// ---------------------------------------------------------------------------------------------

/// The YAML frontmatter of a skill.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkillFrontmatter {
    name: String,
    description: String,
}

/// The YAML frontmatter of a command.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CommandFrontmatter {
    description: String,
    argument_hint: String,
    allowed_tools: String,
}

/// Splits a Markdown file into its YAML frontmatter and its body.
fn frontmatter(path: &Path) -> (String, String) {
    let text = read(path);
    let rest = text
        .strip_prefix("---\n")
        .unwrap_or_else(|| panic!("{} does not open with --- frontmatter", path.display()));
    let end = rest
        .find("\n---\n")
        .unwrap_or_else(|| panic!("{}: frontmatter is not closed by ---", path.display()));
    (rest[..end].to_string(), rest[end + 5..].to_string())
}

fn skill_path() -> PathBuf {
    repo().join("plugin/skills/vmoat/SKILL.md")
}

fn command_path() -> PathBuf {
    repo().join("plugin/commands/vmoat.md")
}

#[test]
fn skill_frontmatter_has_a_valid_name_and_description() {
    let (yaml, body) = frontmatter(&skill_path());
    let front: SkillFrontmatter =
        serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("SKILL.md frontmatter: {e}"));

    assert_eq!(
        front.name, "vmoat",
        "the skill's name is its directory's name"
    );
    assert!(is_kebab(&front.name));
    assert!(
        (100..=1024).contains(&front.description.len()),
        "a skill description says what it does and when, in at most 1024 characters; it has {}",
        front.description.len()
    );
    assert!(
        !front.description.contains(['<', '>']),
        "no angle brackets in a description"
    );
    for trigger in ["verify", "worktree", "browser", "parallel"] {
        assert!(
            front.description.contains(trigger),
            "description never says {trigger:?}"
        );
    }
    assert!(body.split_whitespace().count() < 3000, "keep SKILL.md lean");
}

#[test]
fn command_frontmatter_passes_arguments_to_the_cli() {
    let (yaml, body) = frontmatter(&command_path());
    let front: CommandFrontmatter =
        serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("vmoat.md frontmatter: {e}"));

    assert!(!front.description.is_empty() && front.description.len() <= 100);
    assert_eq!(front.argument_hint, "<command> [args]");
    assert_eq!(front.allowed_tools, "Bash(vmoat:*)");
    assert!(
        body.contains("vmoat $ARGUMENTS"),
        "the command runs vmoat with $ARGUMENTS"
    );
}

/// What `crates/vmoat/src/cli.rs` declares: commands, `image` subcommands and options.
struct CliDefinition {
    commands: BTreeSet<String>,
    hidden: BTreeSet<String>,
    image_commands: BTreeSet<String>,
    flags: BTreeSet<String>,
}

/// `ImageBuild` → `image-build`, `keep_failed` → `keep-failed`: clap's names.
fn kebab(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(if c == '_' {
            '-'
        } else {
            c.to_ascii_lowercase()
        });
    }
    out
}

/// The variants of `pub enum NAME` in `src`, kebab-cased, each with whether it is hidden.
fn enum_variants(src: &str, name: &str) -> Vec<(String, bool)> {
    let start = src
        .find(&format!("pub enum {name} {{"))
        .unwrap_or_else(|| panic!("cli.rs has no enum {name}"));
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").expect("enum closes")];

    let mut variants = Vec::new();
    let mut hidden = false;
    for line in body.lines().skip(1) {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with("#[") && trimmed.contains("hide = true") {
            hidden = true;
        }
        if indent == 4 && trimmed.starts_with(|c: char| c.is_ascii_uppercase()) {
            let ident: String = trimmed
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            variants.push((kebab(&ident), hidden));
            hidden = false;
        }
    }
    variants
}

/// Every `--long` and `-s` option that an `#[arg(...)]` attribute in `src` declares.
fn declared_flags(src: &str) -> BTreeSet<String> {
    let mut flags: BTreeSet<String> = ["--help", "-h", "--version", "-V"]
        .into_iter()
        .map(String::from)
        .collect();
    let lines: Vec<&str> = src.lines().collect();

    for (i, line) in lines.iter().enumerate() {
        let Some(attr) = line.trim().strip_prefix("#[arg(") else {
            continue;
        };
        let field = lines[i + 1..]
            .iter()
            .find_map(|l| l.trim().strip_prefix("pub "))
            .and_then(|l| l.split(':').next())
            .expect("an #[arg] attribute precedes a field");

        for item in attr.trim_end_matches(")]").split(',').map(str::trim) {
            match item.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("long", v)) => flags.insert(format!("--{}", v.trim_matches('"'))),
                Some(("short", v)) => flags.insert(format!("-{}", v.trim_matches('\''))),
                None if item == "long" => flags.insert(format!("--{}", kebab(field))),
                None if item == "short" => flags.insert(format!("-{}", &field[..1])),
                _ => false,
            };
        }
    }
    flags
}

fn cli_definition() -> CliDefinition {
    let src = read(&repo().join("crates/vmoat/src/cli.rs"));
    let commands = enum_variants(&src, "Command");

    CliDefinition {
        hidden: commands
            .iter()
            .filter(|c| c.1)
            .map(|c| c.0.clone())
            .collect(),
        commands: commands.into_iter().filter(|c| !c.1).map(|c| c.0).collect(),
        image_commands: enum_variants(&src, "ImageCommand")
            .into_iter()
            .map(|c| c.0)
            .collect(),
        flags: declared_flags(&src),
    }
}

/// The code in a Markdown file: fenced blocks whole, and inline `spans`.
fn code_spans(markdown: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut fenced = false;

    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            spans.push(line.to_string());
            continue;
        }
        spans.extend(line.split('`').skip(1).step_by(2).map(String::from));
    }
    spans
}

/// Checks every `vmoat …` invocation in `markdown` against the CLI and returns the commands
/// it uses; panics naming the first invocation with an unknown command or option.
fn check_invocations(file: &str, markdown: &str, cli: &CliDefinition) -> BTreeSet<String> {
    let mut used = BTreeSet::new();

    for span in code_spans(markdown) {
        let tokens: Vec<&str> = span.split_whitespace().collect();
        for start in tokens
            .iter()
            .enumerate()
            .filter(|t| *t.1 == "vmoat")
            .map(|t| t.0)
        {
            let mut rest = tokens[start + 1..].iter().copied();

            let mut command = None;
            while let Some(token) = rest.next() {
                if !token.starts_with('-') {
                    command = Some(token);
                    break;
                }
                assert!(
                    cli.flags.contains(token),
                    "{file}: `{span}`: no option {token}"
                );
                if token == "-C" || token == "--directory" {
                    rest.next();
                }
            }
            let Some(command) = command else { continue };
            if command.starts_with('<') || command.starts_with('$') {
                continue;
            }

            assert!(
                cli.commands.contains(command),
                "{file}: `{span}`: vmoat has no command {command:?} (it has {:?})",
                cli.commands
            );
            used.insert(command.to_string());

            // Arguments of test and ssh belong to the command run in the VM.
            if command == "test" || command == "ssh" {
                continue;
            }
            let mut subcommand_seen = command != "image";
            for token in rest {
                if !subcommand_seen && !token.starts_with(['-', '<', '[']) {
                    subcommand_seen = true;
                    for sub in token.split('|') {
                        assert!(cli.image_commands.contains(sub), "{file}: no image {sub}");
                    }
                } else if token.starts_with('-') {
                    assert!(
                        cli.flags.contains(token),
                        "{file}: `{span}`: no option {token}"
                    );
                }
            }
        }
    }
    used
}

#[test]
fn the_cli_definition_is_read_whole() {
    let cli = cli_definition();

    for command in [
        "up", "test", "tunnel", "untunnel", "down", "destroy", "image", "version",
    ] {
        assert!(
            cli.commands.contains(command),
            "cli.rs parse lost {command}"
        );
    }
    assert!(cli.hidden.contains("agent") && !cli.commands.contains("agent"));
    assert_eq!(
        cli.image_commands,
        ["build", "list", "prune", "rm"].map(String::from).into()
    );
    for flag in [
        "--json",
        "-C",
        "--directory",
        "-v",
        "--quiet",
        "-f",
        "--keep-failed",
    ] {
        assert!(cli.flags.contains(flag), "cli.rs parse lost {flag}");
    }
}

#[test]
fn skill_and_command_name_only_real_commands_and_options() {
    let cli = cli_definition();
    let skill = read(&skill_path());
    let used = check_invocations("SKILL.md", &skill, &cli);

    let missing: Vec<_> = cli.commands.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "SKILL.md never shows `vmoat` with {missing:?}"
    );
    for hidden in &cli.hidden {
        assert!(
            !used.contains(hidden),
            "SKILL.md shows the internal command {hidden}"
        );
    }

    check_invocations("commands/vmoat.md", &read(&command_path()), &cli);
    check_invocations(
        "plugin/README.md",
        &read(&repo().join("plugin/README.md")),
        &cli,
    );
}

#[test]
fn skill_says_what_to_do_on_every_exit_code() {
    let exit_rs = read(&repo().join("crates/vmoat/src/exit.rs"));
    let help = exit_rs
        .split("pub const EXIT_CODES_HELP")
        .nth(1)
        .and_then(|s| s.split("\";").next())
        .expect("exit.rs has EXIT_CODES_HELP");
    let codes: BTreeSet<u8> = help
        .lines()
        .filter_map(|l| {
            l.strip_prefix("  ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(codes, (0..=6).collect(), "spec.md lists exit codes 0 to 6");

    let skill = read(&skill_path());
    let rows: BTreeSet<u8> = skill
        .lines()
        .filter_map(|l| {
            l.strip_prefix("| ")?
                .split(" |")
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        rows, codes,
        "SKILL.md's exit-code table must have one row per code"
    );

    assert!(skill.contains("destroy -f") && skill.contains("Never run `vmoat destroy`"));
    assert!(skill.contains("--json") && skill.contains("vmoat.conf"));
}

// ---------------------------------------------------------------------------------------------
// The launcher
// ---------------------------------------------------------------------------------------------

/// Directories every launcher run gets on PATH after the test's own: the shell tools the
/// launcher needs, and no vmoat.
const SYSTEM_PATH: &str = "/usr/bin:/bin";

/// How long any launcher run may take before the test calls it a hang (a loop on itself).
const HANG: Duration = Duration::from_secs(20);

/// A fake `vmoat` that reports who it is, its pid, its working directory, its arguments and
/// (with FAKE_READ_STDIN=1) its stdin, then exits with FAKE_EXIT (or sleeps, with
/// FAKE_SLEEP=1, as the same process so signals reach it).
fn fake_vmoat(tag: &str) -> String {
    format!(
        r#"#!/bin/sh
echo "tag={tag}"
echo "pid=$$"
echo "cwd=$(pwd -P)"
for arg in "$@"; do printf 'arg=[%s]\n' "$arg"; done
if [ "${{FAKE_READ_STDIN:-}}" = 1 ]; then
    while IFS= read -r line; do printf 'stdin=[%s]\n' "$line"; done
fi
if [ "${{FAKE_SLEEP:-}}" = 1 ]; then exec sleep 30; fi
exit "${{FAKE_EXIT:-0}}"
"#
    )
}

/// A fake `cargo` that logs its arguments to FAKE_CARGO_LOG, can hang (FAKE_CARGO_HANG=1,
/// pid in FAKE_CARGO_PIDFILE), sleep (FAKE_CARGO_SLEEP) or fail (FAKE_CARGO_EXIT), and
/// otherwise "builds" a fake vmoat where cargo would put the release binary.
const FAKE_CARGO: &str = r#"#!/bin/sh
printf '%s\n' "$*" >>"$FAKE_CARGO_LOG"
if [ -n "${FAKE_CARGO_PIDFILE:-}" ]; then echo "$$" >"$FAKE_CARGO_PIDFILE"; fi
if [ "${FAKE_CARGO_HANG:-}" = 1 ]; then exec sleep 60; fi
sleep "${FAKE_CARGO_SLEEP:-0}"
if [ "${FAKE_CARGO_EXIT:-0}" != 0 ]; then
    echo "error: fake failure" >&2
    exit "$FAKE_CARGO_EXIT"
fi
while [ $# -gt 0 ]; do
    if [ "$1" = --manifest-path ]; then manifest=$2; shift; fi
    shift
done
target=${CARGO_TARGET_DIR:-$(dirname "$manifest")/target}
mkdir -p "$target/release"
cp "$FAKE_CARGO_PRODUCT" "$target/release/vmoat.part"
mv "$target/release/vmoat.part" "$target/release/vmoat"
"#;

fn write_executable(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A temporary world for the launcher: an empty HOME, room for fake binaries, and ways to
/// place the plugin inside or outside a checkout.
struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        for system_dir in SYSTEM_PATH.split(':') {
            assert!(
                !Path::new(system_dir).join("vmoat").exists(),
                "{system_dir}/vmoat exists; these tests need a host without vmoat there"
            );
        }
        let sandbox = Sandbox {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        fs::create_dir_all(sandbox.home()).expect("mkdir home");
        sandbox
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// A copy of the plugin at REL, whose parent is no checkout; returns its launcher and the
    /// launcher's directory.
    fn plugin_outside_checkout(&self, rel: &str) -> (PathBuf, PathBuf) {
        let plugin = self.path(rel);
        copy_tree(&repo().join("plugin"), &plugin);
        (plugin.join("bin/vmoat"), plugin.join("bin"))
    }

    /// A minimal checkout of the vmoat workspace around a copy of the plugin; returns the
    /// checkout root, its launcher and the launcher's directory.
    fn checkout(&self) -> (PathBuf, PathBuf, PathBuf) {
        let root = self.path("checkout");
        fs::create_dir_all(root.join("crates/vmoat")).expect("mkdir");
        fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\"crates/vmoat\"]\n",
        )
        .expect("write");
        fs::write(
            root.join("crates/vmoat/Cargo.toml"),
            "[package]\nname = \"vmoat\"\n",
        )
        .expect("write");
        copy_tree(&repo().join("plugin"), &root.join("plugin"));
        (
            root.clone(),
            root.join("plugin/bin/vmoat"),
            root.join("plugin/bin"),
        )
    }

    /// A fake cargo plus the fake vmoat it "builds"; returns the env that selects them, with
    /// `extra` added.
    fn fake_cargo(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let cargo = self.path("tools/cargo");
        let product = self.path("tools/built-vmoat");
        write_executable(&cargo, FAKE_CARGO);
        write_executable(&product, &fake_vmoat("built"));

        let mut vars = env(&[
            ("VMOAT_CARGO", &cargo.display().to_string()),
            ("FAKE_CARGO_LOG", &self.cargo_log().display().to_string()),
            ("FAKE_CARGO_PRODUCT", &product.display().to_string()),
        ]);
        vars.extend(env(extra));
        vars
    }

    fn cargo_log(&self) -> PathBuf {
        self.path("cargo.log")
    }

    /// Lines the fake cargo logged, one per run.
    fn cargo_runs(&self) -> Vec<String> {
        fs::read_to_string(self.cargo_log())
            .map(|log| log.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// The launcher as a command with a clean environment: HOME, PATH (`path_dirs` first, then
    /// the system dirs) and `env`, run from the sandbox, its stdio on /dev/null.
    fn launcher(
        &self,
        launcher: &Path,
        path_dirs: &[impl AsRef<Path>],
        env: &[(String, String)],
    ) -> Command {
        self.launcher_in(None, launcher, path_dirs, env)
    }

    /// As [`Sandbox::launcher`], run by `shell` (a path) instead of its `#!` line.
    fn launcher_in(
        &self,
        shell: Option<&str>,
        launcher: &Path,
        path_dirs: &[impl AsRef<Path>],
        env: &[(String, String)],
    ) -> Command {
        let mut path: Vec<String> = path_dirs
            .iter()
            .map(|d| d.as_ref().display().to_string())
            .collect();
        path.push(SYSTEM_PATH.to_string());

        let mut cmd = match shell {
            None => Command::new(launcher),
            Some(shell) => {
                let mut cmd = Command::new(shell);
                if shell.ends_with("busybox") {
                    cmd.arg("sh");
                }
                cmd.arg(launcher);
                cmd
            }
        };
        cmd.env_clear()
            .env("HOME", self.home())
            .env("PATH", path.join(":"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }
}

/// A child process that is killed (by its pid, which this test started) if the test ends
/// before it does.
struct Reaped(Child);

impl Reaped {
    /// Spawns `cmd`.
    fn spawn(cmd: &mut Command) -> Reaped {
        Reaped(cmd.spawn().expect("spawn the launcher"))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What a launcher run produced.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The values of `key=` lines the fake vmoat printed, in order.
    fn values(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix).map(String::from))
            .collect()
    }
}

/// Runs `cmd` with `stdin` piped in, failing the test if it outlives HANG.
fn run(mut cmd: Command, stdin: &[u8]) -> Run {
    cmd.stderr(Stdio::piped());
    let mut child = Reaped::spawn(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()));

    let mut input = child.0.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let stdout = drain(child.0.stdout.take().expect("stdout"));
    let stderr = drain(child.0.stderr.take().expect("stderr"));

    let status = wait_for_exit(&mut child.0, "the launcher ends (or it loops)");
    writer.join().expect("stdin writer");
    Run {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// True while a process with this pid exists.
fn alive(pid: u32) -> bool {
    Command::new("sh")
        .args(["-c", "kill -0 \"$1\" 2>/dev/null", "sh", &pid.to_string()])
        .status()
        .expect("sh")
        .success()
}

fn send_term(pid: u32) {
    let status = Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh", &pid.to_string()])
        .status()
        .expect("sh");
    assert!(status.success(), "could not signal pid {pid}");
}

/// Waits for `child` to end, failing the test after HANG.
fn wait_for_exit(child: &mut Child, what: &str) -> ExitStatus {
    let mut status = None;
    wait_until(what, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    status.expect("ended")
}

/// Polls `done` until it holds, failing the test after HANG.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// How to run the launcher: by its `#!/bin/sh` line (`None`), then by each POSIX shell
/// this host has, so a construct one of them lacks fails here.
fn shells() -> Vec<Option<String>> {
    let mut shells = vec![None];
    for shell in ["dash", "bash", "busybox", "mksh", "ksh"] {
        let found = Command::new("sh")
            .args(["-c", "command -v \"$1\"", "sh", shell])
            .output()
            .expect("sh");
        if found.status.success() {
            shells.push(Some(
                String::from_utf8_lossy(&found.stdout).trim().to_string(),
            ));
        }
    }
    shells
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn runs_vmoat_from_path_with_args_stdin_and_status_unchanged() {
    let sb = Sandbox::new();
    let (launcher, plugin_bin) = sb.plugin_outside_checkout("plugin");
    write_executable(&sb.path("installed/vmoat"), &fake_vmoat("path"));
    let worktree = sb.path("work tree");
    fs::create_dir_all(&worktree).expect("mkdir");

    let argv = ["test", "--name", "two words", "", "*", "$HOME", "-k x"];
    let env = env(&[("FAKE_EXIT", "7"), ("FAKE_READ_STDIN", "1")]);
    let path = [plugin_bin, sb.path("installed")];
    let cwd = worktree.canonicalize().expect("canonical");

    for shell in shells() {
        let mut cmd = sb.launcher_in(shell.as_deref(), &launcher, &path, &env);
        cmd.args(argv).current_dir(&worktree);
        let out = run(cmd, b"first line\n  second line\n");
        let shell = shell.unwrap_or_else(|| "#!/bin/sh".into());

        assert_eq!(
            out.status.code(),
            Some(7),
            "{shell}: exit status; stderr: {}",
            out.stderr
        );
        assert_eq!(
            out.values("tag"),
            ["path"],
            "{shell}: ran the vmoat on PATH"
        );
        assert_eq!(
            out.values("arg"),
            argv.map(|a| format!("[{a}]")),
            "{shell}: arguments"
        );
        let stdin = out.values("stdin");
        assert_eq!(stdin, ["[first line]", "[  second line]"], "{shell}: stdin");
        assert_eq!(
            out.values("cwd"),
            [cwd.display().to_string()],
            "{shell}: cwd"
        );
        assert_eq!(
            out.stderr, "",
            "{shell}: the launcher says nothing when vmoat is found"
        );
    }
}

#[test]
fn runs_vmoat_from_cargo_bin_when_none_is_on_path() {
    let sb = Sandbox::new();
    let (launcher, plugin_bin) = sb.plugin_outside_checkout("plugin");
    write_executable(
        &sb.home().join(".cargo/bin/vmoat"),
        &fake_vmoat("cargo-bin"),
    );

    let mut cmd = sb.launcher(&launcher, &[&plugin_bin], &[]);
    cmd.args(["status", "--json"]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(out.values("tag"), ["cargo-bin"]);
    assert_eq!(out.values("arg"), ["[status]", "[--json]"]);

    // CARGO_HOME, when set, is where cargo installs: it comes before ~/.cargo.
    write_executable(&sb.path("cargo-home/bin/vmoat"), &fake_vmoat("cargo-home"));
    let cargo_home = sb.path("cargo-home").display().to_string();
    let env = env(&[("CARGO_HOME", &cargo_home)]);
    let out = run(sb.launcher(&launcher, &[&plugin_bin], &env), b"");
    assert_eq!(out.values("tag"), ["cargo-home"]);

    // A vmoat on PATH comes before both.
    write_executable(&sb.path("installed/vmoat"), &fake_vmoat("path"));
    let out = run(
        sb.launcher(&launcher, &[plugin_bin, sb.path("installed")], &env),
        b"",
    );
    assert_eq!(out.values("tag"), ["path"]);
}

#[test]
fn never_runs_itself_a_link_to_itself_or_a_copy_of_itself() {
    let sb = Sandbox::new();
    let (launcher, plugin_bin) = sb.plugin_outside_checkout("plugin");

    // Another install of the plugin, and a link like `ln -s …/plugin/bin/vmoat ~/bin/vmoat`,
    // both on PATH, and both again in ~/.cargo/bin.
    let (other, other_bin) = sb.plugin_outside_checkout("other-plugin");
    fs::create_dir_all(sb.path("links")).expect("mkdir");
    symlink(&launcher, sb.path("links/vmoat")).expect("symlink");
    fs::create_dir_all(sb.home().join(".cargo/bin")).expect("mkdir");
    symlink(&other, sb.home().join(".cargo/bin/vmoat")).expect("symlink");
    let path = [plugin_bin, sb.path("links"), other_bin];

    let out = run(sb.launcher(&launcher, &path, &[]), b"");
    assert_eq!(
        out.status.code(),
        Some(5),
        "stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("no vmoat binary"),
        "stderr: {}",
        out.stderr
    );

    // Through the link, too: the launcher resolves its own path first.
    let out = run(sb.launcher(&sb.path("links/vmoat"), &path, &[]), b"");
    assert_eq!(out.status.code(), Some(5), "stderr: {}", out.stderr);

    // Without its marker line, the launcher still knows itself and links to itself by their
    // resolved paths.
    let (unmarked, unmarked_bin) = sb.plugin_outside_checkout("unmarked");
    let text = read(&unmarked).replacen("# vmoat-plugin-launcher:", "# launcher:", 1);
    write_executable(&unmarked, &text);
    symlink(&unmarked, sb.path("links/vmoat-unmarked")).expect("symlink");
    fs::create_dir_all(sb.path("unmarked-link")).expect("mkdir");
    symlink(
        sb.path("links/vmoat-unmarked"),
        sb.path("unmarked-link/vmoat"),
    )
    .expect("symlink");
    let unmarked_path = [unmarked_bin, sb.path("unmarked-link")];
    let out = run(sb.launcher(&unmarked, &unmarked_path, &[]), b"");
    assert_eq!(out.status.code(), Some(5), "stderr: {}", out.stderr);

    // And with a real vmoat after all of them, that one runs.
    write_executable(&sb.path("installed/vmoat"), &fake_vmoat("path"));
    let mut path = path.to_vec();
    path.push(sb.path("installed"));
    let out = run(sb.launcher(&launcher, &path, &[]), b"");
    assert_eq!(out.values("tag"), ["path"], "stderr: {}", out.stderr);
}

#[test]
fn outside_a_checkout_without_vmoat_says_how_to_install_and_exits_5() {
    let sb = Sandbox::new();
    let (launcher, plugin_bin) = sb.plugin_outside_checkout("plugin");

    let mut cmd = sb.launcher(&launcher, &[plugin_bin], &sb.fake_cargo(&[]));
    cmd.arg("up");
    let out = run(cmd, b"");

    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, "", "instructions go to stderr, never stdout");
    for needle in [
        "no vmoat binary on PATH or in ~/.cargo/bin",
        "is not in a vmoat checkout",
        "cargo install --locked --git https://github.com/voycey/vmoat vmoat",
        "cargo install --locked --path crates/vmoat",
    ] {
        assert!(
            out.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            out.stderr
        );
    }
    assert!(
        sb.cargo_runs().is_empty(),
        "nothing to build outside a checkout"
    );
}

#[test]
fn in_a_checkout_builds_once_then_runs_the_build() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();
    let env = sb.fake_cargo(&[]);

    let mut cmd = sb.launcher(&launcher, &[&plugin_bin], &env);
    cmd.args(["tunnel", "8080", "a b"]);
    let first = run(cmd, b"");
    assert!(first.status.success(), "stderr: {}", first.stderr);
    assert_eq!(first.values("tag"), ["built"]);
    assert_eq!(first.values("arg"), ["[tunnel]", "[8080]", "[a b]"]);
    let manifest = root.join("Cargo.toml");
    assert_eq!(
        sb.cargo_runs(),
        [format!(
            "build --release -p vmoat --manifest-path {}",
            manifest.display()
        )]
    );
    assert!(
        first.stderr.contains("building vmoat in"),
        "progress: {}",
        first.stderr
    );
    assert!(root.join("target/release/vmoat").is_file());
    assert!(
        !root.join("target/vmoat-launcher-build.lock").exists(),
        "lock released"
    );

    let mut cmd = sb.launcher(&launcher, &[plugin_bin], &env);
    cmd.args(["status"]);
    let second = run(cmd, b"");
    assert!(second.status.success());
    assert_eq!(second.values("tag"), ["built"]);
    assert_eq!(sb.cargo_runs().len(), 1, "the second run builds nothing");
    assert_eq!(second.stderr, "", "and says nothing");
}

#[test]
fn in_a_checkout_honours_cargo_target_dir() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();
    let elsewhere = sb.path("elsewhere").display().to_string();
    let env = sb.fake_cargo(&[("CARGO_TARGET_DIR", &elsewhere)]);

    let out = run(sb.launcher(&launcher, &[plugin_bin], &env), b"");
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(out.values("tag"), ["built"]);
    assert!(sb.path("elsewhere/release/vmoat").is_file());
    assert!(!root.join("target").exists());
}

#[test]
fn launchers_started_together_build_once() {
    let sb = Sandbox::new();
    let (_root, launcher, plugin_bin) = sb.checkout();
    let env = sb.fake_cargo(&[("FAKE_CARGO_SLEEP", "2")]);

    let runs: Vec<_> = (0..3)
        .map(|i| {
            let mut cmd = sb.launcher(&launcher, &[&plugin_bin], &env);
            cmd.arg(format!("agent-{i}"));
            thread::spawn(move || run(cmd, b""))
        })
        .collect();

    for (i, handle) in runs.into_iter().enumerate() {
        let out = handle.join().expect("launcher thread");
        assert!(out.status.success(), "launcher {i}: {}", out.stderr);
        assert_eq!(out.values("tag"), ["built"]);
        assert_eq!(out.values("arg"), [format!("[agent-{i}]")]);
    }
    assert_eq!(sb.cargo_runs().len(), 1, "one build for three launchers");
}

#[test]
fn a_failed_build_exits_5_and_leaves_no_lock() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();
    let mut env = sb.fake_cargo(&[("FAKE_CARGO_EXIT", "101")]);

    let out = run(sb.launcher(&launcher, &[&plugin_bin], &env), b"");
    assert_eq!(out.status.code(), Some(5));
    assert!(
        out.stderr.contains("error: fake failure"),
        "cargo's errors: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("cargo exited with 101"),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
    assert!(!root.join("target/vmoat-launcher-build.lock").exists());

    env.retain(|(k, _)| k != "FAKE_CARGO_EXIT");
    let out = run(sb.launcher(&launcher, &[plugin_bin], &env), b"");
    assert!(out.status.success(), "the next run builds: {}", out.stderr);
    assert_eq!(sb.cargo_runs().len(), 2);
}

#[test]
fn a_lock_left_by_a_dead_launcher_is_taken_over() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();

    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("wait true");
    fs::create_dir_all(root.join("target")).expect("mkdir");
    symlink(
        format!("pid-{dead_pid}"),
        root.join("target/vmoat-launcher-build.lock"),
    )
    .expect("symlink");

    let out = run(
        sb.launcher(&launcher, &[plugin_bin], &sb.fake_cargo(&[])),
        b"",
    );
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(out.values("tag"), ["built"]);
    assert_eq!(sb.cargo_runs().len(), 1);
}

#[test]
fn a_build_under_way_is_waited_for_even_when_its_binary_exists() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();
    let env = sb.fake_cargo(&[]);
    write_executable(&root.join("target/release/vmoat"), &fake_vmoat("built"));

    // A live process holds the lock, as a launcher that has built but not yet signed would.
    let mut holder = Reaped::spawn(Command::new("sleep").arg("30"));
    let lock = root.join("target/vmoat-launcher-build.lock");
    symlink(format!("pid-{}", holder.0.id()), &lock).expect("symlink");

    let cmd = sb.launcher(&launcher, &[&plugin_bin], &env);
    let waiting = thread::spawn(move || run(cmd, b""));
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !waiting.is_finished(),
        "the launcher ran vmoat while a build held the lock"
    );

    fs::remove_file(&lock).expect("release the lock");
    let out = waiting.join().expect("launcher thread");
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(out.values("tag"), ["built"]);
    assert!(
        out.stderr.contains("waiting for launcher pid"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        sb.cargo_runs().is_empty(),
        "the build it waited for is used as it is"
    );
    holder.0.kill().expect("end the lock holder");
}

#[test]
fn a_signal_during_the_build_stops_cargo_and_frees_the_lock() {
    let sb = Sandbox::new();
    let (root, launcher, plugin_bin) = sb.checkout();
    let pidfile = sb.path("cargo.pid");
    let pidfile_var = pidfile.display().to_string();
    let env = sb.fake_cargo(&[
        ("FAKE_CARGO_HANG", "1"),
        ("FAKE_CARGO_PIDFILE", &pidfile_var),
    ]);

    let mut launcher_proc = Reaped::spawn(&mut sb.launcher(&launcher, &[plugin_bin], &env));

    wait_until("the fake cargo runs", || {
        fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
    });
    let cargo_pid: u32 = read(&pidfile).trim().parse().expect("pid");
    let guard_cargo = KillOnDrop(cargo_pid);

    send_term(launcher_proc.0.id());
    let status = wait_for_exit(&mut launcher_proc.0, "the launcher ends on SIGTERM");

    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    wait_until("the fake cargo is gone", || !alive(cargo_pid));
    assert!(
        !root.join("target/vmoat-launcher-build.lock").exists(),
        "lock freed"
    );
    drop(guard_cargo);
}

/// Sends SIGTERM on drop to a process this test started, if it still runs.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            send_term(self.0);
        }
    }
}

#[test]
fn vmoat_replaces_the_launcher_so_signals_reach_it() {
    let sb = Sandbox::new();
    let (launcher, plugin_bin) = sb.plugin_outside_checkout("plugin");
    write_executable(&sb.path("installed/vmoat"), &fake_vmoat("path"));
    let env = env(&[("FAKE_SLEEP", "1")]);

    let mut cmd = sb.launcher(&launcher, &[plugin_bin, sb.path("installed")], &env);
    let mut proc = Reaped::spawn(cmd.arg("ssh").stdout(Stdio::piped()));

    let mut lines = BufReader::new(proc.0.stdout.take().expect("stdout")).lines();
    let pid_line = lines
        .find_map(|l| {
            l.ok()
                .and_then(|l| l.strip_prefix("pid=").map(String::from))
        })
        .expect("the fake vmoat prints its pid");
    assert_eq!(
        pid_line,
        proc.0.id().to_string(),
        "exec: vmoat runs as the launcher's pid"
    );

    send_term(proc.0.id());
    let status = proc.0.wait().expect("wait");
    assert_eq!(
        status.signal(),
        Some(15),
        "SIGTERM reached vmoat: {status:?}"
    );
}

#[test]
fn in_this_repository_builds_with_cargo_from_the_workspace_root() {
    let sb = Sandbox::new();
    let plugin_bin = repo().join("plugin/bin");
    let launcher = plugin_bin.join("vmoat");
    let target = sb.path("target").display().to_string();
    let env = sb.fake_cargo(&[("CARGO_TARGET_DIR", &target)]);

    let mut cmd = sb.launcher(&launcher, &[plugin_bin], &env);
    cmd.arg("version");
    let out = run(cmd, b"");

    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(out.values("tag"), ["built"]);
    let manifest = repo().canonicalize().expect("canonical").join("Cargo.toml");
    assert_eq!(
        sb.cargo_runs(),
        [format!(
            "build --release -p vmoat --manifest-path {}",
            manifest.display()
        )]
    );
    assert!(sb.path("target/release/vmoat").is_file());
}
