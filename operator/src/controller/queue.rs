//! The `Queue` controller: declares the queue through the management API;
//! `deletionPolicy: retain` keeps it on the broker when the resource goes.

use std::future::Future;
use std::sync::Arc;

use synod_broker::mgmt::api::QueueDeclare;

use super::Context;
use super::topology::{self, Topology};
use crate::broker_client::{self, BrokerClient};
use crate::crd::queue::DeletionPolicy;
use crate::crd::{Queue, TopologyStatus};

/// The management API request that declares `queue`.
pub fn declaration(queue: &Queue) -> QueueDeclare {
    QueueDeclare {
        durable: queue.spec.durable,
        auto_delete: queue.spec.auto_delete,
        arguments: queue.spec.arguments.clone(),
        node: None,
    }
}

impl Topology for Queue {
    const KIND: &'static str = "Queue";

    fn cluster_name(&self) -> &str {
        &self.spec.cluster_ref.name
    }

    fn topology_status(&self) -> Option<&TopologyStatus> {
        self.status.as_ref()
    }

    fn describe(&self) -> String {
        format!(
            "queue {:?} in vhost {:?} of cluster {}",
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
        async move { client.declare_queue(&vhost, &name, &body).await }
    }

    fn remove(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send {
        let (vhost, name) = (self.spec.vhost.clone(), self.spec.name.clone());
        async move { client.delete_queue(&vhost, &name).await }
    }

    fn retain_on_delete(&self) -> bool {
        self.spec.deletion_policy == DeletionPolicy::Retain
    }
}

/// Runs the `Queue` controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    tracing::info!(namespace = ?namespace, "starting the Queue controller");
    topology::run::<Queue>(ctx, namespace, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClusterRef;
    use crate::crd::queue::QueueSpec;

    fn queue(policy: DeletionPolicy) -> Queue {
        Queue::new(
            "jobs",
            QueueSpec {
                cluster_ref: ClusterRef {
                    name: "rabbit".into(),
                },
                name: "jobs".into(),
                vhost: "/".into(),
                durable: true,
                auto_delete: false,
                arguments: [("x-max-length".to_string(), serde_json::json!(1000))].into(),
                deletion_policy: policy,
            },
        )
    }

    #[test]
    fn declaration_copies_the_spec_and_policy_decides_retention() {
        // Goal: the body carries durability and arguments; only `retain` keeps the queue.
        let body = serde_json::to_value(declaration(&queue(DeletionPolicy::Delete))).expect("json");
        assert_eq!(body["durable"], true);
        assert_eq!(body["arguments"]["x-max-length"], 1000);
        assert!(body.get("node").is_none());
        assert!(!queue(DeletionPolicy::Delete).retain_on_delete());
        assert!(queue(DeletionPolicy::Retain).retain_on_delete());
    }
}
