//! Per-channel state: consumers, unacked deliveries, confirms, qos, tx and
//! the content being assembled. Owned by the connection task; no locks,
//! no I/O (the connection writes whatever the channel decides).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::protocol::basic::AMQPProperties;
use bytes::{Bytes, BytesMut};

use crate::broker::ChannelInfo;
use crate::cluster::forward::LinkChannel;
use crate::message::NameCache;
use crate::protocol::{AmqpError, reply};
use crate::queue::{Credit, Entry, Queue};

/// Where a consumer's messages come from.
#[derive(Debug, Clone)]
pub enum ConsumerSource {
    /// A queue homed on this node.
    Local(Arc<Queue>),
    /// A queue homed elsewhere, consumed through this link channel (the
    /// home node enforces the prefetch).
    Remote(Arc<LinkChannel>),
}

/// A consumer as its channel sees it.
#[derive(Debug)]
pub struct ChannelConsumer {
    /// The queue consumed from.
    pub source: ConsumerSource,
    /// No acks expected.
    pub no_ack: bool,
    /// Its prefetch credit.
    pub credit: Arc<Credit>,
}

/// Where an unacked delivery came from, and so how to settle it.
#[derive(Debug)]
pub enum Origin {
    /// A local queue holds the message as unacked.
    Local {
        /// Queue it came from.
        queue: Arc<Queue>,
        /// The message.
        entry: Entry,
    },
    /// The home node holds it as unacked on a link channel.
    Remote {
        /// The link channel it arrived on.
        link: Arc<LinkChannel>,
        /// Its delivery tag on that link channel.
        tag: u64,
    },
}

/// A delivery awaiting ack.
#[derive(Debug)]
pub struct Unacked {
    /// Delivery tag on this channel.
    pub tag: u64,
    /// Where it came from.
    pub origin: Origin,
    /// Consumer credit to return (None for `basic.get` and remote deliveries).
    pub credit: Option<Arc<Credit>>,
}

/// This channel's use of one home node's data link.
#[derive(Debug)]
pub struct RemoteChannel {
    /// The link channel.
    pub link: Arc<LinkChannel>,
    /// The link failed or the home node closed the channel.
    pub down: bool,
    /// Publishes forwarded on it (its confirm sequence).
    pub published: u64,
    /// Forwarded publishes awaiting the home node's confirm, in order.
    pub unconfirmed: VecDeque<Forwarded>,
}

/// A publish forwarded to a home node, awaiting its confirm.
#[derive(Debug)]
pub struct Forwarded {
    /// Its sequence on the link channel.
    pub link_seq: u64,
    /// Its client publish sequence (0 outside confirm mode).
    pub seq: u64,
    /// A mandatory message whose only destination is this home node: it is
    /// returned (`basic.return`) if the link fails before the confirm.
    pub returnable: Option<Arc<crate::message::Message>>,
}

/// A publish whose header/body frames are still arriving.
#[derive(Debug)]
pub struct PendingContent {
    /// Exchange.
    pub exchange: Arc<str>,
    /// Routing key.
    pub routing_key: Arc<str>,
    /// Mandatory flag.
    pub mandatory: bool,
    /// Header received: size, properties, raw properties.
    pub header: Option<(u64, AMQPProperties, Bytes)>,
    /// Body received so far.
    pub body: BodyParts,
}

/// Body assembly: a single frame stays a zero-copy slice.
#[derive(Debug, Default)]
pub enum BodyParts {
    /// Nothing yet.
    #[default]
    Empty,
    /// One frame.
    One(Bytes),
    /// Several frames, copied together.
    Many(BytesMut),
}

impl BodyParts {
    /// Bytes received so far.
    pub fn len(&self) -> usize {
        match self {
            BodyParts::Empty => 0,
            BodyParts::One(b) => b.len(),
            BodyParts::Many(b) => b.len(),
        }
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a body frame.
    pub fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            BodyParts::Empty => BodyParts::One(chunk),
            BodyParts::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                BodyParts::Many(all)
            }
            BodyParts::Many(mut all) => {
                all.extend_from_slice(&chunk);
                BodyParts::Many(all)
            }
        }
    }

    /// The whole body.
    pub fn finish(self) -> Bytes {
        match self {
            BodyParts::Empty => Bytes::new(),
            BodyParts::One(b) => b,
            BodyParts::Many(b) => b.freeze(),
        }
    }
}

