//! `hive-bench restart`: how long a restarted `hive up` takes until its agent's instance
//! cache is complete again, with containers running on the node.
//!
//! One `hive up` in a temporary data dir runs `--containers` busybox containers; then, `--runs`
//! times, it is killed (`kill -9`: the containers keep running) and started again on the same
//! data dir, and the time from the start of the process to the agent's `instance cache` log
//! line (the tenant's cache resumed from its saved revision and caught up: the sync loop acts
//! from then on) is measured, with the time to its `API at` line for comparison. Every run
//! must resume, not list, and find the same containers running; `hive down` removes what the
//! node made at the end, however the run ends. Last line:
//! `restart_p50_ms=… restart_p95_ms=… api_p50_ms=… containers=…`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hive_api::{Instance, InstancePhase};
use hive_client::Client;

use crate::images::{build_image, need};
use crate::runtime::{hive_binary, stats};
use crate::start::{DownOnDrop, clean, create_and_wait, ms, push, service, with_own_prefix};

#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    /// Restarts measured.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Containers running on the node while it restarts.
    #[arg(long, default_value_t = 5)]
    pub containers: u32,
    /// Where the test image is built (and reused on later runs).
    #[arg(long, default_value = "/tmp/hive-bench-start")]
    pub work: PathBuf,
    /// The `hive` binary; default: next to this program.
    #[arg(long)]
    pub hive: Option<PathBuf>,
    /// One more argument for `hive up` (repeat for several). The network prefix is the run's
    /// own unless one is given (`--up-arg=--net-prefix=hb`).
    #[arg(long = "up-arg", allow_hyphen_values = true)]
    pub up_args: Vec<String>,
}

/// A `hive up` whose log lines arrive on `lines` with the time since its start.
struct Up {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Duration, String)>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(hive: &Path, data: &Path, extra: &[String]) -> Result<Up> {
        let t0 = Instant::now();
        let mut child = Command::new(hive)
            .args(["up", "--no-login", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env("HIVE_LOG", "info")
            .env("HIVE_CONFIG", data.join("no-cli-config.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start hive up")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Keeps draining once nobody listens: hive never blocks on the pipe.
                let _ = tx.send((t0.elapsed(), line));
            }
        });
        Ok(Up { child, lines })
    }

    /// The first line containing `what`, and when it came.
    fn wait_for(&mut self, what: &str) -> Result<(Duration, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((at, line)) = self.lines.recv_timeout(Duration::from_millis(100)) {
                if line.contains(what) {
                    return Ok((at, line));
                }
                continue;
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("hive up exited ({status}) before saying {what:?}");
            }
        }
        bail!("hive up did not say {what:?} within 60 s")
    }
}

/// The URL in `hive up`'s `API at URL` line.
fn url_of(line: &str) -> Result<String> {
    line.split("API at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no URL in {line:?}"))
}

/// The running instances' pids, by name.
async fn pids(client: &Client) -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = client
        .list::<Instance>(Some("default"))
        .await?
        .items
        .into_iter()
        .filter(|i| i.status.phase == InstancePhase::Running)
        .map(|i| (i.name, i.status.pid.unwrap_or_default()))
        .collect();
    out.sort();
    Ok(out)
}

pub fn run(args: RestartArgs) -> Result<()> {
    for t in ["skopeo", "umoci", "runc"] {
        need(t)?;
    }
    let hive = hive_binary(args.hive.clone())?;
    std::fs::create_dir_all(&args.work)?;
    let busybox = build_image(&args.work, "run-busybox", 0, 0, true)?;
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-restart-")
        .tempdir()?;
    let data = dir.path().join("hive");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let _down = DownOnDrop {
        hive: hive.clone(),
        data: data.clone(),
    };
    let up_args = with_own_prefix(&args.up_args);
    let mut up = Up::start(&hive, &data, &up_args)?;
    let mut url = url_of(&up.wait_for("API at ")?.1)?;
    let token = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_owned();
    let client = Client::new(&url, Some(token.clone()))?;
    let host = url.trim_start_matches("http://").to_owned();
    let image = format!("{host}/default/busybox:test");
    push(&busybox, &image, &format!("hive:{token}"))?;
    let svc = {
        let mut s = service("idle", &image, &["sleep", "100000"]);
        s.spec.replicas = args.containers;
        s
    };
    rt.block_on(create_and_wait(&client, &svc, args.containers as usize))?;
    let before = rt.block_on(pids(&client))?;
    println!(
        "hive-bench restart: {} runs, {} containers; load {}",
        args.runs,
        args.containers,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let (mut cache, mut api) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        // Past the agent's periodic save, as a node that ran a while would be.
        std::thread::sleep(Duration::from_secs(1));
        drop(up);
        up = Up::start(&hive, &data, &up_args)?;
        let (api_at, line) = up.wait_for("API at ")?;
        url = url_of(&line)?;
        let (cache_at, line) = up.wait_for("instance cache")?;
        if !line.contains("Resumed") {
            bail!("run {run}: the instance cache did not resume: {line}");
        }
        let client = Client::new(&url, Some(token.clone()))?;
        let after = rt.block_on(pids(&client))?;
        if after != before {
            bail!("run {run}: the containers changed across the restart: {before:?} -> {after:?}");
        }
        println!(
            "run {run}: API at {:.0} ms, instance cache complete at {:.0} ms",
            ms(api_at),
            ms(cache_at)
        );
        api.push(ms(api_at));
        cache.push(ms(cache_at));
    }
    let client = Client::new(&url, Some(token))?;
    rt.block_on(clean(&client, &data))?;
    drop(up);

    let (cache, api) = (stats(cache), stats(api));
    println!(
        "restart_p50_ms={:.0} restart_p95_ms={:.0} api_p50_ms={:.0} containers={}",
        cache.0, cache.1, api.0, args.containers
    );
    Ok(())
}
