//! The rows of DESIGN.md's status table, and the one assertion that checks a response
//! against a row: status, `content-type`, the JSON body's `error`, `code`,
//! `description` and `request_id`, and `WWW-Authenticate` (exact, or absent).

use super::client::Resp;

/// One row of the status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: &'static str,
    pub code: u64,
    /// `None`: the response must not carry `WWW-Authenticate`.
    pub www_authenticate: Option<&'static str>,
}

impl Refusal {
    /// The same row with another HTTP status (`[compat] campaign_statuses`).
    pub const fn with_status(self, status: u16) -> Refusal {
        Refusal { status, ..self }
    }
}

pub const MISSING_CREDENTIALS: Refusal = Refusal {
    status: 401,
    error: "missing_credentials",
    code: 498,
    www_authenticate: Some(r#"Bearer realm="campaign""#),
};

pub const INVALID_TOKEN: Refusal = Refusal {
    status: 401,
    error: "invalid_token",
    code: 498,
    www_authenticate: Some(r#"Bearer realm="campaign", error="invalid_token""#),
};

pub const INVALID_REQUEST: Refusal = Refusal {
    status: 400,
    error: "invalid_request",
    code: 400,
    www_authenticate: Some(r#"Bearer realm="campaign", error="invalid_request""#),
};

pub const API_ACCESS_DENIED: Refusal = Refusal {
    status: 403,
    error: "api_access_denied",
    code: 430,
    www_authenticate: Some(r#"Bearer realm="campaign", error="insufficient_scope""#),
};

pub const UNKNOWN_API: Refusal = Refusal {
    status: 404,
    error: "unknown_api",
    code: 404,
    www_authenticate: None,
};

pub const API_NOT_GRANTED: Refusal = Refusal {
    status: 403,
    error: "api_not_granted",
    code: 430,
    www_authenticate: Some(r#"Bearer realm="campaign", error="insufficient_scope""#),
};

pub const INVALID_PATH: Refusal = Refusal {
    status: 400,
    error: "invalid_path",
    code: 400,
    www_authenticate: None,
};

pub const METHOD_NOT_ALLOWED: Refusal = Refusal {
    status: 405,
    error: "method_not_allowed",
    code: 405,
    www_authenticate: None,
};

pub const PAYLOAD_TOO_LARGE: Refusal = Refusal {
    status: 413,
    error: "payload_too_large",
    code: 413,
    www_authenticate: None,
};

pub const UPSTREAM_UNAVAILABLE: Refusal = Refusal {
    status: 502,
    error: "upstream_unavailable",
    code: 502,
    www_authenticate: None,
};

pub const UPSTREAM_TIMEOUT: Refusal = Refusal {
    status: 504,
    error: "upstream_timeout",
    code: 504,
    www_authenticate: None,
};

/// Panics unless `resp` is exactly the refusal `expected`. `case` names the request in
/// the failure message.
#[track_caller]
pub fn assert_refusal(resp: &Resp, expected: Refusal, case: &str) {
    let shown = || {
        format!(
            "{case}: got {} {:?} {}",
            resp.status,
            resp.headers,
            resp.text()
        )
    };
    assert_eq!(resp.status.as_u16(), expected.status, "status; {}", shown());
    let content_type = resp.header("content-type").unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    assert!(
        media_type.eq_ignore_ascii_case("application/json"),
        "content-type; {}",
        shown()
    );
    assert_eq!(
        resp.header("www-authenticate"),
        expected.www_authenticate,
        "WWW-Authenticate; {}",
        shown()
    );
    let Some(body) = resp.json() else {
        panic!("body is not JSON; {}", shown());
    };
    assert_eq!(
        body["error"].as_str(),
        Some(expected.error),
        "error; {}",
        shown()
    );
    assert_eq!(
        body["code"].as_u64(),
        Some(expected.code),
        "code; {}",
        shown()
    );
    assert!(
        body["description"].as_str().is_some_and(|d| !d.is_empty()),
        "description; {}",
        shown()
    );
    assert!(
        body["request_id"].as_str().is_some_and(|d| !d.is_empty()),
        "request_id; {}",
        shown()
    );
}

/// Framing the gateway refuses (its guard ahead of hyper, or its own checks after).
pub const BAD_REQUEST: Refusal = Refusal {
    status: 400,
    error: "bad_request",
    code: 400,
    www_authenticate: None,
};

pub const URI_TOO_LONG: Refusal = Refusal {
    status: 414,
    error: "uri_too_long",
    code: 414,
    www_authenticate: None,
};

pub const HEADERS_TOO_LARGE: Refusal = Refusal {
    status: 431,
    error: "headers_too_large",
    code: 431,
    www_authenticate: None,
};

pub const REQUEST_TIMEOUT: Refusal = Refusal {
    status: 408,
    error: "request_timeout",
    code: 408,
    www_authenticate: None,
};

pub const TOO_MANY_REQUESTS: Refusal = Refusal {
    status: 429,
    error: "too_many_requests",
    code: 429,
    www_authenticate: None,
};
