//! vnpd's local admin API: request/response types and a blocking client.
//!
//! The API is JSON lines over a unix socket (`admin_socket` in vnpd's config): each request is
//! one JSON object on one line, each answer one JSON object on one line, and a connection may
//! carry several requests in turn. Access control is the socket file's permissions (root only
//! by default), as for other local daemons.
//!
//! ```text
//! > {"op":"attach","vm_id":"vm-a"}
//! < {"ok":{"result":"attached","attachment":{"vm_id":"vm-a",...}}}
//! > {"op":"stats"}
//! < {"ok":{"result":"stats","vms":[{"vm_id":"vm-a","counters":{...},"drops":{...}}]}}
//! > {"op":"detach","vm_id":"nope"}
//! < {"error":{"code":"not_attached","message":"vm nope is not attached"}}
//! ```
//!
//! The protocol is a crate of its own so that vnpd's admin server and `vnpctl vnpd` share one
//! definition while neither pulls in the other: `vnpctl` gets no data path, vnpd no registry CLI.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request or response line either side accepts (bytes, including the newline).
pub const MAX_LINE_LEN: usize = 1 << 20;

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Attach a VM known to the registry to this host's vnpd.
    Attach {
        /// The VM's registry id (its identity never comes from the guest).
        vm_id: String,
        /// vhost-user socket vnpd listens on; default `<socket_dir>/<vm_id>.sock`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket_path: Option<PathBuf>,
        /// Queue pairs of the device; default from vnpd's config.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue_pairs: Option<u16>,
        /// Live-migration destination: prepare the port but leave the endpoint where it is;
        /// vnpd registers it when the migrated VM's device starts here (its resume).
        #[serde(default, skip_serializing_if = "is_false")]
        incoming: bool,
    },
    /// Detach a VM: closes its socket and UDP port and forgets the attachment.
    Detach {
        /// The VM's registry id.
        vm_id: String,
    },
    /// List attachments.
    List,
    /// Counters of one VM or of all.
    Stats {
        /// Only this VM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_id: Option<String>,
    },
    /// One VM's NAT state: its port blocks and live flows to and from the outside.
    Nat {
        /// The VM's registry id.
        vm_id: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An attached VM as vnpd serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    /// Registry id.
    pub vm_id: String,
    /// Network name.
    pub network: String,
    /// Numeric network id used in tokens.
    pub network_id: u32,
    /// The VM's address (offered by DHCP).
    pub vm_ip: Ipv4Addr,
    /// Prefix length of the VM's network.
    pub prefix_len: u8,
    /// The virtual router vnpd impersonates.
    pub router_ip: Ipv4Addr,
    /// The VM's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Hostname offered by DHCP.
    pub hostname: String,
    /// MTU offered to the guest.
    pub guest_mtu: u16,
    /// This host's underlay address.
    pub host_addr: Ipv4Addr,
    /// The VM's UDP port on this host.
    pub udp_port: u16,
    /// vhost-user socket path.
    pub socket_path: PathBuf,
    /// Queue pairs.
    pub queue_pairs: u16,
}

/// Counters of one VM: packet/byte counters by name and drops by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// Registry id.
    pub vm_id: String,
    /// e.g. `rx_packets`, `tx_bytes`.
    pub counters: BTreeMap<String, u64>,
    /// Drop reason => count.
    pub drops: BTreeMap<String, u64>,
}

/// One NAT flow of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatFlowInfo {
    /// `tcp`, `udp` or `icmp`.
    pub proto: String,
    /// The guest's port (ICMP: echo identifier).
    pub local_port: u16,
    /// The outside address.
    pub remote: Ipv4Addr,
    /// The outside port (0 for ICMP).
    pub remote_port: u16,
    /// The mapped port; `None` for an inbound (port-forwarded) flow, which is not remapped.
    pub mapped: Option<u16>,
    /// `handshake`, `established`, `half_closed`, `closed`, `udp`, `icmp`.
    pub state: String,
    /// Seconds until it expires if idle.
    pub expires_in: u64,
}

