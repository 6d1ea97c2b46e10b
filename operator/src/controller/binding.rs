//! The `Binding` controller: creates the binding through the management API
//! unless an identical one exists, and deletes exactly that one on cleanup.

use std::future::Future;
use std::sync::Arc;

use synod_broker::mgmt::api::{BindingDeclare, BindingInfo, DestinationType};

use super::Context;
use super::topology::{self, Topology};
use crate::broker_client::{self, BrokerClient};
use crate::crd::{Binding, TopologyStatus};

/// Whether `existing` is the binding `binding` describes (same key and arguments).
pub fn matches(binding: &Binding, existing: &BindingInfo) -> bool {
    existing.routing_key == binding.spec.routing_key && existing.arguments == binding.spec.arguments
}

impl Topology for Binding {
    const KIND: &'static str = "Binding";

    fn cluster_name(&self) -> &str {
        &self.spec.cluster_ref.name
    }

    fn topology_status(&self) -> Option<&TopologyStatus> {
        self.status.as_ref()
    }

    fn describe(&self) -> String {
        format!(
            "binding {:?} -> {:?} ({:?}) in vhost {:?} of cluster {}",
            self.spec.source,
            self.spec.destination,
            self.spec.routing_key,
            self.spec.vhost,
            self.cluster_name()
        )
    }

    fn declare(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send {
        let binding = self.clone();
        async move {
            let spec = &binding.spec;
            let kind = DestinationType::from(spec.destination_type);
            let existing = client
                .bindings_between(&spec.vhost, &spec.source, kind, &spec.destination)
                .await?;
            if existing.iter().any(|b| matches(&binding, b)) {
                return Ok(());
            }
            let body = BindingDeclare {
                routing_key: spec.routing_key.clone(),
                arguments: spec.arguments.clone(),
            };
            client
                .create_binding(&spec.vhost, &spec.source, kind, &spec.destination, &body)
                .await
        }
    }

    fn remove(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send {
        let binding = self.clone();
        async move {
            let spec = &binding.spec;
            let kind = DestinationType::from(spec.destination_type);
            let existing = match client
                .bindings_between(&spec.vhost, &spec.source, kind, &spec.destination)
                .await
            {
                Ok(existing) => existing,
                // Source, destination or vhost gone: so is the binding.
                Err(err) if err.is_not_found() => return Ok(()),
                Err(err) => return Err(err),
            };
            for found in existing.iter().filter(|b| matches(&binding, b)) {
                client
                    .delete_binding(
                        &spec.vhost,
                        &spec.source,
                        kind,
                        &spec.destination,
                        &found.properties_key,
                    )
                    .await?;
            }
            Ok(())
        }
    }
}

/// Runs the `Binding` controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    tracing::info!(namespace = ?namespace, "starting the Binding controller");
    topology::run::<Binding>(ctx, namespace, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClusterRef;
    use crate::crd::binding::{BindingDestinationType, BindingSpec};

    #[test]
    fn only_the_same_key_and_arguments_match() {
        // Goal: an existing binding matches only with equal routing key and arguments.
        let binding = Binding::new(
            "b",
            BindingSpec {
                cluster_ref: ClusterRef {
                    name: "rabbit".into(),
                },
                vhost: "/".into(),
                source: "orders".into(),
                destination: "jobs".into(),
                destination_type: BindingDestinationType::Queue,
                routing_key: "eu.#".into(),
                arguments: Default::default(),
            },
        );
        let mut existing = BindingInfo {
            source: "orders".into(),
            vhost: "/".into(),
            destination: "jobs".into(),
            destination_type: DestinationType::Queue,
            routing_key: "eu.#".into(),
            arguments: Default::default(),
            properties_key: "eu.%23".into(),
        };
        assert!(matches(&binding, &existing));
        existing.routing_key = "us.#".into();
        assert!(!matches(&binding, &existing));
        existing.routing_key = "eu.#".into();
        existing
            .arguments
            .insert("x-match".into(), serde_json::json!("all"));
        assert!(!matches(&binding, &existing));
    }
}
