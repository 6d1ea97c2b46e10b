//! Leader election on a `coordination.k8s.io` Lease, so two operator
//! replicas can run and only one reconciles. Holds no controller logic; the
//! decision whether a lease may be taken (`may_take`) is pure.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a standby retries).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// One participant in the election for a named Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

/// Whether `identity` may take or renew the lease described by `spec` at `now`:
/// it holds it already, nobody does, or the holder stopped renewing.
pub fn may_take(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    renewed.0 + duration < now
}

impl LeaseLock {
    /// A participant named `identity` for Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: LEASE_DURATION,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let held_by_us = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if held_by_us {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if held_by_us || previous.is_none() {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the lease; `Ok(false)` when someone else holds it.
    ///
    /// Updates carry the read `resourceVersion`, so two contenders never both win.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(err) => Err(err),
                }
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                if !may_take(&current, &self.identity, now) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(Some(&current), now));
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(err) => Err(err),
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at once (on clean shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(err) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %err, "could not release the leader lease");
        }
    }

    /// Waits until this participant holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(err) => warn!(error = %err, "leader election: could not read the lease"),
            }
            tokio::time::sleep(RENEW_INTERVAL).await;
        }
    }

    /// Renews the lease until a renewal is impossible for a whole lease
    /// duration; returns then, meaning leadership may be lost.
    pub async fn keep_renewing(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_INTERVAL).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the lease");
                    return;
                }
                Err(err) => warn!(error = %err, "leader election: renewal failed"),
            }
            // Stop before the lease can expire under us: a standby may take it then.
            if last_renewal.elapsed() + RENEW_INTERVAL >= self.lease_duration {
                warn!(lease = %self.name, "could not renew the lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_at: Option<i64>, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed_at
                .map(|s| MicroTime(Timestamp::from_second(s).expect("valid time"))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_holder_cannot_be_taken() {
        // Goal: free, own or expired leases may be taken; another holder's fresh lease may not.
        let now = Timestamp::from_second(1_000).expect("valid time");
        assert!(may_take(&spec(None, None, 15), "a", now));
        assert!(may_take(&spec(Some("a"), Some(999), 15), "a", now));
        assert!(!may_take(&spec(Some("b"), Some(990), 15), "a", now));
        assert!(may_take(&spec(Some("b"), Some(980), 15), "a", now));
        assert!(may_take(&spec(Some(""), Some(999), 15), "a", now));
    }
}
