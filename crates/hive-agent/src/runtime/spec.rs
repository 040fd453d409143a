//! The OCI runtime spec (`config.json`) of a container: what to run (from the image config
//! and the service's container template) and how it is confined — Docker-equivalent
//! defaults: its own pid, mount, uts, ipc and network namespaces, the default capability
//! set, `no_new_privs`, masked and read-only `/proc` paths, a seccomp filter, and cgroup
//! limits for CPU, memory and pids.
//!
//! Pure functions: no I/O except reading the rootfs's `/etc/passwd` and `/etc/group` to
//! resolve a user name.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder, PosixRlimitBuilder,
    PosixRlimitType, RootBuilder, Spec, UserBuilder,
};

/// CFS period for CPU limits: 100 ms, as Docker.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Open files per container (the hosts' hard limit is 20000).
pub const NOFILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container {id}: the image has no entrypoint or cmd and the service gives no command")]
    NoCommand { id: String },
    #[error("container {id}: user {user:?} is not in the image's /etc/passwd")]
    UnknownUser { id: String, user: String },
    #[error("container {id}: group {group:?} is not in the image's /etc/group")]
    UnknownGroup { id: String, group: String },
    #[error("container {id}: build the runtime spec: {source}")]
    Build {
        id: String,
        source: oci_spec::OciSpecError,
    },
}

/// What the image says to run (from its config); all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// The signal that asks it to stop (`SIGQUIT`, `15`…); empty means SIGTERM.
    pub stop_signal: String,
}

/// The bundle annotation that keeps the image's stop signal for whoever stops the container.
pub const STOP_SIGNAL_ANNOTATION: &str = "org.opencontainers.image.stopSignal";

/// A signal name or number as `runc kill` takes it, from an image (hostile input): `TERM`
/// when it is not one.
pub fn stop_signal(raw: &str) -> String {
    let name = raw.strip_prefix("SIG").unwrap_or(raw);
    let number = name.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n));
    let named = name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.len() <= 12
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'+' || b == b'-');
    if number || named {
        name.to_owned()
    } else {
        "TERM".to_owned()
    }
}

/// What the service's template overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessOverride {
    /// Replaces the entrypoint (and then the image's cmd is dropped, as Docker does).
    pub command: Vec<String>,
    /// Replaces the cmd.
    pub args: Vec<String>,
    /// Added to (and overriding by name) the image's environment.
    pub env: Vec<(String, String)>,
}

/// Limits enforced by the container's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_millis: Option<u64>,
    /// Relative weight (cgroup v1 `cpu.shares`): from the CPU request, 1024 per core.
    pub cpu_request_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Everything needed to write one container's spec.
#[derive(Clone, Debug)]
pub struct ContainerConfig {
    pub id: String,
    pub hostname: String,
    pub rootfs: PathBuf,
    pub image: ImageProcess,
    pub overrides: ProcessOverride,
    pub limits: Limits,
    /// The cgroup, relative to each hierarchy's root (`/hive/<tenant>/<instance>`).
    pub cgroups_path: PathBuf,
    /// A network namespace to join (prepared by the network layer); none: a new empty one.
    pub netns: Option<PathBuf>,
}

/// The argv and environment the container runs with.
pub fn resolve_process(
    id: &str,
    image: &ImageProcess,
    over: &ProcessOverride,
) -> Result<(Vec<String>, Vec<String>), SpecError> {
    let (entrypoint, cmd) = if over.command.is_empty() {
        let cmd = if over.args.is_empty() {
            &image.cmd
        } else {
            &over.args
        };
        (&image.entrypoint, cmd)
    } else {
        (&over.command, &over.args)
    };
    let args: Vec<String> = entrypoint.iter().chain(cmd.iter()).cloned().collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand { id: id.to_owned() });
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if env.insert(k.to_owned(), v.to_owned()).is_none() {
            order.push(k.to_owned());
        }
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in &over.env {
        set(k, v);
    }
    let env = order.iter().map(|k| format!("{k}={}", env[k])).collect();
    Ok((args, env))
}

