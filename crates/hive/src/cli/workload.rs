//! Docker-like verbs on a tenant's workloads: `hive run`, `hive rm`, `hive logs`, `hive exec`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use futures_util::StreamExt;
use hive_api::{ErrorCode, Instance, InstancePhase, Service};
use hive_client::LogsQuery;
use hive_client::exec::{Frame, read_frame};

use super::Ctx;
use super::resources::TemplateArgs;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Service name (default: from the image, with a random suffix).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the service is created, without waiting for its container.
    #[arg(long, short = 'd')]
    pub detach: bool,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Image reference.
    pub image: String,
    /// Command and arguments: replace the image's cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Services to remove (with their containers).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Return without waiting for the containers to be gone.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Send this terminal's stdin to the process.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Give the process a terminal (with -i: an interactive shell).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// An instance, or a service (its first running instance).
    pub name: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The process's exit code, to become `hive`'s own (also: errors already printed, exit
/// with this code).
#[derive(Debug)]
pub struct ExitWith(pub i32);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// An instance, or a service (all its instances, each line prefixed with the instance's
    /// name when there are several).
    pub name: String,
    /// Keep printing new output until the container exits.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, short = 'n')]
    pub tail: Option<u64>,
    /// Prefix each line with its time.
    #[arg(long, short = 't')]
    pub timestamps: bool,
}

/// A name from an image reference: its last path component, without tag or digest.
fn name_from_image(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let base = last.split(['@', ':']).next().unwrap_or(last);
    let s = hive_api::validate::to_name(base, 40);
    if s.is_empty() { "run".into() } else { s }
}

fn suffix() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        ^ u128::from(std::process::id()) << 64;
    (0..5)
        .map(|_| {
            let c = CHARS[(n % CHARS.len() as u128) as usize] as char;
            n /= CHARS.len() as u128;
            c
        })
        .collect()
}

/// Start-up failures the agent reports in `status.reason`; one that persists (the agent retries
/// with backoff) ends `hive run`.
const FAILED_STARTS: &[&str] = &[
    "ImagePullFailed",
    "RootfsFailed",
    "InvalidSpec",
    "StartFailed",
];

