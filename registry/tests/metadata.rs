//! Metadata and credentials (issue #11) over real mutual TLS: the real `vnp-registry` binary,
//! the real client, on redb and on a real one-member etcd. Tokens are also verified by an
//! independent implementation (Python's PyJWT + cryptography, fetching the JWKS without a
//! client certificate).

mod common;

use common::{Backend, Fixture, RegistryProc, TempDir};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vnp_registry_client::jwt;
use vnp_registry_client::*;

/// The interpreter with PyJWT and cryptography (Debian's python3-jwt, python3-cryptography;
/// `scripts/setup` installs them).
const PYTHON: &str = "/usr/bin/python3";

fn vm(id: &str, host: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        network: "n1".into(),
        host: Some(host.into()),
        service_account: Some("web".into()),
        ..VmSpec::default()
    }
}

/// Network n1 with hosts h1, h2; VM a on h1, b on h2.
fn populate(f: &Fixture) {
    let admin = f.reg.client("admin");
    common::network_and_two_hosts(&admin, None);
    admin.create_vm(&vm("a", "h1")).unwrap();
    admin.create_vm(&vm("b", "h2")).unwrap();
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_string()
}

const VERIFY_PY: &str = r#"
import json, ssl, sys, urllib.error, urllib.request
import jwt
url, ca, access, identity, audience = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)  # no client certificate
jwks = json.load(urllib.request.urlopen(url + "/v1/jwks", context=ctx))
try:
    urllib.request.urlopen(url + "/v1/vms", context=ctx)
    denied = None
except urllib.error.HTTPError as e:
    denied = e.code
keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}
def check(token, **kw):
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.decode(token, keys[kid], algorithms=["ES256"], **kw)
tampered = identity[:-4] + ("AAAA" if not identity.endswith("AAAA") else "BBBB")
try:
    check(tampered, audience=audience)
    tampered_result = "accepted"
except jwt.InvalidSignatureError:
    tampered_result = "refused"
try:
    check(identity, audience="someone-else")
    other_audience = "accepted"
except jwt.InvalidAudienceError:
    other_audience = "refused"
print(json.dumps({"denied_without_cert": denied, "keys": len(jwks["keys"]),
                  "access": check(access), "identity": check(identity, audience=audience),
                  "tampered": tampered_result, "other_audience": other_audience}))
"#;

/// Verifies the tokens with PyJWT, fetching the JWKS over TLS without a client certificate.
fn python_verify(f: &Fixture, access: &str, identity: &str, audience: &str) -> serde_json::Value {
    let out = Command::new(PYTHON)
        .args(["-c", VERIFY_PY, &f.reg.url])
        .arg(f.reg.tls.join("ca.pem"))
        .args([access, identity, audience])
        .output()
        .expect("run /usr/bin/python3 (install python3-jwt python3-cryptography)");
    assert!(
        out.status.success(),
        "python verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verifier output")
}