/// Resolves `user[:group]` (names or numbers) against the rootfs's passwd and group files.
pub fn resolve_user(
    id: &str,
    rootfs: &Path,
    user: &str,
) -> Result<(u32, u32, Vec<u32>), SpecError> {
    if user.is_empty() {
        return Ok((0, 0, Vec::new()));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let entries = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect()
    };
    let passwd = entries(&passwd);
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .iter()
                .find(|e| e.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(uid))
                .and_then(|e| e.get(3)?.parse().ok())
                .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => passwd
            .iter()
            .find(|e| e.first().map(String::as_str) == Some(u))
            .and_then(|e| Some((e.get(2)?.parse().ok()?, e.get(3)?.parse().ok()?)))
            .ok_or_else(|| SpecError::UnknownUser {
                id: id.to_owned(),
                user: u.to_owned(),
            })?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entries(&group)
                .iter()
                .find(|e| e.first().map(String::as_str) == Some(g))
                .and_then(|e| e.get(2)?.parse().ok())
                .ok_or_else(|| SpecError::UnknownGroup {
                    id: id.to_owned(),
                    group: g.to_owned(),
                })?,
        },
    };
    Ok((uid, gid, Vec::new()))
}

/// Docker's default capability set.
pub fn default_capabilities() -> HashSet<Capability> {
    use Capability::*;
    [
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
    .into_iter()
    .collect()
}

/// System calls a container never needs and that widen the kernel's attack surface: refused
/// with EPERM. (Everything else is allowed: capabilities and namespaces do the rest.)
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

fn build_err(id: &str) -> impl Fn(oci_spec::OciSpecError) -> SpecError + '_ {
    move |source| SpecError::Build {
        id: id.to_owned(),
        source,
    }
}

