//! The command channel: run a shell command in the guest over its second serial port and get
//! stdout, stderr and the exit status back.
//!
//! Wire format (see `qemu-launch/guest/cmd-channel`, the guest side):
//! host -> guest: `RUN <id> <timeout-s> <base64 script>\n`;
//! guest -> host: `@@OUT <id>`, base64 lines, `@@ERR <id>`, base64 lines, `@@END <id> <status>`,
//! or `@@BAD <id>` for a request it could not decode. Lines for other ids (late replies to
//! requests the host gave up on) and the `@@READY` banner are ignored.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::lines::{LineError, LineReader};

/// Result of one command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    /// Exit status of `sh` (137 when the guest-side timeout killed it).
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Encodes one request line.
pub fn encode_request(id: u64, guest_timeout_s: u64, script: &str) -> String {
    format!(
        "RUN {id} {} {}\n",
        guest_timeout_s.max(1),
        STANDARD.encode(script.as_bytes())
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Waiting,
    Stdout,
    Stderr,
}

/// Collects the reply for one request id from the guest's lines. Pure: fed line by line.
#[derive(Debug)]
pub struct ReplyParser {
    id: String,
    section: Section,
    stdout_b64: String,
    stderr_b64: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("guest could not decode request {0}")]
    Rejected(u64),
    #[error("malformed reply: {0}")]
    Malformed(String),
}

impl ReplyParser {
    pub fn new(id: u64) -> Self {
        Self {
            id: id.to_string(),
            section: Section::Waiting,
            stdout_b64: String::new(),
            stderr_b64: String::new(),
        }
    }

    /// Feeds one line (without newline). `Ok(Some(..))` once the reply is complete.
    pub fn feed(&mut self, line: &str) -> Result<Option<CmdOutput>, ReplyError> {
        let line = line.trim_end_matches('\r');
        let mut words = line.split(' ');
        let marker = words.next().unwrap_or("");
        if marker.starts_with("@@") {
            let id = words.next().unwrap_or("");
            if id != self.id {
                // Someone else's reply (or the READY banner): whatever section we were in ends.
                if self.section != Section::Waiting {
                    return Err(ReplyError::Malformed(format!(
                        "reply interrupted by {line:?}"
                    )));
                }
                return Ok(None);
            }
            match (marker, self.section) {
                ("@@OUT", Section::Waiting) => self.section = Section::Stdout,
                ("@@ERR", Section::Stdout) => self.section = Section::Stderr,
                ("@@END", Section::Stderr) => {
                    let status: i32 =
                        words.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                            ReplyError::Malformed(format!("bad status line {line:?}"))
                        })?;
                    return Ok(Some(CmdOutput {
                        status,
                        stdout: decode(&self.stdout_b64)?,
                        stderr: decode(&self.stderr_b64)?,
                    }));
                }
                ("@@BAD", _) => {
                    return Err(ReplyError::Rejected(self.id.parse().unwrap_or(0)));
                }
                _ => return Err(ReplyError::Malformed(format!("unexpected {line:?}"))),
            }
            return Ok(None);
        }
        match self.section {
            Section::Waiting => {}
            Section::Stdout => self.stdout_b64.push_str(line.trim()),
            Section::Stderr => self.stderr_b64.push_str(line.trim()),
        }
        Ok(None)
    }
}

