//! What a project's files say without a config: the command that starts its stack (`CMD_UP`
//! auto-detection, in the spec's order) and the ports its compose file publishes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Compose file names, in the order they are looked for.
pub const COMPOSE_FILES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];

/// Makefile names, in the order `make` looks for them.
const MAKEFILES: [&str; 3] = ["GNUmakefile", "makefile", "Makefile"];

/// A command found by auto-detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    /// The command to run in the worktree directory.
    pub command: String,
    /// The file that decided it (`compose.yaml`, `Makefile`, `package.json`).
    pub file: String,
}

/// Detects `CMD_UP` for the worktree at `worktree_root`: a compose file (`compose.yaml`,
/// `compose.yml`, `docker-compose.yml`, `docker-compose.yaml`) gives `docker compose up -d`;
/// else a Makefile with a line starting `up:` (a rule, not a recipe line or a `up:=`
/// assignment) gives `make up`; else a `package.json` whose `scripts` has `dev` gives
/// `npm run dev`. `None` when nothing matches.
pub fn detect_cmd_up(worktree_root: &Path) -> Option<Detected> {
    let found = |command: &str, file: &str| {
        Some(Detected {
            command: command.to_owned(),
            file: file.to_owned(),
        })
    };

    if let Some(file) = compose_file(worktree_root) {
        return found("docker compose up -d", file);
    }
    for file in MAKEFILES {
        if let Ok(bytes) = std::fs::read(worktree_root.join(file)) {
            // Only the first Makefile found is the one `make` reads.
            if has_up_rule(&String::from_utf8_lossy(&bytes)) {
                return found("make up", file);
            }
            break;
        }
    }
    if let Ok(text) = std::fs::read_to_string(worktree_root.join("package.json"))
        && has_dev_script(&text)
    {
        return found("npm run dev", "package.json");
    }
    None
}

/// The first compose file present in `worktree_root`.
pub fn compose_file(worktree_root: &Path) -> Option<&'static str> {
    COMPOSE_FILES
        .into_iter()
        .find(|f| worktree_root.join(f).is_file())
}

/// Whether a Makefile has a rule for `up`: a line starting `up:` (or `up::`) that is not a
/// recipe line (those start with a tab), not a `up:=` assignment and not the continuation of
/// the previous line.
fn has_up_rule(makefile: &str) -> bool {
    let mut continued = false;
    for line in makefile.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let is_rule = !continued && line.starts_with("up:") && !line.starts_with("up:=");
        if is_rule {
            return true;
        }
        continued = line.ends_with('\\');
    }
    false
}

/// Whether `package.json` has `scripts.dev`, by parsing it (a `"dev"` inside some other
/// string does not count). A file that is not valid JSON is logged and does not count.
fn has_dev_script(text: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(json) => json
            .get("scripts")
            .and_then(|s| s.get("dev"))
            .is_some_and(serde_json::Value::is_string),
        Err(err) => {
            tracing::warn!("package.json is not valid JSON, so no dev script is used: {err}");
            false
        }
    }
}

/// A port a compose service publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundPort {
    /// The published (host-side) port: the one to reach inside the VM.
    pub port: u16,
    /// The service publishing it.
    pub service: String,
}

/// What a compose file says about published ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortScan {
    /// The compose file read.
    pub file: String,
    /// Ports found for certain, in order, each once.
    pub ports: Vec<FoundPort>,
    /// Entries that could not be turned into a fixed port, each said in a sentence (a
    /// variable, a random host port, UDP, a file that does not parse).
    pub unsure: Vec<String>,
}

#[derive(Deserialize)]
struct ComposeFile {
    #[serde(default)]
    services: BTreeMap<String, Option<Service>>,
}

