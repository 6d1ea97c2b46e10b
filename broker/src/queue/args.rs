//! Queue declare arguments (`x-message-ttl`, `x-max-length`, ...), parsed
//! and validated once at declaration. Pure.

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::exchange::as_integer;

/// Longest exchange name or routing key: AMQP short strings.
pub const NAME_LEN_MAX: usize = 255;

/// What happens when a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message.
    #[default]
    DropHead,
    /// Refuse the new message (publisher gets a nack in confirm mode).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// Parsed queue arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// `x-message-ttl`, in milliseconds.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: delete the queue after this long unused, in milliseconds.
    pub expires_ms: Option<u64>,
    /// `x-max-length`, in messages.
    pub length_max: Option<u64>,
    /// `x-max-length-bytes`, in body bytes.
    pub length_bytes_max: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-queue-leader-locator: balanced`: home the queue on the member
    /// holding the fewest queues instead of the declaring node.
    pub balanced_home: bool,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
}

impl QueueArgs {
    /// Parses and validates; the error text is the 406 reply detail.
    pub fn parse(arguments: &FieldTable) -> Result<QueueArgs, String> {
        let mut args = QueueArgs::default();
        for (key, value) in arguments {
            let key = key.as_str();
            match key {
                "x-message-ttl" => args.message_ttl_ms = Some(non_negative(key, value)?),
                "x-expires" => {
                    let ms = non_negative(key, value)?;
                    if ms == 0 {
                        return Err(format!("invalid arg '{key}': value 0 must be positive"));
                    }
                    args.expires_ms = Some(ms);
                }
                "x-max-length" => args.length_max = Some(non_negative(key, value)?),
                "x-max-length-bytes" => args.length_bytes_max = Some(non_negative(key, value)?),
                "x-overflow" => {
                    args.overflow = match text(value).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => return Err(format!("invalid arg '{key}': {value:?}")),
                    }
                }
                "x-dead-letter-exchange" => {
                    args.dead_letter_exchange =
                        Some(text(value).ok_or_else(|| format!("invalid arg '{key}'"))?)
                }
                "x-dead-letter-routing-key" => {
                    args.dead_letter_routing_key =
                        Some(text(value).ok_or_else(|| format!("invalid arg '{key}'"))?)
                }
                "x-queue-leader-locator" => {
                    args.balanced_home = match text(value).as_deref() {
                        Some("client-local") => false,
                        Some("balanced") => true,
                        _ => {
                            return Err(format!(
                                "invalid arg '{key}': {value:?} (client-local or balanced)"
                            ));
                        }
                    }
                }
                "x-queue-type" => match text(value).as_deref() {
                    Some("classic") => {}
                    _ => return Err(format!("invalid arg '{key}': only 'classic' is supported")),
                },
                _ => {}
            }
        }
        for (key, value) in [
            ("x-dead-letter-exchange", &args.dead_letter_exchange),
            ("x-dead-letter-routing-key", &args.dead_letter_routing_key),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > NAME_LEN_MAX) {
                return Err(format!(
                    "invalid arg '{key}': longer than {NAME_LEN_MAX} bytes"
                ));
            }
        }
        if args.dead_letter_routing_key.is_some() && args.dead_letter_exchange.is_none() {
            return Err(
                "invalid arg 'x-dead-letter-routing-key': requires x-dead-letter-exchange".into(),
            );
        }
        Ok(args)
    }
}

fn non_negative(key: &str, value: &AMQPValue) -> Result<u64, String> {
    match as_integer(value) {
        Some(v) if v >= 0 => Ok(v.min(i128::from(u64::MAX)) as u64),
        _ => Err(format!(
            "invalid arg '{key}': {value:?} is not a non-negative integer"
        )),
    }
}

/// A string argument of either string kind.
pub fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Equality of argument values for redeclaration: integers by value,
/// strings by content.
pub fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (as_integer(a), as_integer(b)) {
        (Some(a), Some(b)) => return a == b,
        (None, None) => {}
        _ => return false,
    }
    match (text(a), text(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_bad_values_are_named() {
        // Goal: valid arguments parse to their fields; invalid ones name the key.
        let mut table = FieldTable::default();
        table.insert("x-message-ttl".into(), AMQPValue::LongInt(500));
        table.insert("x-max-length".into(), AMQPValue::ShortShortUInt(3));
        table.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        table.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("dlx".into()),
        );
        let args = QueueArgs::parse(&table).expect("valid");
        assert_eq!(args.message_ttl_ms, Some(500));
        assert_eq!(args.length_max, Some(3));
        assert_eq!(args.overflow, Overflow::RejectPublish);
        assert_eq!(args.dead_letter_exchange.as_deref(), Some("dlx"));
        let mut bad = FieldTable::default();
        bad.insert("x-message-ttl".into(), AMQPValue::LongInt(-1));
        assert!(
            QueueArgs::parse(&bad)
                .expect_err("negative")
                .contains("x-message-ttl")
        );
        let mut bad = FieldTable::default();
        bad.insert("x-overflow".into(), AMQPValue::LongString("nope".into()));
        assert!(
            QueueArgs::parse(&bad)
                .expect_err("bad overflow")
                .contains("x-overflow")
        );
    }
}
