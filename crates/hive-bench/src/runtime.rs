//! `hive-bench runtime`: container start latency of the runtime layer, to choose the default
//! OCI runtime by measurement. Each run starts busybox `/bin/true` in its own namespaces and
//! cgroup, waits for it to exit and removes it:
//! - bare: `runc run` and `crun run` (crun in a private mount namespace hiding the cgroup2
//!   mount, which it needs on these hybrid hosts, made as the agent makes it) on a prepared
//!   bundle;
//! - hive: the agent's path — bundle written, `hive shim` supervisor, runtime run --detach,
//!   exit recorded, container removed — with each runtime.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hive_agent::runtime::oci::hide_cgroup2;
use hive_agent::runtime::spec::{self, ContainerConfig, ImageProcess, Limits, ProcessOverride};
use hive_agent::runtime::{Containers, OciRuntime, RuntimeKind, ShimCommand};

#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Runs per case (after 3 warm-up runs).
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// The `hive` binary (for `hive shim`); default: next to this program.
    #[arg(long)]
    pub hive: Option<PathBuf>,
}

pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("copy /bin/busybox (install busybox-static)")?;
    for a in ["sh", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a))?;
    }
    Ok(rootfs)
}

fn config(id: &str, rootfs: &Path) -> ContainerConfig {
    ContainerConfig {
        id: id.to_owned(),
        hostname: id.to_owned(),
        rootfs: rootfs.to_owned(),
        image: ImageProcess::default(),
        overrides: ProcessOverride {
            command: vec!["/bin/true".into()],
            ..Default::default()
        },
        limits: Limits::default(),
        cgroups_path: format!("/hive-bench/{id}").into(),
        netns: None,
    }
}

/// CPU time the whole machine has spent busy since it booted (every CPU's user, system and
/// interrupt time): what a step costs on a machine whose other work is idle, whichever
/// processes and kernel threads did it.
pub fn busy_cpu() -> Result<Duration> {
    let ticks: u64 = cpu_jiffies()?.iter().map(|(busy, _)| busy).sum();
    Ok(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_sec(),
    ))
}

/// Per CPU (indexed by number): jiffies busy and in all, from `/proc/stat`.
pub fn cpu_jiffies() -> Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let mut out = Vec::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(n) = f
            .next()
            .and_then(|c| c.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
        let v: Vec<u64> = f.take(8).map(|x| x.parse().unwrap_or(0)).collect();
        if v.len() < 8 {
            bail!("/proc/stat: short line {line:?}");
        }
        let all: u64 = v.iter().sum();
        if out.len() <= n {
            out.resize(n + 1, (0, 0));
        }
        out[n] = (all - v[3] - v[4], all);
    }
    Ok(out)
}

/// `USER_HZ`, the unit of the times in `/proc` (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// p50 and p95 of `ms`.
pub fn stats(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.95))
}

/// The runtime's command line as the benchmarks call it bare: crun in a mount namespace
/// without the cgroup2 mount, which it needs on these hybrid hosts, made the way the agent
/// makes it (between fork and exec, no wrapper programs). With `sealed`, the program is
/// started from that sealed in-memory copy of itself, as the agent's supervisor starts it
/// ([`hive_agent::runtime::shim::sealed_copy`]: the runtime then skips copying itself), so
/// the floor is as fast as the runtime can be driven here.
fn runtime_cmd(kind: RuntimeKind, root: &Path, sealed: Option<&OwnedFd>) -> Command {
    let mut c = match sealed {
        Some(fd) => Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        None => Command::new(kind_name(kind)),
    };
    if kind == RuntimeKind::Crun {
        hide_cgroup2(&mut c);
    }
    c.arg("--root").arg(root);
    c
}

fn kind_name(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::Runc => "runc",
        RuntimeKind::Crun => "crun",
    }
}

