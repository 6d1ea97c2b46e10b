//! Status conditions: building them and merging them into a previous list so
//! `lastTransitionTime` moves only when a condition's status changes. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type every Synod resource has.
pub const READY: &str = "Ready";

/// A condition of `type_` with `status` (`True`/`False`/`Unknown`), `reason` and `message`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// `next` with each condition's `lastTransitionTime` taken from `previous`
/// when its status did not change.
pub fn merge(previous: &[Condition], next: Vec<Condition>) -> Vec<Condition> {
    next.into_iter()
        .map(|mut condition| {
            if let Some(old) = previous
                .iter()
                .find(|old| old.type_ == condition.type_ && old.status == condition.status)
            {
                condition.last_transition_time = old.last_transition_time.clone();
            }
            condition
        })
        .collect()
}

/// The condition of `type_` in `conditions`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `conditions` has `type_` with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The current time as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid"))
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        // Goal: an unchanged status keeps its old time; a flipped one gets the new time.
        let previous = vec![
            condition(READY, true, "A", "", Some(1), &at(100)),
            condition("Other", false, "B", "", Some(1), &at(100)),
        ];
        let next = vec![
            condition(READY, true, "A2", "new message", Some(2), &at(200)),
            condition("Other", true, "B", "", Some(2), &at(200)),
        ];
        let merged = merge(&previous, next);
        assert_eq!(merged[0].last_transition_time, at(100));
        assert_eq!(merged[0].reason, "A2");
        assert_eq!(merged[1].last_transition_time, at(200));
        assert!(is_true(&merged, READY));
        assert!(is_true(&merged, "Other"));
        assert!(!is_true(&merged, "Missing"));
    }
}
