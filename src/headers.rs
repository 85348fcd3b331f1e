//! Header hygiene: what is removed, replaced and added on the way to the backend and
//! back. Pure functions over `HeaderMap`; the forwarder calls them in a fixed order.

use std::net::IpAddr;

use bytes::BytesMut;
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

/// Removes `Connection`, every header it nominates and the fixed hop-by-hop set (the
/// backend's response on its way to the client).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, None);
}

/// Whether `name` is one of [`HOP_BY_HOP`] (not those a `Connection` names).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(removal(name, None), Some(Removal::Fixed(_)))
}

/// Removes from a request on its way to the backend, in one walk over the names:
/// the hop-by-hop headers as [`strip_hop_by_hop`]; method-override headers; every header
/// that starts with the identity prefix (names in a `HeaderMap` are already lower-case,
/// so any case sent is caught); and `Authorization` when `drop_authorization`.
///
/// Spellings with `_` for `-` go as well (`x_campaign_user_id`, `x_http_method_override`,
/// `x_forwarded_for`): CGI, WSGI, Rack and PHP backends map both `-` and `_` to `_`,
/// so such a header would reach them as the one the gateway controls.
///
/// The client's `X-Request-Id` goes too (the gateway writes its own after the map), and
/// so do its `X-Forwarded-For/-Proto/-Host` when `drop_forwarded` (a peer that is not a
/// trusted proxy: the gateway writes its own values). In the same walk, so the usual
/// request, which carries none of them, costs no hash removal for them.
///
/// Runs before the gateway adds anything, so a client cannot nominate the gateway's own
/// headers away.
pub fn strip_for_upstream(
    headers: &mut HeaderMap,
    identity_prefix: &str,
    drop_authorization: bool,
    drop_forwarded: bool,
) {
    let rules = RequestRules {
        prefix: identity_prefix.as_bytes(),
        drop_authorization,
        drop_forwarded,
    };
    strip(headers, Some(&rules));
}

/// What goes from a request beyond the hop-by-hop headers.
struct RequestRules<'a> {
    prefix: &'a [u8],
    drop_authorization: bool,
    drop_forwarded: bool,
}

/// Every name a fixed rule removes, matched by position: [`HOP_BY_HOP`] (`Connection`
/// first), then [`METHOD_OVERRIDE`], `Authorization`, `X-Request-Id` and [`FORWARDED`].
static FIXED: [HeaderName; 17] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    header::AUTHORIZATION,
    X_REQUEST_ID,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
];

/// Why a name goes.
#[derive(Debug, PartialEq)]
enum Removal {
    /// `FIXED[i]`.
    Fixed(usize),
    /// The identity prefix or a `_` spelling: a name only known at run time.
    Untrusted,
}

/// Whether and why `name` goes: hop-by-hop always, the rest with `rules` (requests).
fn removal(name: &HeaderName, rules: Option<&RequestRules<'_>>) -> Option<Removal> {
    let fixed = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "te" => 2,
        "trailer" => 3,
        "transfer-encoding" => 4,
        "upgrade" => 5,
        "proxy-connection" => 6,
        "proxy-authorization" => 7,
        "proxy-authenticate" => 8,
        _ if rules.is_none() => return None,
        "x-http-method-override" => 9,
        "x-http-method" => 10,
        "x-method-override" => 11,
        "authorization" if rules.is_some_and(|r| r.drop_authorization) => 12,
        "x-request-id" => 13,
        "x-forwarded-for" if rules.is_some_and(|r| r.drop_forwarded) => 14,
        "x-forwarded-proto" if rules.is_some_and(|r| r.drop_forwarded) => 15,
        "x-forwarded-host" if rules.is_some_and(|r| r.drop_forwarded) => 16,
        _ => {
            let prefix = rules.map_or(&b""[..], |r| r.prefix);
            return untrusted(name, prefix).then_some(Removal::Untrusted);
        }
    };
    Some(Removal::Fixed(fixed))
}

