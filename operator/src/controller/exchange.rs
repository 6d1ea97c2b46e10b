//! The `Exchange` controller: declares the exchange through the management
//! API; the shared reconcile lives in `topology`.

use std::future::Future;
use std::sync::Arc;

use synod_broker::mgmt::api::ExchangeDeclare;

use super::Context;
use super::topology::{self, Topology};
use crate::broker_client::{self, BrokerClient};
use crate::crd::{Exchange, TopologyStatus};

/// The management API request that declares `exchange`.
pub fn declaration(exchange: &Exchange) -> ExchangeDeclare {
    ExchangeDeclare {
        kind: exchange.spec.kind.into(),
        durable: exchange.spec.durable,
        auto_delete: exchange.spec.auto_delete,
        internal: false,
        arguments: exchange.spec.arguments.clone(),
    }
}

impl Topology for Exchange {
    const KIND: &'static str = "Exchange";

    fn cluster_name(&self) -> &str {
        &self.spec.cluster_ref.name
    }

    fn topology_status(&self) -> Option<&TopologyStatus> {
        self.status.as_ref()
    }

    fn describe(&self) -> String {
        format!(
            "exchange {:?} in vhost {:?} of cluster {}",
            self.spec.name,
            self.spec.vhost,
            self.cluster_name()
        )
    }

    fn declare(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send {
        let (vhost, name, body) = (
            self.spec.vhost.clone(),
            self.spec.name.clone(),
            declaration(self),
        );
        async move { client.declare_exchange(&vhost, &name, &body).await }
    }

    fn remove(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send {
        let (vhost, name) = (self.spec.vhost.clone(), self.spec.name.clone());
        async move { client.delete_exchange(&vhost, &name).await }
    }
}

/// Runs the `Exchange` controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    tracing::info!(namespace = ?namespace, "starting the Exchange controller");
    topology::run::<Exchange>(ctx, namespace, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClusterRef;
    use crate::crd::exchange::{ExchangeKind, ExchangeSpec};
    use kube::ResourceExt;

    #[test]
    fn declaration_copies_the_spec() {
        // Goal: type, durability, auto-delete and arguments reach the management API body.
        let mut exchange = Exchange::new(
            "orders",
            ExchangeSpec {
                cluster_ref: ClusterRef {
                    name: "rabbit".into(),
                },
                name: "orders.v1".into(),
                vhost: "/".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: true,
                arguments: [("alternate-exchange".to_string(), serde_json::json!("ae"))].into(),
            },
        );
        exchange.metadata.namespace = Some("prod".into());
        let body = serde_json::to_value(declaration(&exchange)).expect("serializes");
        assert_eq!(body["type"], "topic");
        assert_eq!(body["durable"], true);
        assert_eq!(body["auto_delete"], true);
        assert_eq!(body["arguments"]["alternate-exchange"], "ae");
        assert!(exchange.describe().contains("orders.v1"));
        assert_eq!(exchange.name_any(), "orders");
    }
}