/// An operation buffered by `tx.select` until commit.
#[derive(Debug)]
pub enum TxOp {
    /// A complete publish.
    Publish {
        /// Message to route.
        message: Arc<crate::message::Message>,
        /// Mandatory flag.
        mandatory: bool,
    },
    /// `basic.ack`.
    Ack {
        /// Tag.
        tag: u64,
        /// Multiple.
        multiple: bool,
    },
    /// `basic.nack` / `basic.reject`.
    Nack {
        /// Tag.
        tag: u64,
        /// Multiple.
        multiple: bool,
        /// Requeue.
        requeue: bool,
    },
}

/// Publisher-confirm bookkeeping. Confirms are sent in order; consecutive
/// acks are coalesced into one `multiple` ack per read batch.
#[derive(Debug, Default)]
pub struct Confirms {
    /// Sequence number of the last publish.
    pub published: u64,
    /// Highest sequence acked but not yet sent.
    pub acked_through: u64,
    /// Highest sequence sent to the client (ack or nack).
    pub sent_through: u64,
    /// Publishes waiting for the durable store or a home node, in order;
    /// while any are, later confirms queue behind them to stay in order.
    pub waiting: VecDeque<WaitingConfirm>,
}

/// A publish whose confirm waits for the store or home nodes.
#[derive(Debug, Clone, Copy)]
pub struct WaitingConfirm {
    /// Publish sequence number.
    pub seq: u64,
    /// Answers still awaited (the durable waiter, each home node).
    pub waits: u32,
    /// Every answer so far was positive.
    pub ok: bool,
}

impl Confirms {
    /// Records one answer for publish `seq`.
    pub fn answer(&mut self, seq: u64, ok: bool) {
        if let Ok(index) = self.waiting.binary_search_by_key(&seq, |w| w.seq) {
            let waiting = &mut self.waiting[index];
            waiting.waits = waiting.waits.saturating_sub(1);
            waiting.ok &= ok;
        }
    }

    /// Takes the publishes at the head whose answers are all in.
    pub fn take_answered(&mut self) -> Vec<WaitingConfirm> {
        let mut done = Vec::new();
        while self.waiting.front().is_some_and(|w| w.waits == 0) {
            done.extend(self.waiting.pop_front());
        }
        done
    }
}

/// One open channel.
#[derive(Debug)]
pub struct Channel {
    /// Channel number.
    pub id: u16,
    /// We sent `channel.close` and await `close-ok`.
    pub closing: bool,
    /// Consumers by tag.
    pub consumers: HashMap<Arc<str>, ChannelConsumer>,
    /// Last delivery tag used.
    pub delivery_tag: u64,
    /// Deliveries awaiting ack, in tag order.
    pub unacked: VecDeque<Unacked>,
    /// Prefetch for consumers created from now on (`global = false`).
    pub consumer_prefetch: u32,
    /// The channel-wide credit (`global = true`, and `channel.flow`).
    pub credit: Arc<Credit>,
    /// Confirm mode state.
    pub confirms: Option<Confirms>,
    /// Tx mode buffer.
    pub tx: Option<Vec<TxOp>>,
    /// Content being assembled.
    pub pending: Option<PendingContent>,
    /// Shared counters for listing.
    pub info: Arc<ChannelInfo>,
    /// Exchange names and routing keys shared between this channel's publishes.
    pub names: NameCache,
    /// Link channels to the home nodes of remote queues this channel used.
    pub remotes: Vec<RemoteChannel>,
}

impl Channel {
    /// A fresh channel.
    pub fn new(id: u16) -> Channel {
        Channel {
            id,
            closing: false,
            consumers: HashMap::new(),
            delivery_tag: 0,
            unacked: VecDeque::new(),
            consumer_prefetch: 0,
            credit: Credit::new(0),
            confirms: None,
            tx: None,
            pending: None,
            info: Arc::new(ChannelInfo {
                number: id,
                ..ChannelInfo::default()
            }),
            names: NameCache::default(),
            remotes: Vec::new(),
        }
    }

