//! `hive-bench registry`: Hive's registry against the reference, Debian's `docker-registry`
//! (distribution 2.8, filesystem storage, as in `shared/peers/registry-local.sh`), both on
//! 127.0.0.1, with skopeo as the client and `hey` for manifest reads.
//!
//! Images are built locally with umoci (one layer of `--big-mib` random MiB; `--many` layers
//! of `--many-kib` KiB) and cached under `--work`. Every repetition pushes to a new
//! repository after deleting skopeo's blob-info cache, so every byte is uploaded. Hive runs
//! in this process on its own runtime, with tenant token auth; the reference without auth.
//! Two floors explain the pull figures: skopeo copying the same layout to another layout
//! with no registry at all (the client's own cost: it hashes and writes every byte), and a
//! plain `curl` GET of the big layer from each registry (the server's own cost).
//! Last line: `push_ratio=… pull_ratio=… manifest_ratio=…` (Hive ÷ reference, geometric
//! mean over the two images for push and pull), then the floors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hive_api::{Role, Tenant, TokenCreate};
use hive_client::Client;
use hive_server::{RateLimit, ServerConfig};

use crate::images::{image_bytes, need, random_file, sh};

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Where the test images are built (and reused on later runs).
    #[arg(long, default_value = "/tmp/hive-bench-registry")]
    pub work: PathBuf,
    /// Repetitions of each push and pull (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[command(flatten)]
    pub sizes: crate::images::ImageSizes,
    /// Seconds of manifest GETs per registry.
    #[arg(long, default_value_t = 10)]
    pub manifest_secs: u64,
    /// Concurrent connections for manifest GETs.
    #[arg(long, default_value_t = 16)]
    pub conc: usize,
    /// MiB of the single blob pushed (with curl) while this process's RSS is sampled; 0: skip.
    #[arg(long, default_value_t = 1024)]
    pub rss_mib: usize,
}

/// This process's resident memory (the server runs in it).
fn rss_kib() -> u64 {
    crate::start::rss_kib(std::process::id())
}