/// What the runtime mounts over in every container, outside its other mounts: the default
/// mounts' top-level destinations (`/proc`, `/dev`, `/sys`; `/dev/pts` is inside `/dev`'s
/// tmpfs) and `/etc/resolv.conf` ([`mount_resolv_conf`]). The image store makes those an
/// image lacks once, in a layer on top of its layers.
pub fn mount_points() -> Vec<crate::image::mountpoints::MountPoint> {
    let dests: Vec<PathBuf> = Spec::default()
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().clone())
        .collect();
    let mut out: Vec<_> = dests
        .iter()
        .filter(|d| !dests.iter().any(|o| o != *d && d.starts_with(o)))
        .map(|d| crate::image::mountpoints::MountPoint {
            path: d.clone(),
            file: false,
        })
        .collect();
    out.push(crate::image::mountpoints::MountPoint {
        path: RESOLV_CONF.into(),
        file: true,
    });
    out
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Bind-mounts `file` read-only over the container's `/etc/resolv.conf` (its instance's
/// resolver, see `discovery`).
pub fn mount_resolv_conf(spec: &mut Spec, id: &str, file: &Path) -> Result<(), SpecError> {
    let m = oci_spec::runtime::MountBuilder::default()
        .destination(RESOLV_CONF)
        .typ("bind")
        .source(file)
        .options(vec![
            "rbind".to_owned(),
            "ro".to_owned(),
            "nosuid".to_owned(),
            "nodev".to_owned(),
            "noexec".to_owned(),
        ])
        .build()
        .map_err(build_err(id))?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|x| x.destination() != Path::new(RESOLV_CONF));
    mounts.push(m);
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The whole spec.
pub fn build(cfg: &ContainerConfig) -> Result<Spec, SpecError> {
    let id = cfg.id.as_str();
    let err = build_err(id);
    let (args, env) = resolve_process(id, &cfg.image, &cfg.overrides)?;
    let (uid, gid, additional) = resolve_user(id, &cfg.rootfs, &cfg.image.user)?;
    let mut spec = Spec::default();
    spec.set_hostname(Some(cfg.hostname.clone()));
    spec.set_root(Some(
        RootBuilder::default()
            .path(cfg.rootfs.clone())
            .readonly(false)
            .build()
            .map_err(&err)?,
    ));

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args));
    process.set_env(Some(env));
    let cwd = if cfg.image.working_dir.is_empty() {
        "/".into()
    } else {
        cfg.image.working_dir.clone()
    };
    process.set_cwd(cwd.into());
    process.set_user(
        UserBuilder::default()
            .uid(uid)
            .gid(gid)
            .additional_gids(additional)
            .build()
            .map_err(&err)?,
    );
    process.set_no_new_privileges(Some(true));
    let caps = default_capabilities();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .build()
            .map_err(&err)?,
    ));
    process.set_rlimits(Some(vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(NOFILE)
            .soft(NOFILE)
            .build()
            .map_err(&err)?,
    ]));
    spec.set_process(Some(process));

    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Network,
    ] {
        let mut ns = LinuxNamespaceBuilder::default().typ(typ);
        if typ == LinuxNamespaceType::Network
            && let Some(path) = &cfg.netns
        {
            ns = ns.path(path.clone());
        }
        namespaces.push(ns.build().map_err(&err)?);
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(cfg.cgroups_path.clone()));
    let mut resources = LinuxResourcesBuilder::default();
    if cfg.limits.memory_bytes.is_some() {
        let mem = cfg.limits.memory_bytes.map(|b| b as i64);
        // Swap as large as memory: the container cannot swap past its limit.
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(mem.unwrap_or_default())
                .swap(mem.unwrap_or_default())
                .build()
                .map_err(&err)?,
        );
    }
    if cfg.limits.cpu_millis.is_some() || cfg.limits.cpu_request_millis.is_some() {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(m) = cfg.limits.cpu_millis {
            cpu = cpu
                .quota((m * CPU_PERIOD_US / 1000) as i64)
                .period(CPU_PERIOD_US);
        }
        if let Some(r) = cfg.limits.cpu_request_millis {
            cpu = cpu.shares((r * 1024 / 1000).max(2));
        }
        resources = resources.cpu(cpu.build().map_err(&err)?);
    }
    if let Some(p) = cfg.limits.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(p as i64)
                .build()
                .map_err(&err)?,
        );
    }
    // Devices: deny all but the standard set (runc adds the default allow list itself).
    linux.set_resources(Some(resources.build().map_err(&err)?));
    let syscalls = vec![
        LinuxSyscallBuilder::default()
            .names(
                DENIED_SYSCALLS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc_eperm())
            .build()
            .map_err(&err)?,
    ];
    linux.set_seccomp(Some(
        LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .architectures(vec![
                Arch::ScmpArchX86_64,
                Arch::ScmpArchX86,
                Arch::ScmpArchX32,
            ])
            .syscalls(syscalls)
            .build()
            .map_err(&err)?,
    ));
    spec.set_linux(Some(linux));
    if !cfg.image.stop_signal.is_empty() {
        spec.set_annotations(Some(
            [(
                STOP_SIGNAL_ANNOTATION.to_owned(),
                stop_signal(&cfg.image.stop_signal),
            )]
            .into(),
        ));
    }
    Ok(spec)
}

