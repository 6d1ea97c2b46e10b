//! Builder of the ConfigMap `X-config`: the broker's TOML configuration, with
//! keys named after the broker's flags. Pure: no API calls.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    AMQP_PORT, AMQPS_PORT, CLUSTER_PORT, Error, MANAGEMENT_PORT, METRICS_PORT, Names,
    owned_metadata,
};
use crate::crd::BrokerCluster;
use kube::ResourceExt;

/// Key of the TOML file in `X-config` (mounted as `/etc/synod/synod.toml`).
pub const CONFIG_FILE_KEY: &str = "synod.toml";
/// Where the broker keeps its durable state (the `data` volume).
pub const DATA_DIR: &str = "/var/lib/synod";
/// Where `X-config` is mounted.
pub const CONFIG_DIR: &str = "/etc/synod";
/// Where `X-cluster-secret` is mounted.
pub const CLUSTER_SECRET_DIR: &str = "/etc/synod/cluster-secret";
/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/synod/tls";
/// Key of the CA bundle in a `spec.tls` Secret (cert-manager's name for it).
pub const TLS_CA_KEY: &str = "ca.crt";

/// The broker's TOML configuration for a cluster whose seed list is `peers`.
///
/// `node-name` is absent on purpose: it differs per pod and comes from the
/// pod's `SYNOD_NODE_NAME` (environment beats the file in the broker).
pub fn broker_config_toml(cluster: &BrokerCluster, peers: &str) -> Result<String, Error> {
    let mut table = toml::Table::new();
    let mut set = |key: &str, value: String| {
        table.insert(key.to_string(), toml::Value::String(value));
    };
    set("data-dir", DATA_DIR.to_string());
    // Clients and dashboards see the BrokerCluster's name (a `cluster-name`
    // in `spec.config` overrides it below).
    set("cluster-name", cluster.name_any());
    set("amqp-listen", format!("0.0.0.0:{AMQP_PORT}"));
    set("mgmt-listen", format!("0.0.0.0:{MANAGEMENT_PORT}"));
    set("metrics-listen", format!("0.0.0.0:{METRICS_PORT}"));
    set("cluster-listen", format!("0.0.0.0:{CLUSTER_PORT}"));
    set("peers", peers.to_string());
    set(
        "cluster-secret-file",
        format!("{CLUSTER_SECRET_DIR}/{}", super::CLUSTER_SECRET_KEY),
    );
    if cluster.spec.tls.is_some() {
        set("tls-cert", format!("{TLS_DIR}/tls.crt"));
        set("tls-key", format!("{TLS_DIR}/tls.key"));
        // Peers verify each other's certificates (cluster traffic is TLS too),
        // so the CA is always passed; cert-manager writes it as `ca.crt`.
        set("tls-ca", format!("{TLS_DIR}/{TLS_CA_KEY}"));
        set("amqps-listen", format!("0.0.0.0:{AMQPS_PORT}"));
    }
    for (key, value) in &cluster.spec.config {
        // The schema's CEL rule already refuses these keys; this keeps an
        // object written before the rule existed from overriding them.
        if crate::crd::broker_cluster::OPERATOR_OWNED_CONFIG_KEYS.contains(&key.as_str()) {
            return Err(Error::InvalidConfig {
                key: key.clone(),
                reason: "is set by the operator".to_string(),
            });
        }
        let value = match value {
            IntOrString::Int(number) => toml::Value::Integer(i64::from(*number)),
            IntOrString::String(text) => toml::Value::String(text.clone()),
        };
        table.insert(key.clone(), value);
    }
    toml::to_string(&table).map_err(|err| Error::InvalidConfig {
        key: String::new(),
        reason: err.to_string(),
    })
}

