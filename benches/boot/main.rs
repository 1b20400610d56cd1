//! `bench-boot`: how long a vmoat VM takes to boot, stage by stage, and what it costs in host
//! memory, on real VMs (one at a time) in a scratch HOME and COLIMA_HOME. Figures for issue 4.
//!
//! 1. Direct kernel boot of vmoat's Debian image (`VM_IMAGE=debian`): a first boot (fresh
//!    disk, `vmoat up` creating the VM) and later boots (`vmoat up` of the stopped VM), each
//!    as a timeline of marks from the spawn of `vmoat up` ([`vm::MARKS`]).
//! 2. Warm start to SSH, paired: `vmoat up` of the stopped VM until sshd accepts vmoat's key,
//!    alternately with bare qemu ([`bare`]) booting an overlay of the same disk with the same
//!    command line until sshd's banner. Goal from issue 4: ≤ 1.15×.
//! 3. Idle host RSS of qemu, the agent and virtiofsd, after the first boot has settled.
//! 4. The same image booted through UEFI firmware ([`firmware`]): first and later boots,
//!    RSS. Skipped, with the reason, when the host lacks the tools to build that disk.
//!
//! Options: `--runs N` (measured warm-start pairs, default 3), `--warmup N` (unmeasured pairs
//! first, default 1), `--firmware-runs N` (later firmware boots, default 2), `--settle S`
//! (seconds idle before RSS, default 30), `--no-firmware`, `--vmoat PATH`, `--json`.
//! The machine's load average is printed with the figures: compare ratios, not seconds.

mod bare;
mod firmware;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vmoat_benches::Report as _;
use vmoat_benches::args::Flags;
use vmoat_benches::vm::{self, BenchVm, BootRecord, Rss, VmConfig};
use vmoat_benches::{Paired, Sample, cleanup, fail, ms, must, note, paired, sample_json, say};

/// Boots per measurement before the bench gives up (failures are reported).
const ATTEMPTS: usize = 3;

fn main() {
    cleanup::on_signals();
    let flags = Flags::from_args(
        &[
            "--runs",
            "--warmup",
            "--firmware-runs",
            "--settle",
            "--vmoat",
        ],
        &["--json", "--no-firmware"],
    );
    let runs = flags.number("--runs", 3).max(1);
    let warmup = flags.number("--warmup", 1);
    let firmware_runs = flags.number("--firmware-runs", 2);
    let settle = Duration::from_secs(flags.number("--settle", 30) as u64);
    let vmoat = flags.vmoat_binary(runs, warmup);

    let load_before = vm::load_average();
    let mut vm = BenchVm::prepared("boot", &vmoat);

    // 1 and 3: first boot, then memory once it has settled.
    note("direct boot: first boot (fresh disk)");
    let first = must(vm.up_retrying(ATTEMPTS), "first boot");
    let (recipe, argv_check) = must(bare::capture(&vm), "reading the VM's qemu and virtiofsd");
    note(&format!(
        "rebuilt qemu argv vs running: {}",
        argv_check.detail
    ));
    note(&format!("idle RSS in {} s", settle.as_secs()));
    let rss = must(vm.settled_rss(settle, 5), "RSS");
    must(vm.down(), "vmoat down");

    // 2: warm starts, paired with bare qemu; every vmoat run is also a later-boot timeline.
    let later = std::cell::RefCell::new(Vec::new());
    let round = std::cell::Cell::new(0);
    let bare_failures = std::cell::RefCell::new(Vec::new());
    let warm = paired(
        runs,
        warmup,
        || {
            round.set(round.get() + 1);
            note(&format!("warm start {}: vmoat up", round.get()));
            let record = vm.up_retrying(ATTEMPTS)?;
            vm.down()?;
            let ssh = record
                .at("ssh")
                .ok_or_else(|| io::Error::other("the agent reported no ssh stage"))?;
            later.borrow_mut().push(record);
            Ok(ssh)
        },
        || {
            note(&format!("warm start {}: bare qemu", round.get()));
            let mut attempt = 0;
            loop {
                attempt += 1;
                match bare::boot_to_banner(&vm, &recipe, round.get()) {
                    Ok(time) => return Ok(time),
                    Err(err) if attempt < ATTEMPTS => {
                        note(&format!("bare boot attempt {attempt} failed: {err}"));
                        bare_failures.borrow_mut().push(format!("bare qemu: {err}"));
                    }
                    Err(err) => return Err(err),
                }
            }
        },
    );
    let warm = must(warm, "warm-start pairs");
    let later: Vec<BootRecord> = later.into_inner().split_off(warmup);

    // 4: firmware.
    let firmware = if flags.switch("--no-firmware") {
        Variant::Skipped("--no-firmware".into())
    } else if let Some(reason) = firmware::unavailable() {
        Variant::Skipped(reason)
    } else {
        firmware_variant(&mut vm, firmware_runs, settle)
    };
    let mut failures = vm.failures();
    failures.extend(bare_failures.into_inner());
    vm.destroy();

    let report = Report {
        failures,
        load_before,
        load_after: vm::load_average(),
        vmoat,
        direct: Measured { first, later, rss },
        firmware,
        warm,
        argv_same: argv_check.same,
    };
    report.print(flags.switch("--json"));
}

