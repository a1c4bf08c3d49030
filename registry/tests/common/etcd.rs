//! A real etcd cluster on loopback (Debian's `etcd` binary): unique ports, a temporary data
//! directory per member, every member killed and every directory removed on drop, also when a
//! test fails.

use super::TempDir;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member process.
pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP (see [`EtcdCluster::pause`]): alive but answering nothing.
    paused: bool,
}

impl Member {
    /// Whether its process has ended (it was started and is gone).
    fn exited(&self) -> bool {
        // `try_wait` needs `&mut`; a zero-signal probe of the pid does not.
        self.child.as_ref().is_some_and(|c| {
            !std::path::Path::new(&format!("/proc/{}", c.id())).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                    .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        })
    }
}

/// A cluster of `n` members.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    pub dir: TempDir,
}

fn free_port() -> u16 {
    // Bound then released: good enough on loopback, and etcd says so loudly if it lost a race.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers. Ports are picked by binding
    /// and releasing them, so another process can take one meanwhile: a member that exits at
    /// start (address in use) makes the whole cluster start again on fresh ports.
    pub fn start(n: usize, tag: &str) -> EtcdCluster {
        for attempt in 0..3 {
            let cluster = Self::try_start(n, &format!("{tag}{attempt}"));
            match cluster.wait_until_healthy(Duration::from_secs(30)) {
                Ok(()) => return cluster,
                Err(why) if attempt < 2 => eprintln!("etcd cluster did not start ({why}); again"),
                Err(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    fn try_start(n: usize, tag: &str) -> EtcdCluster {
        let dir = TempDir::new(&format!("etcd-{tag}"));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data: dir.0.join(format!("m{i}.etcd")),
                log: dir.0.join(format!("m{i}.log")),
                child: None,
                paused: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token: format!("vnp-{tag}-{}", std::process::id()),
            dir,
        };
        for i in 0..n {
            cluster.spawn(i, "new");
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Fast elections on loopback, so a killed leader costs about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (Debian package etcd-server; scripts/setup installs it)");
        m.child = Some(child);
    }

    /// All client URLs, comma-separated (what `--etcd-endpoints` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl` against the running members.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let live: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some() && !m.paused)
            .map(|m| m.client_url.as_str())
            .collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", live.join(",")))
            .args(["--command-timeout", "3s"])
            .args(args)
            .output()
            .expect("run etcdctl (Debian package etcd-client)")
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self, limit: Duration) {
        if let Err(why) = self.wait_until_healthy(limit) {
            panic!("{why}");
        }
    }

    fn wait_until_healthy(&self, limit: Duration) -> Result<(), String> {
        let t = Instant::now();
        loop {
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.status.success() {
                return Ok(());
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "etcd not healthy after {limit:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tails()
                ));
            }
            if let Some(m) = self.members.iter().find(|m| m.exited()) {
                return Err(format!("member {} exited:\n{}", m.name, self.log_tails()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
            .map(|l| l.lines().rev().take(10).collect::<Vec<_>>().join("\n"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// The index of the current leader (asks the running members).
    pub fn leader(&self) -> usize {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("endpoint status: {e}: {:?}", out));
        let rows = status.as_array().expect("status list");
        let leader = rows[0]["Status"]["leader"].as_u64().expect("leader id");
        let endpoint = rows
            .iter()
            .find(|r| r["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|r| r["Endpoint"].as_str())
            .expect("leader among the endpoints");
        self.members
            .iter()
            .position(|m| m.client_url == endpoint)
            .expect("leader is a member")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].paused = false;
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open but nothing answers, like a
    /// member stuck on a dead disk. [`Self::resume`] lets it go on.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.members[i].paused = true;
    }

    /// Lets a paused member go on (SIGCONT).
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.members[i].paused = false;
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.members[i].child.as_ref().expect("member runs").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A secret-key file for `--secret-keys` in `dir`.
pub fn write_secret_keys(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("secret.keys");
    std::fs::write(&path, format!("test-k1 {}\n", "5a".repeat(32))).expect("key file");
    path
}
