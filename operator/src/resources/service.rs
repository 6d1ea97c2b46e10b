//! Builders of the client Service `X`, the headless Service `X-nodes` and the
//! ServiceAccount `X`. Pure: no API calls.

use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    AMQP_PORT, AMQPS_PORT, CLUSTER_PORT, Error, MANAGEMENT_PORT, METRICS_PORT, Names,
    owned_metadata, selector_labels,
};
use crate::crd::BrokerCluster;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// Service `X`: where clients reach AMQP, the management API and metrics.
pub fn client_service(cluster: &BrokerCluster) -> Result<Service, Error> {
    let names = Names::of(cluster)?;
    let mut metadata = owned_metadata(cluster, names.cluster.clone(), "client")?;
    if !cluster.spec.service.annotations.is_empty() {
        metadata.annotations = Some(cluster.spec.service.annotations.clone());
    }
    let mut ports = vec![port("amqp", AMQP_PORT)];
    if cluster.spec.tls.is_some() {
        ports.push(port("amqps", AMQPS_PORT));
    }
    ports.push(port("management", MANAGEMENT_PORT));
    ports.push(port("metrics", METRICS_PORT));
    Ok(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(cluster.spec.service.kind.as_str().to_string()),
            selector: Some(selector_labels(cluster)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Headless Service `X-nodes`: stable DNS names `X-i.X-nodes.<ns>.svc` for
/// every pod, ready or not, so peers find each other before they are members.
pub fn nodes_service(cluster: &BrokerCluster) -> Result<Service, Error> {
    let names = Names::of(cluster)?;
    Ok(Service {
        metadata: owned_metadata(cluster, names.nodes_service(), "nodes")?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cluster)),
            ports: Some(vec![
                port("cluster", CLUSTER_PORT),
                port("management", MANAGEMENT_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// ServiceAccount `X` of the broker pods. Brokers never call the Kubernetes
/// API, so no token is mounted.
pub fn service_account(cluster: &BrokerCluster) -> Result<ServiceAccount, Error> {
    let names = Names::of(cluster)?;
    Ok(ServiceAccount {
        metadata: owned_metadata(cluster, names.cluster, "broker")?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::broker_cluster::{ServiceType, TlsSpec};
    use crate::resources::test_support::{cluster, cluster_with};

    fn port_numbers(service: &Service) -> Vec<(String, i32)> {
        service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port))
            .collect()
    }

    #[test]
    fn client_service_exposes_amqp_management_and_metrics() {
        // Goal: Service X has the three client ports, the selector and the spec's type/annotations.
        let mut spec = cluster().spec;
        spec.service.kind = ServiceType::LoadBalancer;
        spec.service
            .annotations
            .insert("lb/internal".into(), "true".into());
        let service = client_service(&cluster_with(spec)).expect("builds");
        assert_eq!(service.metadata.name.as_deref(), Some("rabbit"));
        assert_eq!(
            service.metadata.annotations.as_ref().expect("annotations")["lb/internal"],
            "true"
        );
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.selector, Some(selector_labels(&cluster())));
        assert_eq!(
            port_numbers(&service),
            vec![
                ("amqp".into(), 5672),
                ("management".into(), 15672),
                ("metrics".into(), 15692)
            ]
        );
    }

    #[test]
    fn client_service_adds_amqps_with_tls() {
        // Goal: with spec.tls the client Service also exposes 5671.
        let mut spec = cluster().spec;
        spec.tls = Some(TlsSpec {
            secret_name: "certs".into(),
        });
        let service = client_service(&cluster_with(spec)).expect("builds");
        assert!(port_numbers(&service).contains(&("amqps".into(), 5671)));
    }

    #[test]
    fn nodes_service_is_headless_and_publishes_unready_pods() {
        // Goal: X-nodes is headless, lists not-ready pods and carries the cluster port.
        let service = nodes_service(&cluster()).expect("builds");
        assert_eq!(service.metadata.name.as_deref(), Some("rabbit-nodes"));
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert!(port_numbers(&service).contains(&("cluster".into(), 25672)));
        assert!(service.metadata.owner_references.is_some());
    }

    #[test]
    fn service_account_mounts_no_token() {
        // Goal: brokers get an identity but no API token.
        let account = service_account(&cluster()).expect("builds");
        assert_eq!(account.metadata.name.as_deref(), Some("rabbit"));
        assert_eq!(account.automount_service_account_token, Some(false));
    }
}
