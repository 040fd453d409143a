//! Network namespaces: creating and removing named ones (and spares made ahead, named
//! later), running code inside one, sysctls, and netlink connections bound to one.
//!
//! `setns`/`unshare(CLONE_NEWNET)` change only the calling thread, so everything that must
//! happen "inside" a namespace runs on a short-lived dedicated std thread; nothing forks.
//! A netlink socket stays bound to the namespace of the thread that created it, so a
//! connection made on such a thread configures that namespace from any thread afterwards.
//! This module owns the only `unsafe` of the crate.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::statfs::{NSFS_MAGIC, statfs};
use rtnetlink::Handle;
use rtnetlink::sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};

use crate::NetError;

/// The network namespace of the calling thread.
pub(crate) fn current() -> Result<File, NetError> {
    File::open("/proc/thread-self/ns/net")
        .map_err(|e| NetError::io("open /proc/thread-self/ns/net", e))
}

/// Opens a namespace file (a bind mount like `/run/netns/NAME`).
pub(crate) fn open(path: &Path) -> Result<File, NetError> {
    let f =
        File::open(path).map_err(|e| NetError::io(format!("open netns {}", path.display()), e))?;
    if !is_nsfs(path) {
        return Err(NetError::invalid(
            "netns path",
            format!("{} is not a mounted network namespace", path.display()),
        ));
    }
    Ok(f)
}

pub(crate) fn is_nsfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Runs `f` on a new thread that first joins the namespace `ns`, and awaits its result.
pub(crate) async fn run_in<T, F>(ns: &File, what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let ns = ns
        .try_clone()
        .map_err(|e| NetError::io(format!("{what}: dup netns fd"), e))?;
    spawn(what, move || {
        nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::io("setns", e))?;
        f()
    })
    .await
}

/// [`run_in`], but right on the calling thread when it is in `ns` already (the node's
/// namespace is the agent's own): no thread to start for a sysctl or two.
pub(crate) async fn run_in_or_here<T, F>(ns: &File, what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let here = nix::sys::stat::stat("/proc/thread-self/ns/net");
    let there = nix::sys::stat::fstat(ns.as_fd());
    match (here, there) {
        (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) => f(),
        _ => run_in(ns, what, f).await,
    }
}

/// No IPv6 on the node-side devices `devs`: no link-local addresses, RS or MLD on tenant L2.
pub(crate) async fn disable_ipv6(node_ns: &File, devs: Vec<String>) -> Result<(), NetError> {
    run_in_or_here(node_ns, "disable ipv6", move || {
        if !Path::new("/proc/sys/net/ipv6").exists() {
            return Ok(());
        }
        for d in devs {
            if read_sysctl(&format!("net/ipv6/conf/{d}/disable_ipv6"))? != "1" {
                write_sysctl(&format!("net/ipv6/conf/{d}/disable_ipv6"), "1")?;
            }
        }
        Ok(())
    })
    .await
}