fn credentials_verify_with_independent_libraries(backend: Backend) {
    let f = Fixture::on(backend, "md-creds");
    populate(&f);
    let (h1, admin) = (f.reg.client("h1"), f.reg.client("admin"));
    admin
        .update_project(
            "n1",
            &ProjectUpdate {
                project_id: Some("acme".into()),
                zone: None,
                require_session_token: None,
            },
        )
        .unwrap();
    let access = h1.mint_access_token("a").unwrap();
    assert_eq!(
        (access.token_type.as_str(), access.expires_in),
        ("Bearer", 600)
    );
    let identity = h1
        .mint_identity_token("a", "https://svc.example", true)
        .unwrap();
    let standard = h1.mint_identity_token("a", "svc", false).unwrap();

    // Our verifier, with the JWKS from the API.
    let jwks = h1.jwks().unwrap();
    assert_eq!(jwks.keys.len(), 1, "one key after the first start");
    let v = jwt::verify(&identity.token, &jwks, Some("https://svc.example"), now()).unwrap();
    assert_eq!(v.claims["google"]["compute_engine"]["instance_name"], "a");
    assert_eq!(v.claims["google"]["compute_engine"]["project_id"], "acme");
    let v = jwt::verify(&standard.token, &jwks, Some("svc"), now()).unwrap();
    assert!(
        v.claims.get("google").is_none(),
        "standard has no GCE claims"
    );
    assert_eq!(v.claims["vnp"]["network"], "n1");

    // An independent implementation, with the JWKS fetched without a client certificate.
    let py = python_verify(
        &f,
        &access.access_token,
        &identity.token,
        "https://svc.example",
    );
    assert_eq!(py["denied_without_cert"], 401, "{py}");
    assert_eq!(
        (py["tampered"].as_str(), py["other_audience"].as_str()),
        (Some("refused"), Some("refused"))
    );
    let a = &py["access"];
    assert_eq!(a["sub"], "web@acme.vnp.internal");
    assert_eq!(a["scope"], DEFAULT_SCOPES[0]);
    assert_eq!(a["vnp"]["vm"], "a");
    let exp = a["exp"].as_u64().unwrap();
    assert!(
        exp >= now() + 590 && exp <= now() + 601,
        "short-lived: {exp}"
    );
    let i = &py["identity"];
    assert_eq!(i["aud"], "https://svc.example");
    assert_eq!(i["iss"], "vnp-registry");
    assert_eq!(i["vnp"]["network"], "n1");
    assert_eq!(i["google"]["compute_engine"]["zone"], DEFAULT_ZONE);
    let md = admin.vm_metadata("a", None).unwrap();
    assert_eq!(i["google"]["compute_engine"]["instance_id"], md.instance.id);

    // An admin may mint too; nobody else but the VM's host.
    admin.mint_access_token("b").unwrap();
    let h2 = f.reg.client("h2");
    assert_eq!(code(h2.mint_access_token("a")), ErrorCode::NotOwner);
    assert_eq!(
        code(h2.mint_identity_token("a", "x", false)),
        ErrorCode::NotOwner
    );
    assert_eq!(code(h2.vm_metadata("a", None)), ErrorCode::NotOwner);
    assert_eq!(code(h1.mint_access_token("nope")), ErrorCode::UnknownVm);
    for bad in ["", "two words", &"x".repeat(513)] {
        assert_eq!(
            code(h1.mint_identity_token("a", bad, false)),
            ErrorCode::BadRequest
        );
    }
    // A VM its host no longer runs.
    admin
        .move_vm(
            "a",
            &MoveVm {
                host: None,
                host_port: None,
            },
        )
        .unwrap();
    assert_eq!(code(h1.mint_access_token("a")), ErrorCode::NotOwner);
    assert_eq!(code(h1.vm_metadata("a", None)), ErrorCode::NotOwner);
}

