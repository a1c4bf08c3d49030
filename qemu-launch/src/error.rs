//! Errors of qemu-launch. Every error about a running (or dead) guest carries [`Diagnostics`]:
//! the tail of the guest console and of QEMU's stderr, because "it did not come up" is useless
//! without knowing what the guest or QEMU said last.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::qmp::QmpError;

/// How much of each log an error quotes.
const TAIL_BYTES: u64 = 2048;

/// The last words of a guest: console tail and QEMU stderr tail.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    pub console_path: PathBuf,
    pub console_tail: String,
    pub stderr_path: PathBuf,
    pub stderr_tail: String,
}

impl Diagnostics {
    /// Reads the tails now (the files may vanish when the guest is dropped).
    pub fn collect(console_path: &Path, stderr_path: &Path) -> Self {
        Self {
            console_path: console_path.to_path_buf(),
            console_tail: read_tail(console_path, TAIL_BYTES),
            stderr_path: stderr_path.to_path_buf(),
            stderr_tail: read_tail(stderr_path, TAIL_BYTES),
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "--- guest console tail ({}) ---",
            self.console_path.display()
        )?;
        writeln!(f, "{}", or_empty(&self.console_tail))?;
        writeln!(
            f,
            "--- QEMU stderr tail ({}) ---",
            self.stderr_path.display()
        )?;
        write!(f, "{}", or_empty(&self.stderr_tail))
    }
}

fn or_empty(s: &str) -> &str {
    if s.trim().is_empty() {
        "(empty)"
    } else {
        s.trim_end()
    }
}

/// The last `max` bytes of a file as lossy UTF-8, starting at a line boundary when possible.
/// A missing file reads as empty: the tail is best-effort context for another error.
pub fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(max).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
    if start > 0 {
        if let Some(nl) = text.find('\n') {
            return text[nl + 1..].to_string();
        }
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid guest spec: {0}")]
    InvalidSpec(String),

    #[error(
        "vhost-user socket {} does not exist or is not a socket: is vnpd running and serving this VM?",
        .0.display()
    )]
    MissingSocket(PathBuf),

    #[error("guest image: {0}")]
    Image(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("QEMU for guest {name} exited early ({status})\n{diagnostics}")]
    QemuExited {
        name: String,
        status: String,
        diagnostics: Box<Diagnostics>,
    },

    #[error("guest {name}: {what} did not happen within {timeout:?}\n{diagnostics}")]
    Timeout {
        name: String,
        what: String,
        timeout: Duration,
        diagnostics: Box<Diagnostics>,
    },

    #[error("guest {name}: command channel: {reason}\n{diagnostics}")]
    Channel {
        name: String,
        reason: String,
        diagnostics: Box<Diagnostics>,
    },

    #[error("guest {name}: QMP: {source}\n{diagnostics}")]
    Qmp {
        name: String,
        #[source]
        source: QmpError,
        diagnostics: Box<Diagnostics>,
    },

    #[error("{command} failed: {detail}")]
    Libvirt { command: String, detail: String },

    #[error("migration {src} -> {dst} failed: {reason}\nsource guest:\n{src_diagnostics}\ndestination guest:\n{dst_diagnostics}")]
    Migration {
        src: String,
        dst: String,
        reason: String,
        src_diagnostics: Box<Diagnostics>,
        dst_diagnostics: Box<Diagnostics>,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_starts_at_a_line_boundary_and_keeps_the_end() {
        let dir = std::env::temp_dir().join(format!("ql-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..1000 {
            writeln!(f, "line {i}").unwrap();
        }
        drop(f);
        let tail = read_tail(&path, 30);
        assert!(tail.ends_with("line 999\n"), "{tail:?}");
        assert!(tail.starts_with("line "), "{tail:?}");
        assert!(tail.len() <= 30);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_tail_is_empty_and_displayed_as_such() {
        let d = Diagnostics::collect(
            Path::new("/nonexistent/console"),
            Path::new("/nonexistent/err"),
        );
        assert_eq!(d.console_tail, "");
        assert!(d.to_string().contains("(empty)"));
    }
}
