//! Real etcd processes for the etcd backend's tests: `/usr/bin/etcd` (Debian's etcd-server,
//! or `HIVE_TEST_ETCD`) on loopback, on free ports, in a temporary directory.
//!
//! Everything started is cleaned up: dropping an [`EtcdCluster`] (also while a failing test
//! unwinds) kills each member by the PID it was started with and removes the directory, and
//! each member gets SIGKILL from the kernel if the thread that started it dies first. A test
//! that cannot find etcd fails with what to install; it never passes without running.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hive_store::EtcdStoreOptions;

const DEFAULT_BINARY: &str = "/usr/bin/etcd";
/// Enough for Hive's largest value (1.5 MiB) with its key, which etcd's default (exactly
/// 1.5 MiB per request) refuses.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, also when clients speak TLS.
    pub metrics_port: u16,
    scheme: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl EtcdMember {
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    dir: tempfile::TempDir,
}

/// PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCerts {
    /// Made with the `openssl` command (Debian's openssl package).
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hive-etcd-certs-")
            .tempdir()
            .expect("temp dir");
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("this test needs the openssl command: {e}"));
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=hive test ca"];
        ca.extend(key);
        ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&ca);
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let mut request = vec!["req", "-subj"];
            let subject = format!("/CN=hive test {name}");
            request.push(&subject);
            request.extend(key);
            let (key_file, csr, cert) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            request.extend(["-keyout", &key_file, "-out", &csr]);
            openssl(&request);
            let ext = format!("{name}.ext");
            std::fs::write(
                path(&ext),
                format!(
                    "subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n\
                     keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
                ),
            )
            .expect("write extensions");
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ]);
        }
        Self {
            ca: path("ca.crt"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
            _dir: dir,
        }
    }
}

/// Ports that were free a moment ago (held until all are chosen, so they differ).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn etcd_binary() -> PathBuf {
    let binary = std::env::var_os("HIVE_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
    assert!(
        binary.is_file(),
        "this test needs a real etcd at {} (Debian: apt-get install etcd-server, or run \
         scripts/deps.sh; or point HIVE_TEST_ETCD at an etcd binary)",
        binary.display()
    );
    binary
}

impl EtcdCluster {
    /// Starts `size` members on fresh ports and waits until every one is healthy.
    pub fn start(size: usize) -> Self {
        Self::start_with(size, None)
    }

    /// Starts one member whose clients must speak TLS and show a certificate of `certs`' CA.
    pub fn start_tls(certs: &TestCerts) -> Self {
        Self::start_with(1, Some(certs))
    }

    fn start_with(size: usize, tls: Option<&TestCerts>) -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(3 * size);
            match Self::try_start(&ports, tls) {
                Ok(cluster) => return cluster,
                // Most likely a port taken between choosing and binding: choose again.
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "etcd cluster of {size} did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// Starts one member on the given client, peer and metrics ports (for a test that
    /// reserved them).
    pub fn start_on(ports: [u16; 3]) -> Self {
        Self::try_start(&ports, None).unwrap_or_else(|why| panic!("{why}"))
    }

    /// `ports` holds a client, a peer and a metrics port per member.
    fn try_start(ports: &[u16], tls: Option<&TestCerts>) -> Result<Self, String> {
        let binary = etcd_binary();
        let dir = tempfile::Builder::new()
            .prefix("hive-etcd-")
            .tempdir()
            .expect("temp dir");
        let token = format!(
            "hive-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let names: Vec<String> = (0..ports.len() / 3).map(|i| format!("m{i}")).collect();
        let initial_cluster: Vec<String> = names
            .iter()
            .zip(ports.chunks(3))
            .map(|(name, p)| format!("{name}=http://127.0.0.1:{}", p[1]))
            .collect();
        let mut cluster = Self {
            members: Vec::new(),
            dir,
        };
        for (name, p) in names.iter().zip(ports.chunks(3)) {
            let member = spawn(
                &binary,
                cluster.dir.path(),
                name,
                [p[0], p[1], p[2]],
                &initial_cluster.join(","),
                &token,
                tls,
            )?;
            cluster.members.push(member);
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::url).collect()
    }

    /// Store options for these members, with timeouts short enough for tests.
    pub fn store_options(&self) -> EtcdStoreOptions {
        EtcdStoreOptions {
            endpoints: self.endpoints(),
            request_timeout: Duration::from_secs(5),
            failover_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(20),
            ..EtcdStoreOptions::default()
        }
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 0..self.members.len() {
            loop {
                if let Some(status) = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    return Err(format!(
                        "etcd {} exited at start ({status}):\n{}",
                        self.members[i].name,
                        log_tail(&self.members[i].log)
                    ));
                }
                let port = self.members[i].metrics_port;
                if http_get(port, "/health").is_some_and(|b| b.contains("\"health\":\"true\"")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "etcd {} not healthy within {READY_TIMEOUT:?}:\n{}",
                        self.members[i].name,
                        log_tail(&self.members[i].log)
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The member that is the raft leader now, from etcd's own metrics.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.is_running()
                && http_get(m.metrics_port, "/metrics")
                    .is_some_and(|body| body.lines().any(|l| l == "etcd_server_is_leader 1"))
        })
    }

    /// Waits until some running member is the leader.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP to member `index`: its connections stay open but nothing is answered, as a
    /// network partition looks to its clients. [`EtcdCluster::resume`] ends it.
    pub fn pause(&self, index: usize) {
        self.signal(index, "STOP");
    }

    /// SIGCONT to a member [`EtcdCluster::pause`] stopped.
    pub fn resume(&self, index: usize) {
        self.signal(index, "CONT");
    }

    fn signal(&self, index: usize, signal: &str) {
        let child = self.members[index]
            .child
            .as_ref()
            .expect("member is running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} etcd member {index}");
    }

    /// SIGKILL to member `index`, by the PID this helper started it with; waits for it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            child.kill().expect("kill etcd");
            child.wait().expect("reap etcd");
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // The TempDir field removes the data dirs after this.
    }
}

fn spawn(
    binary: &Path,
    dir: &Path,
    name: &str,
    [client_port, peer_port, metrics_port]: [u16; 3],
    initial_cluster: &str,
    token: &str,
    tls: Option<&TestCerts>,
) -> Result<EtcdMember, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let metrics = format!("http://127.0.0.1:{metrics_port}");
    let log = dir.join(format!("{name}.log"));
    let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("log: {e}"))?;
    let mut command = Command::new(binary);
    command
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(dir.join(name))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-state", "new"])
        .args(["--initial-cluster-token", token])
        .args(["--listen-metrics-urls", &metrics])
        .args(["--max-request-bytes", &MAX_REQUEST_BYTES.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    if let Some(certs) = tls {
        command
            .arg("--cert-file")
            .arg(&certs.server_cert)
            .arg("--key-file")
            .arg(&certs.server_key)
            .arg("--trusted-ca-file")
            .arg(&certs.ca)
            .arg("--client-cert-auth");
    }
    // SAFETY: between fork and exec the child only calls prctl(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("start {}: {e}", binary.display()))?;
    Ok(EtcdMember {
        name: name.to_owned(),
        client_port,
        peer_port,
        metrics_port,
        scheme,
        child: Some(child),
        log,
    })
}

/// A plain HTTP/1.0 GET on loopback; the body, or `None` when the member does not answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned())
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