    /// This channel's link channel to `peer`, if open and up.
    pub fn remote(&mut self, peer: &str) -> Option<&mut RemoteChannel> {
        self.remotes
            .iter_mut()
            .find(|r| !r.down && r.link.peer() == peer)
    }

    /// The entry of link channel `link`.
    pub fn remote_of(&mut self, link: &Arc<LinkChannel>) -> Option<&mut RemoteChannel> {
        self.remotes.iter_mut().find(|r| Arc::ptr_eq(&r.link, link))
    }

    /// Records a delivery needing an ack; returns its tag.
    pub fn track(&mut self, origin: Origin, credit: Option<Arc<Credit>>) -> u64 {
        self.delivery_tag += 1;
        self.unacked.push_back(Unacked {
            tag: self.delivery_tag,
            origin,
            credit,
        });
        self.info
            .unacked
            .store(self.unacked.len() as u32, Ordering::Relaxed);
        self.delivery_tag
    }

    /// Removes the deliveries an ack/nack/reject names. `tag = 0` with
    /// `multiple` means all. An unknown tag is a 406 channel error.
    pub fn take_unacked(&mut self, tag: u64, multiple: bool) -> Result<Vec<Unacked>, AmqpError> {
        let taken: Vec<Unacked> = if multiple {
            let end = if tag == 0 {
                self.unacked.len()
            } else {
                self.unacked.partition_point(|u| u.tag <= tag)
            };
            if end == 0 && tag != 0 {
                return Err(unknown_tag(tag));
            }
            self.unacked.drain(..end).collect()
        } else {
            let index = self
                .unacked
                .binary_search_by_key(&tag, |u| u.tag)
                .map_err(|_| unknown_tag(tag))?;
            self.unacked.remove(index).into_iter().collect()
        };
        for unacked in &taken {
            if let Some(credit) = &unacked.credit {
                credit.release(1);
            }
        }
        self.credit
            .release(taken.iter().filter(|u| u.credit.is_some()).count() as u32);
        self.info
            .unacked
            .store(self.unacked.len() as u32, Ordering::Relaxed);
        Ok(taken)
    }

    /// Takes every unacked delivery (channel close, recover).
    pub fn take_all_unacked(&mut self) -> Vec<Unacked> {
        let all: Vec<Unacked> = self.unacked.drain(..).collect();
        for unacked in &all {
            if let Some(credit) = &unacked.credit {
                credit.release(1);
                self.credit.release(1);
            }
        }
        self.info.unacked.store(0, Ordering::Relaxed);
        all
    }

    /// Local queues this channel consumes from (to re-dispatch after acks).
    pub fn consumed_queues(&self) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        for consumer in self.consumers.values() {
            if let ConsumerSource::Local(queue) = &consumer.source
                && !queues.iter().any(|q| Arc::ptr_eq(q, queue))
            {
                queues.push(queue.clone());
            }
        }
        queues
    }
}

fn unknown_tag(tag: u64) -> AmqpError {
    AmqpError::new(
        reply::PRECONDITION_FAILED,
        format!("unknown delivery tag {tag}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_leave_in_publish_order_once_every_answer_is_in() {
        // Goal: a publish waiting on two answers holds back later ones; a single nack answer makes it a nack.
        let mut confirms = Confirms::default();
        for (seq, waits) in [(1, 2), (2, 1), (3, 0)] {
            confirms.waiting.push_back(WaitingConfirm {
                seq,
                waits,
                ok: true,
            });
        }
        confirms.answer(2, true);
        assert!(confirms.take_answered().is_empty(), "1 still waits");
        confirms.answer(1, true);
        assert!(
            confirms.take_answered().is_empty(),
            "1 waits for a second answer"
        );
        confirms.answer(1, false);
        let done: Vec<(u64, bool)> = confirms
            .take_answered()
            .iter()
            .map(|w| (w.seq, w.ok))
            .collect();
        assert_eq!(done, [(1, false), (2, true), (3, true)]);
        confirms.answer(9, true);
        assert!(confirms.waiting.is_empty());
    }
}
