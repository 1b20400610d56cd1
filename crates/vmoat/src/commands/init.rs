//! `vmoat init`: writes a commented `vmoat.conf` at the worktree root with the detected
//! `CMD_UP` and the ports the compose file publishes, every other key as a commented line with
//! its default and meaning, and makes sure `.gitignore` ignores `vmoat.local.conf`.
//!
//! It never overwrites a config without `-f`, and prints the path it wrote on stdout.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use vmoat_config::{BASE_FILE, KEYS, KeySpec, LOCAL_FILE, PortScan};

use crate::cli::InitArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit, WithExit};
use crate::output;

/// Comment lines are wrapped at this width.
const WIDTH: usize = 88;

/// Runs the command.
pub fn run(ctx: &Context, args: InitArgs) -> CmdResult {
    let worktree = vmoat_worktree::discover(&ctx.directory).exit_with(Exit::Usage)?;
    let path = worktree.root.join(BASE_FILE);

    // symlink_metadata: a dangling link is a file too, and overwriting it needs -f as well.
    if path.symlink_metadata().is_ok() && !args.force {
        return Err(CodedError::msg(
            Exit::Usage,
            format!("{} already exists; pass -f to overwrite it", path.display()),
        ));
    }

    let text = template(&worktree.root);
    std::fs::write(&path, text)
        .with_context(|| format!("cannot write {}", path.display()))
        .exit_with(Exit::Failed)?;
    tracing::info!("wrote {}", path.display());

    let added = ensure_ignored(&worktree.root)
        .with_context(|| {
            format!(
                "cannot update {}",
                worktree.root.join(".gitignore").display()
            )
        })
        .exit_with(Exit::Failed)?;
    if let Some(gitignore) = added
        && !ctx.quiet
    {
        output::notice(format!("added {LOCAL_FILE} to {}", gitignore.display()));
    }

    output::line(path.display().to_string());
    Ok(Exit::Ok)
}

/// The text of a new `vmoat.conf` for the worktree at `root`.
fn template(root: &Path) -> String {
    let mut text = String::new();
    comment(
        &mut text,
        "vmoat.conf: how vmoat runs this worktree in its own VM. It is bash, read by bash \
         (KEY=\"value\", KEY=(a b c), $HOME and $(...) work), committed with the project. \
         Per-worktree changes go in vmoat.local.conf beside it, which git ignores. Every key \
         is optional: a commented line shows an example, and the default is said above it.",
    );

    let detected = vmoat_config::detect_cmd_up(root);
    let ports = vmoat_config::detect_ports(root);
    for spec in KEYS {
        text.push('\n');
        comment(
            &mut text,
            &format!(
                "{}: {}. Default: {}.",
                spec.name, spec.meaning, spec.default
            ),
        );
        match spec.name {
            "CMD_UP" => match &detected {
                Some(found) => {
                    comment(&mut text, &format!("Detected from {}.", found.file));
                    let _ = writeln!(text, "CMD_UP={}", bash_quote(&found.command));
                }
                None => {
                    comment(
                        &mut text,
                        "Nothing was detected (no compose file, no Makefile rule `up:`, no \
                         package.json script `dev`): set the command that starts the stack.",
                    );
                    example(&mut text, spec);
                }
            },
            "EXPOSE_PORTS" => expose_ports(&mut text, spec, ports.as_ref()),
            _ => example(&mut text, spec),
        }
    }
    text
}

/// The `EXPOSE_PORTS` lines: the ports the compose file publishes, and what could not be
/// read for certain as comments.
fn expose_ports(text: &mut String, spec: &KeySpec, scan: Option<&PortScan>) {
    let Some(scan) = scan else {
        example(text, spec);
        return;
    };

    if scan.ports.is_empty() {
        comment(text, &format!("{} publishes no fixed port.", scan.file));
        example(text, spec);
    } else {
        let listed: Vec<String> = scan
            .ports
            .iter()
            .map(|p| format!("{} ({})", p.port, p.service))
            .collect();
        comment(
            text,
            &format!("Published in {}: {}.", scan.file, listed.join(", ")),
        );
        let ports: Vec<String> = scan.ports.iter().map(|p| p.port.to_string()).collect();
        let _ = writeln!(text, "EXPOSE_PORTS=({})", ports.join(" "));
    }
    if !scan.unsure.is_empty() {
        comment(
            text,
            "Not read for certain (add these ports by hand if you need them):",
        );
        for unsure in &scan.unsure {
            comment(text, &format!("  {unsure}"));
        }
    }
}

/// A commented example line for `spec`.
fn example(text: &mut String, spec: &KeySpec) {
    let _ = writeln!(text, "# {}={}", spec.name, spec.example);
}

