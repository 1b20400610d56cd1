//! The code-signing entitlement Virtualization.framework demands of any process that creates
//! a VM, how to tell whether this binary carries it, and the command that adds it.
//!
//! Without `com.apple.security.virtualization` the framework refuses to start a VM. A binary
//! built with `cargo` is at most ad-hoc signed by the linker, without entitlements, so every
//! build must be re-signed: `codesign --force --sign - --entitlements vmoat.entitlements
//! <binary>` (an ad-hoc signature, no Apple developer account needed).

use std::path::Path;
use std::process::Command;

/// The entitlement vz needs.
pub const ENTITLEMENT: &str = "com.apple.security.virtualization";

/// The entitlements property list (`platform/vz/vmoat.entitlements`), embedded so the binary
/// can print it for a user who installed without the source tree.
pub const ENTITLEMENTS_PLIST: &str = include_str!("../vmoat.entitlements");

/// What `codesign` says about an executable's virtualization entitlement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntitlementStatus {
    /// Signed, with the entitlement set to true.
    Present,
    /// Signed (ad-hoc or otherwise) but without the entitlement, or with it set to false.
    Missing,
    /// Not signed at all.
    Unsigned,
}

/// Classifies the output of `codesign -d --entitlements - <exe>`.
///
/// Recent macOS prints a bracketed dump (`[Key] com.apple.security.virtualization`, `[Value]`,
/// `[Bool] true`); older releases and `--xml` print a property list
/// (`<key>…</key><true/>`). Both are read the same way: the value is whatever boolean appears
/// after the key and before the next key.
pub fn parse_entitlements(stdout: &str, stderr: &str, success: bool) -> EntitlementStatus {
    if !success || stderr.contains("not signed at all") {
        return EntitlementStatus::Unsigned;
    }

    let Some(at) = stdout.find(ENTITLEMENT) else {
        return EntitlementStatus::Missing;
    };
    let after = &stdout[at + ENTITLEMENT.len()..];

    // The value ends where the next key starts, in either format.
    let end = ["[Key]", "<key>"]
        .iter()
        .filter_map(|marker| after.find(marker))
        .min()
        .unwrap_or(after.len());
    let value = &after[..end];

    if value.contains("<true/>") || value.contains("[Bool] true") {
        EntitlementStatus::Present
    } else {
        EntitlementStatus::Missing
    }
}

/// Runs `codesign` on `exe` and classifies its answer; `Err` carries why `codesign` could not
/// run at all.
pub fn entitlement_status(exe: &Path) -> Result<EntitlementStatus, String> {
    let output = Command::new("codesign")
        .args(["-d", "--entitlements", "-"])
        .arg(exe)
        .output()
        .map_err(|err| format!("could not run `codesign`: {err}"))?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // `codesign -d` fails for an unsigned binary, and for reasons that have nothing to do
    // with signing (a missing file); only the first is an answer.
    if !output.status.success() && !stderr.contains("not signed at all") {
        return Err(format!("`codesign -d` failed: {}", stderr.trim()));
    }

    Ok(parse_entitlements(
        &stdout,
        &stderr,
        output.status.success(),
    ))
}

/// A shell command that writes the entitlements file and ad-hoc signs `exe` with it, for a
/// user who has no copy of `vmoat.entitlements` at hand. Safe to paste: the path is quoted.
pub fn sign_command(exe: &Path) -> String {
    let plist: String = ENTITLEMENTS_PLIST
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("<!DOCTYPE"))
        .collect();
    let exe = shell_quote(&exe.to_string_lossy());

    format!(
        "printf '%s' '{plist}' > /tmp/vmoat.entitlements && \
         codesign --force --sign - --entitlements /tmp/vmoat.entitlements {exe}"
    )
}

/// `detail` with the signing fix appended when it is the framework's complaint about the
/// missing entitlement, naming this executable.
pub fn with_signing_hint(detail: String) -> String {
    signing_hint_for(detail, std::env::current_exe().ok().as_deref())
}

