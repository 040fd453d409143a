//! Test images and tools the benchmarks share: OCI layouts built locally with umoci (no
//! registry, no internet), and running the peers' command-line tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The sizes of the two test images the benchmarks push, pull and start.
#[derive(Debug, clap::Args)]
pub struct ImageSizes {
    /// MiB of the one-layer image.
    #[arg(long, default_value_t = 256)]
    pub big_mib: usize,
    /// Layers of the many-layer image.
    #[arg(long, default_value_t = 50)]
    pub many: usize,
    /// KiB of each of its layers.
    #[arg(long, default_value_t = 100)]
    pub many_kib: usize,
}

impl ImageSizes {
    /// Builds (or reuses) the two images under `work`, named `<prefix>big` and
    /// `<prefix>many`; with `busybox` they can run. Returns (big, many).
    pub fn build(&self, work: &Path, prefix: &str, busybox: bool) -> Result<(PathBuf, PathBuf)> {
        let big = build_image(
            work,
            &format!("{prefix}big"),
            1,
            self.big_mib << 20,
            busybox,
        )?;
        let many = build_image(
            work,
            &format!("{prefix}many"),
            self.many,
            self.many_kib << 10,
            busybox,
        )?;
        Ok((big, many))
    }
}

pub fn need(tool: &str) -> Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("{tool} is not installed: run scripts/deps.sh");
    }
    Ok(())
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn random_file(path: &Path, bytes: usize) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = bytes;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len());
        rand_fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

fn rand_fill(buf: &mut [u8]) {
    for c in buf.chunks_mut(32) {
        let r: [u8; 32] = rand::random();
        c.copy_from_slice(&r[..c.len()]);
    }
}

/// Builds `name` as an OCI layout under `work/oci` (reused when already built): `layers`
/// layers of one random file of `bytes` each; with `busybox`, the first layer also holds
/// busybox-static and its applets, so the image runs (`/bin/sh`, `sleep`, `true`).
pub fn build_image(
    work: &Path,
    name: &str,
    layers: usize,
    bytes: usize,
    busybox: bool,
) -> Result<PathBuf> {
    let layout = work.join("oci").join(name);
    let stamp = layout.join(format!(".built-{layers}x{bytes}-{busybox}"));
    if stamp.exists() {
        return Ok(layout);
    }
    eprintln!("building image {name}: {layers} layer(s) of {bytes} bytes");
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(layout.parent().unwrap_or(work))?;
    let l = layout.to_str().context("path")?;
    let image = format!("{l}:test");
    let bundle = work.join(format!("{name}.bundle"));
    let _ = std::fs::remove_dir_all(&bundle);
    let b = bundle.to_str().context("path")?;
    sh("umoci", &["init", "--layout", l])?;
    sh("umoci", &["new", "--image", &image])?;
    sh(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
    )?;
    sh("umoci", &["unpack", "--image", &image, b])?;
    let rootfs = bundle.join("rootfs");
    if busybox {
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .context("copy /bin/busybox (install busybox-static)")?;
        for a in ["sh", "sleep", "true", "echo", "cat"] {
            std::os::unix::fs::symlink("busybox", bin.join(a))?;
        }
    }
    for i in 0..layers.max(1) {
        if i < layers {
            random_file(&rootfs.join(format!("f{i:03}.bin")), bytes)?;
        }
        sh(
            "umoci",
            &["repack", "--refresh-bundle", "--image", &image, b],
        )?;
    }
    sh("umoci", &["gc", "--layout", l])?;
    std::fs::remove_dir_all(&bundle)?;
    std::fs::write(&stamp, "")?;
    Ok(layout)
}

pub fn image_bytes(layout: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(layout.join("blobs/sha256"))? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}
