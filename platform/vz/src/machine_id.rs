//! The host's machine id on macOS as Lima reads it: the `IOPlatformUUID` from
//! `/usr/sbin/ioreg -a -d2 -c IOPlatformExpertDevice` (a property list). Lima hashes it with
//! the instance directory into the NIC's MAC, so vmoat must use the same value for a VM's MAC
//! (and hence its DHCP lease) to match what Lima would compute on this Mac.

/// The `IOPlatformUUID` in `ioreg -a` output: the `<string>` right after
/// `<key>IOPlatformUUID</key>`.
pub fn parse_platform_uuid(plist: &str) -> Option<String> {
    let key = "<key>IOPlatformUUID</key>";
    let after = &plist[plist.find(key)? + key.len()..];

    let value = after.trim_start().strip_prefix("<string>")?;
    let value = &value[..value.find("</string>")?];

    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// This Mac's `IOPlatformUUID`, or `None` when `ioreg` cannot say (then Lima falls back to
/// the host name, and so should the caller).
#[cfg(target_os = "macos")]
pub fn platform_uuid() -> Option<String> {
    let output = std::process::Command::new("/usr/sbin/ioreg")
        .args(["-a", "-d2", "-c", "IOPlatformExpertDevice"])
        .output()
        .ok()?;
    if !output.status.success() {
        tracing::debug!(
            "ioreg failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return None;
    }
    parse_platform_uuid(&String::from_utf8_lossy(&output.stdout))
}

/// The machine id Lima uses on macOS: the `IOPlatformUUID`, else the host name (as Lima falls
/// back). Pass it to `vmoat_driver::lima_mac` so a VM's MAC matches Lima's on this Mac.
#[cfg(target_os = "macos")]
pub fn host_machine_id() -> String {
    platform_uuid().unwrap_or_else(hostname)
}

/// `gethostname(3)`, or an empty string when it fails.
#[cfg(target_os = "macos")]
fn hostname() -> String {
    let mut buf = [0u8; 256];

    // SAFETY: the buffer is writable for its whole length, which is what we pass.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }

    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOREG: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>IOObjectClass</key>
	<string>IORegistryEntry</string>
	<key>IORegistryEntryChildren</key>
	<array>
		<dict>
			<key>IOPlatformSerialNumber</key>
			<string>C02XXXXXXXXX</string>
			<key>IOPlatformUUID</key>
			<string>1A2B3C4D-0000-1111-2222-333344445555</string>
			<key>manufacturer</key>
			<data>QXBwbGUgSW5jLgA=</data>
		</dict>
	</array>
</dict>
</plist>
"#;

    #[test]
    fn finds_the_uuid() {
        assert_eq!(
            parse_platform_uuid(IOREG).as_deref(),
            Some("1A2B3C4D-0000-1111-2222-333344445555")
        );
    }

    #[test]
    fn absent_or_malformed_gives_none() {
        assert_eq!(parse_platform_uuid("<plist><dict></dict></plist>"), None);
        assert_eq!(
            parse_platform_uuid("<key>IOPlatformUUID</key><data>AAA=</data>"),
            None
        );
        assert_eq!(
            parse_platform_uuid("<key>IOPlatformUUID</key><string> </string>"),
            None
        );
        assert_eq!(
            parse_platform_uuid("<key>IOPlatformUUID</key><string>x"),
            None
        );
    }
}
