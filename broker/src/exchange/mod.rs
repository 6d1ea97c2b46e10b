//! Exchange routing: direct, fanout, topic, headers. Pure: no I/O, no locks;
//! an exchange's bindings in, the set of destinations out.

pub mod topic;

use std::collections::HashMap;

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

/// The routing algorithm of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every binding.
    Fanout,
    /// Dotted words with `*` and `#` wildcards.
    Topic,
    /// Message headers against binding arguments (`x-match`).
    Headers,
}

impl ExchangeKind {
    /// Parses the `type` of `exchange.declare`.
    pub fn parse(text: &str) -> Option<ExchangeKind> {
        match text {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            "headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    /// The name used on the wire and in the management API.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Destination {
    /// A queue of the same vhost.
    Queue(String),
    /// An exchange of the same vhost (exchange-to-exchange binding).
    Exchange(String),
}

impl Destination {
    /// The destination's name.
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(name) | Destination::Exchange(name) => name,
        }
    }
}

/// One binding of an exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// Where matching messages go.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// Binding arguments (used by headers exchanges).
    pub arguments: FieldTable,
}

/// The bindings of one exchange, indexed for its kind.
#[derive(Debug, Clone)]
pub struct Router {
    kind: ExchangeKind,
    bindings: Vec<Binding>,
    direct: HashMap<String, Vec<Destination>>,
    topic: topic::TopicTrie,
}

impl Router {
    /// An exchange of `kind` with no bindings.
    pub fn new(kind: ExchangeKind) -> Router {
        Router {
            kind,
            bindings: Vec::new(),
            direct: HashMap::new(),
            topic: topic::TopicTrie::default(),
        }
    }

    /// Every binding, in the order they were made.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds a binding; returns false when an identical one exists.
    pub fn bind(&mut self, binding: Binding) -> bool {
        if self.bindings.contains(&binding) {
            return false;
        }
        match self.kind {
            ExchangeKind::Direct => self
                .direct
                .entry(binding.routing_key.clone())
                .or_default()
                .push(binding.destination.clone()),
            ExchangeKind::Topic => self
                .topic
                .insert(&binding.routing_key, binding.destination.clone()),
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
        self.bindings.push(binding);
        true
    }

    /// Removes a binding; returns false when there was none.
    pub fn unbind(&mut self, binding: &Binding) -> bool {
        let Some(index) = self.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        self.bindings.remove(index);
        self.unindex(binding);
        true
    }

    /// Removes every binding to `destination`; returns how many.
    pub fn unbind_destination(&mut self, destination: &Destination) -> usize {
        let (gone, kept): (Vec<Binding>, Vec<Binding>) = std::mem::take(&mut self.bindings)
            .into_iter()
            .partition(|b| &b.destination == destination);
        self.bindings = kept;
        for binding in &gone {
            self.unindex(binding);
        }
        gone.len()
    }

    fn unindex(&mut self, binding: &Binding) {
        // Another binding may still give the same (key, destination) pair
        // (headers arguments differ); keep the index entry then.
        let still_bound = self
            .bindings
            .iter()
            .any(|b| b.routing_key == binding.routing_key && b.destination == binding.destination);
        if still_bound {
            return;
        }
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(list) = self.direct.get_mut(&binding.routing_key) {
                    list.retain(|d| d != &binding.destination);
                    if list.is_empty() {
                        self.direct.remove(&binding.routing_key);
                    }
                }
            }
            ExchangeKind::Topic => self
                .topic
                .remove(&binding.routing_key, &binding.destination),
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
    }

    /// Calls `found` for each destination matching a message. A destination
    /// may be reported more than once; callers deduplicate.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        found: &mut dyn FnMut(&Destination),
    ) {
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(list) = self.direct.get(routing_key) {
                    list.iter().for_each(found);
                }
            }
            ExchangeKind::Fanout => self.bindings.iter().for_each(|b| found(&b.destination)),
            ExchangeKind::Topic => self.topic.matches(routing_key, found),
            ExchangeKind::Headers => {
                for binding in &self.bindings {
                    if headers_match(&binding.arguments, headers) {
                        found(&binding.destination);
                    }
                }
            }
        }
    }
}

