//! One certificate signing request (certificates.k8s.io/v1), from key to issued certificate:
//! a new ECDSA P-256 key, a PKCS#10 request for `CN=system:node:<node>, O=system:nodes`, the
//! CertificateSigningRequest object, and a watch until it is issued, denied or failed.

use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use tracing::info;

use super::CertificateError;
use crate::config::one_line;

/// The signer of kubelet client certificates; the csrapproving controller approves a node's
/// requests to it (`nodeclient` for bootstrap identities, `selfnodeclient` for renewals).
pub const KUBE_APISERVER_CLIENT_KUBELET: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of kubelet serving certificates; nothing in Kubernetes approves these requests.
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";

/// The usages the client signer and its auto-approval accept for an ECDSA key ("key
/// encipherment" is for RSA keys only).
pub const CLIENT_USAGES: &[&str] = &["digital signature", "client auth"];
/// The usages of a serving certificate with an ECDSA key.
pub const SERVING_USAGES: &[&str] = &["digital signature", "server auth"];

/// What to ask for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub signer: &'static str,
    pub usages: &'static [&'static str],
    pub node_name: &'a str,
    /// DNS names and IP addresses (serving certificates); client certificates have none, or the
    /// auto-approval refuses them.
    pub subject_alt_names: Vec<String>,
    /// How long to wait for the certificate.
    pub timeout: Duration,
    /// Said in the waiting log line and the time-out error: who has to approve (`<name>` is
    /// replaced by the CSR's name).
    pub hint: &'static str,
}

/// Creates a CSR with `client` and waits for its certificate. Returns (certificate PEM,
/// private key PEM).
pub async fn request(
    client: kube::Client,
    request: &Request<'_>,
) -> Result<(String, String), CertificateError> {
    let generate = |e: rcgen::Error| CertificateError::Generate(e.to_string());
    // rcgen's default key is ECDSA P-256 with SHA-256, as the kubelet makes.
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params =
        rcgen::CertificateParams::new(request.subject_alt_names.clone()).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{}", request.node_name),
    );
    let csr_pem = params
        .serialize_request(&key)
        .map_err(generate)?
        .pem()
        .map_err(generate)?;

    let api: Api<CertificateSigningRequest> = Api::all(client);
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("csr-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: request.signer.into(),
            usages: Some(request.usages.iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| CertificateError::Api(one_line(&e)))?;
    let name = created.metadata.name.unwrap_or_default();
    let hint = request.hint.replace("<name>", &name);
    info!(csr = %name, signer = request.signer, timeout = ?request.timeout, "waiting for certificate signing request {name} to be approved and issued{hint}");

    let wait = kube::runtime::wait::await_condition(
        api,
        &name,
        |csr: Option<&CertificateSigningRequest>| csr.and_then(outcome).is_some(),
    );
    let csr = match tokio::time::timeout(request.timeout, wait).await {
        Err(_) => {
            return Err(CertificateError::TimedOut {
                name,
                waited: request.timeout,
                hint,
            })
        }
        Ok(Err(e)) => {
            return Err(CertificateError::Api(format!(
                "watching {name}: {}",
                one_line(&e)
            )))
        }
        Ok(Ok(csr)) => csr,
    };
    match csr.as_ref().and_then(outcome) {
        Some(Outcome::Issued(cert)) => {
            let cert = String::from_utf8(cert).map_err(|_| CertificateError::Parse {
                what: format!("the certificate of {name}"),
                reason: "not PEM text".into(),
            })?;
            info!(csr = %name, "certificate signing request {name} was approved and issued");
            Ok((cert, key.serialize_pem()))
        }
        Some(Outcome::Refused { verdict, reason }) => Err(CertificateError::Refused {
            name,
            verdict,
            reason,
        }),
        None => Err(CertificateError::Api(format!(
            "{name} was deleted before it was issued"
        ))),
    }
}

/// Where a CSR ended up.
#[derive(Debug, PartialEq)]
enum Outcome {
    Issued(Vec<u8>),
    Refused {
        verdict: &'static str,
        reason: String,
    },
}

/// `None` while the CSR is pending (approved but not yet signed is still pending).
fn outcome(csr: &CertificateSigningRequest) -> Option<Outcome> {
    let status = csr.status.as_ref()?;
    for condition in status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.status == "True")
    {
        let verdict = match condition.type_.as_str() {
            "Denied" => "denied",
            "Failed" => "failed",
            _ => continue,
        };
        let reason = [condition.reason.as_deref(), condition.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        let reason = if reason.is_empty() {
            "no reason given".into()
        } else {
            reason
        };
        return Some(Outcome::Refused { verdict, reason });
    }
    let cert = status.certificate.as_ref().filter(|c| !c.0.is_empty())?;
    Some(Outcome::Issued(cert.0.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(status: serde_json::Value) -> CertificateSigningRequest {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "csr-x"},
            "spec": {"request": "", "signerName": KUBELET_SERVING},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pending_approved_issued_denied_and_failed() {
        assert_eq!(outcome(&csr(serde_json::json!({}))), None);
        let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]});
        assert_eq!(
            outcome(&csr(approved)),
            None,
            "approved but not yet signed is pending"
        );
        let issued = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}], "certificate": "UEVN"});
        assert_eq!(
            outcome(&csr(issued)),
            Some(Outcome::Issued(b"PEM".to_vec()))
        );
        let denied = serde_json::json!({"conditions": [{"type": "Denied", "status": "True", "reason": "NotMine", "message": "go away"}]});
        assert_eq!(
            outcome(&csr(denied)),
            Some(Outcome::Refused {
                verdict: "denied",
                reason: "NotMine: go away".into()
            })
        );
        let failed = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}, {"type": "Failed", "status": "True"}]});
        assert_eq!(
            outcome(&csr(failed)),
            Some(Outcome::Refused {
                verdict: "failed",
                reason: "no reason given".into()
            })
        );
    }
}
