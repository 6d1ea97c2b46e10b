//! Passwords and SASL: RabbitMQ's `rabbit_password_hashing_sha256` format
//! and the PLAIN / AMQPLAIN mechanisms (EXTERNAL is decided by the
//! connection, which holds the verified certificate). Pure: never touches the network.
//!
//! A stored hash is `base64(salt || sha256(salt || password))` with a
//! 4-byte salt, byte-compatible with RabbitMQ definitions exports.

use amq_protocol::types::{AMQPValue, FieldTable};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

/// Salt length of RabbitMQ's password hashes, in bytes.
const SALT_LEN: usize = 4;

/// Hashes `password` with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    hash_with_salt(salt, password)
}

/// Hashes `password` with the given salt (deterministic; for tests and imports).
pub fn hash_with_salt(salt: [u8; SALT_LEN], password: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&hasher.finalize());
    STANDARD.encode(out)
}

/// Whether `password` matches a stored hash. Malformed hashes never match.
pub fn verify_password(stored_hash: &str, password: &str) -> bool {
    let Ok(decoded) = STANDARD.decode(stored_hash) else {
        return false;
    };
    if decoded.len() != SALT_LEN + 32 {
        return false;
    }
    let (salt, expected) = decoded.split_at(SALT_LEN);
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let actual = hasher.finalize();
    // Constant-time comparison: do not reveal how many bytes matched.
    actual
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Credentials presented by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Clear-text password.
    pub password: String,
}

/// Mechanisms the broker offers in `connection.start`.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";
/// Mechanisms offered on a TLS connection whose client certificate was
/// verified: EXTERNAL (the user is the certificate's subject common name, as
/// RabbitMQ's `rabbitmq_auth_mechanism_ssl` does) first.
pub const MECHANISMS_WITH_EXTERNAL: &str = "EXTERNAL PLAIN AMQPLAIN";

/// Decodes a `start-ok` response for `mechanism`; `None` when malformed or
/// the mechanism is not offered.
pub fn decode_response(mechanism: &str, response: &[u8]) -> Option<Credentials> {
    match mechanism {
        "PLAIN" => {
            // authzid \0 authcid \0 password
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let username = String::from_utf8(parts.next()?.to_vec()).ok()?;
            let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
            if parts.next().is_some() {
                return None;
            }
            Some(Credentials { username, password })
        }
        "AMQPLAIN" => {
            // A field table without its leading length: LOGIN and PASSWORD.
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
            Some(Credentials {
                username: text_field(&table, "LOGIN")?,
                password: text_field(&table, "PASSWORD")?,
            })
        }
        _ => None,
    }
}

fn text_field(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_rabbitmq_and_verify() {
        // Goal: the hash format is RabbitMQ's; verification accepts only the right password.
        // Computed independently: base64(0x908DC60A || sha256(0x908DC60A || "test12")).
        let hash = hash_with_salt([0x90, 0x8D, 0xC6, 0x0A], "test12");
        assert_eq!(hash, "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR");
        assert!(verify_password(&hash, "test12"));
        assert!(!verify_password(&hash, "test13"));
        assert!(!verify_password("not base64!", "x"));
        let fresh = hash_password("secret");
        assert!(verify_password(&fresh, "secret"));
        assert_ne!(fresh, hash_password("secret"), "salts differ");
    }

    #[test]
    fn plain_and_amqplain_responses_decode() {
        // Goal: both mechanisms yield the credentials; garbage yields None.
        let plain = decode_response("PLAIN", b"\0guest\0pw").expect("valid PLAIN");
        assert_eq!(plain.username, "guest");
        assert_eq!(plain.password, "pw");
        assert!(decode_response("PLAIN", b"guest").is_none());
        assert!(decode_response("EXTERNAL", b"").is_none());
        let mut table = FieldTable::default();
        table.insert("LOGIN".into(), AMQPValue::LongString("u".into()));
        table.insert("PASSWORD".into(), AMQPValue::LongString("p".into()));
        let encoded = amq_protocol::types::generation::gen_field_table(&table)(
            amq_protocol::frame::WriteContext::from(Vec::new()),
        )
        .expect("encode")
        .write;
        let creds = decode_response("AMQPLAIN", &encoded[4..]).expect("valid AMQPLAIN");
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            ("u", "p")
        );
    }
}
