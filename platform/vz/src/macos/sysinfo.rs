//! The macOS facts behind the vz host checks, read with `sysctlbyname(3)`, `codesign` and
//! Virtualization.framework's own verdict.

use std::ffi::CString;
use std::io;

use objc2_virtualization::VZVirtualMachine;

use crate::codesign;
use crate::host::HostFacts;

/// Gathers everything [`crate::host::findings`] judges.
pub(crate) fn gather_host_facts() -> HostFacts {
    let exe = std::env::current_exe().map_err(|err| err.to_string());
    let entitlement = match &exe {
        Ok(exe) => codesign::entitlement_status(exe),
        Err(why) => Err(why.clone()),
    };

    HostFacts {
        os_version: sysctl_string("kern.osproductversion")
            .map_err(|err| format!("sysctl kern.osproductversion: {err}")),
        // Both keys are absent where they do not apply (Intel Macs, native processes).
        apple_silicon: sysctl_int("hw.optional.arm64").unwrap_or(0) == 1,
        translated: sysctl_int("sysctl.proc_translated").unwrap_or(0) == 1,
        // SAFETY: a class property with no arguments, readable from any thread.
        vz_supported: unsafe { VZVirtualMachine::isSupported() },
        exe,
        entitlement,
    }
}

/// Reads a string sysctl.
fn sysctl_string(name: &str) -> io::Result<String> {
    let mut buf = vec![0u8; 256];
    let len = sysctl_raw(name, &mut buf)?;
    buf.truncate(len);

    // The value is NUL-terminated.
    while buf.last() == Some(&0) {
        buf.pop();
    }
    String::from_utf8(buf).map_err(io::Error::other)
}

/// Reads an integer sysctl.
fn sysctl_int(name: &str) -> io::Result<i32> {
    let mut buf = [0u8; 4];
    let len = sysctl_raw(name, &mut buf)?;
    if len != buf.len() {
        return Err(io::Error::other(format!("{name} is {len} bytes, not 4")));
    }
    Ok(i32::from_ne_bytes(buf))
}

/// `sysctlbyname(name, buf)`, returning the value's length.
fn sysctl_raw(name: &str, buf: &mut [u8]) -> io::Result<usize> {
    let name = CString::new(name)?;
    let mut len = buf.len();

    // SAFETY: `name` is NUL-terminated; `buf` is writable for `len` bytes and `len` tells the
    // kernel so; no new value is set (null pointer, length 0).
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}