/// The firmware-booted variant: the same image made UEFI-bootable, a fresh VM from it.
fn firmware_variant(vm: &mut BenchVm, later_runs: usize, settle: Duration) -> Variant {
    let paths = vm.paths().clone();
    let parts = firmware::Parts {
        base: std::fs::canonicalize(paths.basedisk()).unwrap_or_else(|_| paths.basedisk()),
        kernel: paths.kernel(),
        initrd: paths.initrd(),
        cmdline: std::fs::read_to_string(paths.kernel_cmdline())
            .unwrap_or_else(|e| fail(&format!("{}: {e}", paths.kernel_cmdline().display()))),
    };
    note("firmware: building the UEFI-bootable disk (untimed)");
    let disk = firmware::build(&vm.scratch().join("fw"), &parts)
        .unwrap_or_else(|e| fail(&format!("building the firmware disk: {e}")));

    vm.destroy();
    let config = VmConfig {
        image: disk.to_string_lossy().into_owned(),
    };
    must(vm.write_config(&config), "writing vmoat.conf");
    note("firmware boot: first boot (fresh disk)");
    let first = must(vm.up_retrying(ATTEMPTS), "firmware first boot");
    let booted_firmware = vm
        .settings()
        .map(|s| matches!(s.spec.boot, vmoat_driver::Boot::Firmware { .. }))
        .unwrap_or(false);
    if !booted_firmware {
        fail("the VM made from the firmware disk was not booted through firmware");
    }
    let rss = must(vm.settled_rss(settle, 5), "firmware RSS");
    must(vm.down(), "vmoat down");

    let mut later = Vec::new();
    for run in 1..=later_runs {
        note(&format!("firmware boot: later boot {run}"));
        later.push(must(vm.up_retrying(ATTEMPTS), "firmware later boot"));
        must(vm.down(), "vmoat down");
    }
    Variant::Measured(Measured { first, later, rss })
}

/// One boot path's figures.
struct Measured {
    first: BootRecord,
    later: Vec<BootRecord>,
    rss: Rss,
}

enum Variant {
    Measured(Measured),
    Skipped(String),
}

struct Report {
    failures: Vec<String>,
    load_before: String,
    load_after: String,
    vmoat: PathBuf,
    direct: Measured,
    firmware: Variant,
    warm: Paired,
    argv_same: bool,
}