/// [`with_signing_hint`] for a given executable (or none known).
fn signing_hint_for(detail: String, exe: Option<&Path>) -> String {
    if !detail.contains("entitlement") {
        return detail;
    }
    match exe {
        Some(exe) => format!("{detail}; sign the binary: {}", sign_command(exe)),
        None => format!("{detail}; sign vmoat with {ENTITLEMENT} (`vmoat doctor` shows how)"),
    }
}

/// Quotes `text` for a POSIX shell with single quotes.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracketed_dump_with_entitlement() {
        let out = "[Dict]\n\t[Key] com.apple.security.virtualization\n\t[Value]\n\t\t[Bool] true\n";
        assert_eq!(
            parse_entitlements(out, "Executable=/usr/local/bin/vmoat\n", true),
            EntitlementStatus::Present
        );
    }

    #[test]
    fn xml_plist_with_entitlement() {
        let out = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict>\
                   <key>com.apple.security.get-task-allow</key><true/>\
                   <key>com.apple.security.virtualization</key><true/></dict></plist>";
        assert_eq!(
            parse_entitlements(out, "", true),
            EntitlementStatus::Present
        );
    }

    #[test]
    fn entitlement_set_to_false_is_missing() {
        let out = "[Dict]\n\t[Key] com.apple.security.virtualization\n\t[Value]\n\t\t[Bool] false\n\
                   \t[Key] com.apple.security.get-task-allow\n\t[Value]\n\t\t[Bool] true\n";
        assert_eq!(
            parse_entitlements(out, "", true),
            EntitlementStatus::Missing
        );

        let xml = "<dict><key>com.apple.security.virtualization</key><false/>\
                   <key>other</key><true/></dict>";
        assert_eq!(
            parse_entitlements(xml, "", true),
            EntitlementStatus::Missing
        );
    }

    #[test]
    fn ad_hoc_signature_without_entitlements_is_missing() {
        // What a linker-signed cargo build prints: the path on stderr, nothing on stdout.
        assert_eq!(
            parse_entitlements("", "Executable=/Users/me/.cargo/bin/vmoat\n", true),
            EntitlementStatus::Missing
        );
    }

    #[test]
    fn unsigned_binary() {
        let err = "/tmp/vmoat: code object is not signed at all\n";
        assert_eq!(
            parse_entitlements("", err, false),
            EntitlementStatus::Unsigned
        );
    }

    #[test]
    fn plist_file_sets_the_entitlement() {
        assert_eq!(
            parse_entitlements(ENTITLEMENTS_PLIST, "", true),
            EntitlementStatus::Present
        );
    }

    #[test]
    fn sign_command_quotes_the_path_and_carries_the_plist() {
        let cmd = sign_command(Path::new("/Users/o'neil/.cargo/bin/vmoat"));
        assert!(
            cmd.contains("codesign --force --sign - --entitlements"),
            "{cmd}"
        );
        assert!(
            cmd.ends_with(r"'/Users/o'\''neil/.cargo/bin/vmoat'"),
            "{cmd}"
        );
        assert!(
            cmd.contains("<key>com.apple.security.virtualization</key><true/>"),
            "{cmd}"
        );
        assert!(!cmd.contains('\n'), "{cmd}");
    }

    #[test]
    fn entitlement_complaints_get_the_fix() {
        let complaint = "Invalid virtual machine configuration. The process doesn’t have the \
                         “com.apple.security.virtualization” entitlement."
            .to_owned();

        let hinted = signing_hint_for(complaint.clone(), Some(Path::new("/bin/vmoat")));
        assert!(hinted.starts_with(&complaint), "{hinted}");
        assert!(hinted.contains("codesign --force --sign -"), "{hinted}");

        let hinted = signing_hint_for(complaint.clone(), None);
        assert!(hinted.contains("vmoat doctor"), "{hinted}");

        let other = "Internal Virtualization error.".to_owned();
        assert_eq!(
            signing_hint_for(other.clone(), Some(Path::new("/bin/vmoat"))),
            other
        );
    }

    #[test]
    fn codesign_failure_is_an_error_not_an_answer() {
        // On Linux `codesign` does not exist; on macOS the file does not. Either way the
        // result must not claim the binary is signed or unsigned.
        let result = entitlement_status(Path::new("/nonexistent/vmoat-test-binary"));
        assert!(result.is_err(), "{result:?}");
    }
}
