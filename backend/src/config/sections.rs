//! The `[vhost_user]` and `[token_requests]` sections of vnpd's configuration.

use serde::Deserialize;
use std::ffi::CString;
use std::mem::MaybeUninit;

use super::ConfigError;
use crate::control::fair::RequestRate;
use crate::datapath::vhost_socket::SocketAccess;

/// `[vhost_user]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVhostUser {
    socket_owner: Option<String>,
    socket_group: Option<String>,
    socket_mode: Option<u32>,
}

impl RawVhostUser {
    /// `over`'s values win.
    pub(super) fn merge(self, over: Self) -> Self {
        Self {
            socket_owner: over.socket_owner.or(self.socket_owner),
            socket_group: over.socket_group.or(self.socket_group),
            socket_mode: over.socket_mode.or(self.socket_mode),
        }
    }

    /// Resolves the user and group names (they must exist on this host now, so that a typo
    /// fails at start, not at the first attach).
    pub(super) fn validate(self) -> Result<SocketAccess, ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
        let mode = self.socket_mode.unwrap_or(0o660);
        if mode > 0o777 {
            return Err(invalid(
                "vhost_user.socket_mode",
                format!("{mode:#o} has bits beyond 0o777 (write it in octal: 0o660)"),
            ));
        }
        let owner = match self.socket_owner.as_deref() {
            None => None,
            Some(name) => Some(uid_of(name).map_err(|r| invalid("vhost_user.socket_owner", r))?),
        };
        let group = match self.socket_group.as_deref() {
            None => None,
            Some(name) => Some(gid_of(name).map_err(|r| invalid("vhost_user.socket_group", r))?),
        };
        Ok(SocketAccess { owner, group, mode })
    }
}

/// `[token_requests]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokenRequests {
    per_sec: Option<u32>,
    burst: Option<u32>,
}

impl RawTokenRequests {
    /// `over`'s values win.
    pub(super) fn merge(self, over: Self) -> Self {
        Self {
            per_sec: over.per_sec.or(self.per_sec),
            burst: over.burst.or(self.burst),
        }
    }

    pub(super) fn validate(self) -> Result<RequestRate, ConfigError> {
        let default = RequestRate::default();
        let rate = RequestRate {
            per_sec: self.per_sec.unwrap_or(default.per_sec),
            burst: self.burst.unwrap_or(default.burst),
        };
        for (key, value) in [
            ("token_requests.per_sec", rate.per_sec),
            ("token_requests.burst", rate.burst),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{value} is outside 1..=1000000"),
                });
            }
        }
        Ok(rate)
    }
}

/// A user name (or numeric uid) to its uid.
fn uid_of(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = CString::new(name).map_err(|_| format!("{name:?} is not a user name"))?;
    let mut entry = MaybeUninit::<libc::passwd>::uninit();
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `entry` and
    // `buf` are writable for their sizes, `found` receives NULL or `entry`'s address.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no user {name:?} on this host"));
    }
    // SAFETY: getpwnam_r succeeded and `found` points at `entry`, which it filled in.
    Ok(unsafe { (*found).pw_uid })
}

/// A group name (or numeric gid) to its gid.
fn gid_of(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = CString::new(name).map_err(|_| format!("{name:?} is not a group name"))?;
    let mut entry = MaybeUninit::<libc::group>::uninit();
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in uid_of: valid name, writable entry and buffer, `found` set by the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group {name:?} on this host"));
    }
    // SAFETY: getgrnam_r succeeded and `found` points at `entry`, which it filled in.
    Ok(unsafe { (*found).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(uid_of("root"), Ok(0));
        assert_eq!(gid_of("root"), Ok(0));
        assert_eq!(uid_of("1234"), Ok(1234));
        assert!(uid_of("no-such-user-vnp").unwrap_err().contains("no user"));
        assert!(gid_of("no-such-group-vnp")
            .unwrap_err()
            .contains("no group"));
    }
}
