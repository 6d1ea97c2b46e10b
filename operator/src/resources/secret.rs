//! Builders of the Secrets `X-default-user` (administrator credentials) and
//! `X-cluster-secret` (what peers prove to each other). Pure: credentials come
//! in as arguments; existing ones are read back, never regenerated.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rand::Rng;
use rand::distr::Alphanumeric;

use super::{AMQP_PORT, Error, Names, owned_metadata};
use crate::crd::BrokerCluster;

/// Key of the user name in `X-default-user`.
pub const USERNAME_KEY: &str = "username";
/// Key of the password in `X-default-user`.
pub const PASSWORD_KEY: &str = "password";
/// Key of the shared secret in `X-cluster-secret`.
pub const CLUSTER_SECRET_KEY: &str = "cluster-secret";
/// Length of generated passwords and cluster secrets (alphanumeric: ~190 bits).
pub const SECRET_LENGTH: usize = 32;

/// A random alphanumeric string of `length` characters from the thread's CSPRNG.
pub fn random_token(length: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    let text = String::from_utf8(bytes.0.clone()).ok()?;
    (!text.is_empty()).then_some(text)
}

/// The `(username, password)` stored in an existing `X-default-user`, if complete.
pub fn credentials(existing: Option<&Secret>) -> Option<(String, String)> {
    let secret = existing?;
    Some((value(secret, USERNAME_KEY)?, value(secret, PASSWORD_KEY)?))
}

/// Secret `X-default-user` holding `username`/`password` plus where to connect
/// (`host`, `port`), in the shape service-binding consumers expect.
pub fn default_user_secret(
    cluster: &BrokerCluster,
    username: &str,
    password: &str,
) -> Result<Secret, Error> {
    let names = Names::of(cluster)?;
    let host = format!("{}.{}.svc", names.cluster, names.namespace);
    let data = BTreeMap::from([
        (USERNAME_KEY.to_string(), bytes(username)),
        (PASSWORD_KEY.to_string(), bytes(password)),
        ("host".to_string(), bytes(&host)),
        ("port".to_string(), bytes(&AMQP_PORT.to_string())),
        ("provider".to_string(), bytes("synod")),
        ("type".to_string(), bytes("rabbitmq")),
    ]);
    Ok(Secret {
        metadata: owned_metadata(cluster, names.default_user_secret(), "default-user")?,
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    })
}

/// The shared secret stored in an existing `X-cluster-secret`, if present.
pub fn existing_cluster_secret(existing: Option<&Secret>) -> Option<String> {
    value(existing?, CLUSTER_SECRET_KEY)
}

/// Secret `X-cluster-secret`, mounted into every broker as `--cluster-secret-file`.
pub fn cluster_secret(cluster: &BrokerCluster, secret: &str) -> Result<Secret, Error> {
    let names = Names::of(cluster)?;
    Ok(Secret {
        metadata: owned_metadata(cluster, names.cluster_secret(), "cluster-secret")?,
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            CLUSTER_SECRET_KEY.to_string(),
            bytes(secret),
        )])),
        ..Secret::default()
    })
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::cluster;

    #[test]
    fn existing_credentials_are_read_back_unchanged() {
        // Goal: credentials in an existing Secret are reused, so they never change once issued.
        let secret = default_user_secret(&cluster(), "admin-x", "s3cret").expect("builds");
        assert_eq!(
            credentials(Some(&secret)),
            Some(("admin-x".to_string(), "s3cret".to_string()))
        );
        let rebuilt = default_user_secret(&cluster(), "admin-x", "s3cret").expect("builds");
        assert_eq!(rebuilt.data, secret.data);
    }

    #[test]
    fn incomplete_secrets_yield_no_credentials() {
        // Goal: a Secret without a password (or without one at all) means "generate".
        assert_eq!(credentials(None), None);
        let mut secret = default_user_secret(&cluster(), "u", "p").expect("builds");
        secret
            .data
            .as_mut()
            .expect("data")
            .insert(PASSWORD_KEY.into(), ByteString(Vec::new()));
        assert_eq!(credentials(Some(&secret)), None);
    }

    #[test]
    fn default_user_secret_names_the_client_service() {
        // Goal: X-default-user tells clients where to connect and is owned by the cluster.
        let secret = default_user_secret(&cluster(), "u", "p").expect("builds");
        assert_eq!(secret.metadata.name.as_deref(), Some("rabbit-default-user"));
        let data = secret.data.expect("data");
        assert_eq!(data["host"].0, b"rabbit.prod.svc");
        assert_eq!(data["port"].0, b"5672");
        assert!(secret.metadata.owner_references.is_some());
    }

    #[test]
    fn random_tokens_are_long_and_distinct() {
        // Goal: generated secrets have the promised length and do not repeat.
        let first = random_token(SECRET_LENGTH);
        let second = random_token(SECRET_LENGTH);
        assert_eq!(first.len(), SECRET_LENGTH);
        assert_ne!(first, second);
        assert!(first.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn cluster_secret_round_trips() {
        // Goal: X-cluster-secret holds the shared secret under its key and reads back.
        let secret = cluster_secret(&cluster(), "shared").expect("builds");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("rabbit-cluster-secret")
        );
        assert_eq!(
            existing_cluster_secret(Some(&secret)).as_deref(),
            Some("shared")
        );
    }
}
