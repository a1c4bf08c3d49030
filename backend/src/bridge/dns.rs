//! The bridge's DNS answers. DHCP hands the guest the metadata address as its resolver (as GCE
//! does); the bridge answers A queries for `metadata.google.internal` (the metadata address)
//! and for the VM's own hostname (its address), NOERROR without answers for their other types;
//! every other name is forwarded to the operator's upstream resolver when one is configured
//! (`dns_forward.rs`), REFUSED otherwise. Pure; messages are decoded and encoded by
//! `hickory-proto`.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The name guests resolve before they connect to the metadata server.
pub const METADATA_NAME: &str = "metadata.google.internal.";
/// TTL of the answers (short: a migrated VM keeps its names anyway).
pub const TTL: u32 = 60;
/// Largest query accepted (a plain UDP DNS message).
pub const MAX_QUERY: usize = 512;

/// The names the bridge answers for one VM.
#[derive(Debug, Clone)]
pub struct Names {
    metadata: (Name, Ipv4Addr),
    host: Option<(Name, Ipv4Addr)>,
}

impl Names {
    /// `metadata.google.internal` -> `metadata_ip`, `hostname` -> `vm_ip` (when it is a valid
    /// name).
    pub fn new(metadata_ip: Ipv4Addr, hostname: &str, vm_ip: Ipv4Addr) -> Self {
        let metadata = Name::from_ascii(METADATA_NAME).map(|n| (n, metadata_ip));
        let host = (!hostname.is_empty())
            .then(|| Name::from_ascii(format!("{}.", hostname.trim_end_matches('.'))).ok())
            .flatten()
            .map(|n| (n, vm_ip));
        Self {
            metadata: metadata.unwrap_or_else(|_| (Name::root(), metadata_ip)),
            host,
        }
    }

    /// The address of `name` (case-insensitive, with or without the final dot).
    fn lookup(&self, name: &Name) -> Option<Ipv4Addr> {
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        [Some(&self.metadata), self.host.as_ref()]
            .into_iter()
            .flatten()
            .find(|(n, _)| *n == fqdn)
            .map(|(_, ip)| *ip)
    }
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsDrop {
    /// Not a DNS message, or larger than [`MAX_QUERY`].
    Malformed,
    /// A response, not a query.
    NotAQuery,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this back.
    Reply(Vec<u8>),
    /// A single-question query for a name the bridge does not serve: ask the upstream.
    Forward,
}

/// The answer to the DNS query `query`; names the bridge does not serve are forwarded when
/// `forward` (an upstream is configured), REFUSED otherwise.
pub fn answer(query: &[u8], names: &Names, forward: bool) -> Result<Answer, DnsDrop> {
    if query.len() > MAX_QUERY {
        return Err(DnsDrop::Malformed);
    }
    let req = Message::from_vec(query).map_err(|_| DnsDrop::Malformed)?;
    if req.metadata.message_type != MessageType::Query {
        return Err(DnsDrop::NotAQuery);
    }
    let mut metadata = Metadata::response_from_request(&req.metadata);
    let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    let [q] = req.queries.as_slice() else {
        metadata.response_code = ResponseCode::FormErr;
        resp.metadata = metadata;
        return resp
            .to_vec()
            .map(Answer::Reply)
            .map_err(|_| DnsDrop::Malformed);
    };
    resp.add_query(q.clone());
    let plain = req.metadata.op_code == OpCode::Query && q.query_class() == DNSClass::IN;
    let known = plain.then(|| names.lookup(q.name())).flatten();
    if known.is_none() && plain && forward {
        return Ok(Answer::Forward);
    }
    match known {
        Some(ip) => {
            metadata.authoritative = true;
            if q.query_type() == RecordType::A {
                resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
            }
        }
        None => metadata.response_code = ResponseCode::Refused,
    }
    resp.metadata = metadata;
    resp.to_vec()
        .map(Answer::Reply)
        .map_err(|_| DnsDrop::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    const MD: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn ask(name: &str, qtype: RecordType) -> Message {
        let names = Names::new(MD, "vm-a", VM);
        match answer(&query(name, qtype), &names, false).unwrap() {
            Answer::Reply(r) => Message::from_vec(&r).unwrap(),
            Answer::Forward => panic!("forwarded without an upstream"),
        }
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn metadata_and_own_name() {
        let m = ask("metadata.google.internal", RecordType::A);
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&m), vec![MD]);
        assert_eq!(
            a_records(&ask("METADATA.Google.Internal.", RecordType::A)),
            vec![MD]
        );
        assert_eq!(a_records(&ask("vm-a", RecordType::A)), vec![VM]);
        // Other types of a known name: no data, no error.
        let aaaa = ask("metadata.google.internal", RecordType::AAAA);
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
    }

    #[test]
    fn other_names_are_refused_and_garbage_is_dropped() {
        let m = ask("example.com", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(m.answers.is_empty());
        let names = Names::new(MD, "vm-a", VM);
        assert_eq!(answer(b"\x00\x01", &names, true), Err(DnsDrop::Malformed));
        assert_eq!(answer(&[0u8; 600], &names, true), Err(DnsDrop::Malformed));
        let mut resp = Message::new(1, MessageType::Response, OpCode::Query);
        resp.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        assert_eq!(
            answer(&resp.to_vec().unwrap(), &names, true),
            Err(DnsDrop::NotAQuery)
        );
    }

    #[test]
    fn with_an_upstream_other_names_are_forwarded_and_own_names_still_answered() {
        let names = Names::new(MD, "vm-a", VM);
        let q = query("example.com", RecordType::A);
        assert_eq!(answer(&q, &names, true), Ok(Answer::Forward));
        let q = query("metadata.google.internal", RecordType::A);
        let Ok(Answer::Reply(r)) = answer(&q, &names, true) else {
            panic!("the metadata name is the bridge's own");
        };
        assert_eq!(a_records(&Message::from_vec(&r).unwrap()), vec![MD]);
        // Two questions: FORMERR from the bridge, never forwarded.
        let mut m = Message::new(5, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        m.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
        let Ok(Answer::Reply(r)) = answer(&m.to_vec().unwrap(), &names, true) else {
            panic!("two questions forwarded");
        };
        let r = Message::from_vec(&r).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }
}
