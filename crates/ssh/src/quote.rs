//! POSIX shell quoting, and the command line that gives a remote command its working
//! directory and environment.
//!
//! sshd hands the exec string to the user's login shell (`$SHELL -c …`) and usually refuses
//! `setenv` requests (`AcceptEnv` is empty by default), so the directory and variables are set
//! by wrapping the command:
//!
//! ```text
//! cd -- '/work/tree' && exec env -- 'A=1' 'B=it'\''s' "${SHELL:-/bin/sh}" -c 'make test'
//! ```
//!
//! The command runs under the login shell again (not a fixed `sh`), so bash syntax in a user's
//! command keeps working the way it does with a plain `ssh host cmd`.

use std::borrow::Cow;

/// Quote `word` so a POSIX shell reads it back as exactly one word with this text.
///
/// Words made only of characters no shell treats specially are returned as they are; anything
/// else is put in single quotes, with each `'` written as `'\''`. The empty string becomes `''`.
pub fn shell_quote(word: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return Cow::Borrowed(word);
    }

    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    Cow::Owned(quoted)
}

/// Quote each word and join them with spaces: the command line that runs exactly these argv
/// words (e.g. `vmoat ssh -- ls 'my dir'`).
pub fn shell_join<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let quoted: Vec<String> = words
        .into_iter()
        .map(|w| shell_quote(w.as_ref()).into_owned())
        .collect();
    quoted.join(" ")
}

/// Whether `name` can be an environment variable name for `env` and every shell.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Build the wrapped command line: `command` (or, when `None`, an interactive login shell) run
/// in `cwd` with `env` added. Returns `command` unchanged when there is nothing to add.
///
/// Callers validate names and NUL bytes first (see `ExecRequest::remote_command`).
pub(crate) fn wrap(
    command: Option<&str>,
    cwd: Option<&str>,
    env: &[(String, String)],
) -> Option<String> {
    if cwd.is_none() && env.is_empty() {
        return command.map(str::to_owned);
    }

    let mut line = String::new();
    if let Some(dir) = cwd {
        line.push_str("cd -- ");
        line.push_str(&shell_quote(dir));
        line.push_str(" && ");
    }

    line.push_str("exec ");
    if !env.is_empty() {
        line.push_str("env --");
        for (name, value) in env {
            line.push(' ');
            line.push_str(&shell_quote(&format!("{name}={value}")));
        }
        line.push(' ');
    }

    line.push_str("\"${SHELL:-/bin/sh}\"");
    match command {
        Some(command) => {
            line.push_str(" -c ");
            line.push_str(&shell_quote(command));
        }
        None => line.push_str(" -l"),
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Run `line` under a real `sh` and return what it printed.
    fn sh(line: &str) -> String {
        let out = Command::new("sh").arg("-c").arg(line).output().unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(shell_quote("make"), "make");
        assert_eq!(
            shell_quote("/a/b-c_d.e:f=g,h@i%j+k"),
            "/a/b-c_d.e:f=g,h@i%j+k"
        );
    }

    #[test]
    fn awkward_words_are_quoted() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("~"), "'~'");
    }

    #[test]
    fn a_shell_reads_quoted_words_back_exactly() {
        let words = [
            "", " ", "it's", "\"dq\"", "$HOME", "`id`", "$(id)", "a\\b", "*", "a\nb", "-n", "\t",
            "'", "''", "!x", "{a,b}", ";", "&&", "ü é",
        ];
        for word in words {
            let printed = sh(&format!("printf '%s|' {}", shell_quote(word)));
            assert_eq!(printed, format!("{word}|"), "word {word:?}");
        }

        let joined = shell_join(words);
        let printed = sh(&format!("printf '%s|' {joined}"));
        assert_eq!(
            printed,
            words.iter().map(|w| format!("{w}|")).collect::<String>()
        );
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("PATH"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("1A"));
        assert!(!is_env_name("A=B"));
        assert!(!is_env_name("A B"));
    }

    #[test]
    fn nothing_to_wrap_keeps_the_command() {
        assert_eq!(wrap(Some("ls -l"), None, &[]).as_deref(), Some("ls -l"));
        assert_eq!(wrap(None, None, &[]), None);
    }

    #[test]
    fn wrapped_command_sets_dir_and_env_under_a_real_shell() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("it's a $dir");
        std::fs::create_dir(&odd).unwrap();
        let env = vec![
            ("A".to_owned(), "x y".to_owned()),
            ("B".to_owned(), "it's $HOME `q` \"d\"".to_owned()),
            ("C".to_owned(), String::new()),
        ];
        let line = wrap(
            Some("printf '%s|%s|%s|' \"$A\" \"$B\" \"$C\"; pwd"),
            Some(odd.to_str().unwrap()),
            &env,
        )
        .unwrap();

        let printed = sh(&line);
        assert_eq!(
            printed,
            format!("x y|it's $HOME `q` \"d\"||{}\n", odd.display())
        );
    }

    #[test]
    fn wrapped_command_fails_when_the_dir_is_missing() {
        let line = wrap(Some("echo ran"), Some("/nonexistent/vmoat"), &[]).unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn a_shell_without_command_is_a_login_shell() {
        let line = wrap(None, Some("/tmp"), &[]).unwrap();
        assert_eq!(line, "cd -- /tmp && exec \"${SHELL:-/bin/sh}\" -l");
    }
}
