//! Who is asking, and may they: the kubelet API's authentication and authorization.
//!
//! Authentication, in the kubelet's order: a client certificate verified against
//! `--client-ca-file` (user = CN, groups = O); else an `Authorization: Bearer` token reviewed
//! by the API server (TokenReview); else anonymous, refused unless `--anonymous-auth`.
//! Authorization: [`attributes`] maps the request to the kubelet's `nodes/<subresource>` check
//! and [`Authorizer`] asks the API server with a SubjectAccessReview (or allows everything in
//! AlwaysAllow mode). Both keep a small cache of answers with the kubelet's webhook TTLs.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::Api;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::ServerError;
use crate::config::{one_line, AuthorizationMode};

/// The kubelet's `authentication.webhook.cacheTTL` default.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(2 * 60);
/// The kubelet's `authorization.webhook.cacheAuthorizedTTL` default.
const ALLOWED_CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// The kubelet's `authorization.webhook.cacheUnauthorizedTTL` default.
const DENIED_CACHE_TTL: Duration = Duration::from_secs(30);
/// Entries kept per cache; past it, expired entries are dropped and then the whole cache, so
/// a flood of distinct tokens costs memory only up to this bound.
const CACHE_CAPACITY: usize = 1024;

/// An authenticated user, as TokenReview and SubjectAccessReview name one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// The user of an anonymous request (with --anonymous-auth).
    pub fn anonymous() -> User {
        User {
            name: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
            extra: BTreeMap::new(),
        }
    }
}

/// Why a request could not be authenticated: answered with 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No certificate, no token, and anonymous requests are refused.
    NoCredentials,
    /// A bearer token the API server did not accept (or tokens are not checked here).
    BadToken(String),
}

/// Authenticates requests; owns its token cache.
pub struct Authenticator {
    client: Option<kube::Client>,
    token_webhook: bool,
    anonymous: bool,
    tokens: TtlCache<[u8; 32], Option<User>>,
}

impl Authenticator {
    pub fn new(client: Option<kube::Client>, token_webhook: bool, anonymous: bool) -> Self {
        Authenticator {
            client,
            token_webhook,
            anonymous,
            tokens: TtlCache::new(),
        }
    }

    /// The user of a request: `peer` is the verified client certificate's user, if any.
    pub async fn authenticate(
        &self,
        peer: Option<&User>,
        headers: &http::HeaderMap,
    ) -> Result<Result<User, Unauthenticated>, ServerError> {
        if let Some(user) = peer {
            return Ok(Ok(user.clone()));
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Ok(if self.anonymous {
                Ok(User::anonymous())
            } else {
                Err(Unauthenticated::NoCredentials)
            });
        };
        let (true, Some(client)) = (self.token_webhook, &self.client) else {
            return Ok(Err(Unauthenticated::BadToken(
                "bearer tokens are not accepted (--authentication-token-webhook=false)".into(),
            )));
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cached) = self.tokens.get(&key) {
            return Ok(
                cached.ok_or_else(|| Unauthenticated::BadToken("invalid bearer token".into()))
            );
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ServerError::Api(format!("TokenReview: {}", one_line(&e))))?;
        let user = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| {
                Some(User {
                    name: u.username.filter(|n| !n.is_empty())?,
                    uid: u.uid.unwrap_or_default(),
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                })
            });
        // Only accepted tokens are cached: a rejected one is asked about again next time.
        if user.is_some() {
            self.tokens.insert(key, user.clone(), TOKEN_CACHE_TTL);
        }
        Ok(user.ok_or_else(|| Unauthenticated::BadToken("invalid bearer token".into())))
    }
}

/// What a request asks to do, as the kubelet's authorizer sees it: `<verb>` on
/// `nodes/<subresource>` named after this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: &'static str,
    pub subresource: &'static str,
}

/// The kubelet's mapping (pkg/kubelet/server/auth.go): the verb from the HTTP method, the
/// subresource from the path; everything not listed (containerLogs, exec, attach, portForward,
/// run, pods, runningpods) is `proxy`.
pub fn attributes(method: &http::Method, path: &str) -> Attributes {
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    };
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresource = if under("/stats") {
        "stats"
    } else if path.starts_with("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else if under("/healthz") {
        "healthz"
    } else {
        "proxy"
    };
    Attributes { verb, subresource }
}

/// The answer to an authorization question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

/// Authorizes requests; owns its decision cache.
pub struct Authorizer {
    mode: AuthorizationMode,
    client: Option<kube::Client>,
    node_name: String,
    decisions: TtlCache<(String, Vec<String>, Attributes), Decision>,
}

