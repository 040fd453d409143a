//! `hive-bench start`: how fast Hive starts containers, against the bare runtimes and podman
//! in the same run.
//!
//! - Warm: API create of a one-replica service → its instance reported `running` (seen on a
//!   watch), busybox already on the node; `--runs` runs. Floor: bare `runc`/`crun`
//!   `run --detach` of the same busybox with the same spec (until it returns: the process
//!   runs), their state on a tmpfs (where the agent keeps its runtime's, and runtimes keep
//!   theirs on ordinary hosts: `/run`) and on this host's disk, and crun started from a
//!   sealed copy of its program as the agent's supervisor starts it (it then skips copying
//!   itself); the floor is the fastest of the five. Peer: `podman run --rm --network none`
//!   of the same image from local storage (runc, the hosts' ulimits; its run state on the
//!   same tmpfs). Beside the times, the CPU one start costs: the machine's busy time over
//!   the warm runs per run (API, control plane, agent, runtime, kernel, and this client),
//!   split out for `hive up` and two of its threads, against bare crun's (from its sealed
//!   copy) per `run --detach` (on two CPUs, what a start spends beside its own path is on
//!   the next one's clock).
//! - Cold: an image never seen by the node, pushed to Hive's registry first: one 256 MiB layer,
//!   and 50 layers of 100 KiB; API create → running (pull + unpack + start), against
//!   `podman pull` + `podman run` from the same registry into empty storage. One run each
//!   (a second would find the layers).
//! - Density: `--density` idle containers on the node: time until all run, then the CPU and
//!   memory of `hive up` (server and agent are one process) over 10 idle seconds, and the
//!   memory of the per-container supervisors.
//!
//! Hive is the real `hive up` binary in a temporary data dir, with a network prefix of the
//! run's own (`hb` + 4 hex digits, unless `--up-arg=--net-prefix=…`); `hive down` removes
//! what it made once it is stopped, however the run ends. Last line: `warm_p50_ms=…
//! bare_p50_ms=… podman_p50_ms=… ratio_to_bare=… ratio_to_podman=… cold_ratio_to_podman=…`
//! and more (ratios are Hive ÷ peer: smaller is better).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use hive_api::{ContainerSpec, Instance, InstancePhase, Service, ServiceSpec};
use hive_client::Client;

use crate::images::{build_image, need, sh};
use crate::runtime::{Tmpfs, bare_start, busybox_rootfs, hive_binary, remove_bench_cgroups, stats};
use hive_agent::runtime::RuntimeKind;

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Warm starts measured (after 3 warm-ups), for Hive, the bare runtimes and podman.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Idle containers for the density figure (0: skip).
    #[arg(long, default_value_t = 200)]
    pub density: u32,
    /// Where the test images are built (and reused on later runs).
    #[arg(long, default_value = "/tmp/hive-bench-start")]
    pub work: PathBuf,
    #[command(flatten)]
    pub sizes: crate::images::ImageSizes,
    /// The `hive` binary; default: next to this program.
    #[arg(long)]
    pub hive: Option<PathBuf>,
    /// The OCI runtime `hive up` drives: crun (its default) or runc.
    #[arg(long, default_value = "crun")]
    pub runtime: String,
    /// One more argument for `hive up` (repeat for several), to compare configurations,
    /// e.g. `--up-arg=--no-watch-cache`.
    #[arg(long = "up-arg", allow_hyphen_values = true)]
    pub up_args: Vec<String>,
}

/// A `hive up` or `hive server` child process, killed (by pid) when dropped (a benchmark
/// removes its containers before that).
pub(crate) struct HiveUp {
    child: Child,
    pub(crate) url: String,
    pub(crate) token: String,
}

impl Drop for HiveUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `hive down` on a `hive up` data dir when dropped, after the `hive up` (declared after
/// it, so dropped before it) is gone: a benchmark leaves no container, mount, cgroup or
/// network state behind, whether it ends well or not.
pub(crate) struct DownOnDrop {
    pub(crate) hive: PathBuf,
    pub(crate) data: PathBuf,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if !self.data.join("agent").exists() {
            return;
        }
        let out = Command::new(&self.hive)
            .arg("down")
            .arg("--data-dir")
            .arg(&self.data)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                for line in String::from_utf8_lossy(&o.stdout).lines() {
                    eprintln!("hive down: {line}");
                }
            }
            Ok(o) => eprintln!(
                "hive down of {} failed ({}): {}{}",
                self.data.display(),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("hive down of {}: {e}", self.data.display()),
        }
    }
}

