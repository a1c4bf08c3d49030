//! Forwarding the guest's DNS queries for other names to an operator-configured upstream
//! resolver (`[bridge] dns_upstream` in vnpd.toml). Each forwarded query gets a fresh random
//! id from the caller; an answer is accepted only if it is a response with a pending id and the
//! same question, and goes back to the guest with the guest's own id. Queries wait at most
//! [`FORWARD_TIMEOUT`]; at most [`MAX_PENDING`] wait per VM. Pure: the forwarder thread
//! (`thread.rs`) does the socket I/O and draws the ids.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, Query};

use super::dns::MAX_QUERY;

/// How long a forwarded query waits for the upstream's answer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Most queries of one VM waiting for the upstream.
pub const MAX_PENDING: usize = 64;
/// Largest answer passed back (a plain UDP DNS message; larger ones are dropped, counted).
pub const MAX_ANSWER: usize = MAX_QUERY;

/// Why a query or an answer was not forwarded (each counted by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardDrop {
    /// [`MAX_PENDING`] queries are already waiting.
    TooManyPending,
    /// The id drawn is in use (the caller may draw again).
    IdInUse,
    /// An answer that is not a DNS response, too large, for no pending id, or for another
    /// question (a late, duplicate or forged answer).
    BadAnswer,
}

#[derive(Debug, Clone)]
struct Waiting<G> {
    guest_id: u16,
    guest: G,
    question: Query,
    deadline: Instant,
}

/// The queries of one VM waiting for the upstream; `G` says where the answer goes.
#[derive(Debug)]
pub struct Pending<G> {
    by_id: HashMap<u16, Waiting<G>>,
}

impl<G> Default for Pending<G> {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
        }
    }
}

impl<G: Clone> Pending<G> {
    /// Registers the guest's query `query` (already known to be a single-question query) under
    /// `upstream_id`; the bytes to send upstream.
    pub fn start(
        &mut self,
        query: &[u8],
        guest: G,
        upstream_id: u16,
        now: Instant,
    ) -> Result<Vec<u8>, ForwardDrop> {
        if self.by_id.len() >= MAX_PENDING {
            return Err(ForwardDrop::TooManyPending);
        }
        if self.by_id.contains_key(&upstream_id) {
            return Err(ForwardDrop::IdInUse);
        }
        let msg = Message::from_vec(query).map_err(|_| ForwardDrop::BadAnswer)?;
        let [question] = msg.queries.as_slice() else {
            return Err(ForwardDrop::BadAnswer);
        };
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&upstream_id.to_be_bytes());
        self.by_id.insert(
            upstream_id,
            Waiting {
                guest_id: msg.metadata.id,
                guest,
                question: question.clone(),
                deadline: now + FORWARD_TIMEOUT,
            },
        );
        Ok(out)
    }

    /// The upstream's datagram `answer`: the bytes for the guest and where they go.
    pub fn finish(&mut self, answer: &[u8]) -> Result<(Vec<u8>, G), ForwardDrop> {
        if answer.len() > MAX_ANSWER {
            return Err(ForwardDrop::BadAnswer);
        }
        let msg = Message::from_vec(answer).map_err(|_| ForwardDrop::BadAnswer)?;
        if msg.metadata.message_type != MessageType::Response {
            return Err(ForwardDrop::BadAnswer);
        }
        let id = msg.metadata.id;
        let same_question = self
            .by_id
            .get(&id)
            .is_some_and(|w| msg.queries.as_slice() == std::slice::from_ref(&w.question));
        if !same_question {
            return Err(ForwardDrop::BadAnswer);
        }
        let waiting = self.by_id.remove(&id).ok_or(ForwardDrop::BadAnswer)?;
        let mut out = answer.to_vec();
        out[..2].copy_from_slice(&waiting.guest_id.to_be_bytes());
        Ok((out, waiting.guest))
    }

    /// Forgets the queries whose time is up; how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.by_id.len();
        self.by_id.retain(|_, w| now < w.deadline);
        before - self.by_id.len()
    }

    /// Queries waiting.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::net::Ipv4Addr;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn answer_to(q: &[u8], ip: Ipv4Addr) -> Vec<u8> {
        let req = Message::from_vec(q).unwrap();
        let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        m.add_query(req.queries[0].clone());
        m.add_answer(Record::from_rdata(
            req.queries[0].name().clone(),
            60,
            RData::A(A(ip)),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn an_answer_goes_back_with_the_guests_id() {
        let now = Instant::now();
        let mut p = Pending::default();
        let sent = p
            .start(&query(7, "svc.corp."), "guest", 0xbeef, now)
            .unwrap();
        assert_eq!(&sent[..2], &[0xbe, 0xef]);
        let upstream = answer_to(&sent, Ipv4Addr::new(192, 0, 2, 7));
        let (back, to) = p.finish(&upstream).unwrap();
        assert_eq!(to, "guest");
        let m = Message::from_vec(&back).unwrap();
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.answers.len(), 1);
        assert!(p.is_empty());
        // The same answer again: nothing waits for it any more.
        assert_eq!(p.finish(&upstream), Err(ForwardDrop::BadAnswer));
    }

    #[test]
    fn forged_late_and_odd_answers_are_dropped() {
        let now = Instant::now();
        let mut p = Pending::default();
        let sent = p.start(&query(1, "a.corp."), 1u8, 100, now).unwrap();
        // Another question under the right id.
        let mut other = answer_to(&query(1, "b.corp."), Ipv4Addr::LOCALHOST);
        other[..2].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(p.finish(&other), Err(ForwardDrop::BadAnswer));
        // A query, not a response; garbage; oversize.
        assert_eq!(p.finish(&sent), Err(ForwardDrop::BadAnswer));
        assert_eq!(p.finish(b"\x00\x64junk"), Err(ForwardDrop::BadAnswer));
        assert_eq!(p.finish(&[0u8; 600]), Err(ForwardDrop::BadAnswer));
        assert_eq!(p.len(), 1, "still waiting for the real answer");
        // Time is up: forgotten, and its answer no longer accepted.
        assert_eq!(p.expire(now + FORWARD_TIMEOUT), 1);
        let late = answer_to(&sent, Ipv4Addr::LOCALHOST);
        assert_eq!(p.finish(&late), Err(ForwardDrop::BadAnswer));
    }

    #[test]
    fn pending_queries_are_bounded() {
        let now = Instant::now();
        let mut p = Pending::default();
        for id in 0..MAX_PENDING as u16 {
            p.start(&query(id, "x.corp."), (), id, now).unwrap();
        }
        assert_eq!(
            p.start(&query(9, "y.corp."), (), 9999, now),
            Err(ForwardDrop::TooManyPending)
        );
        p.expire(now + FORWARD_TIMEOUT);
        assert_eq!(
            p.start(&query(9, "y.corp."), (), 3, now).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            p.start(&query(9, "y.corp."), (), 3, now),
            Err(ForwardDrop::IdInUse)
        );
    }
}