fn metadata_document_etag_and_long_poll(backend: Backend) {
    let f = Fixture::on(backend, "md-doc");
    populate(&f);
    let (h1, admin) = (f.reg.client("h1"), f.reg.client("admin"));
    let md = h1.vm_metadata("a", None).unwrap();
    assert_eq!(md.instance.name, "a");
    assert_eq!(md.instance.gateway, std::net::Ipv4Addr::new(10, 1, 0, 1));
    assert_eq!(
        (md.instance.mtu, md.instance.network.as_str()),
        (1400, "n1")
    );
    assert_eq!(md.project.project_id, "n1", "the network is the project");
    assert_eq!(md.instance.service_account.email, "web@n1.vnp.internal");
    assert_eq!(h1.vm_metadata("a", None).unwrap().etag, md.etag, "stable");

    // A change to the document changes the etag; writing the same value does not.
    admin.set_vm_attribute("a", "role", "web").unwrap();
    let md2 = h1.vm_metadata("a", None).unwrap();
    assert_ne!(md2.etag, md.etag);
    assert_eq!(md2.instance.attributes["role"], "web");
    admin.set_vm_attribute("a", "role", "web").unwrap();
    admin.set_vm_attribute("b", "role", "db").unwrap();
    assert_eq!(
        h1.vm_metadata("a", None).unwrap().etag,
        md2.etag,
        "nothing of a changed"
    );

    // A hanging GET returns when something changes, well within 1 s.
    let etag = md2.etag.clone();
    let waiter = {
        let h1 = h1.clone();
        std::thread::spawn(move || {
            let r = h1.vm_metadata("a", Some((&etag, Duration::from_secs(30))));
            (r, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Another VM's change wakes the waiter, which sees a's etag unchanged and waits on.
    admin.set_vm_attribute("b", "role", "cache").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "returned without a change to a");
    admin
        .set_project_attribute("n1", "ssh-keys", "ops:ssh-ed25519 AAAA")
        .unwrap();
    let changed_at = Instant::now();
    let (r, returned_at) = waiter.join().unwrap();
    let md3 = r.unwrap();
    assert!(
        returned_at.duration_since(changed_at) < Duration::from_secs(1),
        "long-poll took {:?}",
        returned_at.duration_since(changed_at)
    );
    assert_ne!(md3.etag, md2.etag);
    assert_eq!(md3.project.attributes["ssh-keys"], "ops:ssh-ed25519 AAAA");

    // The network's metadata session option reaches its VMs' documents (and their etag).
    assert!(!md3.project.require_session_token, "optional by default");
    let session = |on| ProjectUpdate {
        require_session_token: Some(on),
        ..ProjectUpdate::default()
    };
    let p = admin.update_project("n1", &session(true)).unwrap();
    assert!(p.require_session_token);
    assert!(admin.get_project("n1").unwrap().require_session_token);
    let on = h1.vm_metadata("a", None).unwrap();
    assert!(on.project.require_session_token);
    assert_ne!(on.etag, md3.etag);
    assert_eq!(
        code(h1.update_project("n1", &session(false))),
        ErrorCode::AdminRequired
    );
    assert!(
        !admin
            .update_project("n1", &session(false))
            .unwrap()
            .require_session_token
    );
    assert_eq!(
        h1.vm_metadata("a", None).unwrap().etag,
        md3.etag,
        "back to off"
    );
    admin.update_project("n1", &session(true)).unwrap();
    let md3 = h1.vm_metadata("a", None).unwrap();

    // Without a change it returns after its timeout with the same document.
    let t = Instant::now();
    let same = h1
        .vm_metadata("a", Some((&md3.etag, Duration::from_secs(1))))
        .unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(same.etag, md3.etag);
    // A stale etag answers at once.
    let t = Instant::now();
    h1.vm_metadata("a", Some((&md.etag, Duration::from_secs(30))))
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));

    // Unsetting, scopes, and the VM's deletion forget what was set.
    assert!(admin.unset_vm_attribute("a", "role").unwrap().is_empty());
    assert!(
        admin.unset_vm_attribute("a", "role").unwrap().is_empty(),
        "idempotent"
    );
    let scopes = vec!["read".to_string(), "write".to_string()];
    assert_eq!(admin.set_vm_scopes("a", &scopes).unwrap(), scopes);
    assert_eq!(
        h1.vm_metadata("a", None)
            .unwrap()
            .instance
            .service_account
            .scopes,
        scopes
    );
    assert_eq!(
        code(admin.set_vm_scopes("a", &["a b".into()])),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(h1.set_vm_attribute("a", "k", "v")),
        ErrorCode::AdminRequired
    );
    assert_eq!(
        code(admin.set_vm_attribute("a", "bad/key", "v")),
        ErrorCode::BadRequest
    );
    let big = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        code(admin.set_vm_attribute("a", "big", &big)),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(admin.set_vm_attribute("zz", "k", "v")),
        ErrorCode::UnknownVm
    );
    admin.delete_vm("a").unwrap();
    admin.create_vm(&vm("a", "h1")).unwrap();
    let fresh = h1.vm_metadata("a", None).unwrap();
    assert!(fresh.instance.attributes.is_empty() && fresh.guest_attributes.is_empty());
    assert_eq!(
        fresh.instance.service_account.scopes,
        vec![DEFAULT_SCOPES[0]]
    );
}

const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG7Pq2hS2cpzx3o3fXz root@a";

