//! Conversions between the broker's types and the API's JSON: AMQP field
//! tables <-> JSON objects, path-segment percent-encoding, binding
//! properties keys, and the JSON body reader that names the bad field.
//! Must not: touch the broker or decide permissions.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};
use base64::Engine;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::mgmt::Error;
use crate::mgmt::api::Arguments;

/// Converts API arguments to an AMQP field table, as RabbitMQ's management
/// plugin does: integers become signed 64-bit, strings long strings.
pub fn arguments_to_table(arguments: &Arguments) -> Result<FieldTable, Error> {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let converted = json_to_amqp(value)
            .ok_or_else(|| Error::BadRequest(format!("arguments.{key}: unsupported value")))?;
        table.insert(key.as_str().into(), converted);
    }
    Ok(table)
}

fn json_to_amqp(value: &serde_json::Value) -> Option<AMQPValue> {
    use serde_json::Value;
    Some(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64()?),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(json_to_amqp(item)?);
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(k.as_str().into(), json_to_amqp(v)?);
            }
            AMQPValue::FieldTable(table)
        }
    })
}

/// Converts an AMQP field table to API arguments.
pub fn table_to_arguments(table: &FieldTable) -> Arguments {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
        .collect()
}

fn amqp_to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::{Value, json};
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => {
            json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => {
            json!(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved
/// characters), so `/` becomes `%2F` as in RabbitMQ's URLs.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (the inverse of [`encode_segment`]); malformed
/// escapes are kept as they are.
pub fn decode_segment(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `{props}` key that identifies a binding among those with the same
/// source and destination: the encoded routing key (`~` when empty), plus
/// `~` and a digest of the arguments when there are any.
pub fn properties_key(routing_key: &str, arguments: &Arguments) -> String {
    let key = if routing_key.is_empty() {
        "~".to_string()
    } else {
        encode_segment(routing_key)
    };
    if arguments.is_empty() {
        return key;
    }
    // Arguments is a sorted map, so equal argument sets give equal JSON.
    let canonical = serde_json::to_vec(arguments).expect("JSON values always serialize");
    let digest = Sha256::digest(&canonical);
    let short = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..9]);
    format!("{key}~{short}")
}

/// Parses a JSON request body; on failure the reason names the offending
/// field path (`arguments.x-max-length`, `durable`, ...).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let syntax = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        if syntax || path == "." || path == "?" || path.is_empty() {
            Error::BadRequest(format!("bad JSON body: {inner}"))
        } else {
            Error::BadRequest(format!("field '{path}': {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_through_field_tables() {
        // Goal: JSON arguments become AMQP values and come back unchanged.
        let arguments: Arguments = serde_json::from_str(
            r#"{"x-max-length":10,"x-overflow":"reject-publish","flag":true,
                "ratio":0.5,"list":[1,"a"],"nested":{"k":"v"}}"#,
        )
        .expect("valid JSON");
        let table = arguments_to_table(&arguments).expect("convertible");
        assert_eq!(
            table.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(table_to_arguments(&table), arguments);
    }

    #[test]
    fn segments_and_properties_keys_are_encoded_like_rabbitmq() {
        // Goal: `/` becomes %2F, an empty routing key is `~`, arguments add a digest.
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(decode_segment("a%20b%2Fc"), "a b/c");
        assert_eq!(decode_segment("100%"), "100%");
        let none = Arguments::new();
        assert_eq!(properties_key("", &none), "~");
        assert_eq!(properties_key("a.#", &none), "a.%23");
        let mut some = Arguments::new();
        some.insert("x-match".into(), serde_json::json!("all"));
        let keyed = properties_key("k", &some);
        assert!(keyed.starts_with("k~") && keyed.len() > 3, "{keyed}");
        assert_eq!(keyed, properties_key("k", &some.clone()));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        // Goal: a wrongly typed field is reported by name; malformed JSON says so.
        #[derive(Debug, serde::Deserialize)]
        struct Body {
            #[allow(dead_code)]
            durable: bool,
        }
        let err = parse_body::<Body>(br#"{"durable":"yes"}"#).expect_err("wrong type");
        assert!(err.to_string().contains("durable"), "{err}");
        let err = parse_body::<Body>(b"{not json").expect_err("malformed");
        assert!(err.to_string().contains("JSON"), "{err}");
    }
}