/// The later boots' times of one mark.
fn mark_sample(records: &[BootRecord], mark: &str) -> Sample {
    Sample::new(records.iter().filter_map(|r| r.at(mark)).collect())
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

impl Report {
    fn timeline(&self, title: &str, m: &Measured) {
        say(&format!(
            "\n{title}: s from the spawn of `vmoat up`; later = median of {} (min-max)",
            m.later.len()
        ));
        say(&format!(
            "  {:<11} {:>7}  {:>20}  meaning",
            "mark", "first", "later"
        ));
        for mark in vm::MARKS {
            let first = m.first.at(mark).map(secs).unwrap_or_else(|| "-".into());
            let later = mark_sample(&m.later, mark);
            let later = if later.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} ({}-{})",
                    secs(later.median()),
                    secs(later.min()),
                    secs(later.max())
                )
            };
            say(&format!(
                "  {mark:<11} {first:>7}  {later:>20}  {}",
                vm::mark_meaning(mark)
            ));
        }
        say(&format!(
            "  idle RSS (MiB): qemu {}, agent {}, virtiofsd {}; total {}",
            mib(m.rss.qemu_kib),
            mib(m.rss.agent_kib),
            mib(m.rss.virtiofsd_kib),
            mib(m.rss.total_kib())
        ));
    }
}

impl vmoat_benches::Report for Report {
    fn table(&self) {
        say(&format!(
            "bench-boot: vmoat {} (load average {} before, {} after)",
            self.vmoat.display(),
            self.load_before,
            self.load_after
        ));
        self.timeline("direct kernel boot", &self.direct);
        match &self.firmware {
            Variant::Measured(m) => self.timeline("UEFI firmware boot (OVMF, UKI on an ESP)", m),
            Variant::Skipped(reason) => say(&format!("\nUEFI firmware boot: skipped ({reason})")),
        }

        let w = &self.warm;
        say("\nwarm start to SSH (s, median (min-max))");
        say(&format!(
            "  vmoat up, stopped VM -> key accepted   {} ({}-{})",
            secs(w.a.median()),
            secs(w.a.min()),
            secs(w.a.max())
        ));
        say(&format!(
            "  bare qemu, same argv -> sshd banner    {} ({}-{})",
            secs(w.b.median()),
            secs(w.b.min()),
            secs(w.b.max())
        ));
        say(&format!(
            "  ratio vmoat / bare: {:.2}x over {} pairs (goal <= 1.15x); argv identical: {}",
            w.ratio(),
            w.ratios.len(),
            self.argv_same
        ));
        say(&format!(
            "\nboots that failed and were tried again: {}",
            self.failures.len()
        ));
        for failure in &self.failures {
            say(&format!("  {failure}"));
        }
    }

    fn json(&self) -> serde_json::Value {
        let w = &self.warm;
        serde_json::json!({
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "vmoat": self.vmoat.display().to_string(),
            "direct": measured_json(&self.direct),
            "firmware": match &self.firmware {
                Variant::Measured(m) => measured_json(m),
                Variant::Skipped(reason) => serde_json::json!({ "skipped": reason }),
            },
            "warm_start_to_ssh": {
                "vmoat_up": sample_json(&w.a),
                "bare_qemu_banner": sample_json(&w.b),
                "ratio": w.ratio(),
                "ratios": w.ratios,
                "goal_max": 1.15,
                "argv_identical": self.argv_same,
            },
            "failed_boots_retried": self.failures,
        })
    }
}

fn measured_json(m: &Measured) -> serde_json::Value {
    let marks = |record: &BootRecord| {
        record
            .marks
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(ms(*v).parse::<f64>().ok())))
            .collect::<serde_json::Map<_, _>>()
    };
    let later: BTreeMap<String, serde_json::Value> = vm::MARKS
        .iter()
        .map(|mark| (mark.to_string(), mark_sample(&m.later, mark)))
        .filter(|(_, sample)| !sample.is_empty())
        .map(|(mark, sample)| (mark, sample_json(&sample)))
        .collect();
    serde_json::json!({
        "first_boot_ms": marks(&m.first),
        "first_boot_agent_stages": m.first.stages,
        "later_boots_ms": later,
        "later_boot_runs": m.later.len(),
        "idle_rss_kib": {
            "qemu": m.rss.qemu_kib,
            "agent": m.rss.agent_kib,
            "virtiofsd": m.rss.virtiofsd_kib,
            "total": m.rss.total_kib(),
        },
    })
}