/// Appends `words` as `# ` comment lines wrapped at [`WIDTH`], each indented like the text.
fn comment(text: &mut String, words: &str) {
    let indent = &words[..words.len() - words.trim_start_matches(' ').len()];
    let room = WIDTH - "# ".len() - indent.len();
    let mut line = String::new();
    for word in words.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > room {
            let _ = writeln!(text, "# {indent}{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    let _ = writeln!(text, "# {indent}{line}");
}

/// `value` quoted for bash: in double quotes when nothing in it is special there, else in
/// single quotes.
fn bash_quote(value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " _-./:=,@+%".contains(c));
    if plain {
        format!("\"{value}\"")
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Adds `vmoat.local.conf` to the worktree's `.gitignore` unless a line there already ignores
/// it, creating the file if needed and keeping its line endings. Returns the file when it was
/// changed.
fn ensure_ignored(root: &Path) -> io::Result<Option<PathBuf>> {
    let path = root.join(".gitignore");
    let existing = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err),
    };
    let text = String::from_utf8_lossy(&existing);
    if ignores(&text, LOCAL_FILE) {
        return Ok(None);
    }

    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut addition = String::new();
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        addition.push_str(newline);
    }
    addition.push_str(LOCAL_FILE);
    addition.push_str(newline);

    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(addition.as_bytes())?;
    Ok(Some(path))
}

/// Whether the lines of a root `.gitignore` ignore the file `name` at the root, with git's
/// rules: the last matching pattern wins, `!` re-includes, a trailing `/` matches directories
/// only, a pattern with a `/` before its end is anchored at the root.
fn ignores(gitignore: &str, name: &str) -> bool {
    let mut ignored = false;
    for line in gitignore.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = trim_unescaped_trailing_spaces(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }

        let (negated, pattern) = match line.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, line.strip_prefix('\\').unwrap_or(line)),
        };
        if pattern.ends_with('/') {
            continue;
        }
        let pattern = pattern
            .strip_prefix("**/")
            .or_else(|| pattern.strip_prefix('/'))
            .unwrap_or(pattern);
        if glob(pattern.as_bytes(), name.as_bytes()) {
            ignored = !negated;
        }
    }
    ignored
}

fn trim_unescaped_trailing_spaces(line: &str) -> &str {
    let mut end = line.len();
    while end > 0 && line.as_bytes()[end - 1] == b' ' {
        if end >= 2 && line.as_bytes()[end - 2] == b'\\' {
            break;
        }
        end -= 1;
    }
    &line[..end]
}

/// gitignore glob matching of one path component: `*`, `?`, `[…]` (with `!`/`^` and ranges)
/// and `\` escapes; `/` is never matched by a wildcard.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len())
            .take_while(|&skip| skip == 0 || name[skip - 1] != b'/')
            .any(|skip| glob(rest, &name[skip..])),
        Some((b'?', rest)) => {
            matches!(name.split_first(), Some((c, tail)) if *c != b'/' && glob(rest, tail))
        }
        Some((b'[', rest)) => match (class(rest), name.split_first()) {
            (Some((matches, after)), Some((c, tail))) => matches(*c) && glob(after, tail),
            (None, Some((b'[', tail))) => glob(rest, tail),
            _ => false,
        },
        Some((b'\\', [escaped, rest @ ..])) => {
            matches!(name.split_first(), Some((c, tail)) if c == escaped && glob(rest, tail))
        }
        Some((literal, rest)) => {
            matches!(name.split_first(), Some((c, tail)) if c == literal && glob(rest, tail))
        }
    }
}

