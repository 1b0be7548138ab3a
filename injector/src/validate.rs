//! The validating webhook: `POST /validate` checks a `trellis.dev` object,
//! or an HTTPRoute or GRPCRoute that names a Service parent, with
//! mesh-api's own checks ([`Object::check`]), the ones the control plane's
//! index applies before it takes an object. So an object the mesh would
//! refuse is refused at `kubectl apply`, with every field named, instead
//! of being accepted by the API server and then ignored (Kubernetes 1.20
//! has no CEL, and the generated CRDs carry only the objects' structure).
//!
//! A route whose parents are all Gateways belongs to a gateway
//! implementation, not to the mesh, and is allowed untouched.

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use mesh_api::ValidationError;
use mesh_api::k8s::Object;
use mesh_api::routes::has_service_parent;
use tracing::{debug, info};

use crate::webhook::{BadReview, Verdict, read_review, who};

/// Answers one `/validate` review.
pub fn validate(body: &[u8]) -> Result<(Verdict, AdmissionReview<DynamicObject>), BadReview> {
    let request = read_review(body)?;
    let (verdict, response) = answer(&request);
    Ok((verdict, response.into_review()))
}

fn answer(request: &AdmissionRequest<DynamicObject>) -> (Verdict, AdmissionResponse) {
    let allowed = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update)
        || request.sub_resource.is_some()
    {
        return (Verdict::Ignored, allowed);
    }
    let what = format!("{} {}", request.kind.kind, who(request));
    let Some(object) = &request.object else {
        return (
            Verdict::Denied,
            allowed.deny(format!("{what}: the review has no object")),
        );
    };
    let object = match serde_json::to_value(object).map(Object::from_json) {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => {
            debug!(%what, "not a kind the mesh checks");
            return (Verdict::Ignored, allowed);
        }
        Ok(Err(e)) | Err(e) => {
            return (
                Verdict::Denied,
                allowed.deny(format!("{what} cannot be read: {e}")),
            );
        }
    };
    if !is_the_meshs(&object) {
        return (Verdict::Ignored, allowed);
    }
    match object.check() {
        Ok(()) => (Verdict::Allowed, allowed),
        Err(errors) => {
            info!(%what, errors = errors.len(), "refused");
            (Verdict::Denied, allowed.deny(message(&errors)))
        }
    }
}

/// Whether the mesh reads the object: every `trellis.dev` kind, and routes
/// with a Service among their parents (GAMMA).
fn is_the_meshs(object: &Object) -> bool {
    match object {
        Object::HttpRoute(HttpRoute { spec, .. }) => {
            has_service_parent(spec.parent_refs.as_deref())
        }
        Object::GrpcRoute(GrpcRoute { spec, .. }) => {
            has_service_parent(spec.parent_refs.as_deref())
        }
        Object::DestinationPolicy(_)
        | Object::PeerAuthentication(_)
        | Object::AuthorizationPolicy(_)
        | Object::RateLimitPolicy(_)
        | Object::HttpFault(_) => true,
        Object::Service(_)
        | Object::EndpointSlice(_)
        | Object::ServiceAccount(_)
        | Object::Pod(_) => false,
    }
}

/// Every error, `; `-separated: `kubectl` prints the message on one line
/// after `admission webhook "…" denied the request: `.
fn message(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