/// `extra` with a network prefix of this run's own unless it names one: the host's node
/// (prefix `hive`) and other runs keep their links, namespaces and tables.
pub(crate) fn with_own_prefix(extra: &[String]) -> Vec<String> {
    let mut args = extra.to_vec();
    if !extra.iter().any(|a| a.starts_with("--net-prefix")) {
        args.push(format!(
            "--net-prefix=hb{:04x}",
            std::process::id() & 0xffff
        ));
    }
    args
}

fn start_hive(
    hive: &Path,
    runtime: &str,
    extra: &[String],
    data: &Path,
    cli_config: &Path,
) -> Result<HiveUp> {
    let mut cmd = Command::new(hive);
    cmd.args([
        "up",
        "--no-login",
        "--listen",
        "127.0.0.1:0",
        "--runtime",
        runtime,
    ])
    .arg("--data-dir")
    .arg(data)
    .args(with_own_prefix(extra))
    .env("HIVE_CONFIG", cli_config);
    spawn_api(cmd, "hive up: API at ", data)
}

/// Starts `cmd` (a `hive up` or `hive server` with `--data-dir data`) and waits for the line
/// starting with `marker` that gives its URL; the token is the data dir's admin token.
pub(crate) fn spawn_api(mut cmd: Command, marker: &str, data: &Path) -> Result<HiveUp> {
    let mut child = cmd
        // Quiet unless the caller asks for more (`HIVE_LOG=hive_agent=debug` shows the
        // agent's launch timings).
        .env(
            "HIVE_LOG",
            std::env::var("HIVE_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start hive")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut up = HiveUp {
        child,
        url: String::new(),
        token: String::new(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Once started, what it still says (warnings and errors) goes to our stderr, and
            // the pipe keeps draining so hive never blocks on it.
            if let Err(std::sync::mpsc::SendError(line)) = tx.send(line) {
                eprintln!("hive: {line}");
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && let Some(rest) = line.strip_prefix(marker)
        {
            up.url = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            up.token = std::fs::read_to_string(data.join("admin.token"))?
                .trim()
                .to_owned();
            return Ok(up);
        }
        if let Some(status) = up.child.try_wait()? {
            bail!("{marker}exited: {status}");
        }
    }
    bail!("hive did not report its address ({marker}…) in 30 s")
}

pub(crate) fn service(name: &str, image: &str, args: &[&str]) -> Service {
    Service {
        name: name.to_owned(),
        spec: ServiceSpec {
            replicas: 1,
            template: ContainerSpec {
                image: image.to_owned(),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Where the time of one start went, in ms: API create → instance created (service
/// controller), → container started (scheduler, agent, runtime), → running seen on a watch
/// (status write and delivery).
type Breakdown = [f64; 3];

/// Creates `svc` and returns the time until `count` of its instances are reported running.
pub(crate) async fn create_and_wait(
    client: &Client,
    svc: &Service,
    count: usize,
) -> Result<Duration> {
    create_and_wait_traced(client, svc, count)
        .await
        .map(|(d, _)| d)
}

async fn create_and_wait_traced(
    client: &Client,
    svc: &Service,
    count: usize,
) -> Result<(Duration, Breakdown)> {
    let tenant = Some("default");
    let rev = client
        .list_page::<Instance>(tenant, Some(1), None)
        .await?
        .revision;
    let mut events = client.watch::<Instance>(tenant, Some(rev)).await?;
    let t0 = Instant::now();
    let wall0 = chrono::Utc::now();
    client.create(tenant, svc).await?;
    let mut running = std::collections::HashSet::new();
    let deadline = tokio::time::sleep(Duration::from_secs(600));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            ev = events.next() => {
                let ev = ev.context("watch ended")??;
                if let Some(i) = ev.object
                    && i.spec.service == svc.name
                {
                    if i.status.phase == InstancePhase::Running {
                        let seen = chrono::Utc::now();
                        let at = |t: chrono::DateTime<chrono::Utc>, from: chrono::DateTime<chrono::Utc>| {
                            (t - from).num_microseconds().unwrap_or(0) as f64 / 1000.0
                        };
                        let started = i.status.started_at.unwrap_or(seen);
                        let created = i.created_at.unwrap_or(wall0);
                        let split = [
                            at(created, wall0),
                            at(started, created),
                            at(seen, started),
                        ];
                        running.insert(i.name);
                        if running.len() >= count {
                            return Ok((t0.elapsed(), split));
                        }
                    } else if !i.status.reason.is_empty() && i.status.reason != "Unschedulable" {
                        bail!("{}: {}: {}", i.name, i.status.reason, i.status.message);
                    }
                }
            }
            () = &mut deadline => bail!("{}: {} of {count} running after 10 minutes", svc.name, running.len()),
        }
    }
}

/// Deletes every service and waits until the node has no container left.
pub(crate) async fn clean(client: &Client, data: &Path) -> Result<()> {
    let tenant = Some("default");
    for s in client.list::<Service>(tenant).await?.items {
        client.delete::<Service>(tenant, &s.name).await?;
    }
    let containers = data.join("agent/containers");
    let t0 = Instant::now();
    while std::fs::read_dir(&containers).map_or(0, |d| d.count()) > 0 {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "containers left in {} after 2 minutes",
                containers.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The podman command line on its own storage under `root`.
/// Podman with its storage under `root` and its run state (the runtime's among it) under
/// `run`: the run's tmpfs, where Hive's agent keeps its runtime's state.
fn podman(root: &Path, run: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(root.join("storage"))
        .arg("--runroot")
        .arg(run)
        .stdin(Stdio::null());
    c
}

/// The hosts lack CAP_SYS_RESOURCE: podman's default rlimits fail, so pin them (shared/peers).
const PODMAN_RUN: &[&str] = &[
    "run",
    "--rm",
    "--network",
    "none",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
];

fn run_ok(mut c: Command, what: &str) -> Result<()> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn podman_warm(root: &Path, run: &Path, layout: &Path, runs: usize) -> Result<(f64, f64)> {
    let mut pull = podman(root, run);
    pull.args(["pull", "-q", &format!("oci:{}:test", layout.display())]);
    let out = pull.output()?;
    if !out.status.success() {
        bail!(
            "podman pull: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut times = Vec::new();
    for i in 0..runs + 3 {
        let mut c = podman(root, run);
        c.args(PODMAN_RUN).args([id.as_str(), "/bin/true"]);
        let t = Instant::now();
        run_ok(c, "podman run")?;
        if i >= 3 {
            times.push(ms(t.elapsed()));
        }
    }
    Ok(stats(times))
}

/// `podman pull` + `podman run` of `image` from Hive's registry into empty storage.
fn podman_cold(root: &Path, run: &Path, image: &str, creds: &str) -> Result<f64> {
    let _ = std::fs::remove_dir_all(root);
    let t = Instant::now();
    let mut pull = podman(root, run);
    pull.args(["pull", "-q", "--tls-verify=false", "--creds", creds, image]);
    run_ok(pull, "podman pull")?;
    let mut c = podman(root, run);
    c.args(PODMAN_RUN).args([image, "/bin/true"]);
    run_ok(c, "podman run")?;
    let el = ms(t.elapsed());
    let mut reset = podman(root, run);
    reset.args(["system", "reset", "-f"]);
    let _ = reset.output();
    let _ = std::fs::remove_dir_all(root);
    Ok(el)
}

pub(crate) fn push(layout: &Path, dest: &str, creds: &str) -> Result<()> {
    sh(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            creds,
            &format!("oci:{}:test", layout.display()),
            &format!("docker://{dest}"),
        ],
    )
    .map(drop)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_cpu(&format!("/proc/{pid}/stat")).1
}

/// The command name and utime + stime (clock ticks) in a `/proc/…/stat` file.
fn stat_cpu(path: &str) -> (String, u64) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let (head, rest) = stat.rsplit_once(')').unwrap_or(("", ""));
    let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (comm, n(11) + n(12))
}

/// CPU spent so far (ms): by the whole machine, by `hive up` (every thread it had), by its
/// agent's thread and by its store's writer thread.
#[derive(Debug, Default)]
struct WarmCpu {
    machine: f64,
    process: f64,
    agent: f64,
    store: f64,
}

impl WarmCpu {
    fn now(pid: u32) -> Result<WarmCpu> {
        let ms = |ticks: u64| ticks as f64 * 1000.0 / crate::runtime::clock_ticks_per_sec();
        let mut c = WarmCpu {
            machine: crate::runtime::busy_cpu()?.as_secs_f64() * 1000.0,
            process: ms(cpu_ticks(pid)),
            ..Default::default()
        };
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let (comm, ticks) = stat_cpu(&format!("{}/stat", e.path().display()));
            if comm == "hive-agent" {
                c.agent += ms(ticks);
            } else if comm.starts_with("hive-store-wri") {
                // (a thread's name is cut to 15 characters)
                c.store += ms(ticks);
            }
        }
        Ok(c)
    }

    /// What was spent from `before` to `self`, per start over `runs`.
    fn since(&self, before: &WarmCpu, runs: usize) -> WarmCpu {
        let per = |a: f64, b: f64| (a - b) / runs.max(1) as f64;
        WarmCpu {
            machine: per(self.machine, before.machine),
            process: per(self.process, before.process),
            agent: per(self.agent, before.agent),
            store: per(self.store, before.store),
        }
    }
}

/// A memory figure of `pid` in KiB: `field` of `/proc/<pid>/<file>`.
fn mem_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    mem_kib(pid, "status", "VmRSS:")
}

/// Proportional set size: shared pages (the `hive` binary) divided among their users.
fn pss_kib(pid: u32) -> u64 {
    mem_kib(pid, "smaps_rollup", "Pss:")
}

/// Pids of the `hive shim` supervisors of containers under `containers`.
fn shims(containers: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(containers)
        .into_iter()
        .flatten()
        .flatten()
    {
        let rec = e.path().join("started.json");
        if let Ok(b) = std::fs::read(&rec)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && let Some(pid) = v["shim_pid"].as_u64()
        {
            out.push(pid as u32);
        }
    }
    out
}

pub fn run(args: StartArgs) -> Result<()> {
    for t in ["skopeo", "umoci", "podman", "runc", "crun"] {
        need(t)?;
    }
    let hive = hive_binary(args.hive.clone())?;
    std::fs::create_dir_all(&args.work)?;
    let busybox = build_image(&args.work, "run-busybox", 0, 0, true)?;
    let (big, many) = args.sizes.build(&args.work, "run-", true)?;
    // The images just built are hundreds of MiB not yet written back: flushed now, so that
    // the store's fsyncs during the warm runs do not wait behind this setup's writes.
    let t_sync = std::time::Instant::now();
    nix::unistd::sync();
    println!(
        "hive-bench start: flushed the setup's writes in {:.1} s",
        t_sync.elapsed().as_secs_f64()
    );
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-start-")
        .tempdir()?;
    let data = dir.path().join("hive");
    let _down = DownOnDrop {
        hive: hive.clone(),
        data: data.clone(),
    };
    let up = start_hive(
        &hive,
        &args.runtime,
        &args.up_args,
        &data,
        &dir.path().join("cli.json"),
    )?;
    let host = up.url.trim_start_matches("http://").to_owned();
    let creds = format!("hive:{}", up.token);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(&up.url, Some(up.token.clone()))?;
    println!(
        "hive-bench start: {} warm runs, cold images 1x{} MiB and {}x{} KiB, density {}; load {}",
        args.runs,
        args.sizes.big_mib,
        args.sizes.many,
        args.sizes.many_kib,
        args.density,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    // Warm: the image is on the node after the first run.
    let warm_image = format!("{host}/default/busybox:test");
    push(&busybox, &warm_image, &creds)?;
    let mut warm = Vec::new();
    let mut splits: [Vec<f64>; 3] = Default::default();
    let mut cpu = WarmCpu::default();
    for i in 0..args.runs + 3 {
        if i == 3 {
            cpu = WarmCpu::now(up.child.id())?;
        }
        let svc = service(&format!("warm-{i}"), &warm_image, &["sleep", "100000"]);
        let (el, split) = rt.block_on(create_and_wait_traced(&client, &svc, 1))?;
        if i >= 3 {
            warm.push(ms(el));
            for (v, x) in splits.iter_mut().zip(split) {
                v.push(x);
            }
        }
    }
    let cpu = WarmCpu::now(up.child.id())?.since(&cpu, args.runs);
    let split_p50: Vec<f64> = splits.into_iter().map(|v| stats(v).0).collect();
    // Removing them all: each container's stop waits out its grace (`sleep` ignores TERM).
    let (t, cpu0) = (Instant::now(), cpu_ticks(up.child.id()));
    rt.block_on(clean(&client, &data))?;
    let removed = (
        t.elapsed(),
        (cpu_ticks(up.child.id()) - cpu0) as f64 / crate::runtime::clock_ticks_per_sec(),
    );
    let warm = stats(warm);

    // Floors and peer of the warm start, their runtime state on a tmpfs as the agent keeps
    // its runtime's (and on this host's disk, for comparison).
    let rootfs_dir = dir.path().join("bare");
    let rootfs = busybox_rootfs(&rootfs_dir)?;
    let run = Tmpfs::mount(&dir.path().join("run"))?;
    let mut bare = Vec::new();
    for (kind, state, sealed) in [
        (RuntimeKind::Runc, run.path(), false),
        (RuntimeKind::Crun, run.path(), false),
        (RuntimeKind::Runc, rootfs_dir.as_path(), false),
        (RuntimeKind::Crun, rootfs_dir.as_path(), false),
        (RuntimeKind::Crun, run.path(), true),
    ] {
        bare.push(bare_start(
            kind,
            &rootfs_dir,
            &rootfs,
            args.runs,
            state,
            sealed,
        )?);
    }
    remove_bench_cgroups();
    let podman_root = dir.path().join("podman");
    let podman_run = run.path().join("podman");
    let podman = podman_warm(&podman_root, &podman_run, &busybox, args.runs)?;
    let mut reset = self::podman(&podman_root, &podman_run);
    reset.args(["system", "reset", "-f"]);
    let _ = reset.output();

    // Cold: images the node never saw, from Hive's registry.
    let mut cold = Vec::new();
    for (name, layout) in [("big", &big), ("many", &many)] {
        let image = format!("{host}/default/{name}:test");
        push(layout, &image, &creds)?;
        let svc = service(&format!("cold-{name}"), &image, &["sleep", "100000"]);
        let hive_ms = ms(rt.block_on(create_and_wait(&client, &svc, 1))?);
        let podman_ms = podman_cold(
            &dir.path().join("podman-cold"),
            &run.path().join("podman-cold"),
            &image,
            &creds,
        )?;
        cold.push((name, hive_ms, podman_ms));
    }
    rt.block_on(clean(&client, &data))?;

    // Density.
    let mut density = None;
    if args.density > 0 {
        let mut svc = service("idle", &warm_image, &["sleep", "100000"]);
        svc.spec.replicas = args.density;
        svc.spec.template.resources.limits.memory_bytes = Some(16 << 20);
        let all = rt.block_on(create_and_wait(&client, &svc, args.density as usize))?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = up.child.id();
        let (c0, t0) = (cpu_ticks(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(10));
        let cpu_pct = (cpu_ticks(pid) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
        let rss = rss_kib(pid);
        let shim_pids = shims(&data.join("agent/containers"));
        let shim_rss: u64 = shim_pids.iter().map(|p| rss_kib(*p)).sum();
        let shim_pss: u64 = shim_pids.iter().map(|p| pss_kib(*p)).sum();
        density = Some((all, cpu_pct, rss, shim_pids.len(), shim_rss, shim_pss));
        rt.block_on(clean(&client, &data))?;
    }
    drop(up);

    drop(run);

    // The CPU of crun from its sealed copy, the way the agent runs it (and the fastest of
    // the floors in every run so far).
    let bare_cpu = bare[4].1;
    let bare: Vec<(f64, f64)> = bare.into_iter().map(|(t, _)| t).collect();
    let bare_tmpfs = bare[0].0.min(bare[1].0);
    let bare_disk = bare[2].0.min(bare[3].0);
    let bare_sealed = bare[4].0;
    let bare_p50 = bare_tmpfs.min(bare_disk).min(bare_sealed);
    println!();
    println!("{:<60} {:>9} {:>9}", "warm start (ms)", "p50", "p95");
    for (name, (p50, p95)) in [
        (
            format!("hive: API create -> running ({})", args.runtime).as_str(),
            warm,
        ),
        ("bare runc run --detach (state on a tmpfs)", bare[0]),
        (
            "bare crun run --detach (cgroup2 hidden, state on a tmpfs)",
            bare[1],
        ),
        ("bare runc run --detach (state on disk)", bare[2]),
        (
            "bare crun run --detach (cgroup2 hidden, state on disk)",
            bare[3],
        ),
        (
            "bare crun run --detach from a sealed copy (as the agent)",
            bare[4],
        ),
        ("podman run --rm --network none (runc)", podman),
    ] {
        println!("{name:<60} {p50:>9.1} {p95:>9.1}");
    }
    println!(
        "  hive p50 split: create -> instance {:.1} ms, -> container started {:.1} ms, -> running seen {:.1} ms",
        split_p50[0], split_p50[1], split_p50[2]
    );
    println!(
        "  CPU per start (the machine's busy time): hive {:.1} ms (hive up {:.1}: its agent thread {:.1}, store writer {:.1}), bare crun (sealed copy) {bare_cpu:.1} ms",
        cpu.machine, cpu.process, cpu.agent, cpu.store
    );
    println!(
        "  all {} removed (services deleted, containers stopped past their grace) in {:.1} s; hive up's CPU meanwhile {:.2} s",
        args.runs + 3,
        removed.0.as_secs_f64(),
        removed.1
    );
    println!();
    println!("{:<52} {:>9} {:>9}", "cold start (ms)", "hive", "podman");
    for (name, h, p) in &cold {
        println!(
            "{:<52} {h:>9.0} {p:>9.0}",
            format!("{name}: pull + unpack + start")
        );
    }
    let geo = |v: &[f64]| v.iter().product::<f64>().powf(1.0 / v.len() as f64);
    let cold_ratio = geo(&cold.iter().map(|(_, h, p)| h / p).collect::<Vec<_>>());
    let mut tail = String::new();
    if let Some((all, cpu, rss, n, shim_rss, shim_pss)) = density {
        let each = |kib: u64| kib / n.max(1) as u64;
        println!();
        println!(
            "density: {} containers running {:.1} s after the create; idle: hive up {:.2}% CPU, {} MiB RSS; {n} supervisors: {} KiB RSS, {} KiB PSS each",
            args.density,
            all.as_secs_f64(),
            cpu,
            rss >> 10,
            each(shim_rss),
            each(shim_pss),
        );
        tail = format!(
            " density={} density_start_s={:.1} idle_cpu_pct={cpu:.2} up_rss_mib={} shim_rss_kib={} shim_pss_kib={}",
            args.density,
            all.as_secs_f64(),
            rss >> 10,
            each(shim_rss),
            each(shim_pss),
        );
    }
    println!(
        "warm_p50_ms={:.1} warm_p95_ms={:.1} bare_p50_ms={bare_p50:.1} podman_p50_ms={:.1} ratio_to_bare={:.2} ratio_to_podman={:.3} cold_ratio_to_podman={cold_ratio:.2} bare_tmpfs_p50_ms={bare_tmpfs:.1} bare_disk_p50_ms={bare_disk:.1} bare_sealed_p50_ms={bare_sealed:.1} cpu_per_start_ms={:.1} bare_cpu_per_start_ms={bare_cpu:.1} cold_big_ms={:.0} cold_many_ms={:.0} podman_cold_big_ms={:.0} podman_cold_many_ms={:.0}{tail}",
        warm.0,
        warm.1,
        podman.0,
        warm.0 / bare_p50,
        warm.0 / podman.0,
        cpu.machine,
        cold[0].1,
        cold[1].1,
        cold[0].2,
        cold[1].2,
    );
    Ok(())
}