/// Runs `f` on a dedicated thread (which may then change its own namespaces freely).
async fn spawn<T, F>(what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("hive-net-ns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetError::io(format!("{what}: spawn thread"), e))?;
    rx.await.map_err(|_| NetError::Io {
        op: format!("{what}: namespace thread panicked"),
        source: std::io::Error::other("thread ended without a result"),
    })?
}

/// Writes `value` to `/proc/sys/<key with dots as slashes>` from the calling thread, so in
/// the calling thread's network namespace.
pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = sysctl_path(key);
    let mut f = File::options()
        .write(true)
        .open(&path)
        .map_err(|e| NetError::io(format!("sysctl {key}"), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| NetError::io(format!("sysctl {key}={value}"), e))
}

/// Writes several sysctls; IPv6 ones are skipped on a kernel without IPv6.
pub(crate) fn write_sysctls(list: &[(&str, &str)]) -> Result<(), NetError> {
    let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
    for (k, v) in list {
        if ipv6 || !k.starts_with("net.ipv6.") {
            write_sysctl(k, v)?;
        }
    }
    Ok(())
}

pub(crate) fn read_sysctl(key: &str) -> Result<String, NetError> {
    std::fs::read_to_string(sysctl_path(key))
        .map(|s| s.trim().to_owned())
        .map_err(|e| NetError::io(format!("read sysctl {key}"), e))
}

fn sysctl_path(key: &str) -> PathBuf {
    // Interface names may contain dots; callers pass those keys with '/' already.
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// A new netlink route socket bound to the calling thread's namespace.
pub(crate) fn netlink_socket() -> Result<Socket, NetError> {
    Socket::new(NETLINK_ROUTE).map_err(|e| NetError::io("netlink socket", e))
}

/// Wraps a socket made by [`netlink_socket`] (on any thread) into an rtnetlink handle whose
/// connection task runs on the current tokio runtime and ends when the last handle clone
/// is dropped (which also closes the socket, so the namespace is not kept alive by it).
pub(crate) fn handle_from_socket(sock: Socket) -> Result<Handle, NetError> {
    use std::os::fd::FromRawFd;
    let fd = sock.into_raw_fd();
    // SAFETY: `fd` was just released by `into_raw_fd` from a live netlink socket, so it is
    // open, of the type TokioSocket expects, and owned by nothing else from here on.
    let sock = unsafe { TokioSocket::from_raw_fd(fd) };
    let (conn, handle, _) = rtnetlink::from_socket(sock);
    tokio::spawn(conn);
    Ok(handle)
}

/// What [`create_or_open`] and [`Spare::name`] hand back.
pub(crate) struct NamedNetns {
    pub(crate) ns: File,
    pub(crate) socket: Socket,
    pub(crate) created: bool,
    /// Its `lo` is up already.
    pub(crate) lo_up: bool,
    /// The veth pair made in it ahead, if it was a spare that has one.
    pub(crate) veth: Option<SpareVeth>,
}

/// A veth pair made in a spare namespace ahead of its port: the container side inside as
/// `eth0` (a random address, down), the host side in the node's namespace, down, IPv6 off,
/// on no bridge, under a name of its own (`{prefix}s{n}`, which no port, network or teardown
/// matches). The port renames it and puts it on its bridge instead of making a pair. Both
/// go with the namespace if it is dropped unnamed (a veth pair dies with either end's
/// namespace), so a killed agent leaves none.
#[derive(Debug)]
pub(crate) struct SpareVeth {
    /// Its host side's interface index.
    pub(crate) index: u32,
}

/// What a spare's veth pair is made with: the node's netlink handle and namespace, its
/// names' prefix and the ports' MTU.
#[derive(Clone)]
pub(crate) struct VethPlan {
    pub(crate) handle: Handle,
    pub(crate) node_ns: std::sync::Arc<File>,
    pub(crate) prefix: String,
    pub(crate) mtu: u32,
}

/// The interface index of `lo` in every network namespace (registered first).
const LOOPBACK_IFINDEX: u32 = 1;

/// A network namespace made ahead of need, with no name yet: `sysctls` written, `lo` up, and
/// made inside it a netlink socket, the resolver's sockets and the nf_tables socket its VIP
/// table is written through (see [`Spare::make`]). It goes away with the last of them when
/// dropped unnamed.
pub(crate) struct Spare {
    ns: File,
    socket: Socket,
    inside: Inside,
    veth: Option<SpareVeth>,
}

/// The sockets a spare namespace hands over with its name, made inside it ahead: its
/// resolver's, and the nf_tables one of its VIP table (each saves a thread entering the
/// namespace when the instance's views are first applied).
pub(crate) struct Inside {
    pub(crate) dns: crate::dns::Sockets,
    pub(crate) nft: crate::nfnl::NfSocket,
}

impl Spare {
    /// Makes one on a thread of its own (`unshare`, the sysctls, `lo` up through a netlink
    /// connection run on that thread, the sockets).
    pub(crate) async fn make(
        sysctls: &'static [(&'static str, &'static str)],
    ) -> Result<Spare, NetError> {
        spawn("spare netns", move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::io("spare netns: unshare", e))?;
            write_sysctls(sysctls)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| NetError::io("spare netns: runtime", e))?;
            rt.block_on(async {
                let h = handle_from_socket(netlink_socket()?)?;
                crate::link::set_up(&h, LOOPBACK_IFINDEX, "lo").await
            })?;
            Ok(Spare {
                inside: Inside {
                    dns: crate::dns::bind()?,
                    nft: crate::nfnl::NfSocket::new()?,
                },
                ns: current()?,
                socket: netlink_socket()?,
                veth: None,
            })
        })
        .await
    }

    /// Makes its veth pair (see [`SpareVeth`]), named `name` on the node's side.
    async fn add_veth(&mut self, plan: &VethPlan, name: &str) -> Result<(), NetError> {
        crate::link::add_veth_pair(
            &plan.handle,
            name,
            crate::CONTAINER_IFNAME,
            self.ns.as_raw_fd(),
            plan.mtu,
        )
        .await?;
        let host = crate::link::get(&plan.handle, name)
            .await?
            .ok_or_else(|| NetError::invalid("spare veth", format!("{name} is gone")))?;
        // Here rather than when it becomes a port.
        disable_ipv6(&plan.node_ns, vec![name.to_owned()]).await?;
        self.veth = Some(SpareVeth { index: host.index });
        Ok(())
    }

    /// Names it: bind-mounted at `path` (a namespace file, like `ip netns attach`).
    pub(crate) fn name(self, path: &Path) -> Result<(NamedNetns, Inside), NetError> {
        let what = format!("netns {}", path.display());
        mount_point(path, &what)?;
        let source = format!("/proc/self/fd/{}", self.ns.as_raw_fd());
        nix::mount::mount(
            Some(source.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            NetError::io(format!("bind mount {what}"), e)
        })?;
        let named = NamedNetns {
            ns: self.ns,
            socket: self.socket,
            created: true,
            lo_up: true,
            veth: self.veth,
        };
        Ok((named, self.inside))
    }
}

/// How many spare namespaces a node keeps ready once asked to.
const SPARES: usize = 2;