/// ConfigMap `X-config` for a cluster whose seed list is `peers`.
pub fn config_map(cluster: &BrokerCluster, peers: &str) -> Result<ConfigMap, Error> {
    let names = Names::of(cluster)?;
    Ok(ConfigMap {
        metadata: owned_metadata(cluster, names.config_map(), "config")?,
        data: Some(BTreeMap::from([(
            CONFIG_FILE_KEY.to_string(),
            broker_config_toml(cluster, peers)?,
        )])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::broker_cluster::TlsSpec;
    use crate::resources::test_support::{cluster, cluster_with};

    #[test]
    fn config_uses_the_broker_flag_names() {
        // Goal: the TOML parses and its keys are the broker's flags with the standard ports.
        let text = broker_config_toml(&cluster(), "a=h:25672").expect("renders");
        let table: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(table["data-dir"].as_str(), Some("/var/lib/synod"));
        assert_eq!(table["amqp-listen"].as_str(), Some("0.0.0.0:5672"));
        assert_eq!(table["mgmt-listen"].as_str(), Some("0.0.0.0:15672"));
        assert_eq!(table["metrics-listen"].as_str(), Some("0.0.0.0:15692"));
        assert_eq!(table["cluster-listen"].as_str(), Some("0.0.0.0:25672"));
        assert_eq!(table["peers"].as_str(), Some("a=h:25672"));
        assert_eq!(
            table["cluster-secret-file"].as_str(),
            Some("/etc/synod/cluster-secret/cluster-secret")
        );
        assert!(!table.contains_key("node-name"));
        assert_eq!(table["cluster-name"].as_str(), Some("rabbit"));
        assert!(!table.contains_key("tls-cert"));
    }

    #[test]
    fn config_is_accepted_by_the_broker_parser() {
        // Goal: the broker's own --config parser accepts what the operator writes.
        let dir =
            std::env::temp_dir().join(format!("synod-operator-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("synod.toml");
        let text = broker_config_toml(&cluster(), "rabbit-0=127.0.0.1:25672").expect("renders");
        std::fs::write(&path, text).expect("write");
        let args = <synod_broker::config::Args as clap::Parser>::try_parse_from([
            "synod-broker",
            "--config",
            path.to_str().expect("utf-8"),
            "--node-name",
            "rabbit-0",
        ])
        .expect("flags parse");
        let config = synod_broker::config::Config::from_args(args).expect("broker accepts it");
        assert_eq!(config.amqp_listen.port(), 5672);
        assert_eq!(config.cluster_name, "rabbit");
        assert_eq!(config.peers.len(), 1);
        assert!(config.tls.is_none());

        let mut spec = cluster().spec;
        spec.tls = Some(TlsSpec {
            secret_name: "certs".into(),
        });
        let text = broker_config_toml(&cluster_with(spec), "").expect("renders");
        std::fs::write(&path, text).expect("write");
        let args = <synod_broker::config::Args as clap::Parser>::try_parse_from([
            "synod-broker",
            "--config",
            path.to_str().expect("utf-8"),
        ])
        .expect("flags parse");
        let tls = synod_broker::config::Config::from_args(args)
            .expect("broker accepts the TLS settings")
            .tls
            .expect("TLS is configured");
        assert_eq!(tls.cert, std::path::PathBuf::from("/etc/synod/tls/tls.crt"));
        assert_eq!(tls.key, std::path::PathBuf::from("/etc/synod/tls/tls.key"));
        assert_eq!(
            tls.ca,
            Some(std::path::PathBuf::from("/etc/synod/tls/ca.crt"))
        );
        assert_eq!(tls.amqps_listen.port(), 5671);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tls_and_extra_settings_are_written() {
        // Goal: spec.tls adds the certificate paths and spec.config keys are copied typed.
        let mut spec = cluster().spec;
        spec.tls = Some(TlsSpec {
            secret_name: "certs".into(),
        });
        spec.config.insert("heartbeat".into(), IntOrString::Int(30));
        spec.config
            .insert("log-level".into(), IntOrString::String("debug".into()));
        let text = broker_config_toml(&cluster_with(spec), "").expect("renders");
        let table: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(table["tls-cert"].as_str(), Some("/etc/synod/tls/tls.crt"));
        assert_eq!(table["tls-key"].as_str(), Some("/etc/synod/tls/tls.key"));
        assert_eq!(table["tls-ca"].as_str(), Some("/etc/synod/tls/ca.crt"));
        assert_eq!(table["amqps-listen"].as_str(), Some("0.0.0.0:5671"));
        assert_eq!(table["heartbeat"].as_integer(), Some(30));
        assert_eq!(table["log-level"].as_str(), Some("debug"));
    }

    #[test]
    fn operator_owned_settings_are_refused() {
        // Goal: spec.config cannot override managed keys, even where the schema rule was bypassed.
        let mut spec = cluster().spec;
        spec.config
            .insert("peers".into(), IntOrString::String("x=y:1".into()));
        let err = broker_config_toml(&cluster_with(spec), "").expect_err("refused");
        assert!(err.to_string().contains("peers"), "{err}");
    }

    #[test]
    fn config_map_carries_the_file() {
        // Goal: X-config holds the TOML under synod.toml and is owned by the cluster.
        let map = config_map(&cluster(), "p").expect("builds");
        assert_eq!(map.metadata.name.as_deref(), Some("rabbit-config"));
        assert!(map.data.expect("data")[CONFIG_FILE_KEY].contains("peers = \"p\""));
        assert!(map.metadata.owner_references.is_some());
    }
}
