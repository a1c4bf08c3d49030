//! Test harness: a throwaway PKI and the real `vnp-registry` binary on a free loopback port.
//! Everything is removed on drop (process killed, directory deleted), also when a test fails.

#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use vnp_registry_client::{ClientConfig, RegistryClient};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vnp-reg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A CA able to issue server and client certificates into a directory.
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

fn params(
    cn: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = from;
    p.not_after = to;
    p
}

impl Pki {
    /// A CA plus `server.pem/key` for 127.0.0.1 in `dir`.
    pub fn new(dir: &Path, ca_name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, ca_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        };
        let sans = vec![SanType::IpAddress(IpAddr::from([127, 0, 0, 1]))];
        pki.write(
            "server",
            params(
                "vnp-registry",
                sans,
                ExtendedKeyUsagePurpose::ServerAuth,
                now() - time::Duration::hours(1),
                now() + time::Duration::days(1),
            ),
        );
        pki
    }

    fn write(&self, stem: &str, p: CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }

    /// A client certificate with URI SAN `uri` (or none), valid from/to.
    pub fn client_with(
        &self,
        stem: &str,
        uri: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) {
        let sans = uri
            .map(|u| vec![SanType::URI(u.try_into().unwrap())])
            .unwrap_or_default();
        self.write(
            stem,
            params(stem, sans, ExtendedKeyUsagePurpose::ClientAuth, from, to),
        );
    }

    /// A currently valid client certificate for `vnp:<role>:<id>`, written as `<stem>.pem/key`.
    pub fn client(&self, stem: &str, uri: &str) {
        self.client_with(
            stem,
            Some(uri),
            now() - time::Duration::hours(1),
            now() + time::Duration::days(1),
        );
    }
}

/// The real registry binary, killed on drop.
pub struct RegistryProc {
    pub child: Child,
    pub url: String,
    pub data: PathBuf,
    pub tls: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
}

impl RegistryProc {
    /// Starts the registry with its data under `root/data` and TLS material from `tls`.
    pub fn start(root: &Path, tls: &Path, extra: &[&str]) -> RegistryProc {
        let mut p = RegistryProc {
            child: Command::new("true").spawn().unwrap(),
            url: String::new(),
            data: root.join("data"),
            tls: tls.to_path_buf(),
            log: root.join("registry.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let _ = p.child.wait();
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vnp-registry"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&self.data)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vnp-registry");
        let stdout = child.stdout.take().unwrap();
        self.child = child;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("vnp-registry listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "registry did not start: {line:?}; log: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
        self.url = format!("https://{addr}");
    }

    /// Kills the process without warning (a crash), then starts it again on the same data.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.spawn();
    }

    /// A client using `tls/<stem>.pem/key`.
    pub fn client(&self, stem: &str) -> RegistryClient {
        RegistryClient::new(self.config(stem)).expect("client")
    }

    pub fn config(&self, stem: &str) -> ClientConfig {
        let mut c = ClientConfig::from_files(
            &self.url,
            &self.tls.join("ca.pem"),
            &self.tls.join(format!("{stem}.pem")),
            &self.tls.join(format!("{stem}.key")),
        )
        .unwrap();
        c.timeout = Duration::from_secs(10);
        c
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registry with a PKI holding `admin`, hosts `h1` `h2`, gateway `g1`; dropped in order.
pub struct Fixture {
    pub reg: RegistryProc,
    pub pki: Pki,
    pub dir: TempDir,
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        Self::with_args(tag, &[])
    }

    pub fn with_args(tag: &str, extra: &[&str]) -> Fixture {
        let dir = TempDir::new(tag);
        let tls = dir.0.join("tls");
        let pki = Pki::new(&tls, "test CA");
        pki.client("admin", "vnp:admin:admin");
        pki.client("h1", "vnp:host:h1");
        pki.client("h2", "vnp:host:h2");
        pki.client("g1", "vnp:gateway:g1");
        let reg = RegistryProc::start(&dir.0, &tls, extra);
        Fixture { reg, pki, dir }
    }
}
