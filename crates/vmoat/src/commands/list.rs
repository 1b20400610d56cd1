//! `vmoat list`: every vmoat and Colima profile on this host, with its state and owning
//! worktree. `--json` prints an array with `colima list --json`'s field names plus vmoat's
//! `worktree` and `vmoat`. Works outside a repository and with no Colima home at all.

use vmoat_profile::list_profiles;

use crate::context::Context;
use crate::exit::{CmdResult, Exit, WithExit};
use crate::output;

/// The table's columns.
const HEADER: [&str; 7] = [
    "NAME", "STATUS", "ARCH", "CPUS", "MEMORY", "DISK", "WORKTREE",
];

/// Runs the command.
pub fn run(ctx: &Context) -> CmdResult {
    let home = ctx.home()?;
    let profiles = list_profiles(home).exit_with(Exit::Failed)?;

    if ctx.json {
        output::json(&profiles);
        return Ok(Exit::Ok);
    }

    let mut rows = vec![HEADER.map(str::to_owned).to_vec()];
    for p in &profiles {
        let worktree = match (&p.worktree, p.vmoat) {
            (Some(path), _) => path.display().to_string(),
            (None, true) => "?".to_owned(),
            (None, false) => "- (colima)".to_owned(),
        };
        rows.push(vec![
            p.name.clone(),
            p.status.clone(),
            or_dash(&p.arch),
            p.cpus.to_string(),
            human_bytes(p.memory),
            human_bytes(p.disk),
            worktree,
        ]);
    }
    for line in table(&rows) {
        output::line(line);
    }

    if profiles.is_empty() {
        ctx.notice(format!("no profiles in {}", home.root().display()));
    }
    for p in profiles.iter().filter(|p| p.error.is_some()) {
        ctx.notice(format!(
            "{}: {}",
            p.name,
            p.error.as_deref().unwrap_or_default()
        ));
    }
    Ok(Exit::Ok)
}

fn or_dash(text: &str) -> String {
    if text.is_empty() { "-" } else { text }.to_owned()
}

/// A size as Colima shows it: binary units, up to two decimals, trailing zeros dropped
/// (`8GiB`, `1.5GiB`, `512MiB`); `-` for unknown.
pub(crate) fn human_bytes(bytes: u64) -> String {
    if bytes == 0 {
        return "-".to_owned();
    }
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{}", UNITS[unit])
}

/// Left-aligned columns separated by three spaces; the last column is not padded.
fn table(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();

    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == columns {
                    line.push_str(cell);
                } else {
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_colimas() {
        assert_eq!(human_bytes(8 << 30), "8GiB");
        assert_eq!(human_bytes(3 << 29), "1.5GiB");
        assert_eq!(human_bytes(512 << 20), "512MiB");
        assert_eq!(human_bytes(100 << 30), "100GiB");
        assert_eq!(human_bytes(0), "-");
        assert_eq!(human_bytes(1000), "1000B");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["NAME".into(), "STATUS".into(), "WORKTREE".into()],
            vec!["wt-long-name".into(), "Running".into(), "/src/a".into()],
        ];
        assert_eq!(
            table(&rows),
            [
                "NAME           STATUS    WORKTREE",
                "wt-long-name   Running   /src/a"
            ]
        );
    }
}
