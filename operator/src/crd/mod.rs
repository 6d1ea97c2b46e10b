//! Custom resource types of `synod.dev/v1alpha1`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Every CRD this operator serves, as `(file stem, definition)`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    Vec::new()
}
