//! Refusals: every reason the gateway answers a request itself, and the one place that
//! turns a reason into a status, a Campaign `code`, a JSON body and `WWW-Authenticate`.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::forward::GateBody;
use crate::headers::X_REQUEST_ID;

/// Why the gateway refused a request. Client faults are 4xx, backend faults 502/504,
/// store faults 503; a store fault is never reported as 401/403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    MissingCredentials,
    /// Wrong scheme, empty/malformed/oversize token, or a token that does not
    /// authenticate (unknown, past its grace deadline, disabled or deleted user).
    InvalidToken,
    /// More than one `Authorization` header, or a token in the query as well.
    InvalidRequest,
    /// The token resolves to a `ui` user.
    ApiAccessDenied,
    /// Authenticated, but method + path match no API.
    UnknownApi,
    /// Authenticated, API matched, not granted.
    ApiNotGranted,
    /// The path is not canonical.
    InvalidPath,
    /// `CONNECT`, `TRACE`, or a method no route names.
    MethodNotAllowed,
    /// Malformed request framing (beyond what hyper itself refuses).
    BadRequest,
    /// Request target longer than the limit.
    UriTooLong,
    /// The client stopped sending its body.
    RequestTimeout,
    /// Request header block larger than the limit.
    HeadersTooLarge,
    /// Too many failed authentications or token requests.
    TooManyRequests { retry_after_s: u32 },
    /// Body over `[server] max_body_bytes`.
    PayloadTooLarge,
    /// Store unreachable and the answer is not cached.
    AuthUnavailable { retry_after_s: u32 },
    /// The backend refused or reset the connection.
    UpstreamUnavailable,
    /// The backend did not answer in time.
    UpstreamTimeout,
    /// A fault of the gateway itself.
    Internal,
}

/// The fixed parts of a refusal's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalSpec {
    pub status: StatusCode,
    pub error: &'static str,
    /// Campaign's numeric code, which existing clients parse.
    pub code: u16,
    pub description: &'static str,
    pub www_authenticate: Option<&'static str>,
}

const REALM: &str = r#"Bearer realm="campaign""#;
const REALM_INVALID_TOKEN: &str = r#"Bearer realm="campaign", error="invalid_token""#;
const REALM_INVALID_REQUEST: &str = r#"Bearer realm="campaign", error="invalid_request""#;
const REALM_SCOPE: &str = r#"Bearer realm="campaign", error="insufficient_scope""#;