fn guest_attributes_limits_and_host_keys(backend: Backend) {
    // A high rate, so that the count limit is reached quickly (the rate has its own test).
    let f = Fixture::on_with_args(
        backend,
        "md-guest",
        &[
            "--guest-writes-per-sec",
            "1000",
            "--guest-write-burst",
            "1000",
        ],
    );
    populate(&f);
    let (h1, h2, admin) = (
        f.reg.client("h1"),
        f.reg.client("h2"),
        f.reg.client("admin"),
    );
    h1.put_guest_attribute("a", "hostkeys", "ssh-ed25519", HOST_KEY)
        .unwrap();
    let md = admin.vm_metadata("a", None).unwrap();
    assert_eq!(md.guest_attributes["hostkeys/ssh-ed25519"], HOST_KEY);

    // Refused: another host, an admin, a VM not running there, bad names, bad values.
    assert_eq!(
        code(h2.put_guest_attribute("a", "hostkeys", "x", "v")),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(admin.put_guest_attribute("a", "hostkeys", "x", "v")),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(h1.put_guest_attribute("b", "hostkeys", "x", "v")),
        ErrorCode::NotOwner
    );
    assert_eq!(
        code(h1.put_guest_attribute("a", "a/b", "x", "v")),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(h1.put_guest_attribute("a", "ns", "", "v")),
        ErrorCode::NotFound
    );
    let oversize = "k".repeat(4097);
    match h1.put_guest_attribute("a", "ns", "big", &oversize) {
        Err(ClientError::Api {
            status: 413,
            code: ErrorCode::TooLarge,
            message,
        }) => {
            assert!(message.contains("4096"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let (status, _) = h1
        .send_raw(
            "PUT",
            "/v1/vms/a/guest-attributes/ns/k",
            Some(&[0xff, 0xfe]),
        )
        .unwrap();
    assert_eq!(status, 400, "not UTF-8");
    // Up to 64 attributes; the 65th is refused and nothing of it is stored.
    for i in 1..64 {
        h1.put_guest_attribute("a", "ns", &format!("k{i}"), "v")
            .unwrap();
    }
    match h1.put_guest_attribute("a", "ns", "k64", "v") {
        Err(ClientError::Api {
            status: 409,
            code: ErrorCode::TooMany,
            message,
        }) => {
            assert!(message.contains("64"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let md = admin.vm_metadata("a", None).unwrap();
    assert_eq!(md.guest_attributes.len(), 64);
    assert!(!md.guest_attributes.contains_key("ns/k64"));
    // Overwriting one that exists is fine at the limit.
    h1.put_guest_attribute("a", "ns", "k1", "w").unwrap();
}

fn guest_attribute_rate_limit(backend: Backend) {
    let f = Fixture::on(backend, "md-rate");
    populate(&f);
    let h1 = f.reg.client("h1");
    let t = Instant::now();
    let results: Vec<Result<(), ClientError>> = (0..30)
        .map(|i| h1.put_guest_attribute("a", "ns", "counter", &i.to_string()))
        .collect();
    let elapsed = t.elapsed();
    let limited = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ClientError::Api {
                    status: 429,
                    code: ErrorCode::RateLimited,
                    ..
                })
            )
        })
        .count();
    assert!(
        results[..20].iter().all(|r| r.is_ok()),
        "the burst passes: {results:?}"
    );
    // 30 writes in `elapsed` at 5/s after a burst of 20: at most 20 + 5 * elapsed pass.
    let allowed = 20 + (elapsed.as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        limited >= 30usize.saturating_sub(allowed),
        "{limited} limited in {elapsed:?}"
    );
    assert!(limited > 0, "none limited in {elapsed:?}");
    // Another VM's budget is its own.
    f.reg
        .client("h2")
        .put_guest_attribute("b", "ns", "k", "v")
        .unwrap();
}

fn signing_key_rotation_keeps_old_tokens_verifiable(backend: Backend) {
    let mut f = Fixture::on(backend, "md-rotate");
    populate(&f);
    let (h1, admin) = (f.reg.client("h1"), f.reg.client("admin"));
    let before = h1.mint_access_token("a").unwrap().access_token;
    let first_kid = kid_of(&before);
    let keys = admin.rotate_signing_key().unwrap();
    assert_eq!(keys.len(), 2);
    let old = keys.iter().find(|k| k.kid == first_kid).unwrap();
    assert!(!old.active);
    assert_eq!(
        old.published_until,
        old.retired_at.map(|r| r + 600 + jwt::LEEWAY_S)
    );
    let after = h1.mint_access_token("a").unwrap().access_token;
    let second_kid = kid_of(&after);
    assert_ne!(second_kid, first_kid);
    let jwks = h1.jwks().unwrap();
    jwt::verify(&before, &jwks, None, now()).expect("the old key's token still verifies");
    jwt::verify(&after, &jwks, None, now()).unwrap();
    assert_eq!(code(h1.rotate_signing_key()), ErrorCode::AdminRequired);
    // The keys survive a crash; the new one keeps signing.
    f.reg.crash_and_restart();
    let h1 = f.reg.client("h1");
    assert_eq!(h1.jwks().unwrap(), jwks);
    let again = h1.mint_access_token("a").unwrap().access_token;
    assert_eq!(kid_of(&again), second_kid);
    jwt::verify(&before, &h1.jwks().unwrap(), None, now()).unwrap();
}

/// Each test above, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test]
            fn $name() {
                super::$name(super::Backend::Redb)
            })*
        }
        mod etcd {
            $(#[test]
            fn $name() {
                super::$name(super::Backend::Etcd)
            })*
        }
    };
}

