//! Persisted attachments: what vnpd re-attaches after a restart.
//!
//! Only what the operator asked for is stored (VM id, socket path, queue pairs); everything
//! else (address, secret, port) is fetched from the registry again, so a restart picks up
//! changes and no secret ever touches the disk. The file is replaced atomically (write a temp
//! file, fsync, rename, fsync the directory): after a crash it holds either the old or the new
//! list, never half of one.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const STATE_FILE: &str = "attachments.json";
/// Format version written (and the only one read).
pub const STATE_VERSION: u32 = 1;

/// One attachment as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedAttachment {
    /// Registry id.
    pub vm_id: String,
    /// vhost-user socket path.
    pub socket_path: PathBuf,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Attached as a live-migration destination: a restore registers the endpoint only when
    /// the device starts (re-registering the endpoint this host already holds is harmless).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incoming: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    attachments: Vec<PersistedAttachment>,
}

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state directory failed.
    #[error("state {path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file exists but is not a state file vnpd understands.
    #[error(
        "state file {path} is unreadable: {reason} (move it away to start with no attachments)"
    )]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Parses the state file's text (pure). Attachments come back sorted by VM id; duplicates are
/// refused.
pub fn parse_state(text: &str) -> Result<Vec<PersistedAttachment>, String> {
    let f: StateFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if f.version != STATE_VERSION {
        return Err(format!(
            "version {} (this vnpd reads version {STATE_VERSION})",
            f.version
        ));
    }
    let mut list = f.attachments;
    list.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    if let Some(w) = list.windows(2).find(|w| w[0].vm_id == w[1].vm_id) {
        return Err(format!("vm {} is listed twice", w[0].vm_id));
    }
    Ok(list)
}

/// Renders the state file's text (pure), sorted by VM id.
pub fn render_state(attachments: &[PersistedAttachment]) -> String {
    let mut list = attachments.to_vec();
    list.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    let mut text = serde_json::to_string_pretty(&StateFile {
        version: STATE_VERSION,
        attachments: list,
    })
    .expect("state always serializes");
    text.push('\n');
    text
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Uses (and creates, mode 0700) `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the persisted attachments; a missing file means none.
    pub fn load(&self) -> Result<Vec<PersistedAttachment>, StateError> {
        let path = self.path();
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_state(&text).map_err(|reason| StateError::Corrupt { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Replaces the persisted attachments atomically.
    pub fn save(&self, attachments: &[PersistedAttachment]) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Io { path: p, source }
        };
        let text = render_state(attachments);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(id: &str) -> PersistedAttachment {
        PersistedAttachment {
            vm_id: id.into(),
            socket_path: format!("/run/vnp/sockets/{id}.sock").into(),
            queue_pairs: 1,
            incoming: false,
        }
    }

    #[test]
    fn render_parse_round_trip_sorted() {
        let text = render_state(&[att("vm-b"), att("vm-a")]);
        let back = parse_state(&text).unwrap();
        assert_eq!(back, vec![att("vm-a"), att("vm-b")]);
    }

    #[test]
    fn refuses_other_versions_duplicates_and_junk() {
        let e = parse_state(r#"{"version":2,"attachments":[]}"#).unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        let dup = render_state(&[att("vm-a")]).replace(
            "\"attachments\": [",
            "\"attachments\": [{\"vm_id\":\"vm-a\",\"socket_path\":\"/x\",\"queue_pairs\":1},",
        );
        assert!(parse_state(&dup).unwrap_err().contains("twice"));
        assert!(parse_state("{\"version\":1,\"attachments\":[").is_err());
        assert!(parse_state("").is_err());
    }

    #[test]
    fn store_saves_atomically_and_reports_corruption() {
        let dir = std::env::temp_dir().join(format!("vnpd-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = StateStore::open(&dir).unwrap();
        assert!(store.load().unwrap().is_empty());
        store.save(&[att("vm-a"), att("vm-c")]).unwrap();
        assert_eq!(store.load().unwrap(), vec![att("vm-a"), att("vm-c")]);
        store.save(&[att("vm-c")]).unwrap();
        assert_eq!(store.load().unwrap(), vec![att("vm-c")]);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        std::fs::write(store.path(), b"{\"version\":1,\"attach").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