impl Authorizer {
    pub fn new(mode: AuthorizationMode, client: Option<kube::Client>, node_name: String) -> Self {
        Authorizer {
            mode,
            client,
            node_name,
            decisions: TtlCache::new(),
        }
    }

    pub async fn authorize(
        &self,
        user: &User,
        attrs: &Attributes,
    ) -> Result<Decision, ServerError> {
        let client = match (self.mode, &self.client) {
            (AuthorizationMode::AlwaysAllow, _) => return Ok(Decision::Allow),
            (AuthorizationMode::Webhook, Some(client)) => client,
            // Config refuses Webhook without a kubeconfig; deny rather than allow if it ever happens.
            (AuthorizationMode::Webhook, None) => {
                return Ok(Decision::Deny("no API server to ask".into()))
            }
        };
        let key = (user.name.clone(), user.groups.clone(), attrs.clone());
        if let Some(decision) = self.decisions.get(&key) {
            return Ok(decision);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()).filter(|e| !e.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attrs.verb.into()),
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attrs.subresource.into()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ServerError::Api(format!("SubjectAccessReview: {}", one_line(&e))))?;
        let status = answer.status.unwrap_or_default();
        let decision = if status.allowed {
            Decision::Allow
        } else {
            Decision::Deny(
                status
                    .reason
                    .or(status.evaluation_error)
                    .unwrap_or_default(),
            )
        };
        let ttl = if decision == Decision::Allow {
            ALLOWED_CACHE_TTL
        } else {
            DENIED_CACHE_TTL
        };
        self.decisions.insert(key, decision.clone(), ttl);
        Ok(decision)
    }
}

/// A bounded map whose entries expire. Private to its owner (the authenticator or the
/// authorizer); the lock is held only for a lookup or an insert, never across an await.
struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    fn new() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(v, _)| v.clone())
    }

    fn insert(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_CAPACITY {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (value, now + ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_like_the_kubelets() {
        let get = http::Method::GET;
        let cases = [
            ("/stats/summary", "stats"),
            ("/stats", "stats"),
            ("/metrics", "metrics"),
            ("/metrics/cadvisor", "metrics"),
            ("/logs/", "log"),
            ("/healthz", "healthz"),
            ("/containerLogs/ns/pod/c", "proxy"),
            ("/exec/ns/pod/c", "proxy"),
            ("/pods", "proxy"),
            ("/runningpods/", "proxy"),
            ("/statsfoo", "proxy"),
            ("/", "proxy"),
        ];
        for (path, sub) in cases {
            assert_eq!(attributes(&get, path).subresource, sub, "{path}");
        }
        assert_eq!(
            attributes(&http::Method::POST, "/exec/a/b/c").verb,
            "create"
        );
        assert_eq!(attributes(&http::Method::PUT, "/x").verb, "update");
        assert_eq!(attributes(&http::Method::PATCH, "/x").verb, "patch");
        assert_eq!(attributes(&http::Method::DELETE, "/x").verb, "delete");
        assert_eq!(attributes(&http::Method::HEAD, "/x").verb, "get");
    }

    #[tokio::test(start_paused = true)]
    async fn cache_entries_expire() {
        let cache: TtlCache<u32, u32> = TtlCache::new();
        cache.insert(1, 10, Duration::from_secs(30));
        assert_eq!(cache.get(&1), Some(10));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(cache.get(&1), None);
        for i in 0..(CACHE_CAPACITY as u32 + 10) {
            cache.insert(i, i, Duration::from_secs(30));
        }
        assert!(cache.entries.lock().unwrap().len() <= CACHE_CAPACITY);
    }

    #[tokio::test]
    async fn anonymous_is_refused_unless_allowed() {
        let headers = http::HeaderMap::new();
        let refuse = Authenticator::new(None, false, false);
        assert_eq!(
            refuse.authenticate(None, &headers).await.unwrap(),
            Err(Unauthenticated::NoCredentials)
        );
        let allow = Authenticator::new(None, false, true);
        assert_eq!(
            allow.authenticate(None, &headers).await.unwrap(),
            Ok(User::anonymous())
        );
        let mut with_token = http::HeaderMap::new();
        with_token.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer abc"),
        );
        assert!(
            matches!(
                allow.authenticate(None, &with_token).await.unwrap(),
                Err(Unauthenticated::BadToken(_))
            ),
            "a token is never anonymous"
        );
    }
}