on_both_backends!(
    credentials_verify_with_independent_libraries,
    metadata_document_etag_and_long_poll,
    guest_attributes_limits_and_host_keys,
    guest_attribute_rate_limit,
    signing_key_rotation_keeps_old_tokens_verifiable,
);

/// A second replica on the same etcd: it publishes the same single key, and a long-poll on
/// it wakes for a change made through the first (from the store's change stream).
#[test]
fn replica_shares_keys_and_wakes_long_polls() {
    let f = Fixture::on(Backend::Etcd, "md-replica");
    populate(&f);
    let root = f.dir.0.join("r2");
    std::fs::create_dir_all(&root).unwrap();
    let extra: Vec<&str> = f.reg.extra.iter().map(String::as_str).collect();
    let r2 = RegistryProc::start(&root, &f.reg.tls, &extra);
    let (h1_on_1, h1_on_2) = (f.reg.client("h1"), r2.client("h1"));
    assert_eq!(h1_on_1.jwks().unwrap(), h1_on_2.jwks().unwrap());
    assert_eq!(
        h1_on_2.jwks().unwrap().keys.len(),
        1,
        "the second start made no key"
    );
    let token = h1_on_2.mint_access_token("a").unwrap().access_token;
    jwt::verify(&token, &h1_on_1.jwks().unwrap(), None, now()).unwrap();

    let etag = h1_on_2.vm_metadata("a", None).unwrap().etag;
    let waiter = std::thread::spawn(move || {
        let r = h1_on_2.vm_metadata("a", Some((&etag, Duration::from_secs(30))));
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    f.reg
        .client("h1")
        .put_guest_attribute("a", "hostkeys", "ssh-rsa", "ssh-rsa AAAAB3")
        .unwrap();
    let changed_at = Instant::now();
    let (r, at) = waiter.join().unwrap();
    assert_eq!(
        r.unwrap().guest_attributes["hostkeys/ssh-rsa"],
        "ssh-rsa AAAAB3"
    );
    assert!(
        at.duration_since(changed_at) < Duration::from_secs(2),
        "{:?}",
        at.duration_since(changed_at)
    );
    // Rotation through one replica is seen by the other.
    f.reg.client("admin").rotate_signing_key().unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while r2.client("h1").jwks().unwrap().keys.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "rotation not seen on the other replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Export with metadata and keys from one registry, import into a fresh one: the same
/// documents, and tokens the new one signs verify with the old one's JWKS.
#[test]
fn export_import_carries_metadata_and_keys() {
    let keys_dir = TempDir::new("md-backup-keys");
    let keys = common::etcd::write_secret_keys(&keys_dir.0);
    let args = ["--secret-keys", keys.to_str().unwrap()];
    let src = Fixture::with_args("md-export", &args);
    populate(&src);
    let admin = src.reg.client("admin");
    admin.set_vm_attribute("a", "role", "web").unwrap();
    admin.set_project_attribute("n1", "motd", "hello").unwrap();
    admin
        .update_project(
            "n1",
            &ProjectUpdate {
                require_session_token: Some(true),
                ..ProjectUpdate::default()
            },
        )
        .unwrap();
    src.reg
        .client("h1")
        .put_guest_attribute("a", "hostkeys", "ssh-ed25519", HOST_KEY)
        .unwrap();
    admin.rotate_signing_key().unwrap();
    let export = admin.export().unwrap();
    // a's attributes, n1's project, two signing keys.
    assert_eq!(export.metadata.len(), 1 + 1 + 2, "{:?}", export.metadata);
    assert!(
        export
            .secrets
            .iter()
            .filter(|s| s.owner.starts_with("sk/"))
            .count()
            == 2
    );

    let dst = Fixture::with_args("md-import", &args);
    let dst_admin = dst.reg.client("admin");
    let summary = dst_admin.import(&export).unwrap();
    assert_eq!(summary.metadata, export.metadata.len());
    assert_eq!(
        dst_admin.jwks().unwrap(),
        admin.jwks().unwrap(),
        "keys replaced by the export's"
    );
    assert_eq!(
        dst_admin.vm_metadata("a", None).unwrap(),
        admin.vm_metadata("a", None).unwrap()
    );
    assert!(dst_admin.get_project("n1").unwrap().require_session_token);
    let token = dst_admin.mint_access_token("a").unwrap().access_token;
    jwt::verify(&token, &admin.jwks().unwrap(), None, now()).unwrap();
}
