//! Binary encoding of Paxos messages and durable records, shared by the
//! transport and the on-disk log. Pure byte shuffling: no I/O here.
//!
//! Integers are little-endian fixed width; byte strings and strings are a
//! `u32` length then the bytes; enums are a one-byte tag. Decoding never
//! panics on hostile input: every length is checked against what remains.

use crate::paxos::{
    Ballot, Body, Config, ConfigChange, HardState, LogEntry, MemberRequest, Message, NodeId,
    Refusal, Snapshot, Value,
};

/// Input that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}")]
pub struct DecodeError {
    /// What was being decoded.
    pub what: &'static str,
}

fn malformed(what: &'static str) -> DecodeError {
    DecodeError { what }
}

/// Appends encoded values to a buffer.
#[derive(Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// A one-byte value.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        let len = u32::try_from(v.len()).expect("byte strings are bounded far below 4 GiB");
        self.u32(len);
        self.buf.extend_from_slice(v);
    }
    /// Length-prefixed UTF-8.
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// A node identity.
    pub fn node_id(&mut self, id: &NodeId) {
        self.str(&id.name);
        self.u64(id.incarnation);
    }
    fn ballot(&mut self, b: &Ballot) {
        self.u64(b.round);
        self.node_id(&b.leader);
    }
    fn value(&mut self, v: &Value) {
        match v {
            Value::Noop => self.u8(0),
            Value::Command(data) => {
                self.u8(1);
                self.bytes(data);
            }
            Value::Change(change) => {
                let (tag, id) = match change {
                    ConfigChange::AddLearner(id) => (2, id),
                    ConfigChange::Promote(id) => (3, id),
                    ConfigChange::Remove(id) => (4, id),
                };
                self.u8(tag);
                self.node_id(id);
            }
        }
    }
    fn config(&mut self, c: &Config) {
        self.u64(c.epoch);
        for set in [&c.voters, &c.learners] {
            self.u32(set.len() as u32);
            for id in set {
                self.node_id(id);
            }
        }
    }
    /// A log entry.
    pub fn log_entry(&mut self, e: &LogEntry) {
        self.ballot(&e.ballot);
        self.value(&e.value);
    }
    fn entries(&mut self, entries: &[(u64, LogEntry)]) {
        self.u32(entries.len() as u32);
        for (slot, e) in entries {
            self.u64(*slot);
            self.log_entry(e);
        }
    }
    /// A snapshot.
    pub fn snapshot(&mut self, s: &Snapshot) {
        self.u64(s.index);
        self.config(&s.config);
        self.bytes(&s.data);
    }
    /// A hard state.
    pub fn hard_state(&mut self, h: &HardState) {
        self.ballot(&h.promised);
        self.u64(h.decided);
    }
    /// A whole message.
    pub fn message(&mut self, m: &Message) {
        self.node_id(&m.from);
        self.node_id(&m.to);
        match &m.body {
            Body::Prepare { ballot, from_slot } => {
                self.u8(1);
                self.ballot(ballot);
                self.u64(*from_slot);
            }
            Body::Promise {
                ballot,
                decided,
                entries,
            } => {
                self.u8(2);
                self.ballot(ballot);
                self.u64(*decided);
                self.entries(entries);
            }
            Body::Accept {
                ballot,
                entries,
                decided,
            } => {
                self.u8(3);
                self.ballot(ballot);
                self.u32(entries.len() as u32);
                for (slot, v) in entries {
                    self.u64(*slot);
                    self.value(v);
                }
                self.u64(*decided);
            }
            Body::Accepted {
                ballot,
                slots,
                decided,
            } => {
                self.u8(4);
                self.ballot(ballot);
                self.u32(slots.len() as u32);
                for slot in slots {
                    self.u64(*slot);
                }
                self.u64(*decided);
            }
            Body::Reject { promised } => {
                self.u8(5);
                self.ballot(promised);
            }
            Body::Commit { ballot, decided } => {
                self.u8(6);
                self.ballot(ballot);
                self.u64(*decided);
            }
            Body::CommitAck { ballot, decided } => {
                self.u8(7);
                self.ballot(ballot);
                self.u64(*decided);
            }
            Body::CatchUpRequest {
                from_slot,
                has_base,
            } => {
                self.u8(8);
                self.u64(*from_slot);
                self.bool(*has_base);
            }
            Body::CatchUp { entries, decided } => {
                self.u8(9);
                self.entries(entries);
                self.u64(*decided);
            }
            Body::InstallSnapshot { snapshot } => {
                self.u8(10);
                self.snapshot(snapshot);
            }
            Body::Forward { data } => {
                self.u8(11);
                self.bytes(data);
            }
            Body::Join { hops } => {
                self.u8(12);
                self.u8(*hops);
            }
            Body::JoinReply { has_config } => {
                self.u8(13);
                self.bool(*has_config);
            }
            Body::Invite => self.u8(14),
            Body::ChangeRequest { request, change } => {
                self.u8(15);
                self.u64(*request);
                match change {
                    MemberRequest::Remove(id) => {
                        self.u8(1);
                        self.node_id(id);
                    }
                    MemberRequest::Add(name) => {
                        self.u8(2);
                        self.str(name);
                    }
                }
            }
            Body::ChangeReply { request, refusal } => {
                self.u8(16);
                self.u64(*request);
                match refusal {
                    None => self.u8(0),
                    Some(Refusal::NotLeader) => self.u8(1),
                    Some(Refusal::ChangeInProgress) => self.u8(2),
                    Some(Refusal::Invalid(reason)) => {
                        self.u8(3);
                        self.str(reason);
                    }
                    Some(Refusal::Busy) => self.u8(4),
                }
            }
        }
    }
}

