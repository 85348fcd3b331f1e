//! The per-request decision: sanity -> authenticate -> route -> authorize. A function of
//! the request head and the current policy; it never touches the body or the backend.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Method, request};

use crate::auth::bearer::parse_bearer;
use crate::auth::{AuthFailure, Authenticator, Principal, now_ms};
use crate::config::Config;
use crate::errors::Refusal;
use crate::headers::IdentityNames;
use crate::path::canonicalize;
use crate::routes::{ApiId, RouteMatch, RouteTable};
use crate::store::{TokenHash, UserType};

/// Everything a request is judged by that can be reloaded (SIGHUP): built once, shared
/// read-only, swapped whole.
pub struct Policy {
    pub config: Config,
    pub routes: RouteTable,
    pub identity: IdentityNames,
    /// `x-campaign-api` values, indexed by API id.
    api_headers: Vec<HeaderValue>,
}

impl Policy {
    pub fn new(config: Config) -> Result<Policy, String> {
        let routes = config.route_table().map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let identity = IdentityNames::new(&config.upstream.identity_prefix)
            .map_err(|e| format!("upstream.identity_prefix: {e}"))?;
        let api_headers = (0..routes.api_count())
            .map(|i| {
                let id = ApiId(u16::try_from(i).unwrap_or(u16::MAX));
                HeaderValue::from_str(routes.api_name(id)).unwrap_or(HeaderValue::from_static(""))
            })
            .collect();
        Ok(Policy {
            config,
            routes,
            identity,
            api_headers,
        })
    }

    /// The `x-campaign-api` value of an API.
    pub fn api_header(&self, api: ApiId) -> HeaderValue {
        self.api_headers
            .get(usize::from(api.0))
            .cloned()
            .unwrap_or(HeaderValue::from_static(""))
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Admission<'a> {
    pub principal: Arc<Principal>,
    pub api: ApiId,
    /// The canonical path: what was matched, and exactly what is forwarded.
    pub path: Cow<'a, str>,
}

/// How far a refused request got, for metrics and logs.
#[derive(Debug)]
pub struct Rejection {
    pub refusal: Refusal,
    /// The principal, when authentication succeeded before the refusal.
    pub principal: Option<Arc<Principal>>,
}

impl From<Refusal> for Rejection {
    fn from(refusal: Refusal) -> Self {
        Rejection {
            refusal,
            principal: None,
        }
    }
}

/// Checks that cost nothing and need no credentials: method and path.
pub fn sanity<'a>(head: &'a request::Parts, policy: &Policy) -> Result<Cow<'a, str>, Refusal> {
    if !method_is_upper_token(&head.method) {
        return Err(Refusal::BadRequest);
    }
    if !policy.routes.method_allowed(&head.method) {
        return Err(Refusal::MethodNotAllowed);
    }
    canonicalize(head.uri.path()).map_err(|_| Refusal::InvalidPath)
}

/// Extension methods must be upper-case tokens; a backend may treat `get` as `GET`.
fn method_is_upper_token(m: &Method) -> bool {
    m.as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

/// The bearer token of the request, or why there is none usable.
pub fn credential(head: &request::Parts) -> Result<&[u8], Refusal> {
    let mut values = head.headers.get_all(AUTHORIZATION).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::InvalidRequest);
    }
    if head.uri.query().is_some_and(query_has_token) {
        return Err(Refusal::InvalidRequest);
    }
    let value = first.ok_or(Refusal::MissingCredentials)?;
    parse_bearer(value.as_bytes()).map_err(|_| Refusal::InvalidToken)
}

fn query_has_token(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        pair.split('=')
            .next()
            .is_some_and(|name| name == "access_token")
    })
}

/// The whole decision for one request head.
pub async fn admit<'a>(
    head: &'a request::Parts,
    policy: &Policy,
    auth: &Authenticator,
) -> Result<Admission<'a>, Rejection> {
    let path = sanity(head, policy)?;
    let token = credential(head)?;
    let hash = TokenHash::of(token);
    let principal = match auth.resolve(&hash, &policy.routes).await {
        Ok(p) => p,
        Err(AuthFailure::Unknown) => return Err(Refusal::InvalidToken.into()),
        Err(AuthFailure::Unavailable) => {
            return Err(Refusal::AuthUnavailable { retry_after_s: 1 }.into());
        }
    };
    authorize(head, path, principal, &policy.routes)
}

/// Route and grant checks for an authenticated principal.
pub fn authorize<'a>(
    head: &request::Parts,
    path: Cow<'a, str>,
    principal: Arc<Principal>,
    routes: &RouteTable,
) -> Result<Admission<'a>, Rejection> {
    let refuse = |refusal, principal| {
        Err(Rejection {
            refusal,
            principal: Some(principal),
        })
    };
    if !principal.valid_at(now_ms()) {
        return refuse(Refusal::InvalidToken, principal);
    }
    if principal.kind == UserType::Ui {
        return refuse(Refusal::ApiAccessDenied, principal);
    }
    let api = match routes.lookup(&head.method, &path) {
        RouteMatch::Api(api) => api,
        RouteMatch::NoApi => return refuse(Refusal::UnknownApi, principal),
    };
    if !principal.grants.contains(api) {
        return refuse(Refusal::ApiNotGranted, principal);
    }
    Ok(Admission {
        principal,
        api,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, auth: &[&str]) -> request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for a in auth {
            b = b.header(AUTHORIZATION, *a);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn credential_rows() {
        assert_eq!(
            credential(&head("GET", "/x", &[])),
            Err(Refusal::MissingCredentials)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Basic a"])),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Bearer "])),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Bearer a", "Bearer b"])),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            credential(&head("GET", "/x?a=1&access_token=t", &["Bearer a"])),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            credential(&head("GET", "/x?my_access_token=1", &["Bearer a"])),
            Ok(&b"a"[..])
        );
    }

    #[test]
    fn lower_case_methods_are_bad_requests() {
        assert!(method_is_upper_token(&Method::GET));
        assert!(!method_is_upper_token(
            &Method::from_bytes(b"get").expect("method")
        ));
    }
}