/// The spare namespaces of a node ([`Spare`]): the next ports are named ones of them instead
/// of waiting for `unshare`, sysctls, `lo` and the resolver's sockets (~1 ms, a thread each).
#[derive(Clone, Default)]
pub(crate) struct Spares {
    ready: std::sync::Arc<std::sync::Mutex<Vec<Spare>>>,
    filling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The number in the next spare veth's name.
    seq: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares")
            .field("ready", &self.lock().len())
            .finish()
    }
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take(&self) -> Option<Spare> {
        self.lock().pop()
    }

    /// The inode numbers of the ready ones (what `lsns` and `ip netns identify` go by).
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.lock()
            .iter()
            .filter_map(|s| nix::sys::stat::fstat(s.ns.as_fd()).ok())
            .map(|st| st.st_ino)
            .collect()
    }

    /// Tops the spares up to [`SPARES`], one at a time on a task of the current runtime,
    /// each with a veth pair if `veth` says how; does nothing while a refill is under way. A
    /// failure is logged and ends the refill (ports then make their namespaces, or their
    /// veth pairs, themselves).
    pub(crate) fn refill(
        &self,
        sysctls: &'static [(&'static str, &'static str)],
        veth: Option<VethPlan>,
    ) {
        use std::sync::atomic::Ordering;
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            while me.lock().len() < SPARES {
                match Spare::make(sysctls).await {
                    Ok(mut spare) => {
                        if let Some(plan) = &veth {
                            // Up to 8 digits: `{prefix}s{n}` fits 15 bytes.
                            let n = me.seq.fetch_add(1, Ordering::Relaxed) % 100_000_000;
                            let name = format!("{}s{n}", plan.prefix);
                            if let Err(e) = spare.add_veth(plan, &name).await {
                                tracing::warn!(error = %e, "make a spare veth pair");
                                break;
                            }
                        }
                        me.lock().push(spare)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "make a spare network namespace");
                        break;
                    }
                }
            }
            me.filling.store(false, Ordering::Release);
        });
    }
}

/// Creates the file a namespace is bind-mounted on; a plain file left by a crash between
/// create and mount is reused.
fn mount_point(path: &Path, what: &str) -> Result<(), NetError> {
    File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(path)
        .map(drop)
        .map_err(|e| NetError::io(format!("create {what}"), e))
}

/// Makes `dir` a shared mount point, as `ip netns add` does, so namespace bind mounts made
/// later propagate into mount namespaces (e.g. a runtime helper's) created before them.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), NetError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NetError::io(format!("create {}", dir.display()), e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match nix::mount::mount(None::<&str>, dir, None::<&str>, shared, None::<&str>) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself first.
            nix::mount::mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetError::io(format!("bind mount {}", dir.display()), e))?;
            nix::mount::mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
                .map_err(|e| NetError::io(format!("make {} shared", dir.display()), e))
        }
        Err(e) => Err(NetError::io(format!("make {} shared", dir.display()), e)),
    }
}

/// Opens the named namespace at `path`, creating it (like `ip netns add`, without forking)
/// if it does not exist. On the namespace's own thread, writes `sysctls` and makes a
/// netlink socket bound to it.
pub(crate) async fn create_or_open(
    path: PathBuf,
    sysctls: &'static [(&'static str, &'static str)],
) -> Result<NamedNetns, NetError> {
    let what = format!("netns {}", path.display());
    spawn(&what.clone(), move || {
        let created = if is_nsfs(&path) {
            let ns = open(&path)?;
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::io(format!("setns {what}"), e))?;
            false
        } else {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::io(format!("{what}: unshare"), e))?;
            mount_point(&path, &what)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                NetError::io(format!("bind mount {what}"), e)
            })?;
            true
        };
        write_sysctls(sysctls)?;
        let ns = current()?;
        let socket = netlink_socket()?;
        Ok(NamedNetns {
            ns,
            socket,
            created,
            lo_up: false,
            veth: None,
        })
    })
    .await
}

/// Unmounts and deletes a named namespace file; a missing one is not an error.
pub(crate) fn remove(path: &Path) -> Result<(), NetError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(NetError::io(format!("umount netns {}", path.display()), e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(format!("remove netns {}", path.display()), e)),
    }
}

/// Names of the files in `dir` (namespace files), sorted.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<String>, NetError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::io(format!("list {}", dir.display()), e)),
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// A `pre_exec` hook for child processes (the `nft` binary) that must run in `ns`.
/// Runs `program` (from Debian package `package`) with `args` in the namespace `ns`, with
/// `stdin` written to it: its stdout when it exits with 0, else what went wrong (its stderr).
pub(crate) async fn run_program(
    ns: &File,
    program: &str,
    package: &str,
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    enter_in_child(&mut cmd, ns);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("the {program} binary is not in PATH (install {package})")
        } else {
            format!("spawn {program}: {e}")
        }
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(&data)
            .await
            .map_err(|e| format!("write to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("wait for {program}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

pub(crate) fn enter_in_child(cmd: &mut tokio::process::Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes the setns
    // system call, which is async-signal-safe; `fd` stays open in the child because fds
    // are inherited by fork and only closed by exec (O_CLOEXEC), and `ns` outlives the
    // spawn call in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}
