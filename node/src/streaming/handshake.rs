//! The HTTP upgrade to SPDY/3.1 as the kubelet performs it (apimachinery's
//! `httpstream.Handshake` and the SPDY `responseUpgrader`): a pure function from request headers
//! to the chosen sub-protocol and the `101 Switching Protocols` response headers.
//!
//! Where to start: [`negotiate`]. On `Err`, answer with [`Error::http_status`] and
//! [`rejection_headers`].

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};

use super::{Error, Result};

/// `Upgrade` token of the protocol spoken after the handshake.
pub const SPDY_31: &str = "SPDY/3.1";
/// Request header listing the client's sub-protocols (repeated and/or comma separated); the
/// response carries the chosen one.
pub const HEADER_PROTOCOL_VERSION: &str = "x-stream-protocol-version";
/// Response header listing the server's sub-protocols when none matched (HTTP 403).
pub const HEADER_ACCEPTED_PROTOCOL_VERSIONS: &str = "x-accepted-stream-protocol-versions";

/// The tokens of a header that may be repeated and/or comma separated (sub-protocol lists),
/// in the client's order.
pub fn listed_tokens(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks the upgrade request and picks a sub-protocol: the first in the *client's* order that
/// `supported` contains (as `httpstream.Handshake` does). Returns it with the headers of the
/// `101` response: `Connection: Upgrade`, `Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version`.
pub fn negotiate<'a>(headers: &HeaderMap, supported: &[&'a str]) -> Result<(&'a str, HeaderMap)> {
    let has_token = |name: HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains(&token.to_ascii_lowercase()))
        })
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, SPDY_31) {
        return Err(Error::MissingUpgradeHeaders);
    }
    let client = listed_tokens(headers, HEADER_PROTOCOL_VERSION);
    if client.is_empty() {
        return Err(Error::MissingProtocolVersion);
    }
    let chosen = client
        .iter()
        .find_map(|c| supported.iter().find(|s| **s == c.as_str()).copied())
        .ok_or_else(|| Error::NoCommonProtocol {
            client: client.clone(),
            server: supported.iter().map(|s| s.to_string()).collect(),
        })?;
    let mut response = HeaderMap::new();
    response.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    response.insert(UPGRADE, HeaderValue::from_static(SPDY_31));
    let value = HeaderValue::from_str(chosen)
        .map_err(|_| Error::UnsupportedProtocol(chosen.to_string()))?;
    response.insert(HEADER_PROTOCOL_VERSION, value);
    Ok((chosen, response))
}

/// Headers for an error answer to a failed [`negotiate`]: for a 403 the accepted protocols, one
/// `X-Accepted-Stream-Protocol-Versions` value each, as the kubelet sends them.
pub fn rejection_headers(error: &Error) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Error::NoCommonProtocol { server, .. } = error {
        for p in server {
            if let Ok(v) = HeaderValue::from_str(p) {
                headers.append(HEADER_ACCEPTED_PROTOCOL_VERSIONS, v);
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::{portforward, remotecommand};

    fn request(protocols: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        for p in protocols {
            h.append(HEADER_PROTOCOL_VERSION, HeaderValue::from_str(p).unwrap());
        }
        h
    }

    #[test]
    fn picks_v4_when_offered_v4_and_v3() {
        let (p, resp) = negotiate(
            &request(&["v4.channel.k8s.io", "v3.channel.k8s.io"]),
            remotecommand::PROTOCOLS,
        )
        .unwrap();
        assert_eq!(p, "v4.channel.k8s.io");
        assert_eq!(resp[CONNECTION], "Upgrade");
        assert_eq!(resp[UPGRADE], "SPDY/3.1");
        assert_eq!(resp[HEADER_PROTOCOL_VERSION], "v4.channel.k8s.io");
    }

    #[test]
    fn client_order_wins_and_comma_lists_count() {
        let (p, _) = negotiate(
            &request(&["v2.channel.k8s.io, v4.channel.k8s.io"]),
            remotecommand::PROTOCOLS,
        )
        .unwrap();
        assert_eq!(p, "v2.channel.k8s.io");
        let (p, _) = negotiate(&request(&["portforward.k8s.io"]), portforward::PROTOCOLS).unwrap();
        assert_eq!(p, "portforward.k8s.io");
    }

    #[test]
    fn unknown_protocols_are_403_with_accepted_list() {
        let err = negotiate(
            &request(&["v9.channel.k8s.io", "bogus"]),
            remotecommand::PROTOCOLS,
        )
        .unwrap_err();
        assert!(matches!(err, Error::NoCommonProtocol { .. }), "{err}");
        assert_eq!(err.http_status(), Some(403));
        let accepted: Vec<_> = rejection_headers(&err)
            .get_all(HEADER_ACCEPTED_PROTOCOL_VERSIONS)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(accepted, remotecommand::PROTOCOLS);
    }

    #[test]
    fn missing_headers_are_400() {
        let err = negotiate(&request(&[]), remotecommand::PROTOCOLS).unwrap_err();
        assert!(matches!(err, Error::MissingProtocolVersion));
        assert_eq!(err.http_status(), Some(400));
        let mut h = request(&["v4.channel.k8s.io"]);
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        let err = negotiate(&h, remotecommand::PROTOCOLS).unwrap_err();
        assert!(matches!(err, Error::MissingUpgradeHeaders));
        assert_eq!(err.http_status(), Some(400));
    }
}