/// A `[…]` class after its `[`: a test for one byte and the pattern after the `]`, or `None`
/// when the class is not closed (the `[` is then literal).
fn class(pattern: &[u8]) -> Option<(impl Fn(u8) -> bool, &[u8])> {
    let (negated, body) = match pattern.first() {
        Some(b'!' | b'^') => (true, &pattern[1..]),
        _ => (false, pattern),
    };
    // A `]` right at the start is a member, not the end.
    let close = body.iter().skip(1).position(|b| *b == b']')? + 1;
    let members = body[..close].to_vec();
    let test = move |c: u8| {
        let mut hit = false;
        let mut i = 0;
        while i < members.len() {
            if i + 2 < members.len() && members[i + 1] == b'-' {
                hit |= (members[i]..=members[i + 2]).contains(&c);
                i += 3;
            } else {
                hit |= members[i] == c;
                i += 1;
            }
        }
        hit != negated
    };
    Some((test, &body[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignore_patterns() {
        let yes = |text: &str| assert!(ignores(text, "vmoat.local.conf"), "{text:?}");
        let no = |text: &str| assert!(!ignores(text, "vmoat.local.conf"), "{text:?}");

        yes("vmoat.local.conf\n");
        yes("/vmoat.local.conf");
        yes("target/\n*.local.conf\r\n");
        yes("vmoat.local.*");
        yes("**/vmoat.local.conf");
        yes("vmoat.[lL]ocal.conf");
        yes("vmoat.?ocal.conf  ");
        yes("*");
        yes("vmoat.local.conf\n!other\n");

        no("");
        no("# vmoat.local.conf\n");
        no("vmoat.conf\nvmoat.local.conf.bak\n");
        no("vmoat.local.conf/\n");
        no("sub/vmoat.local.conf\n");
        no("*.conf\n!vmoat.local.conf\n");
        no("vmoat.[!l]ocal.conf");
        no("vmoat.local.conf\\ \n");
    }

    #[test]
    fn globs() {
        assert!(glob(b"a*b", b"ab"));
        assert!(glob(b"a*b", b"axxb"));
        assert!(!glob(b"a*b", b"a/b"));
        assert!(glob(b"[a-c]x", b"bx"));
        assert!(!glob(b"[a-c]x", b"dx"));
        assert!(glob(b"[]]", b"]"));
        assert!(glob(b"[ab", b"[ab"));
        assert!(glob(b"\\*", b"*"));
        assert!(!glob(b"\\*", b"x"));
    }

    fn gitignore_after(existing: Option<&str>) -> (String, bool) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = existing {
            std::fs::write(dir.path().join(".gitignore"), text).unwrap();
        }
        let added = ensure_ignored(dir.path()).unwrap().is_some();
        let text = std::fs::read_to_string(dir.path().join(".gitignore")).unwrap();
        (text, added)
    }

    #[test]
    fn gitignore_is_created_or_appended_once() {
        assert_eq!(gitignore_after(None), ("vmoat.local.conf\n".into(), true));
        assert_eq!(
            gitignore_after(Some("")),
            ("vmoat.local.conf\n".into(), true)
        );
        assert_eq!(
            gitignore_after(Some("target")),
            ("target\nvmoat.local.conf\n".into(), true)
        );
        assert_eq!(
            gitignore_after(Some("target\n")),
            ("target\nvmoat.local.conf\n".into(), true)
        );
        assert_eq!(
            gitignore_after(Some("target\r\n.env")),
            ("target\r\n.env\r\nvmoat.local.conf\r\n".into(), true)
        );
        assert_eq!(
            gitignore_after(Some("*.local.conf")),
            ("*.local.conf".into(), false)
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(
            bash_quote("docker compose up -d"),
            "\"docker compose up -d\""
        );
        assert_eq!(bash_quote("echo $HOME"), "'echo $HOME'");
        assert_eq!(bash_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn comments_wrap_and_keep_indent() {
        let mut text = String::new();
        comment(&mut text, &"word ".repeat(40));
        assert!(
            text.lines()
                .all(|l| l.len() <= WIDTH && l.starts_with("# ")),
            "{text}"
        );
        assert!(text.lines().count() > 1);

        let mut text = String::new();
        comment(&mut text, "  indented line");
        assert_eq!(text, "#   indented line\n");
    }

    /// Loads `text` as the only config of a worktree, as `vmoat up` would.
    fn load(root: &Path) -> vmoat_config::Loaded {
        let host = vmoat_config::HostFacts {
            home: root.to_path_buf(),
            user: "tester".into(),
            uid: 1000,
            total_memory_bytes: 16 << 30,
            cpus: 4,
        };
        vmoat_config::load(root, &host).unwrap()
    }

    #[test]
    fn template_with_compose_loads_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let compose = "services:\n  web:\n    ports: [\"8080:80\", \"${X}:81\"]\n  \
                       db:\n    ports: [\"5432:5432\"]\n";
        std::fs::write(root.join("compose.yaml"), compose).unwrap();

        let text = template(&root);
        assert!(
            text.contains("\nCMD_UP=\"docker compose up -d\"\n"),
            "{text}"
        );
        assert!(text.contains("\nEXPOSE_PORTS=(5432 8080)\n"), "{text}");
        assert!(text.contains("uses a variable"), "{text}");
        for spec in KEYS {
            assert!(
                text.contains(&format!("# {}: ", spec.name)),
                "{}",
                spec.name
            );
        }
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");

        std::fs::write(root.join(BASE_FILE), &text).unwrap();
        let loaded = load(&root);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.config.cmd_up.as_deref(),
            Some("docker compose up -d")
        );
        assert_eq!(loaded.config.expose_ports, [5432, 8080]);
        assert_eq!(loaded.config.sources.len(), 2);
    }

    #[test]
    fn template_without_detection_sets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let text = template(&root);
        assert!(text.contains("Nothing was detected"), "{text}");
        assert!(
            text.contains("# CMD_UP=\"docker compose up -d\"\n"),
            "{text}"
        );

        std::fs::write(root.join(BASE_FILE), &text).unwrap();
        let loaded = load(&root);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(loaded.config.sources.is_empty());
    }

    #[test]
    fn template_with_a_makefile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Makefile"), "up:\n\tdocker compose up -d\n").unwrap();
        let text = template(dir.path());
        assert!(
            text.contains("Detected from Makefile.\nCMD_UP=\"make up\"\n"),
            "{text}"
        );
        assert!(text.contains("\n# EXPOSE_PORTS=(8080)\n"), "{text}");
    }
}