/// One walk over the names notes which fixed names are present (a bit each) and
/// whether any run-time one is; then each present fixed name is removed by its constant.
/// The common request has nothing to remove but `Authorization`: one walk and one hash
/// removal, no allocation.
fn strip(headers: &mut HeaderMap, rules: Option<&RequestRules<'_>>) {
    let (mut fixed, mut untrusted) = (0u32, false);
    for k in headers.keys() {
        match removal(k, rules) {
            Some(Removal::Fixed(i)) => fixed |= 1 << i,
            Some(Removal::Untrusted) => untrusted = true,
            None => {}
        }
    }
    if fixed & 1 != 0 {
        // Names the `Connection` header nominates, while it is still there to read: one
        // token at a time, since the map cannot change while its values are borrowed.
        // Hop-by-hop names (`connection` among them) go below anyway.
        let mut done = 0;
        while let Some((i, name)) = {
            let next = connection_tokens(headers)
                .enumerate()
                .skip(done)
                .find(|(_, t)| {
                    !NOT_NOMINATABLE
                        .iter()
                        .any(|n| t.eq_ignore_ascii_case(n.as_str()))
                        && !HOP_BY_HOP
                            .iter()
                            .any(|n| t.eq_ignore_ascii_case(n.as_str()))
                });
            next.map(|(i, t)| (i, Doomed::of(t)))
        } {
            done = i + 1;
            name.remove_from(headers);
        }
    }
    for (i, name) in FIXED.iter().enumerate() {
        if fixed & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if untrusted {
        // Rare (a client spoofing identity headers): one name per walk.
        while let Some(name) = headers
            .keys()
            .find(|k| removal(k, rules) == Some(Removal::Untrusted))
            .map(|k| Doomed::of(k.as_str()))
        {
            name.remove_from(headers);
        }
    }
}

/// The comma-separated tokens of every `Connection` value, trimmed. Values that are not
/// visible ASCII are ignored whole.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
}

/// A header name (or a token that may be one, in any case) to remove, copied out of the
/// map so the map can be changed: on the stack up to 64 bytes (no allocation), else on
/// the heap.
enum Doomed {
    Short([u8; 64], usize),
    Long(String),
}

impl Doomed {
    fn of(name: &str) -> Doomed {
        let bytes = name.as_bytes();
        let mut buf = [0u8; 64];
        match buf.get_mut(..bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                Doomed::Short(buf, bytes.len())
            }
            None => Doomed::Long(name.to_owned()),
        }
    }

    /// Removes every value of the name; nothing when the name is absent or not a valid
    /// header name.
    fn remove_from(self, headers: &mut HeaderMap) {
        match self {
            Doomed::Short(buf, len) => {
                // Copied from a `&str` whole, so still UTF-8.
                if let Ok(name) = std::str::from_utf8(&buf[..len]) {
                    headers.remove(name);
                }
            }
            Doomed::Long(name) => {
                headers.remove(name.as_str());
            }
        }
    }
}

/// `X-Forwarded-*` names: the gateway sets them, so their `_` spellings go too.
const FORWARDED: [HeaderName; 3] = [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];

/// A method-override header, a header with the identity prefix, or a `_` spelling of a
/// method-override or `X-Forwarded-*` name.
fn untrusted(name: &HeaderName, prefix: &[u8]) -> bool {
    let bytes = name.as_str().as_bytes();
    if dashed_starts_with(bytes, prefix) {
        return true;
    }
    if bytes.contains(&b'_') {
        METHOD_OVERRIDE.iter().chain(&FORWARDED).any(|m| {
            bytes.len() == m.as_str().len() && dashed_starts_with(bytes, m.as_str().as_bytes())
        })
    } else {
        METHOD_OVERRIDE.contains(name)
    }
}

/// Whether `name` starts with `prefix` when each `_` of `name` is read as `-`.
fn dashed_starts_with(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len()
        && name
            .iter()
            .zip(prefix)
            .all(|(&n, &p)| n == p || (n == b'_' && p == b'-'))
}