/// One VM's NAT state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    /// Registry id.
    pub vm_id: String,
    /// NAT port blocks, `(first, last)`.
    pub blocks: Vec<(u16, u16)>,
    /// Ports in the blocks (each protocol has all of them).
    pub ports: u64,
    /// Live flows, mapped first.
    pub flows: Vec<NatFlowInfo>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminReply {
    /// The VM is attached (also when it already was, with the same parameters).
    Attached {
        /// What vnpd serves.
        attachment: AttachmentInfo,
    },
    /// The VM was detached.
    Detached {
        /// Registry id.
        vm_id: String,
    },
    /// Every attachment.
    List {
        /// Sorted by VM id.
        attachments: Vec<AttachmentInfo>,
    },
    /// Counters.
    Stats {
        /// Sorted by VM id.
        vms: Vec<VmStats>,
    },
    /// A VM's NAT state.
    Nat {
        /// The state.
        nat: NatInfo,
    },
}

/// Machine-readable refusal reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminErrorCode {
    /// The request did not parse or had bad values.
    BadRequest,
    /// The VM is not attached here.
    NotAttached,
    /// The VM is already attached with different parameters, or the socket path is taken.
    Conflict,
    /// The registry refused or could not be reached.
    Registry,
    /// Starting the VM's device or UDP port failed.
    Port,
    /// Persisting the attachment list failed (the change was rolled back).
    Persist,
    /// Anything else.
    Internal,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AdminFailure {
    /// Reason code.
    pub code: AdminErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl AdminFailure {
    /// Builds a failure.
    pub fn new(code: AdminErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One answer line: `{"ok": ...}` or `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    /// Success.
    Ok(AdminReply),
    /// Refusal.
    Error(AdminFailure),
}

impl From<Result<AdminReply, AdminFailure>> for AdminResponse {
    fn from(r: Result<AdminReply, AdminFailure>) -> Self {
        match r {
            Ok(v) => AdminResponse::Ok(v),
            Err(e) => AdminResponse::Error(e),
        }
    }
}

/// Parses one request line (without or with its trailing newline). Pure.
pub fn parse_request(line: &str) -> Result<AdminRequest, AdminFailure> {
    serde_json::from_str(line.trim_end())
        .map_err(|e| AdminFailure::new(AdminErrorCode::BadRequest, format!("bad request: {e}")))
}

/// Errors of [`VnpdAdminClient`].
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Connecting to or talking over the socket failed.
    #[error("vnpd admin socket {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// vnpd answered something that is not a response.
    #[error("vnpd admin socket {path}: malformed answer: {detail}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// vnpd refused the request.
    #[error("vnpd refused: {0}")]
    Refused(AdminFailure),
}

/// Blocking client of vnpd's admin socket; one connection per call.
#[derive(Debug, Clone)]
pub struct VnpdAdminClient {
    path: PathBuf,
    timeout: Duration,
}

impl VnpdAdminClient {
    /// A client for the socket at `path`. Calls time out after 60 s (an attach waits for the
    /// registry).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Changes the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its answer.
    pub fn call(&self, req: &AdminRequest) -> Result<AdminReply, AdminClientError> {
        let io = |source| AdminClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.path).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut line = serde_json::to_string(req).expect("requests always serialize");
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(io)?;
        let mut reader = BufReader::new(stream).take(MAX_LINE_LEN as u64);
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(io)?;
        if !answer.ends_with('\n') {
            return Err(AdminClientError::Protocol {
                path: self.path.clone(),
                detail: "connection closed before a complete answer".into(),
            });
        }
        match serde_json::from_str::<AdminResponse>(&answer) {
            Ok(AdminResponse::Ok(r)) => Ok(r),
            Ok(AdminResponse::Error(f)) => Err(AdminClientError::Refused(f)),
            Err(e) => Err(AdminClientError::Protocol {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
        }
    }

    /// Attaches `vm_id`.
    pub fn attach(
        &self,
        vm_id: &str,
        socket_path: Option<PathBuf>,
        queue_pairs: Option<u16>,
    ) -> Result<AttachmentInfo, AdminClientError> {
        self.attach_with(vm_id, socket_path, queue_pairs, false)
    }

    /// Attaches `vm_id`; `incoming`: as the destination of a live migration (see
    /// [`AdminRequest::Attach`]).
    pub fn attach_with(
        &self,
        vm_id: &str,
        socket_path: Option<PathBuf>,
        queue_pairs: Option<u16>,
        incoming: bool,
    ) -> Result<AttachmentInfo, AdminClientError> {
        match self.call(&AdminRequest::Attach {
            vm_id: vm_id.to_string(),
            socket_path,
            queue_pairs,
            incoming,
        })? {
            AdminReply::Attached { attachment } => Ok(attachment),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Detaches `vm_id`.
    pub fn detach(&self, vm_id: &str) -> Result<(), AdminClientError> {
        match self.call(&AdminRequest::Detach {
            vm_id: vm_id.to_string(),
        })? {
            AdminReply::Detached { .. } => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Lists attachments.
    pub fn list(&self) -> Result<Vec<AttachmentInfo>, AdminClientError> {
        match self.call(&AdminRequest::List)? {
            AdminReply::List { attachments } => Ok(attachments),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Counters of one VM or all.
    pub fn stats(&self, vm_id: Option<&str>) -> Result<Vec<VmStats>, AdminClientError> {
        match self.call(&AdminRequest::Stats {
            vm_id: vm_id.map(str::to_string),
        })? {
            AdminReply::Stats { vms } => Ok(vms),
            other => Err(self.unexpected(&other)),
        }
    }

    /// One VM's NAT state.
    pub fn nat(&self, vm_id: &str) -> Result<NatInfo, AdminClientError> {
        match self.call(&AdminRequest::Nat {
            vm_id: vm_id.to_string(),
        })? {
            AdminReply::Nat { nat } => Ok(nat),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, reply: &AdminReply) -> AdminClientError {
        AdminClientError::Protocol {
            path: self.path.clone(),
            detail: format!("unexpected reply {reply:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = parse_request(r#"{"op":"attach","vm_id":"vm-a","queue_pairs":2}"#).unwrap();
        assert_eq!(
            r,
            AdminRequest::Attach {
                vm_id: "vm-a".into(),
                socket_path: None,
                queue_pairs: Some(2),
                incoming: false,
            }
        );
        let r = parse_request(r#"{"op":"attach","vm_id":"vm-a","incoming":true}"#).unwrap();
        assert!(matches!(r, AdminRequest::Attach { incoming: true, .. }));
        let line = serde_json::to_string(&AdminRequest::Attach {
            vm_id: "vm-a".into(),
            socket_path: None,
            queue_pairs: None,
            incoming: false,
        })
        .unwrap();
        assert!(!line.contains("incoming"), "{line}");
        assert_eq!(
            parse_request("{\"op\":\"list\"}\n").unwrap(),
            AdminRequest::List
        );
        assert_eq!(
            serde_json::to_string(&AdminRequest::Stats { vm_id: None }).unwrap(),
            r#"{"op":"stats"}"#
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for bad in [
            "",
            "nonsense",
            r#"{"op":"reboot"}"#,
            r#"{"op":"attach"}"#,
            r#"{"op":"attach","vm_id":"a","queue_pairs":-1}"#,
            r#"{"op":"detach","vm_id":"a","extra":1}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.code, AdminErrorCode::BadRequest, "{bad}");
            assert!(e.message.starts_with("bad request"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = AdminResponse::Ok(AdminReply::Detached {
            vm_id: "vm-a".into(),
        });
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(text, r#"{"ok":{"result":"detached","vm_id":"vm-a"}}"#);
        assert_eq!(serde_json::from_str::<AdminResponse>(&text).unwrap(), ok);
        let err = AdminResponse::Error(AdminFailure::new(AdminErrorCode::NotAttached, "x"));
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(text, r#"{"error":{"code":"not_attached","message":"x"}}"#);
    }

    #[test]
    fn client_reports_a_missing_socket() {
        let c = VnpdAdminClient::new("/nonexistent/vnpd-admin.sock");
        let e = c.list().unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/vnpd-admin.sock"),
            "{e}"
        );
    }
}