/// Pushes one `mib` MiB blob to Hive with curl (streamed monolithic upload) and reports this
/// process's resident memory (the server runs in it) before and at its peak during the push.
fn rss_during_push(host: &str, secret: &str, work: &Path, mib: usize) -> Result<(u64, u64)> {
    use sha2::Digest as _;
    let file = work.join(format!("blob-{mib}m.bin"));
    if std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != (mib as u64) << 20 {
        random_file(&file, mib << 20)?;
    }
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(&file)?;
    std::io::copy(&mut f, &mut h)?;
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let idle = rss_kib();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let url = format!(
        "http://{host}/v2/bench/rss-{}/blobs/uploads?digest={digest}",
        std::process::id()
    );
    let out = sh(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {secret}"),
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            file.to_str().context("path")?,
            &url,
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let code = out?;
    if code.trim() != "201" {
        bail!("rss push of {mib} MiB answered {code}");
    }
    Ok((idle, peak))
}

const BLOB_CACHE: &str = "/var/lib/containers/cache/blob-info-cache-v1.boltdb";

struct Target {
    name: &'static str,
    host: String,
    /// skopeo credentials flag value, Authorization header for hey.
    creds: Option<String>,
    prefix: &'static str,
}

fn timed(args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    sh("skopeo", args)?;
    Ok(t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median push and pull seconds of `layout` to fresh repositories of `t`.
fn push_pull(t: &Target, layout: &Path, img: &str, reps: usize, work: &Path) -> Result<(f64, f64)> {
    let run = std::process::id();
    let (mut push, mut pull) = (Vec::new(), Vec::new());
    let src = format!("oci:{}:test", layout.display());
    for rep in 0..reps {
        let dst = format!("docker://{}/{}/{img}-{run}-r{rep}:test", t.host, t.prefix);
        let _ = std::fs::remove_file(BLOB_CACHE);
        let mut a = vec!["copy", "--quiet", "--dest-tls-verify=false"];
        if let Some(c) = &t.creds {
            a.extend(["--dest-creds", c]);
        }
        a.extend([src.as_str(), dst.as_str()]);
        push.push(timed(&a)?);
        let out = work.join("pull").join(img);
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_file(BLOB_CACHE);
        let dest = format!("oci:{}:test", out.display());
        let mut a = vec!["copy", "--quiet", "--src-tls-verify=false"];
        if let Some(c) = &t.creds {
            a.extend(["--src-creds", c]);
        }
        a.extend([dst.as_str(), dest.as_str()]);
        pull.push(timed(&a)?);
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok((median(push), median(pull)))
}

/// Median seconds of skopeo copying `layout` to a fresh layout: a pull's client-side floor.
fn client_floor(layout: &Path, reps: usize, work: &Path) -> Result<f64> {
    let src = format!("oci:{}:test", layout.display());
    let out = work.join("pull").join("floor");
    let mut times = Vec::new();
    for _ in 0..reps {
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_file(BLOB_CACHE);
        let dst = format!("oci:{}:test", out.display());
        times.push(timed(&["copy", "--quiet", &src, &dst])?);
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(median(times))
}

/// The first layer's digest of the image `test` in `layout`.
fn first_layer(layout: &Path) -> Result<String> {
    let read = |p: PathBuf| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(&p).with_context(|| p.display().to_string())?,
        )?)
    };
    let index = read(layout.join("index.json"))?;
    let m = index["manifests"][0]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .context("index.json has no manifest")?;
    let manifest = read(layout.join("blobs/sha256").join(m))?;
    manifest["layers"][0]["digest"]
        .as_str()
        .map(str::to_owned)
        .context("manifest has no layer")
}

/// Median MB/s of a plain `curl` GET of blob `digest` from `repo` of `t`.
fn blob_get_mbps(
    t: &Target,
    auth: Option<&str>,
    repo: &str,
    digest: &str,
    reps: usize,
) -> Result<f64> {
    let url = format!("http://{}/v2/{repo}/blobs/{digest}", t.host);
    let mut speeds = Vec::new();
    for _ in 0..reps {
        let mut a = vec!["-fsS", "-o", "/dev/null", "-w", "%{speed_download}"];
        let h;
        if let Some(tok) = auth {
            h = format!("Authorization: Bearer {tok}");
            a.extend(["-H", &h]);
        }
        a.push(&url);
        let bps: f64 = sh("curl", &a)?.trim().parse().context("curl speed")?;
        speeds.push(bps / 1e6);
    }
    Ok(median(speeds))
}

/// Manifest GETs per second with hey.
fn manifest_rps(t: &Target, auth: Option<&str>, repo: &str, secs: u64, conc: usize) -> Result<f64> {
    let url = format!("http://{}/v2/{repo}/manifests/test", t.host);
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json";
    let dur = format!("{secs}s");
    let c = conc.to_string();
    let mut a = vec!["-z", &dur, "-c", &c, "-H", accept];
    let h;
    if let Some(tok) = auth {
        h = format!("Authorization: Bearer {tok}");
        a.extend(["-H", &h]);
    }
    a.push(&url);
    let out = sh("hey", &a)?;
    let non200: usize = out
        .lines()
        .skip_while(|l| !l.contains("Status code distribution"))
        .filter(|l| l.trim_start().starts_with('[') && !l.contains("[200]"))
        .count();
    if non200 > 0 {
        bail!(
            "manifest GETs on {} answered other than 200:\n{out}",
            t.name
        );
    }
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("hey printed no Requests/sec")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The reference registry; killed (by pid) when dropped.
struct Reference(std::process::Child);

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_reference(dir: &Path) -> Result<(Reference, String)> {
    let port = free_port()?;
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .args(["serve", cfg.to_str().context("path")?])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start docker-registry")?;
    let r = Reference(child);
    let host = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&host).is_ok() {
            return Ok((r, host));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("docker-registry did not listen on {host}")
}

pub fn run(args: RegistryArgs) -> Result<()> {
    for t in ["skopeo", "umoci", "hey", "docker-registry", "curl"] {
        need(t)?;
    }
    std::fs::create_dir_all(args.work.join("pull"))?;
    let (big, many) = args.sizes.build(&args.work, "", false)?;

    let dir = tempfile::Builder::new()
        .prefix("hive-bench-registry-")
        .tempdir()?;
    let hive_data = dir.path().join("hive");
    let ref_data = dir.path().join("reference");
    std::fs::create_dir_all(&hive_data)?;
    std::fs::create_dir_all(&ref_data)?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = ServerConfig {
        data_dir: hive_data.clone(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    let (host, secret) = server_rt.block_on(async {
        let server =
            hive_server::launch(config, "127.0.0.1:0".parse()?, std::future::pending()).await?;
        let host = server.url.trim_start_matches("http://").to_owned();
        let admin = server.admin_token.clone();
        let client = Client::new(&format!("http://{host}"), Some(admin))?;
        client
            .create(
                None,
                &Tenant {
                    name: "bench".into(),
                    ..Default::default()
                },
            )
            .await?;
        let tok = client
            .create_token(
                Some("bench"),
                &TokenCreate {
                    name: "bench".into(),
                    role: Role::Member,
                    expires_in_secs: None,
                },
            )
            .await?;
        anyhow::Ok((host, tok.token))
    })?;
    let (_reference, ref_host) = start_reference(&ref_data)?;
    let hive = Target {
        name: "hive",
        host,
        creds: Some(format!("bench:{secret}")),
        prefix: "bench",
    };
    let reference = Target {
        name: "reference",
        host: ref_host,
        creds: None,
        prefix: "bench",
    };

    println!(
        "hive-bench registry: skopeo {}, {} reps, big 1x{} MiB, many {}x{} KiB, manifest GETs c={} for {} s; load {}",
        sh("skopeo", &["--version"])?
            .split_whitespace()
            .nth(2)
            .unwrap_or("?"),
        args.reps,
        args.sizes.big_mib,
        args.sizes.many,
        args.sizes.many_kib,
        args.conc,
        args.manifest_secs,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut push_ratios = Vec::new();
    let mut pull_ratios = Vec::new();
    let mut floors = Vec::new();
    for (img, layout) in [("big", &big), ("many", &many)] {
        let mib = image_bytes(layout)? as f64 / (1 << 20) as f64;
        let (rp, rl) = push_pull(&reference, layout, img, args.reps, &args.work)?;
        let (hp, hl) = push_pull(&hive, layout, img, args.reps, &args.work)?;
        println!(
            "{img:<5} {mib:8.1} MiB  push: hive {hp:6.2} s ({:6.1} MiB/s)  reference {rp:6.2} s ({:6.1} MiB/s)  ratio {:.2}",
            mib / hp,
            mib / rp,
            rp / hp
        );
        println!(
            "{img:<5} {mib:8.1} MiB  pull: hive {hl:6.2} s ({:6.1} MiB/s)  reference {rl:6.2} s ({:6.1} MiB/s)  ratio {:.2}",
            mib / hl,
            mib / rl,
            rl / hl
        );
        let floor = client_floor(layout, args.reps, &args.work)?;
        println!(
            "{img:<5} {mib:8.1} MiB  client floor (skopeo layout to layout, no registry): {floor:6.2} s ({:6.1} MiB/s)",
            mib / floor
        );
        push_ratios.push(rp / hp);
        pull_ratios.push(rl / hl);
        floors.push(floor);
    }
    // The server's own share of a pull: the big layer with curl, nothing hashed or written.
    let pid = std::process::id();
    let last = args.reps.saturating_sub(1);
    let big_repo = format!("bench/big-{pid}-r{last}");
    let layer = first_layer(&big)?;
    let hive_get = blob_get_mbps(&hive, Some(&secret), &big_repo, &layer, args.reps)?;
    let ref_get = blob_get_mbps(&reference, None, &big_repo, &layer, args.reps)?;
    println!(
        "big layer GET with curl: hive {hive_get:.0} MB/s  reference {ref_get:.0} MB/s  ratio {:.2}",
        hive_get / ref_get
    );

    // Manifest reads: one small image tagged `test` in each.
    let m_repo = format!("bench/manifest-{}", std::process::id());
    for t in [&hive, &reference] {
        let mut a = vec!["copy", "--quiet", "--dest-tls-verify=false"];
        if let Some(c) = &t.creds {
            a.extend(["--dest-creds", c]);
        }
        let src = format!("oci:{}:test", many.display());
        let dst = format!("docker://{}/{m_repo}:test", t.host);
        a.extend([src.as_str(), dst.as_str()]);
        sh("skopeo", &a)?;
    }
    // Hive: a scoped registry token from the token endpoint, as docker clients do.
    let token_json = sh(
        "curl",
        &[
            "-fsS",
            "-u",
            &format!("bench:{secret}"),
            &format!(
                "http://{}/v2/token?service=hive-registry&scope=repository:{m_repo}:pull",
                hive.host
            ),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&token_json)?;
    let tok = v["token"]
        .as_str()
        .context("token endpoint gave no token")?;
    let ref_rps = manifest_rps(&reference, None, &m_repo, args.manifest_secs, args.conc)?;
    let hive_rps = manifest_rps(&hive, Some(tok), &m_repo, args.manifest_secs, args.conc)?;
    println!(
        "manifest GET c={}: hive {hive_rps:.0} req/s  reference {ref_rps:.0} req/s  ratio {:.2}",
        args.conc,
        hive_rps / ref_rps
    );
    if args.rss_mib > 0 {
        let (idle, peak) = rss_during_push(&hive.host, &secret, &args.work, args.rss_mib)?;
        println!(
            "rss: {} MiB blob pushed with curl: server process {} MiB idle, {} MiB peak (+{} MiB)",
            args.rss_mib,
            idle >> 10,
            peak >> 10,
            peak.saturating_sub(idle) >> 10
        );
    }
    let geo = |v: &[f64]| v.iter().product::<f64>().powf(1.0 / v.len() as f64);
    println!(
        "push_ratio={:.2} pull_ratio={:.2} manifest_ratio={:.2} pull_floor_big_s={:.2} pull_floor_many_s={:.2} blob_get_ratio={:.2}",
        geo(&push_ratios),
        geo(&pull_ratios),
        hive_rps / ref_rps,
        floors[0],
        floors[1],
        hive_get / ref_get
    );
    drop(server_rt);
    Ok(())
}