/// For a trusted proxy: appends the peer to `X-Forwarded-For` and sets
/// `X-Forwarded-Proto` and `-Host` when the proxy did not.
/// `peer` is the connection's peer address as a header value ([`ip_header_value`]),
/// computed once per connection.
///
/// For any other peer the client's values go ([`strip_for_upstream`]) and the forwarder
/// writes the gateway's own after the map (`server::handle`).
pub fn append_forwarded(headers: &mut HeaderMap, peer: &HeaderValue, proto: &'static str) {
    let peer_value = peer.clone();
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
///
/// Ids are carved from a per-thread slab of 128 ids (`ID_SLAB`): one allocation per that
/// many ids instead of one each, and a clone (the response carries the id too) is a
/// reference count instead of a second allocation.
pub fn new_request_id() -> HeaderValue {
    struct Ids {
        seed: [u8; 16],
        n: u64,
        slab: BytesMut,
    }
    thread_local! {
        static IDS: std::cell::RefCell<Ids> = std::cell::RefCell::new(Ids {
            seed: hex16(uuid::Uuid::new_v4().as_u64_pair().0),
            n: 0,
            slab: BytesMut::new(),
        });
    }
    let id = IDS.with_borrow_mut(|ids| {
        if ids.slab.capacity() < 32 {
            ids.slab = BytesMut::with_capacity(32 * ID_SLAB);
        }
        let n = ids.n;
        ids.n = n.wrapping_add(1);
        ids.slab.extend_from_slice(&ids.seed);
        ids.slab.extend_from_slice(&hex16(n));
        ids.slab.split().freeze()
    });
    HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0"))
}

/// Request ids per slab: 4 KiB, held until its last id is dropped.
const ID_SLAB: usize = 128;

fn hex16(v: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    write_hex(&mut out, v);
    out
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
        strip_for_upstream(&mut h, "x-campaign-", false, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-campaignx"]);
    }

    #[test]
    fn underscore_spellings_of_controlled_names_removed() {
        let mut h = map(&[
            ("x_campaign_user_id", "evil"),
            ("X-Campaign_Tenant", "evil"),
            ("x_http_method_override", "DELETE"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x_forwarded_host", "evil"),
            ("x_campaignx", "kept: other prefix"),
            ("x_forwarded_for_extra", "kept: another name"),
            ("x_custom", "kept"),
        ]);
        strip_for_upstream(&mut h, "x-campaign-", false, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec!["x_campaignx", "x_custom", "x_forwarded_for_extra"]
        );
    }

    #[test]
    fn fixed_names_are_recognised_by_position() {
        let (hop_by_hop, overrides) = (HOP_BY_HOP, METHOD_OVERRIDE);
        let (forwarded, request_id) = (FORWARDED, X_REQUEST_ID);
        let fixed: Vec<&HeaderName> = hop_by_hop
            .iter()
            .chain(&overrides)
            .chain([&header::AUTHORIZATION, &request_id])
            .chain(&forwarded)
            .collect();
        assert_eq!(fixed, FIXED.iter().collect::<Vec<_>>());
        let request = RequestRules {
            prefix: b"x-campaign-",
            drop_authorization: true,
            drop_forwarded: true,
        };
        for (i, name) in FIXED.iter().enumerate() {
            assert_eq!(
                removal(name, Some(&request)),
                Some(Removal::Fixed(i)),
                "{name}"
            );
            let hop_by_hop = (i < HOP_BY_HOP.len()).then_some(Removal::Fixed(i));
            assert_eq!(removal(name, None), hop_by_hop, "{name}");
        }
        let trusted_peer = RequestRules {
            prefix: b"x-campaign-",
            drop_authorization: false,
            drop_forwarded: false,
        };
        for name in [header::HOST, header::AUTHORIZATION, X_FORWARDED_FOR] {
            assert_eq!(removal(&name, Some(&trusted_peer)), None, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_names_are_exactly_the_fixed_set() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::HOST,
            HeaderName::from_static("x-http-method-override"),
            HeaderName::from_static("connection-x"),
            HeaderName::from_static("x-connection"),
        ] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn authorization_dropped_only_when_asked() {
        let mut h = map(&[("authorization", "Bearer x"), ("connection", "close")]);
        strip_for_upstream(&mut h, "x-campaign-", false, false);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["authorization"]
        );
        strip_for_upstream(&mut h, "x-campaign-", true, false);
        assert!(h.is_empty());
    }

    #[test]
    fn long_names_are_removed_too() {
        let long = format!("x-campaign-{}", "a".repeat(100));
        let mut h = map(&[
            (long.as_str(), "evil"),
            (
                "connection",
                "x-long-nominated-header-name-that-is-well-over-sixty-four-bytes-long",
            ),
            (
                "x-long-nominated-header-name-that-is-well-over-sixty-four-bytes-long",
                "1",
            ),
            ("x-keep", "1"),
        ]);
        strip_for_upstream(&mut h, "x-campaign-", false, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }

    /// The removals as they were before the one-pass walk: the behaviour to keep.
    mod reference {
        use super::super::*;

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

        pub fn strip_untrusted(headers: &mut HeaderMap, identity_prefix: &str) {
            for name in &METHOD_OVERRIDE {
                headers.remove(name);
            }
            let prefix = identity_prefix.as_bytes();
            let untrusted = |k: &HeaderName| {
                let name = k.as_str().as_bytes();
                if dashed_starts_with(name, prefix) {
                    return true;
                }
                name.contains(&b'_')
                    && METHOD_OVERRIDE.iter().chain(&FORWARDED).any(|m| {
                        name.len() == m.as_str().len()
                            && dashed_starts_with(name, m.as_str().as_bytes())
                    })
            };
            let doomed: Vec<HeaderName> =
                headers.keys().filter(|k| untrusted(k)).cloned().collect();
            for name in doomed {
                headers.remove(name);
            }
        }
    }

    mod one_pass_matches_reference {
        use super::*;
        use proptest::prelude::*;

        /// Names that matter to the rules, their spellings, and bystanders.
        const NAMES: &[&str] = &[
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "proxy-authorization",
            "proxy-authenticate",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x_http_method_override",
            "x_http-method",
            "x_method_override",
            "x-campaign-user-id",
            "x-campaign-",
            "x_campaign_tenant",
            "x-campaign_api",
            "x-campaignx",
            "x_campaignx",
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded_proto",
            "x_forwarded_host",
            "x_forwarded_for_extra",
            "host",
            "content-length",
            "authorization",
            "x-request-id",
            "accept",
            "x-custom",
            "x_custom",
            "close",
            "cookie",
        ];

        fn header_map() -> impl Strategy<Value = HeaderMap> {
            let name = prop::sample::select(NAMES);
            let token = prop_oneof![
                prop::sample::select(NAMES).prop_map(str::to_owned),
                prop::sample::select(NAMES).prop_map(str::to_ascii_uppercase),
                Just(String::new()),
                Just("  x-custom ".to_owned()),
                Just("bad token".to_owned()),
                Just("x-\u{e9}".to_owned()),
            ];
            let connection = prop::collection::vec(token, 0..4).prop_map(|t| t.join(","));
            let entry = prop_oneof![
                3 => name.prop_map(|n| (n.to_owned(), "v".to_owned())),
                1 => connection.prop_map(|v| ("connection".to_owned(), v)),
            ];
            prop::collection::vec(entry, 0..12).prop_map(|entries| {
                let mut h = HeaderMap::new();
                for (k, v) in entries {
                    let value = HeaderValue::from_bytes(v.as_bytes())
                        .unwrap_or(HeaderValue::from_static("x"));
                    h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), value);
                }
                h
            })
        }

        /// Every name with its values in order. The order between different names is
        /// not significant in HTTP (RFC 9110, 5.3) and follows from the order of the
        /// removals, so it is not compared.
        fn listed(h: &HeaderMap) -> Vec<(String, Vec<Vec<u8>>)> {
            let mut out: Vec<(String, Vec<Vec<u8>>)> = h
                .keys()
                .map(|k| {
                    let values = h.get_all(k).iter().map(|v| v.as_bytes().to_vec());
                    (k.to_string(), values.collect())
                })
                .collect();
            out.sort();
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn response_side(h in header_map()) {
                let (mut ours, mut theirs) = (h.clone(), h);
                strip_hop_by_hop(&mut ours);
                reference::strip_hop_by_hop(&mut theirs);
                prop_assert_eq!(listed(&ours), listed(&theirs));
            }

            #[test]
            fn request_side(h in header_map(), drop_authorization: bool, drop_forwarded: bool) {
                let (mut ours, mut theirs) = (h.clone(), h);
                strip_for_upstream(&mut ours, "x-campaign-", drop_authorization, drop_forwarded);
                reference::strip_hop_by_hop(&mut theirs);
                reference::strip_untrusted(&mut theirs, "x-campaign-");
                if drop_authorization {
                    theirs.remove(header::AUTHORIZATION);
                }
                theirs.remove(X_REQUEST_ID);
                if drop_forwarded {
                    for name in &FORWARDED {
                        theirs.remove(name);
                    }
                }
                prop_assert_eq!(listed(&ours), listed(&theirs));
            }
        }
    }

    /// The replacement values for an untrusted peer are asserted end to end
    /// (`hostile_headers::forwarded_headers_from_an_untrusted_peer_are_replaced`).
    #[test]
    fn forwarded_removed_for_untrusted_appended_for_trusted() {
        let peer: IpAddr = "10.0.0.9".parse().expect("ip");
        let client = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("x-request-id", "theirs"),
            ("host", "api.example"),
        ];
        let mut h = map(&client);
        strip_for_upstream(&mut h, "x-campaign-", true, true);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["host"]
        );
        // A trusted proxy's values stay (appended to below); the request id never does.
        let mut h = map(&client);
        strip_for_upstream(&mut h, "x-campaign-", true, false);
        let mut names = h.keys().map(HeaderName::as_str).collect::<Vec<_>>();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "host",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto"
            ]
        );

        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("host", "api.example"),
        ]);
        append_forwarded(&mut h, &ip_header_value(peer), "http");
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example");
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

    #[test]
    fn new_request_ids_are_unique_hex_across_slabs() {
        let ids: Vec<HeaderValue> = (0..3 * ID_SLAB + 5).map(|_| new_request_id()).collect();
        let seed = &ids[0].as_bytes()[..16];
        for (i, id) in ids.iter().enumerate() {
            let b = id.as_bytes();
            assert_eq!(b.len(), 32, "{id:?}");
            assert!(b.iter().all(u8::is_ascii_hexdigit), "{id:?}");
            assert_eq!(&b[..16], seed, "one random half per thread");
            if let Some(next) = ids.get(i + 1) {
                let n = |v: &HeaderValue| u64::from_str_radix(&v.to_str().ok()?[16..], 16).ok();
                assert_eq!(n(next), n(id).map(|n| n + 1), "a counter half");
            }
        }
    }
}