/// Reads encoded values from a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// A one-byte value.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "u8")?[0])
    }
    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4, "u32")?;
        Ok(u32::from_le_bytes(b.try_into().expect("took 4 bytes")))
    }
    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8, "u64")?;
        Ok(u64::from_le_bytes(b.try_into().expect("took 8 bytes")))
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        Ok(self.take(len, "byte string")?.to_vec())
    }
    /// Length-prefixed UTF-8.
    pub fn str(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed("string"))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("bool")),
        }
    }
    /// A count of items that each take at least `min_size` bytes.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(malformed("count"));
        }
        Ok(n)
    }
    /// A node identity.
    pub fn node_id(&mut self) -> Result<NodeId, DecodeError> {
        Ok(NodeId {
            name: self.str()?,
            incarnation: self.u64()?,
        })
    }
    fn ballot(&mut self) -> Result<Ballot, DecodeError> {
        Ok(Ballot {
            round: self.u64()?,
            leader: self.node_id()?,
        })
    }
    fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8()? {
            0 => Value::Noop,
            1 => Value::Command(self.bytes()?),
            2 => Value::Change(ConfigChange::AddLearner(self.node_id()?)),
            3 => Value::Change(ConfigChange::Promote(self.node_id()?)),
            4 => Value::Change(ConfigChange::Remove(self.node_id()?)),
            _ => return Err(malformed("value tag")),
        })
    }
    fn config(&mut self) -> Result<Config, DecodeError> {
        let epoch = self.u64()?;
        let mut sets = [Default::default(), Default::default()];
        for set in &mut sets {
            let n = self.count(12)?;
            for _ in 0..n {
                std::collections::BTreeSet::insert(set, self.node_id()?);
            }
        }
        let [voters, learners] = sets;
        Ok(Config {
            epoch,
            voters,
            learners,
        })
    }
    /// A log entry.
    pub fn log_entry(&mut self) -> Result<LogEntry, DecodeError> {
        Ok(LogEntry {
            ballot: self.ballot()?,
            value: self.value()?,
        })
    }
    fn entries(&mut self) -> Result<Vec<(u64, LogEntry)>, DecodeError> {
        let n = self.count(29)?;
        (0..n)
            .map(|_| Ok((self.u64()?, self.log_entry()?)))
            .collect()
    }
    /// A snapshot.
    pub fn snapshot(&mut self) -> Result<Snapshot, DecodeError> {
        Ok(Snapshot {
            index: self.u64()?,
            config: self.config()?,
            data: self.bytes()?,
        })
    }
    /// A hard state.
    pub fn hard_state(&mut self) -> Result<HardState, DecodeError> {
        Ok(HardState {
            promised: self.ballot()?,
            decided: self.u64()?,
        })
    }
    /// A whole message.
    pub fn message(&mut self) -> Result<Message, DecodeError> {
        let from = self.node_id()?;
        let to = self.node_id()?;
        let body = match self.u8()? {
            1 => Body::Prepare {
                ballot: self.ballot()?,
                from_slot: self.u64()?,
            },
            2 => Body::Promise {
                ballot: self.ballot()?,
                decided: self.u64()?,
                entries: self.entries()?,
            },
            3 => {
                let ballot = self.ballot()?;
                let n = self.count(9)?;
                let entries = (0..n)
                    .map(|_| Ok((self.u64()?, self.value()?)))
                    .collect::<Result<_, DecodeError>>()?;
                Body::Accept {
                    ballot,
                    entries,
                    decided: self.u64()?,
                }
            }
            4 => {
                let ballot = self.ballot()?;
                let n = self.count(8)?;
                let slots = (0..n).map(|_| self.u64()).collect::<Result<_, _>>()?;
                Body::Accepted {
                    ballot,
                    slots,
                    decided: self.u64()?,
                }
            }
            5 => Body::Reject {
                promised: self.ballot()?,
            },
            6 => Body::Commit {
                ballot: self.ballot()?,
                decided: self.u64()?,
            },
            7 => Body::CommitAck {
                ballot: self.ballot()?,
                decided: self.u64()?,
            },
            8 => Body::CatchUpRequest {
                from_slot: self.u64()?,
                has_base: self.bool()?,
            },
            9 => Body::CatchUp {
                entries: self.entries()?,
                decided: self.u64()?,
            },
            10 => Body::InstallSnapshot {
                snapshot: self.snapshot()?,
            },
            11 => Body::Forward {
                data: self.bytes()?,
            },
            12 => Body::Join { hops: self.u8()? },
            13 => Body::JoinReply {
                has_config: self.bool()?,
            },
            14 => Body::Invite,
            15 => Body::ChangeRequest {
                request: self.u64()?,
                change: match self.u8()? {
                    1 => MemberRequest::Remove(self.node_id()?),
                    2 => MemberRequest::Add(self.str()?),
                    _ => return Err(malformed("member request tag")),
                },
            },
            16 => Body::ChangeReply {
                request: self.u64()?,
                refusal: match self.u8()? {
                    0 => None,
                    1 => Some(Refusal::NotLeader),
                    2 => Some(Refusal::ChangeInProgress),
                    3 => Some(Refusal::Invalid(self.str()?)),
                    4 => Some(Refusal::Busy),
                    _ => return Err(malformed("refusal tag")),
                },
            },
            _ => return Err(malformed("message tag")),
        };
        Ok(Message { from, to, body })
    }
}

