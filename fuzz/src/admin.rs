//! The vnpd admin protocol target: request lines as the admin socket reads them
//! (`vnpd_admin_api::parse_request`, after the server's UTF-8 check) and the
//! persisted attachment state file (`vnpd::admin::state::parse_state`).
//!
//! Input: bytes, split into lines; each line is one request. The whole input is also parsed as
//! a state file.
//!
//! Invariants asserted: a parsed request serializes to a line that parses back to the same
//! request; a parsed state file renders to text that parses back to the same attachments.

use vnpd::admin::state::{parse_state, render_state};
use vnpd_admin_api::parse_request;

/// Runs one input.
pub fn run(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        // The server refuses a line that is not UTF-8 before parsing it.
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Ok(req) = parse_request(line) {
            let text = serde_json::to_string(&req).expect("a request serializes");
            assert_eq!(parse_request(&text).ok(), Some(req), "request round trip");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(list) = parse_state(text) {
            let again = parse_state(&render_state(&list)).expect("rendered state parses");
            assert_eq!(again, list, "state round trip");
        }
    }
}