const fn libc_eperm() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageProcess {
        ImageProcess {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["A=1".into(), "B=2".into()],
            working_dir: "/srv".into(),
            user: String::new(),
            stop_signal: String::new(),
        }
    }

    #[test]
    fn stop_signals_from_images_are_checked() {
        assert_eq!(stop_signal("SIGQUIT"), "QUIT");
        assert_eq!(stop_signal("QUIT"), "QUIT");
        assert_eq!(stop_signal("9"), "9");
        assert_eq!(stop_signal("SIGRTMIN+3"), "RTMIN+3");
        for bad in [
            "",
            "0",
            "65",
            "--all",
            "quit",
            "TERM; rm -rf /",
            "SIGVERYLONGNAME1",
        ] {
            assert_eq!(stop_signal(bad), "TERM", "{bad}");
        }
    }

    #[test]
    fn process_follows_docker_rules() {
        let img = image();
        let (args, env) = resolve_process("c", &img, &ProcessOverride::default()).unwrap();
        assert_eq!(args, ["/bin/app", "--serve"]);
        assert!(env.contains(&"A=1".to_string()) && env[0].starts_with("PATH="));
        // args replace cmd only.
        let over = ProcessOverride {
            args: vec!["--x".into()],
            ..Default::default()
        };
        assert_eq!(
            resolve_process("c", &img, &over).unwrap().0,
            ["/bin/app", "--x"]
        );
        // command replaces entrypoint and drops the image's cmd.
        let over = ProcessOverride {
            command: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert_eq!(resolve_process("c", &img, &over).unwrap().0, ["/bin/sh"]);
        // env overrides by name, keeps order.
        let over = ProcessOverride {
            env: vec![("B".into(), "9".into()), ("C".into(), "3".into())],
            ..Default::default()
        };
        let env = resolve_process("c", &img, &over).unwrap().1;
        assert_eq!(&env[1..], ["A=1", "B=9", "C=3"]);
        // Nothing to run is an error naming the container.
        let err = resolve_process(
            "web-1",
            &ImageProcess::default(),
            &ProcessOverride::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("web-1") && err.to_string().contains("no entrypoint"));
    }

    #[test]
    fn users_resolve_against_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nweb:x:34:\nstaff:x:50:\n",
        )
        .unwrap();
        assert_eq!(resolve_user("c", dir.path(), "").unwrap(), (0, 0, vec![]));
        assert_eq!(
            resolve_user("c", dir.path(), "www").unwrap(),
            (33, 34, vec![])
        );
        assert_eq!(
            resolve_user("c", dir.path(), "33").unwrap(),
            (33, 34, vec![])
        );
        assert_eq!(
            resolve_user("c", dir.path(), "www:staff").unwrap(),
            (33, 50, vec![])
        );
        assert_eq!(
            resolve_user("c", dir.path(), "1000:1000").unwrap(),
            (1000, 1000, vec![])
        );
        assert!(matches!(
            resolve_user("c", dir.path(), "nobody"),
            Err(SpecError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user("c", dir.path(), "www:nogroup"),
            Err(SpecError::UnknownGroup { .. })
        ));
    }

    #[test]
    fn spec_confines_the_container() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            hostname: "web-1".into(),
            rootfs: "/var/lib/hive/x/rootfs".into(),
            image: image(),
            overrides: ProcessOverride::default(),
            limits: Limits {
                cpu_millis: Some(500),
                cpu_request_millis: Some(250),
                memory_bytes: Some(64 << 20),
                pids: Some(100),
            },
            cgroups_path: "/hive/acme/web-1".into(),
            netns: None,
        };
        let spec = build(&cfg).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "mount", "uts", "ipc", "network"]);
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(json["process"]["cwd"], "/srv");
        let bounding = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert_eq!(bounding.len(), 14);
        assert!(!bounding.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(json["linux"]["resources"]["cpu"]["shares"], 256);
        assert_eq!(json["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(json["linux"]["cgroupsPath"], "/hive/acme/web-1");
        assert!(
            json["linux"]["maskedPaths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/kcore")
        );
        assert!(
            json["linux"]["readonlyPaths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/sys")
        );
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(json["hostname"], "web-1");
    }

    #[test]
    fn the_mount_points_made_ahead_are_the_top_level_destinations_of_the_mounts() {
        let mut spec = build(&ContainerConfig {
            id: "c1".into(),
            hostname: "web-1".into(),
            rootfs: "/var/lib/hive/x/rootfs".into(),
            image: image(),
            overrides: ProcessOverride::default(),
            limits: Limits::default(),
            cgroups_path: "/hive/acme/web-1".into(),
            netns: None,
        })
        .unwrap();
        mount_resolv_conf(&mut spec, "c1", Path::new("/x/resolv.conf")).unwrap();
        let points = mount_points();
        let paths: Vec<&Path> = points.iter().map(|p| p.path.as_path()).collect();
        assert_eq!(paths, ["/proc", "/dev", "/sys", "/etc/resolv.conf"]);
        assert!(
            points
                .iter()
                .all(|p| p.file == (p.path == Path::new(RESOLV_CONF)))
        );
        // Every mount of a spec is at one of them or inside one.
        for m in spec.mounts().as_ref().unwrap() {
            assert!(
                paths.iter().any(|p| m.destination().starts_with(p)),
                "{}",
                m.destination().display()
            );
        }
    }
}