impl Refusal {
    /// The status table of DESIGN.md. `campaign_statuses` switches the two 403s to 401.
    pub fn spec(self, campaign_statuses: bool) -> RefusalSpec {
        let (status, error, code, description, www) = match self {
            Refusal::MissingCredentials => (
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                498,
                "Missing credentials: an Authorization: Bearer header is required",
                Some(REALM),
            ),
            Refusal::InvalidToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                498,
                "Invalid token or access token expired",
                Some(REALM_INVALID_TOKEN),
            ),
            Refusal::InvalidRequest => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                400,
                "Invalid request: send exactly one bearer credential, in the Authorization header",
                Some(REALM_INVALID_REQUEST),
            ),
            Refusal::ApiAccessDenied => (
                StatusCode::FORBIDDEN,
                "api_access_denied",
                430,
                "This user cannot call APIs",
                Some(REALM_SCOPE),
            ),
            Refusal::UnknownApi => (
                StatusCode::NOT_FOUND,
                "unknown_api",
                404,
                "No API matches this method and path",
                None,
            ),
            Refusal::ApiNotGranted => (
                StatusCode::FORBIDDEN,
                "api_not_granted",
                430,
                "This API user was not granted this API",
                Some(REALM_SCOPE),
            ),
            Refusal::InvalidPath => (
                StatusCode::BAD_REQUEST,
                "invalid_path",
                400,
                "The request path is not canonical",
                None,
            ),
            Refusal::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                405,
                "Method not allowed",
                None,
            ),
            Refusal::BadRequest => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                400,
                "Malformed request",
                None,
            ),
            Refusal::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                414,
                "Request target too long",
                None,
            ),
            Refusal::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                408,
                "The request body did not arrive in time",
                None,
            ),
            Refusal::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                431,
                "Request headers too large",
                None,
            ),
            Refusal::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                429,
                "Too many requests; retry later",
                None,
            ),
            Refusal::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                413,
                "Request body too large",
                None,
            ),
            Refusal::AuthUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                503,
                "Authentication is temporarily unavailable; retry later",
                None,
            ),
            Refusal::UpstreamUnavailable => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                502,
                "The backend is unavailable",
                None,
            ),
            Refusal::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                504,
                "The backend did not answer in time",
                None,
            ),
            Refusal::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                500,
                "Internal error",
                None,
            ),
        };
        let status = match self {
            Refusal::ApiNotGranted | Refusal::ApiAccessDenied if campaign_statuses => {
                StatusCode::UNAUTHORIZED
            }
            _ => status,
        };
        RefusalSpec {
            status,
            error,
            code,
            description,
            www_authenticate: www,
        }
    }

    fn retry_after(self) -> Option<u32> {
        match self {
            Refusal::TooManyRequests { retry_after_s }
            | Refusal::AuthUnavailable { retry_after_s } => Some(retry_after_s),
            _ => None,
        }
    }

    /// Whether the connection should be closed after this answer: when the request's
    /// framing cannot be trusted, or the rest of its body is not worth reading.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Refusal::BadRequest
                | Refusal::RequestTimeout
                | Refusal::UriTooLong
                | Refusal::HeadersTooLarge
                | Refusal::PayloadTooLarge
        )
    }

    /// The complete response: JSON body, content type, `WWW-Authenticate`,
    /// `Retry-After` and `x-request-id`.
    pub fn response(self, request_id: &HeaderValue, campaign_statuses: bool) -> Response<GateBody> {
        let spec = self.spec(campaign_statuses);
        let body = serde_json::json!({
            "code": spec.code,
            "description": spec.description,
            "error": spec.error,
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(GateBody::full(Bytes::from(body.to_string())));
        *resp.status_mut() = spec.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(www) = spec.www_authenticate {
            h.insert(WWW_AUTHENTICATE, HeaderValue::from_static(www));
        }
        if let Some(s) = self.retry_after() {
            h.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        h.insert(X_REQUEST_ID, request_id.clone());
        if self.closes_connection() {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the whole status table of DESIGN.md.
    #[test]
    fn status_table() {
        let rows: &[(Refusal, u16, &str, u16, Option<&str>)] = &[
            (
                Refusal::MissingCredentials,
                401,
                "missing_credentials",
                498,
                Some(REALM),
            ),
            (
                Refusal::InvalidToken,
                401,
                "invalid_token",
                498,
                Some(REALM_INVALID_TOKEN),
            ),
            (
                Refusal::InvalidRequest,
                400,
                "invalid_request",
                400,
                Some(REALM_INVALID_REQUEST),
            ),
            (
                Refusal::ApiAccessDenied,
                403,
                "api_access_denied",
                430,
                Some(REALM_SCOPE),
            ),
            (Refusal::UnknownApi, 404, "unknown_api", 404, None),
            (
                Refusal::ApiNotGranted,
                403,
                "api_not_granted",
                430,
                Some(REALM_SCOPE),
            ),
            (Refusal::InvalidPath, 400, "invalid_path", 400, None),
            (
                Refusal::MethodNotAllowed,
                405,
                "method_not_allowed",
                405,
                None,
            ),
            (
                Refusal::TooManyRequests { retry_after_s: 1 },
                429,
                "too_many_requests",
                429,
                None,
            ),
            (
                Refusal::PayloadTooLarge,
                413,
                "payload_too_large",
                413,
                None,
            ),
            (
                Refusal::AuthUnavailable { retry_after_s: 1 },
                503,
                "auth_unavailable",
                503,
                None,
            ),
            (
                Refusal::UpstreamUnavailable,
                502,
                "upstream_unavailable",
                502,
                None,
            ),
            (Refusal::UpstreamTimeout, 504, "upstream_timeout", 504, None),
        ];
        for &(r, status, error, code, www) in rows {
            let s = r.spec(false);
            assert_eq!(s.status.as_u16(), status, "{r:?}");
            assert_eq!(s.error, error, "{r:?}");
            assert_eq!(s.code, code, "{r:?}");
            assert_eq!(s.www_authenticate, www, "{r:?}");
        }
        assert_eq!(
            Refusal::ApiNotGranted.spec(true).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Refusal::ApiAccessDenied.spec(true).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(Refusal::UnknownApi.spec(true).status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn body_is_json_with_request_id_and_retry_after() {
        let resp = Refusal::AuthUnavailable { retry_after_s: 2 }
            .response(&HeaderValue::from_static("rid-1"), false);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        assert_eq!(resp.headers()[X_REQUEST_ID], "rid-1");
    }
}
