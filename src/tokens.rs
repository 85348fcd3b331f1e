//! The deprecated access-token flow: `POST [tokens] path` with HTTP Basic
//! `<API user id>:<secret key>` returns a short-lived bearer token for the same grants.
//!
//! Every response of the flow carries `Deprecation` (RFC 9745) and a `Link` to the
//! migration note, and each exchange is counted, so operators can see when it is safe to
//! turn the flow off (`[tokens] enabled = false`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LINK};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, request};

use crate::auth::{Authenticator, now_ms};
use crate::errors::Refusal;
use crate::forward::GateBody;
use crate::pipeline::{Policy, check_throttle, failed_authentication, resolve_counted};
use crate::store::records::generate_secret_key;
use crate::store::{StoreError, TokenHash, UserType};

const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");

/// The flow was deprecated on 2025-01-01T00:00:00Z (RFC 9745 structured date).
pub const DEPRECATED_SINCE: &str = "@1735689600";

/// Whether a request is for the token endpoint (when the flow is enabled).
pub fn is_token_request(head: &request::Parts, path: &str, policy: &Policy) -> bool {
    policy.config.tokens.enabled && head.method == Method::POST && path == policy.config.tokens.path
}

/// Adds the headers every response of the flow carries.
pub fn mark_deprecated(resp: &mut Response<GateBody>, policy: &Policy) {
    let h = resp.headers_mut();
    h.insert(DEPRECATION, HeaderValue::from_static(DEPRECATED_SINCE));
    if let Ok(link) = HeaderValue::from_str(&format!(
        "<{}>; rel=\"deprecation\"; type=\"text/html\"",
        policy.config.tokens.migration_url
    )) {
        h.insert(LINK, link);
    }
}

/// Exchanges Basic credentials for an access token. Refusals use the status table.
pub async fn exchange(
    head: &request::Parts,
    policy: &Policy,
    auth: &Authenticator,
    client: std::net::IpAddr,
    request_id: &HeaderValue,
) -> Result<Response<GateBody>, Refusal> {
    let now = now_ms();
    check_throttle(auth, client, now)?;
    let mut values = head.headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Refusal::MissingCredentials)?;
    if values.next().is_some() {
        return Err(Refusal::InvalidRequest);
    }
    let Some((user_id, secret)) = parse_basic(value.as_bytes()) else {
        return Err(failed_authentication(auth, client, now));
    };
    let parent = TokenHash::of(secret.as_bytes());
    let principal = resolve_counted(auth, &parent, &policy.routes, client, now).await?;
    if principal.user_id() != user_id || principal.access_token() || !principal.valid_at(now) {
        return Err(failed_authentication(auth, client, now));
    }
    if principal.user.kind == UserType::Ui {
        return Err(Refusal::ApiAccessDenied);
    }
    let (token, _) = generate_secret_key();
    let lifetime = policy.config.tokens.lifetime;
    let issued = auth
        .store()
        .issue_access_token(&user_id, parent, TokenHash::of(token.as_bytes()), lifetime)
        .await;
    match issued {
        Ok(record) => {
            let expires_in = record.expires_ms.saturating_sub(now) / 1000;
            let body = serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires_in,
            });
            let mut resp = Response::new(GateBody::full(Bytes::from(body.to_string())));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(crate::headers::X_REQUEST_ID, request_id.clone());
            *resp.status_mut() = StatusCode::OK;
            Ok(resp)
        }
        Err(StoreError::RateLimited { retry_after_ms }) => Err(Refusal::TooManyRequests {
            retry_after_s: u32::try_from(retry_after_ms.div_ceil(1000)).unwrap_or(u32::MAX),
        }),
        Err(StoreError::Refused(_)) => Err(Refusal::InvalidToken),
        Err(StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
            Err(Refusal::AuthUnavailable { retry_after_s: 1 })
        }
    }
}

/// `Basic base64(user:secret)` -> (user, secret). The user id cannot contain `:`.
fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    const SCHEME: &[u8] = b"basic ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let decoded = STANDARD.decode(value[SCHEME.len()..].trim_ascii()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, secret) = text.split_once(':')?;
    (!user.is_empty() && !secret.is_empty()).then(|| (user.to_string(), secret.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let v = format!("Basic {}", STANDARD.encode("alice:s3cr=t"));
        assert_eq!(
            parse_basic(v.as_bytes()),
            Some(("alice".into(), "s3cr=t".into()))
        );
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(parse_basic(b"Bearer abc"), None);
        let v = format!("basic {}", STANDARD.encode(":x"));
        assert_eq!(parse_basic(v.as_bytes()), None);
    }
}