/// Whether message headers satisfy a headers-exchange binding: `x-match`
/// `all` (default) or `any`; the `-with-x` variants also compare `x-` keys.
pub fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match arguments.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut n_keys = 0;
    let mut n_matched = 0;
    for (key, expected) in arguments {
        if key.as_str() == "x-match" || (!with_x && key.as_str().starts_with("x-")) {
            continue;
        }
        n_keys += 1;
        let matched = match (expected, headers.get(key.as_str())) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (expected, Some(actual)) => values_equal(expected, actual),
        };
        if matched {
            n_matched += 1;
            if any {
                return true;
            }
        } else if !any {
            return false;
        }
    }
    if any {
        n_matched > 0
    } else {
        n_keys == n_matched
    }
}

/// Compares two field values as RabbitMQ does: strings of either kind are
/// equal by content, integers of any width by value.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (as_text(a), as_text(b)) {
        (Some(a), Some(b)) => return a == b,
        (Some(_), None) | (None, Some(_)) => return false,
        (None, None) => {}
    }
    match (as_integer(a), as_integer(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

fn as_text(value: &AMQPValue) -> Option<&[u8]> {
    match value {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// An integer field of any width, widened.
pub fn as_integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i128::from(*v),
        AMQPValue::ShortShortUInt(v) => i128::from(*v),
        AMQPValue::ShortInt(v) => i128::from(*v),
        AMQPValue::ShortUInt(v) => i128::from(*v),
        AMQPValue::LongInt(v) => i128::from(*v),
        AMQPValue::LongUInt(v) => i128::from(*v),
        AMQPValue::LongLongInt(v) => i128::from(*v),
        AMQPValue::Timestamp(v) => i128::from(*v),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str) -> Destination {
        Destination::Queue(name.to_string())
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert((*k).into(), v.clone());
        }
        table
    }

    fn routed(router: &Router, key: &str, headers: Option<&FieldTable>) -> Vec<String> {
        let mut out = Vec::new();
        router.route(key, headers, &mut |d| out.push(d.name().to_string()));
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn direct_and_fanout_route_by_key_and_to_all() {
        // Goal: direct matches keys exactly; fanout ignores them; unbind removes.
        let mut direct = Router::new(ExchangeKind::Direct);
        for (key, q) in [("a", "q1"), ("b", "q2"), ("a", "q3")] {
            direct.bind(Binding {
                destination: queue(q),
                routing_key: key.into(),
                arguments: FieldTable::default(),
            });
        }
        assert_eq!(routed(&direct, "a", None), ["q1", "q3"]);
        assert!(direct.unbind(&Binding {
            destination: queue("q1"),
            routing_key: "a".into(),
            arguments: FieldTable::default(),
        }));
        assert_eq!(routed(&direct, "a", None), ["q3"]);
        assert!(routed(&direct, "c", None).is_empty());
        let mut fanout = Router::new(ExchangeKind::Fanout);
        fanout.bind(Binding {
            destination: queue("q"),
            routing_key: "x".into(),
            arguments: FieldTable::default(),
        });
        assert_eq!(routed(&fanout, "anything", None), ["q"]);
    }

    #[test]
    fn headers_match_all_and_any() {
        // Goal: x-match all needs every key, any needs one; x- keys are ignored.
        let message = table(&[
            ("format", AMQPValue::LongString("pdf".into())),
            ("type", AMQPValue::LongString("report".into())),
            ("size", AMQPValue::LongInt(3)),
        ]);
        let cases: &[(FieldTable, bool)] = &[
            (
                table(&[
                    ("x-match", AMQPValue::LongString("all".into())),
                    ("format", AMQPValue::LongString("pdf".into())),
                    ("type", AMQPValue::LongString("report".into())),
                ]),
                true,
            ),
            (
                table(&[
                    ("format", AMQPValue::LongString("pdf".into())),
                    ("type", AMQPValue::LongString("log".into())),
                ]),
                false,
            ),
            (
                table(&[
                    ("x-match", AMQPValue::LongString("any".into())),
                    ("format", AMQPValue::LongString("zip".into())),
                    ("type", AMQPValue::LongString("report".into())),
                ]),
                true,
            ),
            (
                table(&[
                    ("x-match", AMQPValue::LongString("any".into())),
                    ("format", AMQPValue::LongString("zip".into())),
                ]),
                false,
            ),
            (table(&[("size", AMQPValue::ShortShortUInt(3))]), true),
            (table(&[("missing", AMQPValue::Void)]), false),
            (table(&[("format", AMQPValue::Void)]), true),
        ];
        for (arguments, expected) in cases {
            assert_eq!(
                headers_match(arguments, Some(&message)),
                *expected,
                "{arguments:?}"
            );
        }
    }
}