/// Encodes a message.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut w = Writer::default();
    w.message(m);
    w.buf
}

/// Decodes a message that must fill `buf` exactly.
pub fn decode_message(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let m = r.message()?;
    if r.remaining() != 0 {
        return Err(malformed("message (trailing bytes)"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_messages() -> Vec<Message> {
        let a = NodeId::new("a", 7);
        let b = NodeId::new("b", 9);
        let ballot = Ballot {
            round: 3,
            leader: a.clone(),
        };
        let entry = LogEntry {
            ballot: ballot.clone(),
            value: Value::Change(ConfigChange::Promote(b.clone())),
        };
        let snapshot = Snapshot {
            index: 12,
            config: Config::bootstrap(a.clone()),
            data: b"state".to_vec(),
        };
        let bodies = vec![
            Body::Prepare {
                ballot: ballot.clone(),
                from_slot: 4,
            },
            Body::Promise {
                ballot: ballot.clone(),
                decided: 3,
                entries: vec![(4, entry.clone())],
            },
            Body::Accept {
                ballot: ballot.clone(),
                entries: vec![(5, Value::Command(vec![1, 2])), (6, Value::Noop)],
                decided: 4,
            },
            Body::Accepted {
                ballot: ballot.clone(),
                slots: vec![5, 6],
                decided: 4,
            },
            Body::Reject {
                promised: ballot.clone(),
            },
            Body::Commit {
                ballot: ballot.clone(),
                decided: 6,
            },
            Body::CommitAck {
                ballot: ballot.clone(),
                decided: 6,
            },
            Body::CatchUpRequest {
                from_slot: 1,
                has_base: false,
            },
            Body::CatchUp {
                entries: vec![(1, entry)],
                decided: 1,
            },
            Body::InstallSnapshot { snapshot },
            Body::Forward { data: vec![9; 10] },
            Body::Join { hops: 1 },
            Body::JoinReply { has_config: true },
            Body::Invite,
            Body::ChangeRequest {
                request: 77,
                change: MemberRequest::Remove(b.clone()),
            },
            Body::ChangeRequest {
                request: 78,
                change: MemberRequest::Add("c".into()),
            },
            Body::ChangeReply {
                request: 77,
                refusal: None,
            },
            Body::ChangeReply {
                request: 78,
                refusal: Some(Refusal::Invalid("no".into())),
            },
            Body::ChangeReply {
                request: 79,
                refusal: Some(Refusal::ChangeInProgress),
            },
            Body::ChangeReply {
                request: 80,
                refusal: Some(Refusal::NotLeader),
            },
            Body::ChangeReply {
                request: 81,
                refusal: Some(Refusal::Busy),
            },
        ];
        bodies
            .into_iter()
            .map(|body| Message {
                from: a.clone(),
                to: b.clone(),
                body,
            })
            .collect()
    }

    #[test]
    fn every_message_round_trips() {
        // Goal: decode(encode(m)) == m for every message kind.
        for m in sample_messages() {
            assert_eq!(decode_message(&encode_message(&m)), Ok(m));
        }
    }

    #[test]
    fn truncated_or_corrupt_input_is_an_error_not_a_panic() {
        // Goal: every prefix and a corrupted tag of each message decode to errors.
        for m in sample_messages() {
            let bytes = encode_message(&m);
            for len in 0..bytes.len() {
                assert!(decode_message(&bytes[..len]).is_err(), "{m:?} prefix {len}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(decode_message(&long).is_err());
        }
        let huge_count = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(decode_message(&huge_count).is_err());
    }

    fn byte_vec(max: usize) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..max)
    }

    /// Decodes `bytes` every way the transport and the log do; whatever
    /// decodes must survive a round trip unchanged.
    fn decode_everything(bytes: &[u8]) {
        if let Ok(m) = decode_message(bytes) {
            assert_eq!(decode_message(&encode_message(&m)), Ok(m));
        }
        let _ = Reader::new(bytes).snapshot();
        let _ = Reader::new(bytes).log_entry();
        let _ = Reader::new(bytes).hard_state();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_decode_to_errors_never_panics(bytes in byte_vec(512)) {
            // Goal: arbitrary peer bytes give a message or a DecodeError; no panic, no huge allocation.
            decode_everything(&bytes);
        }

        #[test]
        fn mutated_valid_messages_decode_to_errors_never_panics(
            which in 0usize..14,
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>(), 0u8..3), 1..4),
        ) {
            // Goal: valid messages with bytes replaced, inserted or removed decode or fail cleanly.
            let messages = sample_messages();
            let mut bytes = encode_message(&messages[which % messages.len()]);
            for (at, value, op) in edits {
                let at = at % (bytes.len() + 1);
                match op {
                    0 if at < bytes.len() => bytes[at] = value,
                    1 => bytes.insert(at, value),
                    _ if at < bytes.len() => { bytes.remove(at); }
                    _ => bytes.push(value),
                }
            }
            decode_everything(&bytes);
        }
    }
}
