//! macOS's DHCP leases file, `/var/db/dhcpd_leases`, written by `bootpd` for the NAT network
//! vz's `VZNATNetworkDeviceAttachment` puts guests on. It is how the host learns a guest's
//! address from its MAC when the guest's sshd is not reachable over vsock.
//!
//! The file is a list of brace-delimited blocks of `key=value` lines:
//!
//! ```text
//! {
//!     name=lima-colima-wt-feature
//!     ip_address=192.168.64.7
//!     hw_address=1,52:55:55:a:b:c
//!     identifier=1,52:55:55:a:b:c
//!     lease=0x6790f2a1
//! }
//! ```
//!
//! `bootpd` drops leading zeros from each octet of `hw_address` (`0a` becomes `a`), so MACs are
//! compared as bytes, never as strings.

use std::net::Ipv4Addr;

/// Where `bootpd` keeps its leases.
pub const LEASES_FILE: &str = "/var/db/dhcpd_leases";

/// One lease from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The host name the client sent, if any.
    pub name: Option<String>,
    /// The address leased.
    pub ip: Ipv4Addr,
    /// The client's MAC address.
    pub mac: [u8; 6],
    /// When the lease expires (seconds since the epoch); later means more recent.
    pub expires: u64,
}

/// Parses a MAC address written with `:` between six hex octets, each one or two digits
/// (`52:55:55:0a:0b:0c` or `52:55:55:a:b:c`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');

    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }

    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Every well-formed lease in the file's text; blocks missing an address or MAC are skipped,
/// since `bootpd` may hold entries for other kinds of clients.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    let mut leases = Vec::new();
    let mut block: Option<Vec<(&str, &str)>> = None;

    for line in text.lines().map(str::trim) {
        match line {
            "{" => block = Some(Vec::new()),
            "}" => {
                if let Some(lease) = block.take().and_then(|fields| lease_from(&fields)) {
                    leases.push(lease);
                }
            }
            _ => {
                if let (Some(fields), Some((key, value))) = (block.as_mut(), line.split_once('=')) {
                    fields.push((key.trim(), value.trim()));
                }
            }
        }
    }

    leases
}

/// Builds a lease from one block's fields.
fn lease_from(fields: &[(&str, &str)]) -> Option<Lease> {
    let field = |name: &str| fields.iter().find(|(key, _)| *key == name).map(|(_, v)| *v);

    let ip = field("ip_address")?.parse().ok()?;

    // `hw_address` is `<ARP hardware type>,<mac>`; type 1 is Ethernet.
    let (hw_type, mac) = field("hw_address")?.split_once(',')?;
    if hw_type != "1" {
        return None;
    }
    let mac = parse_mac(mac)?;

    let expires = field("lease")
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);

    Some(Lease {
        name: field("name").map(str::to_owned),
        ip,
        mac,
        expires,
    })
}

/// The address most recently leased to `mac`, if the file has one.
pub fn find_ip(text: &str, mac: &[u8; 6]) -> Option<Ipv4Addr> {
    parse_leases(text)
        .into_iter()
        .filter(|lease| lease.mac == *mac)
        .max_by_key(|lease| lease.expires)
        .map(|lease| lease.ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "{
\tname=lima-colima-old
\tip_address=192.168.64.3
\thw_address=1,52:55:55:a:b:c
\tidentifier=1,52:55:55:a:b:c
\tlease=0x65000000
}
{
\tname=other
\tip_address=192.168.64.4
\thw_address=1,de:ad:be:ef:0:1
\tidentifier=1,de:ad:be:ef:0:1
\tlease=0x67000000
}
{
\tname=lima-colima-new
\tip_address=192.168.64.9
\thw_address=1,52:55:55:a:b:c
\tidentifier=ff,0:1:2:3
\tlease=0x68000000
}
";

    #[test]
    fn mac_octets_may_drop_leading_zeros() {
        assert_eq!(
            parse_mac("52:55:55:a:b:c"),
            Some([0x52, 0x55, 0x55, 0x0a, 0x0b, 0x0c])
        );
        assert_eq!(parse_mac("52:55:55:0a:0B:0c"), parse_mac("52:55:55:a:b:c"));
    }

    #[test]
    fn malformed_macs_are_rejected() {
        assert_eq!(parse_mac("52:55:55:a:b"), None);
        assert_eq!(parse_mac("52:55:55:a:b:c:d"), None);
        assert_eq!(parse_mac("52:55:55:a:b:100"), None);
        assert_eq!(parse_mac("52:55:55:a::c"), None);
        assert_eq!(parse_mac("52:55:55:a:b:zz"), None);
    }

    #[test]
    fn parses_every_block() {
        let leases = parse_leases(SAMPLE);
        assert_eq!(leases.len(), 3);
        assert_eq!(leases[1].name.as_deref(), Some("other"));
        assert_eq!(leases[1].ip, Ipv4Addr::new(192, 168, 64, 4));
        assert_eq!(leases[1].mac, [0xde, 0xad, 0xbe, 0xef, 0, 1]);
        assert_eq!(leases[1].expires, 0x6700_0000);
    }

    #[test]
    fn newest_lease_for_the_mac_wins() {
        let mac = parse_mac("52:55:55:0a:0b:0c").unwrap();
        assert_eq!(find_ip(SAMPLE, &mac), Some(Ipv4Addr::new(192, 168, 64, 9)));
    }

    #[test]
    fn unknown_mac_has_no_address() {
        let mac = parse_mac("52:55:55:00:00:01").unwrap();
        assert_eq!(find_ip(SAMPLE, &mac), None);
        assert_eq!(find_ip("", &mac), None);
    }

    #[test]
    fn incomplete_or_non_ethernet_blocks_are_skipped() {
        let text = "{\n\tip_address=10.0.0.1\n}\n{\n\tip_address=10.0.0.2\n\
                    \thw_address=6,52:55:55:a:b:c\n}\n{\n\tip_address=nope\n\
                    \thw_address=1,52:55:55:a:b:c\n}\n";
        assert!(parse_leases(text).is_empty());
    }
}