fn decode(b64: &str) -> Result<String, ReplyError> {
    let bytes = STANDARD
        .decode(b64)
        .map_err(|e| ReplyError::Malformed(format!("base64: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Connection(String),
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

/// Host side of the channel: a connection to QEMU's unix socket chardev for ttyS1.
#[derive(Debug)]
pub struct CommandChannel {
    reader: LineReader,
    next_id: u64,
}

/// Extra time the host allows beyond the guest-side timeout for encoding and the serial link.
const REPLY_MARGIN: Duration = Duration::from_secs(10);

impl CommandChannel {
    pub fn new(stream: UnixStream) -> Self {
        // Ids differ between channel instances so a late reply is never taken for a new one.
        let seed = (std::process::id() as u64) << 20;
        Self {
            reader: LineReader::new(stream),
            next_id: seed + 1,
        }
    }

    /// Runs `script` with `sh` in the guest. The guest kills it after `timeout`.
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<CmdOutput, ChannelError> {
        self.run_with_reply_deadline(script, timeout, timeout + REPLY_MARGIN)
    }

    /// Like `run`, but gives up waiting for the reply after `wait` (used to poll for the guest
    /// coming up, where an unanswered request is expected).
    pub fn run_with_reply_deadline(
        &mut self,
        script: &str,
        timeout: Duration,
        wait: Duration,
    ) -> Result<CmdOutput, ChannelError> {
        let id = self.next_id;
        self.next_id += 1;
        let guest_timeout = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        self.send(&encode_request(id, guest_timeout, script))?;
        let deadline = Instant::now() + wait;
        let mut parser = ReplyParser::new(id);
        loop {
            let line = self.reader.read_line(deadline).map_err(|e| match e {
                LineError::Timeout => ChannelError::Timeout(wait),
                other => ChannelError::Connection(other.to_string()),
            })?;
            if let Some(out) = parser.feed(&line)? {
                return Ok(out);
            }
        }
    }

    /// Sends a command without waiting for a reply (e.g. `poweroff -f`, which never answers).
    pub fn send_only(&mut self, script: &str) -> Result<(), ChannelError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&encode_request(id, 10, script))
    }

    fn send(&mut self, line: &str) -> Result<(), ChannelError> {
        let mut stream = self.reader.stream();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .and_then(|_| stream.write_all(line.as_bytes()))
            .map_err(|e| ChannelError::Connection(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn request_line() {
        assert_eq!(
            encode_request(7, 0, "echo hi"),
            format!("RUN 7 1 {}\n", b64("echo hi"))
        );
        assert_eq!(encode_request(8, 30, ""), "RUN 8 30 \n");
    }

    #[test]
    fn parses_a_reply_among_noise() {
        let mut p = ReplyParser::new(5);
        let out = b64("hello\nworld\n");
        let (a, b) = out.split_at(6);
        let lines = [
            "@@READY".to_string(),
            "@@OUT 4".into(),
            "aGk=".into(),
            "@@ERR 4".into(),
            "@@END 4 0".into(),
            "@@OUT 5".into(),
            a.into(),
            b.into(),
            "@@ERR 5".into(),
            b64("oops"),
            "@@END 5 3\r".into(),
        ];
        let mut result = None;
        for l in &lines {
            if let Some(r) = p.feed(l).unwrap() {
                result = Some(r);
            }
        }
        let r = result.unwrap();
        assert_eq!(
            r,
            CmdOutput {
                status: 3,
                stdout: "hello\nworld\n".into(),
                stderr: "oops".into()
            }
        );
        assert!(!r.success());
    }

    #[test]
    fn empty_output_and_marker_lookalikes_in_output() {
        let mut p = ReplyParser::new(1);
        // Output that itself contains "@@END 1 0" is base64 on the wire, so it cannot confuse.
        let tricky = b64("@@END 1 0\n");
        for l in ["@@OUT 1", tricky.as_str(), "@@ERR 1"] {
            assert_eq!(p.feed(l).unwrap(), None);
        }
        let r = p.feed("@@END 1 0").unwrap().unwrap();
        assert_eq!(r.stdout, "@@END 1 0\n");
        assert_eq!(r.stderr, "");
    }

    #[test]
    fn rejects_bad_replies() {
        let mut p = ReplyParser::new(2);
        assert_eq!(p.feed("@@BAD 2"), Err(ReplyError::Rejected(2)));
        let mut p = ReplyParser::new(2);
        assert!(p.feed("@@END 2 0").is_err(), "END before OUT");
        let mut p = ReplyParser::new(2);
        p.feed("@@OUT 2").unwrap();
        p.feed("@@ERR 2").unwrap();
        assert!(p.feed("@@END 2 x").is_err());
        let mut p = ReplyParser::new(2);
        p.feed("@@OUT 2").unwrap();
        p.feed("!!!notbase64").unwrap();
        p.feed("@@ERR 2").unwrap();
        assert!(matches!(p.feed("@@END 2 0"), Err(ReplyError::Malformed(_))));
        let mut p = ReplyParser::new(2);
        p.feed("@@OUT 2").unwrap();
        assert!(p.feed("@@OUT 3").is_err(), "interleaved reply");
    }
}