/// `hive run`: a service of one replica; waits until its container runs.
pub async fn run(ctx: &Ctx, args: RunArgs) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", name_from_image(&args.image), suffix()));
    let svc = args
        .template
        .service(name.clone(), args.image, 1, args.args)?;
    ctx.client.create(Some(&tenant), &svc).await?;
    if args.detach {
        println!("{name}");
        return Ok(());
    }
    let t0 = Instant::now();
    let mut last_reason = String::new();
    // A failed start is retried by the agent: it is final only if it persists.
    let mut failing_since: Option<Instant> = None;
    loop {
        let all = ctx.client.list::<Instance>(Some(&tenant)).await?;
        let mine: Vec<&Instance> = all
            .items
            .iter()
            .filter(|i| i.spec.service == name)
            .collect();
        if let Some(i) = mine
            .iter()
            .find(|i| i.status.phase == InstancePhase::Running)
        {
            println!(
                "{name}: instance {} running on node {} (pid {})",
                i.name,
                i.spec.node.as_deref().unwrap_or("-"),
                i.status.pid.unwrap_or_default()
            );
            return Ok(());
        }
        if let Some(i) = mine.iter().find(|i| {
            matches!(
                i.status.phase,
                InstancePhase::Failed | InstancePhase::Succeeded
            )
        }) {
            println!(
                "{name}: instance {} exited with code {} ({})",
                i.name,
                i.status.exit_code.unwrap_or_default(),
                i.status.reason
            );
            return Ok(());
        }
        let failing = mine
            .iter()
            .find(|i| FAILED_STARTS.contains(&i.status.reason.as_str()));
        if failing.is_none() {
            failing_since = None;
        }
        if let Some(i) = failing
            && failing_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(3)
        {
            bail!(
                "{name}: instance {} did not start: {}: {} (the service stays; `hive rm {name}` \
                 removes it)",
                i.name,
                i.status.reason,
                i.status.message
            );
        }
        if let Some(i) = mine.first()
            && !i.status.reason.is_empty()
            && i.status.reason != last_reason
        {
            eprintln!("{name}: {}: {}", i.status.reason, i.status.message);
            last_reason = i.status.reason.clone();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "{name}: not running after 2 minutes{} (the service stays; `hive rm {name}` \
                 removes it)",
                if last_reason.is_empty() {
                    String::new()
                } else {
                    format!(", last: {last_reason}")
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `hive rm`: deletes services and waits until their instances are gone. Like `docker rm`,
/// a name that cannot be removed (missing, forbidden) does not stop the others: each
/// failure is printed naming its service, and `hive` exits with 1 if there was any.
pub async fn rm(ctx: &Ctx, args: RmArgs) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let mut removed: Vec<&str> = Vec::with_capacity(args.names.len());
    let mut failed = 0;
    for name in &args.names {
        match ctx.client.delete::<Service>(Some(&tenant), name).await {
            Ok(_) => removed.push(name),
            Err(e) => {
                eprintln!("error: remove service {name}: {e}");
                failed += 1;
            }
        }
    }
    if !args.no_wait && !removed.is_empty() {
        let t0 = Instant::now();
        loop {
            let all = ctx.client.list::<Instance>(Some(&tenant)).await?;
            let left = all
                .items
                .iter()
                .filter(|i| removed.contains(&i.spec.service.as_str()))
                .count();
            if left == 0 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{left} instances still stopping after a minute; `hive instance ls` shows them"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for name in removed {
        println!("{name} removed");
    }
    match failed {
        0 => Ok(()),
        // Each failure was printed above, with its name.
        _ => Err(ExitWith(1).into()),
    }
}

/// `hive logs`: one instance's output, or every instance of a service.
pub async fn logs(ctx: &Ctx, args: LogsArgs) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let q = LogsQuery {
        follow: args.follow,
        tail: args.tail,
        timestamps: args.timestamps,
    };
    let instances: Vec<String> = instances_named(ctx, &tenant, &args.name)
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    if instances.is_empty() {
        bail!("service {} has no instances", args.name);
    }
    let prefix = instances.len() > 1;
    let mut streams = Vec::with_capacity(instances.len());
    for name in &instances {
        let s = ctx.client.logs(&tenant, name, &q).await?;
        let name = name.clone();
        streams.push(s.map(move |r| (name.clone(), r)).boxed());
    }
    let mut all = futures_util::stream::select_all(streams);
    // With several instances, whole lines only, each under its instance's name.
    let mut partial: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut out = std::io::stdout().lock();
    while let Some((name, chunk)) = all.next().await {
        let chunk = chunk?;
        if !prefix {
            out.write_all(&chunk)?;
            out.flush()?;
            continue;
        }
        let buf = partial.entry(name.clone()).or_default();
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            write!(out, "{name} | ")?;
            out.write_all(&line)?;
        }
        out.flush()?;
    }
    for (name, rest) in partial {
        if !rest.is_empty() {
            write!(out, "{name} | ")?;
            out.write_all(&rest)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// The instance called `name`, else the instances of the service called `name` (by name).
async fn instances_named(ctx: &Ctx, tenant: &str, name: &str) -> Result<Vec<Instance>> {
    match ctx.client.get::<Instance>(Some(tenant), name).await {
        Ok(i) => Ok(vec![i]),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {
            ctx.client.get::<Service>(Some(tenant), name).await?;
            let all = ctx.client.list::<Instance>(Some(tenant)).await?;
            let mut mine: Vec<Instance> = all
                .items
                .into_iter()
                .filter(|i| i.spec.service == name)
                .collect();
            mine.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(mine)
        }
        Err(e) => Err(e.into()),
    }
}

/// Puts the local terminal in raw mode while alive.
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        match rustix::termios::tcgetattr(&stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                raw.make_raw();
                let _ =
                    rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
                Self(Some(saved))
            }
            Err(_) => Self(None),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn window_size() -> Option<Frame> {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .map(|w| Frame::Resize {
            cols: w.ws_col,
            rows: w.ws_row,
        })
}

/// `hive exec`: runs a command in a container; `hive` exits with its exit code.
pub async fn exec(ctx: &Ctx, args: ExecArgs) -> Result<()> {
    use std::io::IsTerminal;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tenant = ctx.tenant().await?;
    let found = instances_named(ctx, &tenant, &args.name).await?;
    let instance = match found.as_slice() {
        [one] if one.name == args.name => one.name.clone(),
        many => many
            .iter()
            .find(|i| i.status.phase == InstancePhase::Running)
            .map(|i| i.name.clone())
            .ok_or_else(|| anyhow::anyhow!("service {} has no running instance", args.name))?,
    };
    let io = ctx
        .client
        .exec(&tenant, &instance, &args.command, args.tty)
        .await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let local_tty = args.tty && std::io::stdin().is_terminal();
    let _raw = local_tty.then(RawTerminal::enter);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
    let sender = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if wr.write_all(&f.encode()).await.is_err() {
                break;
            }
        }
    });
    if args.tty
        && let Some(size) = window_size()
    {
        let _ = tx.send(size).await;
    }
    let mut tasks = Vec::new();
    if args.tty {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(size) = window_size()
                    && tx.send(size).await.is_err()
                {
                    break;
                }
            }
        }));
    }
    if args.interactive {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Frame::StdinEof).await;
                        break;
                    }
                    Ok(n) => {
                        if tx
                            .send(Frame::Stdin(bytes::Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }));
    } else if !args.tty {
        // No input: the process sees end of file (a terminal simply gets no keys).
        let _ = tx.send(Frame::StdinEof).await;
    }
    drop(tx);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let outcome = loop {
        match read_frame(&mut rd).await {
            Ok(Some(Frame::Stdout(b))) => {
                stdout.write_all(&b).await?;
                stdout.flush().await?;
            }
            Ok(Some(Frame::Stderr(b))) => {
                stderr.write_all(&b).await?;
                stderr.flush().await?;
            }
            Ok(Some(Frame::Exit(code))) => break Ok(code),
            Ok(Some(Frame::Error(m))) => break Err(anyhow::anyhow!("exec in {instance}: {m}")),
            Ok(Some(_)) => {}
            Ok(None) => {
                break Err(anyhow::anyhow!(
                    "exec in {instance}: the connection closed before the exit code"
                ));
            }
            Err(e) => break Err(anyhow::anyhow!("exec in {instance}: {e}")),
        }
    };
    for t in tasks {
        t.abort();
    }
    sender.abort();
    drop(_raw);
    match outcome? {
        0 => Ok(()),
        code => Err(ExitWith(code).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_images_are_labels() {
        for (image, want) in [
            ("127.0.0.1:7080/default/busybox:latest", "busybox"),
            ("nginx", "nginx"),
            ("reg/ns/My_App@sha256:abc", "my-app"),
            ("reg/9lives:1", "9lives"),
            ("reg/__:1", "run"),
        ] {
            assert_eq!(name_from_image(image), want, "{image}");
            let full = format!("{want}-{}", suffix());
            assert!(hive_api::validate::name("n", &full).is_ok(), "{full}");
        }
    }
}
