//! The fields the agent reads out of an X.509 certificate (DER), parsed by x509-parser: the
//! subject's commonName and organizationName values (the user and groups of a kubelet API
//! client, `server::tls`) and the serial and validity (when the node's certificates are
//! rotated, `certificates`). A leaf module: it knows nothing of who asks.

use jiff::Timestamp;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate's fields could not be read. Not retryable for the same bytes.
#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    /// Not DER, or not an X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    /// A validity time outside what a timestamp holds (years -9999 to 9999).
    #[error("validity time {0}s since the epoch is out of range")]
    Time(i64),
}

/// What the agent reads out of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// The serial number in lowercase hex, without leading zero bytes.
    pub serial: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// The subject's commonName values, in the order of the Name.
    pub common_names: Vec<String>,
    /// The subject's organizationName values, in the order of the Name.
    pub organizations: Vec<String>,
}

/// Reads the [`Fields`] of a DER certificate (bytes after it are ignored).
pub fn read(der: &[u8]) -> Result<Fields, X509Error> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    let time = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|_| X509Error::Time(t.timestamp()))
    };
    let validity = cert.validity();
    Ok(Fields {
        serial: cert
            .raw_serial()
            .iter()
            .skip_while(|b| **b == 0)
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: time(validity.not_before)?,
        not_after: time(validity.not_after)?,
        common_names: strings(cert.subject().iter_common_name()),
        organizations: strings(cert.subject().iter_organization()),
    })
}

/// The string values among `attributes`: UTF8String, PrintableString, T61String and IA5String,
/// all read as UTF-8 (lossily). Other value types (BMPString, ...) are skipped.
fn strings<'a, 'b: 'a>(
    attributes: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
) -> Vec<String> {
    attributes
        .filter(|atv| {
            matches!(
                atv.attr_value().tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::T61String | Tag::Ia5String
            )
        })
        .map(|atv| String::from_utf8_lossy(atv.as_slice()).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_serial_and_validity() {
        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x01, 0xab]));
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        params.not_before = rcgen::date_time_ymd(2026, 1, 2);
        params.not_after = rcgen::date_time_ymd(2051, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let fields = read(params.self_signed(&key).unwrap().der()).unwrap();
        assert_eq!(fields.common_names, vec!["system:node:n1".to_string()]);
        assert_eq!(fields.organizations, vec!["system:nodes".to_string()]);
        assert_eq!(fields.serial, "01ab");
        assert_eq!(
            fields.not_before,
            "2026-01-02T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            fields.not_after,
            "2051-03-04T00:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [
            &[][..],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x03, 0x30, 0x01],
        ] {
            assert!(matches!(read(bytes), Err(X509Error::Parse(_))), "{bytes:?}");
        }
    }
}
