//! Dead-lettering: rewrites a message as RabbitMQ does (the `x-death`
//! header, `x-first-death-*`, `x-last-death-*`, expiration removed) before
//! it is republished to the dead-letter exchange. Pure given the time.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};

use crate::message::Message;

/// Why a message was dead-lettered (the `reason` field of `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `basic.reject` / `basic.nack` with `requeue = false`.
    Rejected,
    /// TTL ran out.
    Expired,
    /// Dropped by a length limit.
    MaxLen,
}

impl Reason {
    /// The name RabbitMQ writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
        }
    }
}

/// A message leaving a queue for its dead-letter exchange.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message as it was in the queue.
    pub message: Arc<Message>,
    /// Why.
    pub reason: Reason,
    /// Vhost of the queue.
    pub vhost: String,
    /// Queue it leaves.
    pub queue: String,
    /// Dead-letter exchange.
    pub exchange: String,
    /// Dead-letter routing key; `None` keeps the original.
    pub routing_key: Option<String>,
}

impl DeadLetter {
    /// The routing key to republish with.
    pub fn routing_key(&self) -> &str {
        self.routing_key
            .as_deref()
            .unwrap_or(&self.message.routing_key)
    }

    /// The rewritten message, with `time` (seconds since the epoch) in `x-death`.
    pub fn rewrite(&self, time_s: u64) -> Message {
        let original = &self.message;
        let original_properties = original.properties();
        let mut headers = original_properties.headers().clone().unwrap_or_default();
        let old_deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
            _ => Vec::new(),
        };
        let reason = self.reason.as_str();
        let mut count: i64 = 1;
        let mut deaths: Vec<AMQPValue> = Vec::with_capacity(old_deaths.len() + 1);
        for death in old_deaths {
            // Entries are keyed by (queue, reason); a repeat bumps the
            // count and moves to the front.
            if let AMQPValue::FieldTable(table) = &death
                && field_text(table, "queue").as_deref() == Some(self.queue.as_str())
                && field_text(table, "reason").as_deref() == Some(reason)
            {
                count += match table.inner().get("count") {
                    Some(AMQPValue::LongLongInt(n)) => *n,
                    _ => 1,
                };
                continue;
            }
            deaths.push(death);
        }
        let mut entry = FieldTable::default();
        entry.insert("count".into(), AMQPValue::LongLongInt(count));
        entry.insert("reason".into(), AMQPValue::LongString(reason.into()));
        entry.insert(
            "queue".into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        entry.insert("time".into(), AMQPValue::Timestamp(time_s));
        entry.insert(
            "exchange".into(),
            AMQPValue::LongString((*original.exchange).into()),
        );
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                (*original.routing_key).into(),
            )])),
        );
        if let Some(expiration) = original_properties.expiration() {
            entry.insert(
                "original-expiration".into(),
                AMQPValue::LongString(expiration.as_str().into()),
            );
        }
        deaths.insert(0, AMQPValue::FieldTable(entry));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(deaths)),
        );
        if !headers.contains_key("x-first-death-reason") {
            headers.insert(
                "x-first-death-reason".into(),
                AMQPValue::LongString(reason.into()),
            );
            headers.insert(
                "x-first-death-queue".into(),
                AMQPValue::LongString(self.queue.as_str().into()),
            );
            headers.insert(
                "x-first-death-exchange".into(),
                AMQPValue::LongString((*original.exchange).into()),
            );
        }
        headers.insert(
            "x-last-death-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-last-death-queue".into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        headers.insert(
            "x-last-death-exchange".into(),
            AMQPValue::LongString((*original.exchange).into()),
        );
        let properties = without_expiration(&original_properties).with_headers(headers);
        Message::with_properties(
            Arc::from(self.exchange.as_str()),
            Arc::from(self.routing_key()),
            &properties,
            original.body.clone(),
        )
    }

    /// RabbitMQ's cycle rule: drop a dead letter that would return to a
    /// queue it already died in, unless some death in its history was a
    /// rejection (a client decision, so not an infinite loop).
    pub fn is_cycle_to(&self, target_queue: &str) -> bool {
        let headers = self.message.headers();
        let Some(AMQPValue::FieldArray(deaths)) =
            headers.as_ref().and_then(|h| h.inner().get("x-death"))
        else {
            return target_queue == self.queue && self.reason != Reason::Rejected;
        };
        let mut seen_target = target_queue == self.queue;
        let mut any_rejected = self.reason == Reason::Rejected;
        for death in deaths.as_slice() {
            if let AMQPValue::FieldTable(table) = death {
                seen_target |= field_text(table, "queue").as_deref() == Some(target_queue);
                any_rejected |= field_text(table, "reason").as_deref() == Some("rejected");
            }
        }
        seen_target && !any_rejected
    }
}

fn field_text(table: &FieldTable, key: &str) -> Option<String> {
    table.inner().get(key).and_then(super::args::text)
}

fn without_expiration(
    properties: &amq_protocol::protocol::basic::AMQPProperties,
) -> amq_protocol::protocol::basic::AMQPProperties {
    // The generated type has no clearing setter; rebuild from the getters.
    use amq_protocol::protocol::basic::AMQPProperties;
    let mut out = AMQPProperties::default();
    let p = properties;
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;
    use bytes::Bytes;

    fn letter(message: Message, reason: Reason, queue: &str) -> DeadLetter {
        DeadLetter {
            message: Arc::new(message),
            reason,
            vhost: "/".into(),
            queue: queue.into(),
            exchange: "dlx".into(),
            routing_key: None,
        }
    }

    #[test]
    fn x_death_is_written_and_counts_repeats() {
        // Goal: x-death has RabbitMQ's fields; a second death in the same queue bumps count.
        let properties = AMQPProperties::default().with_expiration("5000".into());
        let message = Message::with_properties(
            "ex".into(),
            "rk".into(),
            &properties,
            Bytes::from_static(b"x"),
        );
        let once = letter(message, Reason::Expired, "q").rewrite(1_700_000_000);
        assert!(once.properties().expiration().is_none());
        assert_eq!(once.expiration_ms(), None);
        let headers = once.headers().expect("headers");
        let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
            panic!("no x-death");
        };
        let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
            panic!("not a table");
        };
        assert_eq!(field_text(death, "reason").as_deref(), Some("expired"));
        assert_eq!(field_text(death, "queue").as_deref(), Some("q"));
        assert_eq!(field_text(death, "exchange").as_deref(), Some("ex"));
        assert_eq!(
            field_text(death, "original-expiration").as_deref(),
            Some("5000")
        );
        assert_eq!(death.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        let again = letter(once, Reason::Expired, "q");
        assert!(again.is_cycle_to("q"));
        let twice = again.rewrite(1_700_000_001);
        let headers = twice.headers().expect("headers");
        let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
            panic!("no x-death");
        };
        assert_eq!(deaths.as_slice().len(), 1);
        let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
            panic!("not a table");
        };
        assert_eq!(death.inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
    }
}