/// Writes a bundle for `command` and returns (bundle dir, container id, runtime root).
fn bare_bundle(
    kind: RuntimeKind,
    dir: &Path,
    rootfs: &Path,
    tag: &str,
    command: &[&str],
) -> Result<(PathBuf, String, PathBuf)> {
    let name = kind_name(kind);
    let bundle = dir.join(format!("bundle-{tag}-{name}"));
    std::fs::create_dir_all(&bundle)?;
    let id = format!("bench-{tag}-{name}-{}", std::process::id());
    let mut cfg = config(&id, rootfs);
    cfg.overrides.command = command.iter().map(|s| s.to_string()).collect();
    let spec = spec::build(&cfg)?;
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
    Ok((bundle, id, dir.join(format!("root-{name}"))))
}

fn check(out: std::process::Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `runtime run` of `/bin/true` (create, start, wait, delete), `runs` times after 3 warm-ups.
fn bare(kind: RuntimeKind, dir: &Path, rootfs: &Path, runs: usize) -> Result<(f64, f64)> {
    let (bundle, id, root) = bare_bundle(kind, dir, rootfs, "run", &["/bin/true"])?;
    let mut times = Vec::new();
    for i in 0..runs + 3 {
        let mut c = runtime_cmd(kind, &root, None);
        c.args(["run", "-b"]).arg(&bundle).arg(&id);
        let t = Instant::now();
        let out = c.output()?;
        let el = t.elapsed();
        check(out, &format!("bare {} run", kind_name(kind)))?;
        if i >= 3 {
            times.push(el.as_secs_f64() * 1000.0);
        }
    }
    Ok(stats(times))
}

/// `runtime run --detach` of `sleep` until it returns (the process runs), the floor of a
/// container start (one runtime call: less work than `create` + `start`); the container is
/// deleted untimed. `runs` after 3 warm-ups; the runtime keeps its state under `state`
/// (`root-<runtime>`); with `sealed`, its program runs from a sealed copy made once, before
/// the runs (see [`runtime_cmd`]). Returns the p50 and p95 in ms, and the machine's busy
/// CPU per run (ms, the runs only).
pub fn bare_start(
    kind: RuntimeKind,
    dir: &Path,
    rootfs: &Path,
    runs: usize,
    state: &Path,
    sealed: bool,
) -> Result<((f64, f64), f64)> {
    let (bundle, id, _) = bare_bundle(kind, dir, rootfs, "start", &["sleep", "1000"])?;
    let root = state.join(format!("root-{}", kind_name(kind)));
    let copy = if sealed {
        let program = OciRuntime::new(kind, kind_name(kind), &root).binary;
        Some(
            hive_agent::runtime::shim::sealed_copy(&program)
                .with_context(|| format!("sealed copy of {}", program.display()))?,
        )
    } else {
        None
    };
    let mut times = Vec::new();
    let mut cpu = Duration::ZERO;
    for i in 0..runs + 3 {
        // The container's init keeps the runtime's stdio: nothing may wait for their end.
        let log = dir.join(format!("run-{}.log", kind_name(kind)));
        let mut run = runtime_cmd(kind, &root, copy.as_ref());
        run.arg("--log")
            .arg(&log)
            .args(["run", "--detach", "-b"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (t, busy) = (Instant::now(), busy_cpu()?);
        if !run.status()?.success() {
            bail!(
                "bare {} run --detach: {}",
                kind_name(kind),
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        let el = t.elapsed();
        if i >= 3 {
            cpu += busy_cpu()?.saturating_sub(busy);
        }
        let mut delete = runtime_cmd(kind, &root, None);
        delete.args(["delete", "--force"]).arg(&id);
        check(
            delete.output()?,
            &format!("bare {} delete", kind_name(kind)),
        )?;
        if i >= 3 {
            times.push(el.as_secs_f64() * 1000.0);
        }
    }
    Ok((stats(times), cpu.as_secs_f64() * 1000.0 / runs as f64))
}

/// A tmpfs mounted at a directory, unmounted when dropped: the state of the runtimes the
/// benchmarks compare Hive with, where Hive's agent keeps its runtime's (and where runtimes
/// keep theirs on ordinary hosts: `/run`).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        nix::mount::mount(
            Some("hive-bench"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700,size=64m"),
        )
        .with_context(|| format!("mount a tmpfs on {}", path.display()))?;
        Ok(Tmpfs(path.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes the benchmarks' (empty) parent cgroups, in every hierarchy mounted under
/// `/sys/fs/cgroup` (runc also makes one in the cgroup2 mount of these hybrid hosts).
pub fn remove_bench_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let _ = std::fs::remove_dir(h.path().join("hive-bench"));
    }
}

/// The `hive` binary: `given`, else next to this program.
pub fn hive_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let hive = match given {
        Some(h) => h,
        None => std::env::current_exe()?.with_file_name("hive"),
    };
    anyhow::ensure!(
        hive.exists(),
        "{} not found: build it (cargo build --release -p hive) or pass --hive",
        hive.display()
    );
    Ok(hive)
}

async fn supervised(
    kind: RuntimeKind,
    binary: &str,
    hive: &Path,
    dir: &Path,
    rootfs: &Path,
    runs: usize,
) -> Result<(f64, f64)> {
    let name = binary;
    let runtime = OciRuntime::new(kind, binary, dir.join(format!("hive-root-{name}")));
    let shim = ShimCommand {
        program: hive.to_owned(),
        args: vec!["shim".into()],
    };
    let containers = Containers::new(runtime, shim, dir.join(format!("containers-{name}")));
    // A supervisor spawned ahead of each start, as the agent does (at its start, then after
    // each start's report).
    containers.prepare_supervisor();
    let mut times = Vec::new();
    for i in 0..runs + 3 {
        let id = format!("bench-{name}-{}-{i}", std::process::id());
        let cfg = config(&id, rootfs);
        let spec = spec::build(&cfg)?;
        let t = Instant::now();
        containers.start(&id, &spec, &cfg.cgroups_path).await?;
        let exit = containers
            .wait(&id, Duration::from_secs(30))
            .await
            .context("container did not exit")?;
        containers.remove(&id).await?;
        let el = t.elapsed();
        containers.prepare_supervisor();
        if exit.exit_code != 0 {
            bail!("hive {name}: /bin/true exited {}", exit.exit_code);
        }
        if i >= 3 {
            times.push(el.as_secs_f64() * 1000.0);
        }
    }
    Ok(stats(times))
}

pub fn run(args: RuntimeArgs) -> Result<()> {
    let hive = hive_binary(args.hive)?;
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-rt-")
        .tempdir()?;
    let rootfs = busybox_rootfs(dir.path())?;
    println!(
        "hive-bench runtime: busybox /bin/true, start+wait+delete, {} runs per case; load {}",
        args.runs,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bare_runc = bare(RuntimeKind::Runc, dir.path(), &rootfs, args.runs)?;
    let bare_crun = bare(RuntimeKind::Crun, dir.path(), &rootfs, args.runs)?;
    let hive_runc = rt.block_on(supervised(
        RuntimeKind::Runc,
        "runc",
        &hive,
        dir.path(),
        &rootfs,
        args.runs,
    ))?;
    let hive_crun = rt.block_on(supervised(
        RuntimeKind::Crun,
        "crun",
        &hive,
        dir.path(),
        &rootfs,
        args.runs,
    ))?;
    remove_bench_cgroups();
    println!();
    println!("{:<40} {:>9} {:>9}", "case", "p50 ms", "p95 ms");
    for (name, (p50, p95)) in [
        ("bare runc run", bare_runc),
        ("bare crun run (cgroup2 hidden)", bare_crun),
        ("hive supervisor + runc", hive_runc),
        ("hive supervisor + crun (cgroup2 hidden)", hive_crun),
    ] {
        println!("{name:<40} {p50:>9.1} {p95:>9.1}");
    }
    let fastest = if hive_runc.0 <= hive_crun.0 {
        "runc"
    } else {
        "crun"
    };
    println!(
        "bare_runc_p50_ms={:.1} bare_crun_p50_ms={:.1} hive_runc_p50_ms={:.1} hive_crun_p50_ms={:.1} faster={fastest}",
        bare_runc.0, bare_crun.0, hive_runc.0, hive_crun.0
    );
    Ok(())
}