#[derive(Deserialize)]
struct Service {
    #[serde(default)]
    ports: Vec<PortEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PortEntry {
    Number(u64),
    Short(String),
    Long(LongPort),
}

#[derive(Deserialize)]
struct LongPort {
    target: Option<NumberOrText>,
    published: Option<NumberOrText>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl NumberOrText {
    fn text(&self) -> String {
        match self {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(t) => t.clone(),
        }
    }
}

/// The most ports one range may expand to before it is left to the user.
const MAX_RANGE: u32 = 20;

/// Reads the published ports from the worktree's compose file: for `"8080:80"` the port is
/// 8080, the one the container is reached on inside the VM. `None` when there is no compose
/// file. Best effort: what cannot be read for certain goes to [`PortScan::unsure`].
pub fn detect_ports(worktree_root: &Path) -> Option<PortScan> {
    let file = compose_file(worktree_root)?;
    let mut scan = PortScan {
        file: file.to_owned(),
        ..PortScan::default()
    };

    let parsed = std::fs::read_to_string(worktree_root.join(file))
        .map_err(|e| e.to_string())
        .and_then(|text| serde_saphyr::from_str::<ComposeFile>(&text).map_err(|e| e.to_string()));
    let compose = match parsed {
        Ok(compose) => compose,
        Err(err) => {
            let first = err.lines().next().unwrap_or_default().to_owned();
            scan.unsure
                .push(format!("{file} could not be read for ports ({first})"));
            return Some(scan);
        }
    };

    for (service, definition) in &compose.services {
        for entry in definition.iter().flat_map(|d| &d.ports) {
            let published = match entry {
                PortEntry::Number(target) => Err(format!("{target} on a random host port")),
                PortEntry::Short(text) => short_syntax(text),
                PortEntry::Long(long) => long_syntax(long),
            };
            match published {
                Ok(ports) => {
                    for port in ports {
                        if !scan.ports.iter().any(|p| p.port == port) {
                            scan.ports.push(FoundPort {
                                port,
                                service: service.clone(),
                            });
                        }
                    }
                }
                Err(what) => scan
                    .unsure
                    .push(format!("service {service} publishes {what}")),
            }
        }
    }
    Some(scan)
}

/// `[IP:][HOST:]CONTAINER[/PROTOCOL]`, each port possibly a range.
fn short_syntax(text: &str) -> Result<Vec<u16>, String> {
    let quoted = format!("{text:?}");
    if text.contains('$') {
        return Err(format!("{quoted}, which uses a variable"));
    }
    let (mapping, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    if protocol != "tcp" {
        return Err(format!("{quoted} over {protocol}; tunnels carry TCP only"));
    }

    // An IPv6 address in brackets may hold colons; drop it first.
    let mapping = match mapping.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").map_or(rest, |(_, ports)| ports),
        None => mapping,
    };
    let parts: Vec<&str> = mapping.split(':').collect();
    let host = match parts[..] {
        [_container] => "",
        [host, _container] => host,
        [_ip, host, _container] => host,
        _ => return Err(format!("{quoted}, which is not a port mapping")),
    };
    if host.is_empty() {
        return Err(format!("{quoted} on a random host port"));
    }
    port_range(host).ok_or_else(|| format!("{quoted}, which is not a port mapping"))
}

fn long_syntax(long: &LongPort) -> Result<Vec<u16>, String> {
    let target = long
        .target
        .as_ref()
        .map(NumberOrText::text)
        .unwrap_or_default();
    let protocol = long.protocol.as_deref().unwrap_or("tcp");
    if protocol != "tcp" {
        return Err(format!(
            "target {target} over {protocol}; tunnels carry TCP only"
        ));
    }
    let Some(published) = &long.published else {
        return Err(format!("target {target} on a random host port"));
    };
    let published = published.text();
    if published.contains('$') {
        return Err(format!("{published:?}, which uses a variable"));
    }
    port_range(&published).ok_or_else(|| format!("{published:?}, which is not a port"))
}

/// `8080` or `8080-8082` as ports; `None` if malformed or a range too long to list.
fn port_range(text: &str) -> Option<Vec<u16>> {
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p > 0);
    match text.split_once('-') {
        None => Some(vec![port(text)?]),
        Some((first, last)) => {
            let (first, last) = (port(first)?, port(last)?);
            let count = u32::from(last).checked_sub(u32::from(first))? + 1;
            (count <= MAX_RANGE).then(|| (first..=last).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn detect(files: &[(&str, &str)]) -> Option<(String, String)> {
        let dir = dir_with(files);
        detect_cmd_up(dir.path()).map(|d| (d.command, d.file))
    }

    #[test]
    fn compose_files_in_spec_order() {
        for name in COMPOSE_FILES {
            assert_eq!(
                detect(&[(name, "services: {}\n")]),
                Some(("docker compose up -d".into(), name.into()))
            );
        }
        let both = detect(&[
            ("docker-compose.yaml", ""),
            ("compose.yml", ""),
            ("Makefile", "up:\n\tstart\n"),
        ]);
        assert_eq!(both.unwrap().1, "compose.yml");
    }

    #[test]
    fn makefile_up_rule() {
        let make = Some(("make up".to_owned(), "Makefile".to_owned()));
        assert_eq!(
            detect(&[("Makefile", "all:\n\techo\nup: build\n\trun\n")]),
            make
        );
        assert_eq!(detect(&[("Makefile", "up::\n\trun\n")]), make);
        assert_eq!(detect(&[("Makefile", "up:\r\n\trun\r\n")]), make);
        assert_eq!(detect(&[("Makefile", ".PHONY: up\n")]), None);
    }

    #[test]
    fn makefile_up_only_in_a_recipe_does_not_count() {
        let text = "all:\n\techo up: done\n\tup: x\ndown:\n\t@echo up:\n";
        assert_eq!(detect(&[("Makefile", text)]), None);
        assert_eq!(detect(&[("Makefile", "up:=1\nx: \\\nup:\n")]), None);
        assert_eq!(detect(&[("Makefile", "  up: indented\n")]), None);
    }

    #[test]
    fn package_json_dev_script() {
        let npm = Some(("npm run dev".to_owned(), "package.json".to_owned()));
        let json = r#"{"name": "x", "scripts": {"build": "tsc", "dev": "vite"}}"#;
        assert_eq!(detect(&[("package.json", json)]), npm);

        // "dev" only inside other strings, or outside `scripts`, does not count.
        let decoy = r#"{"description": "\"dev\": \"vite\"", "scripts": {"start": "dev"},
                        "devDependencies": {"dev": "1"}, "dev": "x"}"#;
        assert_eq!(detect(&[("package.json", decoy)]), None);
        assert_eq!(
            detect(&[("package.json", "{\"scripts\": {\"dev\": ")]),
            None
        );
    }

    #[test]
    fn order_is_compose_then_make_then_npm() {
        let json = r#"{"scripts": {"dev": "vite"}}"#;
        let make = "up:\n\trun\n";
        assert_eq!(
            detect(&[("package.json", json), ("Makefile", make)])
                .unwrap()
                .0,
            "make up"
        );
        assert_eq!(
            detect(&[("package.json", json), ("Makefile", "all:\n")])
                .unwrap()
                .0,
            "npm run dev"
        );
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn ports_from_compose() {
        let compose = r#"
services:
  web:
    image: nginx
    ports:
      - "8080:80"
      - 127.0.0.1:8443:443
      - "[::1]:6001:6001"
      - "9090-9091:8080-8081"
      - 3000
      - "4000"
      - "5353:53/udp"
      - "${WEB_PORT:-81}:80"
      - target: 80
        published: 8081
      - target: 80
        published: "8082"
        protocol: tcp
      - target: 80
  db:
    image: postgres
    ports: ["5432:5432", "8080:81"]
  worker:
"#;
        let dir = dir_with(&[("compose.yaml", compose)]);
        let scan = detect_ports(dir.path()).unwrap();
        let ports: Vec<u16> = scan.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, [5432, 8080, 8443, 6001, 9090, 9091, 8081, 8082]);
        assert_eq!(scan.ports[0].service, "db");
        assert_eq!(scan.file, "compose.yaml");
        assert_eq!(scan.unsure.len(), 5, "{:#?}", scan.unsure);
        assert!(scan.unsure.iter().any(|u| u.contains("variable")));
        assert!(scan.unsure.iter().any(|u| u.contains("udp")));
    }

    #[test]
    fn unreadable_compose_is_unsure_not_fatal() {
        let dir = dir_with(&[("compose.yml", "services: [\n")]);
        let scan = detect_ports(dir.path()).unwrap();
        assert!(scan.ports.is_empty());
        assert!(
            scan.unsure[0].contains("compose.yml could not be read"),
            "{scan:?}"
        );
        assert!(detect_ports(dir_with(&[]).path()).is_none());
    }
}
