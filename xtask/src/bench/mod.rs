//! `cargo xtask bench NAME`: benchmarks that write `target/bench/NAME.json` (one object of
//! named figures with units in the names, plus `runs` and `host`) and print a table.
//! Peers are measured in the same run, interleaved with ours, and compared as ratios.

mod agent;
mod boot;
mod child;
mod density;
mod handoff;
mod linux;
mod net;
mod qemu;
mod qmp;
pub mod stats;
mod synthesis;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use crate::util::{step, target_dir};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Which benchmark: `boot`, `synthesis`, `net`, `agent`, `handoff`, `density` or `linux`.
    pub name: String,
    /// Runs per measured configuration.
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
}

/// Runs the named benchmark.
pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.runs < 3 {
        bail!("--runs must be at least 3 to give a median and a p99");
    }
    let figures: Vec<(String, f64)> = match args.name.as_str() {
        "boot" => boot::run(args.runs)?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        "synthesis" => synthesis::run_bench(args.runs)?,
        "net" => net::run_bench(args.runs)?,
        "agent" => agent::run_bench(args.runs)?,
        "handoff" => handoff::run_bench(args.runs)?,
        "density" => density::run_bench(args.runs)?,
        "linux" => linux::run_bench(args.runs)?,
        other => {
            bail!("unknown benchmark '{other}': available: boot, synthesis, net, agent, handoff, density, linux")
        }
    };
    write_report(&args.name, args.runs, figures)
}

/// A little about the host, for the report.
fn host_info() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else {
        "kvm"
    };
    serde_json::json!({ "cpu": cpu, "cores": cores, "kernel": kernel, "kvm": kvm })
}

fn write_report(name: &str, runs: usize, figures: Vec<(String, f64)>) -> Result<()> {
    let mut obj = Map::new();
    for (k, v) in &figures {
        let rounded = (v * 1000.0).round() / 1000.0;
        obj.insert(k.clone(), serde_json::json!(rounded));
    }
    obj.insert("runs".into(), serde_json::json!(runs));
    obj.insert("host".into(), host_info());
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(obj))? + "\n",
    )?;
    println!(
        "\n{:<34} {:>12}",
        format!("bench {name} ({runs} runs)"),
        "value"
    );
    println!("{}", "-".repeat(47));
    for (k, v) in &figures {
        println!("{k:<34} {v:>12.3}");
    }
    step(&format!("wrote {}", path.display()));
    Ok(())
}
