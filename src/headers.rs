//! Header hygiene: what is removed, replaced and added on the way to the backend and
//! back. Pure functions over `HeaderMap`; the forwarder calls them in a fixed order.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one hop and never cross the gateway, in either direction.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Headers that ask a backend to treat the request as another method.
pub const METHOD_OVERRIDE: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Headers a `Connection` list may not remove: they carry the request's framing and
/// target, which the gateway itself decides.
const NOT_NOMINATABLE: [HeaderName; 2] = [header::HOST, header::CONTENT_LENGTH];

/// The identity headers the gateway adds; names derive from the configured prefix.
#[derive(Debug, Clone)]
pub struct IdentityNames {
    pub prefix: String,
    pub user_id: HeaderName,
    pub tenant: HeaderName,
    pub api: HeaderName,
    pub key_id: HeaderName,
}

impl IdentityNames {
    /// `prefix` is lower-case and valid as the start of a header name (checked by config).
    pub fn new(prefix: &str) -> Result<IdentityNames, http::header::InvalidHeaderName> {
        let name = |suffix: &str| HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes());
        Ok(IdentityNames {
            prefix: prefix.to_string(),
            user_id: name("user-id")?,
            tenant: name("tenant")?,
            api: name("api")?,
            key_id: name("key-id")?,
        })
    }
}

/// Removes `Connection` and every header it nominates, then the fixed hop-by-hop set.
/// Runs before the gateway adds anything, so a client cannot nominate the gateway's own
/// headers away.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let mut nominated: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(s) = value.to_str() else { continue };
            for token in s.split(',') {
                if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes())
                    && !NOT_NOMINATABLE.contains(&name)
                {
                    nominated.push(name);
                }
            }
        }
        for name in nominated {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes method-override headers and every header that starts with the identity
/// prefix (names in a `HeaderMap` are already lower-case, so any case sent is caught).
pub fn strip_untrusted(headers: &mut HeaderMap, identity_prefix: &str) {
    for name in &METHOD_OVERRIDE {
        headers.remove(name);
    }
    let prefix = identity_prefix.as_bytes();
    if headers
        .keys()
        .any(|k| k.as_str().as_bytes().starts_with(prefix))
    {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().as_bytes().starts_with(prefix))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`: replaced for an untrusted peer, appended to for
/// a trusted proxy.
/// `peer` is the connection's peer address as a header value ([`ip_header_value`]),
/// computed once per connection.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    trusted: bool,
    proto: &'static str,
) {
    let peer_value = peer.clone();
    if trusted {
        let combined = {
            let existing: Vec<&[u8]> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            if existing.is_empty() {
                None
            } else {
                let mut v = existing.join(&b", "[..]);
                v.extend_from_slice(b", ");
                v.extend_from_slice(peer_value.as_bytes());
                HeaderValue::from_bytes(&v).ok()
            }
        };
        headers.insert(X_FORWARDED_FOR, combined.unwrap_or(peer_value));
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !headers.contains_key(&X_FORWARDED_HOST)
            && let Some(host) = headers.get(header::HOST).cloned()
        {
            headers.insert(X_FORWARDED_HOST, host);
        }
    } else {
        headers.insert(X_FORWARDED_FOR, peer_value);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// The address a request comes from: the peer, or, when the peer is a trusted proxy,
/// the last `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&HeaderValue> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
    for value in values.iter().rev() {
        let Ok(s) = value.to_str() else { return client };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) if is_trusted(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

/// An address as an `X-Forwarded-For` entry (IPv4-mapped IPv6 shown as IPv4).
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // An IP address always formats as visible ASCII.
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// The request id: the client's if it is sane (visible ASCII, 1..=128 bytes), else a
/// new one. Exactly one `x-request-id` is accepted; several are treated as none.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|&c| (0x21..=0x7e).contains(&c)) {
            return v.clone();
        }
    }
    new_request_id()
}

/// A new request id: 32 hex digits, a random half drawn once per thread and a
/// per-thread counter half, so ids are unique across threads and replicas without
/// coordination and without a shared counter on the request path.
pub fn new_request_id() -> HeaderValue {
    thread_local! {
        static STATE: std::cell::Cell<(u64, u64)> = std::cell::Cell::new((uuid::Uuid::new_v4().as_u64_pair().0, 0));
    }
    let (seed, n) = STATE.with(|s| {
        let (seed, n) = s.get();
        s.set((seed, n.wrapping_add(1)));
        (seed, n)
    });
    let mut buf = [0u8; 32];
    write_hex(&mut buf[..16], seed);
    write_hex(&mut buf[16..], n);
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

fn write_hex(out: &mut [u8], v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        let shift = 60 - 4 * i;
        *b = HEX[((v >> shift) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn connection_nominated_and_hop_by_hop_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Drop, host"),
            ("connection", "x-also"),
            ("x-drop", "1"),
            ("x-also", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("host", "example"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["host", "x-keep"]);
    }

    #[test]
    fn identity_prefix_and_overrides_removed_in_any_case() {
        let mut h = map(&[
            ("X-Campaign-User-Id", "evil"),
            ("x-CAMPAIGN-tenant", "evil"),
            ("x-http-method-override", "DELETE"),
            ("X-Method-Override", "DELETE"),
            ("x-campaignx", "kept: other prefix"),
        ]);
        strip_untrusted(&mut h, "x-campaign-");
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-campaignx"]);
    }

    #[test]
    fn forwarded_replaced_for_untrusted_appended_for_trusted() {
        let peer: IpAddr = "10.0.0.9".parse().expect("ip");
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("host", "api.example")]);
        set_forwarded(&mut h, &ip_header_value(peer), false, "http");
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example");

        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ]);
        set_forwarded(&mut h, &ip_header_value(peer), true, "http");
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.9");
    }

    #[test]
    fn request_id_kept_only_when_sane() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h), "abc-123");
        for bad in ["has space", &"x".repeat(129)] {
            let h = map(&[("x-request-id", bad)]);
            assert_eq!(request_id(&h).len(), 32, "{bad}");
        }
        let h = map(&[("x-request-id", "a"), ("x-request-id", "b")]);
        assert_eq!(request_id(&h).len(), 32);
        assert_ne!(new_request_id(), new_request_id());
    }
}
