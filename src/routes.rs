//! Route table and API ids: which configured API a method and canonical path belong to.
//!
//! The table is built once from the `[[apis]]` config and is immutable afterwards. Each
//! API gets an [`ApiId`], its index in config order; grants are compiled against the
//! same table into an [`ApiSet`] bitset.
//!
//! Route syntax: `"<METHOD or *> <path template>"`, one space between the two. METHOD is
//! an upper-case RFC 7230 token other than `CONNECT` and `TRACE`. The template is a
//! canonical path (see [`crate::path`]) in which a whole segment may be `{name}` (one
//! non-empty segment) or, as the last segment, `{*name}` (the non-empty rest of the
//! path, slashes included). A parameter that shares a segment with literal text
//! (`/v{version}`) is refused: it would make two readings of one segment possible.
//!
//! Lookup tries the router of the request's method, then for `HEAD` the `GET` router,
//! then the `*` router. In the default (case-sensitive) mode our lookup code does not
//! allocate; `matchit` itself allocates only for a match with more than three parameters
//! or when it has to backtrack from a literal segment to a parameter at the same
//! position (`/users/me` beside `/users/{id}`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use http::Method;
use matchit::Router;

use crate::path::{self, PathError};

/// The id of a configured API: its index in config order. Only meaningful with the
/// [`RouteTable`] that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiId(pub u16);

/// Set of API ids (a grant set compiled to a bitset). Checking membership does not
/// allocate.
///
/// Ids below [`ApiSet::INLINE`] live in the value itself (16 bytes in all; every cached
/// user holds one, so no allocation for the usual route table); a set with a larger
/// member moves to a boxed bitset as long as its largest member needs. Neither form ever
/// shrinks (there is no removal), so two sets with the same members are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSet {
    Inline(u64),
    Boxed(Box<[u64]>),
}

impl Default for ApiSet {
    fn default() -> Self {
        ApiSet::Inline(0)
    }
}

impl ApiSet {
    /// Ids below this are held without an allocation.
    pub const INLINE: u16 = 64;

    /// Whether `id` is in the set.
    pub fn contains(&self, id: ApiId) -> bool {
        let (word, bit) = Self::position(id);
        self.words().get(word).is_some_and(|w| w & bit != 0)
    }

    /// Adds `id` to the set.
    pub fn insert(&mut self, id: ApiId) {
        let (word, bit) = Self::position(id);
        if word >= self.words().len() {
            let mut words = self.words().to_vec();
            words.resize(word + 1, 0);
            *self = ApiSet::Boxed(words.into_boxed_slice());
        }
        let words = match self {
            ApiSet::Inline(w) => std::slice::from_mut(w),
            ApiSet::Boxed(w) => &mut w[..],
        };
        if let Some(w) = words.get_mut(word) {
            *w |= bit;
        }
    }

    /// Whether the set has no member.
    pub fn is_empty(&self) -> bool {
        self.words().iter().all(|w| *w == 0)
    }

    fn words(&self) -> &[u64] {
        match self {
            ApiSet::Inline(w) => std::slice::from_ref(w),
            ApiSet::Boxed(w) => w,
        }
    }

    fn position(id: ApiId) -> (usize, u64) {
        (usize::from(id.0 / 64), 1 << (id.0 % 64))
    }
}

/// The outcome of a route lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    /// The request belongs to this API.
    Api(ApiId),
    /// No route matches: deny by default.
    NoApi,
}

/// One problem in the `[[apis]]` config, located by API and route.
///
/// `route` is empty when the problem is with the API itself (its name, or no routes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("apis[{api_index}] ({api}): route {route:?}: {reason}")]
pub struct RouteError {
    pub api_index: usize,
    pub api: String,
    pub route: String,
    pub reason: String,
}

/// Maps a method and canonical path to the API it belongs to. Immutable once built.
#[derive(Debug, Clone)]
pub struct RouteTable {
    names: Box<[Box<str>]>,
    ids: HashMap<Box<str>, ApiId>,
    /// One router per method that some route names, in first-seen order.
    by_method: Vec<(Method, Router<ApiId>)>,
    /// Routes whose method is `*`.
    any_method: Option<Router<ApiId>>,
    case_insensitive: bool,
}

impl RouteTable {
    /// Builds the table from `apis`: (name, routes) in config order; ApiId = index in that
    /// order.
    ///
    /// Every problem is reported, not only the first: bad syntax or method, a template
    /// that is not canonical, a duplicate or empty API name, an API without routes, the
    /// same (method, template) twice, and routes that `matchit` finds in conflict.
    /// With `case_insensitive`, the literal parts of templates are lower-cased (and so
    /// compared for duplicates).
    pub fn build<'a>(
        apis: impl IntoIterator<Item = (&'a str, &'a [String])>,
        case_insensitive: bool,
    ) -> Result<RouteTable, Vec<RouteError>> {
        let mut errors = Vec::new();
        let mut names = Vec::new();
        let mut ids = HashMap::new();
        let mut by_method: Vec<(Method, Router<ApiId>)> = Vec::new();
        let mut any_method = None;
        // (method, template as inserted) -> index of the API that declared it first.
        let mut seen: HashMap<(Option<Method>, String), usize> = HashMap::new();

        for (api_index, (name, routes)) in apis.into_iter().enumerate() {
            let error = |route: &str, reason: String| RouteError {
                api_index,
                api: name.to_owned(),
                route: route.to_owned(),
                reason,
            };
            let Ok(raw_id) = u16::try_from(api_index) else {
                errors.push(error(
                    "",
                    format!("too many APIs (at most {})", u32::from(u16::MAX) + 1),
                ));
                continue;
            };
            let id = ApiId(raw_id);
            names.push(Box::<str>::from(name));
            if name.is_empty() {
                errors.push(error("", "API name is empty".to_owned()));
            } else {
                match ids.entry(Box::<str>::from(name)) {
                    Entry::Occupied(first) => {
                        let ApiId(first) = *first.get();
                        errors.push(error(
                            "",
                            format!("duplicate API name (first declared at apis[{first}])"),
                        ));
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(id);
                    }
                }
            }
            if routes.is_empty() {
                errors.push(error("", "API has no routes".to_owned()));
            }

            for route in routes {
                let (method, template) = match parse_route(route, case_insensitive) {
                    Ok(parsed) => parsed,
                    Err(reason) => {
                        errors.push(error(route, reason));
                        continue;
                    }
                };
                match seen.entry((method.clone(), template.clone())) {
                    Entry::Occupied(first) => {
                        let first = *first.get();
                        errors.push(error(
                            route,
                            format!("duplicate route (first declared in apis[{first}])"),
                        ));
                        continue;
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(api_index);
                    }
                }
                let router = match method {
                    None => any_method.get_or_insert_with(Router::new),
                    Some(method) => {
                        let position = match by_method.iter().position(|(m, _)| *m == method) {
                            Some(position) => position,
                            None => {
                                by_method.push((method, Router::new()));
                                by_method.len() - 1
                            }
                        };
                        &mut by_method[position].1
                    }
                };
                if let Err(conflict) = router.insert(template, id) {
                    errors.push(error(route, conflict.to_string()));
                }
            }
        }

        if errors.is_empty() {
            Ok(RouteTable {
                names: names.into_boxed_slice(),
                ids,
                by_method,
                any_method,
                case_insensitive,
            })
        } else {
            Err(errors)
        }
    }

    /// The API that `method` and `canonical_path` (the output of
    /// [`path::canonicalize`]) belong to. `CONNECT` and `TRACE` never match.
    pub fn lookup(&self, method: &Method, canonical_path: &str) -> RouteMatch {
        if *method == Method::CONNECT || *method == Method::TRACE {
            return RouteMatch::NoApi;
        }
        if self.case_insensitive && canonical_path.bytes().any(|b| b.is_ascii_uppercase()) {
            self.lookup_exact(method, &canonical_path.to_ascii_lowercase())
        } else {
            self.lookup_exact(method, canonical_path)
        }
    }

    fn lookup_exact(&self, method: &Method, path: &str) -> RouteMatch {
        let at = |router: Option<&Router<ApiId>>| {
            router
                .and_then(|router| router.at(path).ok())
                .map(|matched| *matched.value)
        };
        at(self.router(method))
            .or_else(|| {
                if *method == Method::HEAD {
                    at(self.router(&Method::GET))
                } else {
                    None
                }
            })
            .or_else(|| at(self.any_method.as_ref()))
            .map_or(RouteMatch::NoApi, RouteMatch::Api)
    }

    fn router(&self, method: &Method) -> Option<&Router<ApiId>> {
        self.by_method
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, router)| router)
    }

    /// false for CONNECT and TRACE always, and for a method that no route names (HEAD
    /// counts as named when GET is; a `*` route names every method except CONNECT/TRACE).
    /// A request whose method is not allowed is answered 405 before any path matching.
    pub fn method_allowed(&self, method: &Method) -> bool {
        if *method == Method::CONNECT || *method == Method::TRACE {
            return false;
        }
        self.any_method.is_some()
            || self.router(method).is_some()
            || (*method == Method::HEAD && self.router(&Method::GET).is_some())
    }

    /// The id of the API called `name`, if the config declares it.
    pub fn api_id(&self, name: &str) -> Option<ApiId> {
        self.ids.get(name).copied()
    }

    /// The name of API `id`.
    ///
    /// # Panics
    ///
    /// If `id` was not issued by this table (a programming error: ids never outlive the
    /// table they came from).
    pub fn api_name(&self, id: ApiId) -> &str {
        &self.names[usize::from(id.0)]
    }

    /// How many APIs the table has; their ids are `0..api_count()`.
    pub fn api_count(&self) -> usize {
        self.names.len()
    }

    /// Compile grant names into a set; names not in the table are skipped.
    pub fn compile_grants<S: AsRef<str>>(&self, names: &[S]) -> ApiSet {
        let mut set = ApiSet::default();
        for id in names.iter().filter_map(|name| self.api_id(name.as_ref())) {
            set.insert(id);
        }
        set
    }
}

/// Splits a route into its method (`None` for `*`) and the template to give `matchit`,
/// or says what is wrong with it.
fn parse_route(route: &str, case_insensitive: bool) -> Result<(Option<Method>, String), String> {
    let Some((method, template)) = route.split_once(' ') else {
        return Err("expected \"<METHOD or *> <path template>\"".to_owned());
    };
    if method.is_empty() || template.contains(' ') {
        return Err("method and path template must be separated by exactly one space".to_owned());
    }
    let method = parse_method(method)?;
    let template = parse_template(template, case_insensitive)?;
    Ok((method, template))
}

fn parse_method(method: &str) -> Result<Option<Method>, String> {
    if method == "*" {
        return Ok(None);
    }
    if method == Method::CONNECT.as_str() || method == Method::TRACE.as_str() {
        return Err(format!("{method} routes are not allowed"));
    }
    if !method.bytes().all(is_upper_case_tchar) {
        return Err(format!(
            "method {method:?} is not an upper-case token (e.g. GET, POST) or *"
        ));
    }
    Method::from_bytes(method.as_bytes())
        .map(Some)
        .map_err(|e| format!("method {method:?}: {e}"))
}

/// RFC 7230 `tchar`, without lower-case letters.
fn is_upper_case_tchar(b: u8) -> bool {
    b.is_ascii_uppercase()
        || b.is_ascii_digit()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// A segment of a route template.
enum TemplateSegment<'a> {
    Literal(&'a str),
    Param,
    CatchAll,
}

/// Checks a path template and returns it as `matchit` should get it (literal parts
/// lower-cased when `case_insensitive`).
fn parse_template(template: &str, case_insensitive: bool) -> Result<String, String> {
    let Some(rest) = template.strip_prefix('/') else {
        return Err("path template must start with '/'".to_owned());
    };
    let raw: Vec<&str> = rest.split('/').collect();
    let mut segments = Vec::with_capacity(raw.len());
    let mut param_names: Vec<&str> = Vec::new();
    for (index, &segment) in raw.iter().enumerate() {
        let parsed = match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(inner) => {
                let (name, kind) = match inner.strip_prefix('*') {
                    Some(name) => (name, TemplateSegment::CatchAll),
                    None => (inner, TemplateSegment::Param),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "parameter {segment:?}: name must be letters, digits or '_'"
                    ));
                }
                if matches!(kind, TemplateSegment::CatchAll) && index + 1 != raw.len() {
                    return Err(format!("catch-all {segment:?} must be the last segment"));
                }
                if param_names.contains(&name) {
                    return Err(format!("parameter name {name:?} is used twice"));
                }
                param_names.push(name);
                kind
            }
            None if segment.contains(['{', '}']) => {
                return Err(format!(
                    "segment {segment:?}: a parameter must be a whole segment, {{name}} or {{*name}}"
                ));
            }
            None => TemplateSegment::Literal(segment),
        };
        segments.push(parsed);
    }

    // Parameters stand for a plain segment, so the rest must already be canonical.
    let skeleton: String = segments.iter().fold(String::new(), |mut s, segment| {
        s.push('/');
        s.push_str(match segment {
            TemplateSegment::Literal(literal) => literal,
            TemplateSegment::Param | TemplateSegment::CatchAll => "p",
        });
        s
    });
    match path::canonicalize(&skeleton) {
        Err(e) => return Err(not_canonical(e)),
        Ok(std::borrow::Cow::Owned(canonical)) => {
            // Escapes never span a '/', so segments line up one to one.
            let suggestion: String = canonical.split('/').skip(1).zip(&raw).zip(&segments).fold(
                String::new(),
                |mut s, ((canonical, raw), segment)| {
                    s.push('/');
                    s.push_str(match segment {
                        TemplateSegment::Literal(_) => canonical,
                        TemplateSegment::Param | TemplateSegment::CatchAll => raw,
                    });
                    s
                },
            );
            return Err(format!(
                "path template is not canonical; write it as {suggestion:?}"
            ));
        }
        Ok(std::borrow::Cow::Borrowed(_)) => {}
    }

    let mut out = String::with_capacity(template.len());
    for (segment, raw) in segments.iter().zip(&raw) {
        out.push('/');
        match segment {
            TemplateSegment::Literal(literal) if case_insensitive => {
                out.push_str(&literal.to_ascii_lowercase());
            }
            _ => out.push_str(raw),
        }
    }
    Ok(out)
}

fn not_canonical(error: PathError) -> String {
    format!("path template is not canonical: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(routes: &[&str]) -> Vec<String> {
        routes.iter().map(|r| (*r).to_owned()).collect()
    }

    fn build(apis: &[(&str, Vec<String>)], case_insensitive: bool) -> RouteTable {
        RouteTable::build(
            apis.iter().map(|(name, routes)| (*name, routes.as_slice())),
            case_insensitive,
        )
        .unwrap_or_else(|errors| panic!("build failed: {errors:#?}"))
    }

    fn build_errors(apis: &[(&str, Vec<String>)]) -> Vec<RouteError> {
        match RouteTable::build(
            apis.iter().map(|(name, routes)| (*name, routes.as_slice())),
            false,
        ) {
            Ok(_) => panic!("build unexpectedly succeeded"),
            Err(errors) => errors,
        }
    }

    /// The catalogue in shared/campaign-apis.toml.
    fn catalogue() -> Vec<(&'static str, Vec<String>)> {
        vec![
            ("events", routes(&["POST /campaignapi/resources/v3/events"])),
            (
                "campaigns",
                routes(&[
                    "GET /campaignapi/resources/v3/campaigncontents/{id}",
                    "PATCH /campaignapi/resources/v3/voicecampaigntransactions",
                ]),
            ),
            (
                "profiles",
                routes(&[
                    "POST /campaignapi/resources/v3/delete",
                    "GET /campaignapi/resources/v3/profilequerystatus/{id}",
                    "GET /campaignapi/metadata/v3/profile/{id}",
                ]),
            ),
            (
                "users",
                routes(&[
                    "GET /campaignapi/resources/v3/users/",
                    "GET /campaignapi/resources/v3/users/{id}",
                ]),
            ),
        ]
    }

    fn method(name: &str) -> Method {
        Method::from_bytes(name.as_bytes()).unwrap()
    }

    #[track_caller]
    fn assert_api(table: &RouteTable, m: &str, path: &str, api: Option<&str>) {
        let got = match table.lookup(&method(m), path) {
            RouteMatch::Api(id) => Some(table.api_name(id)),
            RouteMatch::NoApi => None,
        };
        assert_eq!(got, api, "{m} {path}");
    }

    #[test]
    fn catalogue_routes_match_their_api() {
        let table = build(&catalogue(), false);
        let v3 = "/campaignapi/resources/v3";
        assert_api(&table, "POST", &format!("{v3}/events"), Some("events"));
        assert_api(
            &table,
            "GET",
            &format!("{v3}/campaigncontents/42"),
            Some("campaigns"),
        );
        assert_api(
            &table,
            "PATCH",
            &format!("{v3}/voicecampaigntransactions"),
            Some("campaigns"),
        );
        assert_api(&table, "POST", &format!("{v3}/delete"), Some("profiles"));
        assert_api(
            &table,
            "GET",
            &format!("{v3}/profilequerystatus/abc-123"),
            Some("profiles"),
        );
        assert_api(
            &table,
            "GET",
            "/campaignapi/metadata/v3/profile/p1",
            Some("profiles"),
        );
        assert_api(&table, "GET", &format!("{v3}/users/"), Some("users"));
        assert_api(&table, "GET", &format!("{v3}/users/u%C3%A9"), Some("users"));
    }

    #[test]
    fn catalogue_refuses_what_it_does_not_declare() {
        let table = build(&catalogue(), false);
        let v3 = "/campaignapi/resources/v3";
        // Wrong method for a known path.
        assert_api(&table, "GET", &format!("{v3}/events"), None);
        assert_api(&table, "DELETE", &format!("{v3}/users/1"), None);
        // Unknown paths, missing or extra segments, empty parameter.
        assert_api(&table, "POST", &format!("{v3}/events/"), None);
        assert_api(&table, "POST", &format!("{v3}/event"), None);
        assert_api(&table, "GET", &format!("{v3}/users"), None);
        assert_api(&table, "GET", &format!("{v3}/users/1/keys"), None);
        assert_api(&table, "GET", &format!("{v3}/campaigncontents/"), None);
        assert_api(&table, "GET", &format!("{v3}/campaigncontents"), None);
        assert_api(&table, "GET", "/", None);
        // Matching is case-sensitive by default.
        assert_api(&table, "POST", &format!("{v3}/Events"), None);
    }

    #[test]
    fn api_ids_follow_config_order() {
        let table = build(&catalogue(), false);
        assert_eq!(table.api_count(), 4);
        for (index, name) in ["events", "campaigns", "profiles", "users"]
            .into_iter()
            .enumerate()
        {
            let id = ApiId(u16::try_from(index).unwrap());
            assert_eq!(table.api_id(name), Some(id));
            assert_eq!(table.api_name(id), name);
        }
        assert_eq!(table.api_id("nope"), None);
        assert_eq!(table.api_id(""), None);
    }

    #[test]
    fn head_falls_back_to_get() {
        let table = build(
            &[
                ("reads", routes(&["GET /items/{id}", "GET /ping"])),
                ("heads", routes(&["HEAD /ping"])),
            ],
            false,
        );
        assert_api(&table, "HEAD", "/items/7", Some("reads"));
        // An explicit HEAD route wins over the GET one.
        assert_api(&table, "HEAD", "/ping", Some("heads"));
        assert_api(&table, "GET", "/ping", Some("reads"));
        // GET does not fall back to HEAD, nor POST to GET.
        let table = build(&[("heads", routes(&["HEAD /only-head"]))], false);
        assert_api(&table, "GET", "/only-head", None);
        assert_api(&table, "HEAD", "/only-head", Some("heads"));
        assert_api(&table, "POST", "/items/7", None);
    }

    #[test]
    fn star_routes_match_any_method_after_specific_ones() {
        let table = build(
            &[
                ("files", routes(&["* /files/{*rest}"])),
                ("uploads", routes(&["PUT /files/{*rest}"])),
                ("reads", routes(&["GET /files/readme"])),
            ],
            false,
        );
        for m in ["GET", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE"] {
            assert_api(&table, m, "/files/a/b", Some("files"));
        }
        assert_api(&table, "PUT", "/files/a/b", Some("uploads"));
        assert_api(&table, "GET", "/files/readme", Some("reads"));
        assert_api(&table, "HEAD", "/files/readme", Some("reads"));
        assert_api(&table, "POST", "/files/readme", Some("files"));
        // Never for CONNECT or TRACE.
        assert_api(&table, "CONNECT", "/files/a", None);
        assert_api(&table, "TRACE", "/files/a", None);
    }

    #[test]
    fn catch_all_matches_the_non_empty_rest() {
        let table = build(&[("blobs", routes(&["GET /blobs/{*path}"]))], false);
        assert_api(&table, "GET", "/blobs/a", Some("blobs"));
        assert_api(&table, "GET", "/blobs/a/b/c", Some("blobs"));
        assert_api(&table, "GET", "/blobs/a/b/", Some("blobs"));
        assert_api(&table, "GET", "/blobs/%C3%A9/x", Some("blobs"));
        assert_api(&table, "GET", "/blobs/", None);
        assert_api(&table, "GET", "/blobs", None);
        assert_api(&table, "GET", "/blob/a", None);
    }

    #[test]
    fn trailing_slash_is_its_own_route() {
        let table = build(
            &[
                ("list", routes(&["GET /users/"])),
                ("one", routes(&["GET /users/{id}"])),
                ("plain", routes(&["GET /plain"])),
            ],
            false,
        );
        assert_api(&table, "GET", "/users/", Some("list"));
        assert_api(&table, "GET", "/users/7", Some("one"));
        assert_api(&table, "GET", "/users", None);
        assert_api(&table, "GET", "/users/7/", None);
        assert_api(&table, "GET", "/plain/", None);
        assert_api(&table, "GET", "/plain", Some("plain"));
    }

    #[test]
    fn literal_segments_win_over_parameters() {
        let table = build(
            &[
                ("me", routes(&["GET /users/me"])),
                ("one", routes(&["GET /users/{id}", "GET /users/{id}/keys"])),
            ],
            false,
        );
        assert_api(&table, "GET", "/users/me", Some("me"));
        assert_api(&table, "GET", "/users/mee", Some("one"));
        assert_api(&table, "GET", "/users/me/keys", Some("one"));
    }

    #[test]
    fn method_allowed_gives_405_semantics() {
        let table = build(&catalogue(), false);
        for m in ["GET", "HEAD", "POST", "PATCH"] {
            assert!(table.method_allowed(&method(m)), "{m}");
        }
        for m in ["PUT", "DELETE", "OPTIONS", "PURGE", "CONNECT", "TRACE"] {
            assert!(!table.method_allowed(&method(m)), "{m}");
        }

        let table = build(&[("heads", routes(&["HEAD /x"]))], false);
        assert!(table.method_allowed(&Method::HEAD));
        assert!(!table.method_allowed(&Method::GET));

        let table = build(&[("purge", routes(&["PURGE /cache/{*key}"]))], false);
        assert!(table.method_allowed(&method("PURGE")));
        assert!(!table.method_allowed(&Method::GET));
        assert_api(&table, "PURGE", "/cache/a/b", Some("purge"));

        let table = build(&[("any", routes(&["* /x"]))], false);
        for m in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PURGE"] {
            assert!(table.method_allowed(&method(m)), "{m}");
        }
        assert!(!table.method_allowed(&Method::CONNECT));
        assert!(!table.method_allowed(&Method::TRACE));
    }

    #[test]
    fn case_insensitive_mode_folds_literals_and_paths() {
        let apis = [
            ("events", routes(&["POST /CampaignAPI/Events"])),
            ("users", routes(&["GET /users/{ID}", "GET /Users/%C3%A9"])),
        ];
        let table = build(&apis, true);
        assert_api(&table, "POST", "/campaignapi/events", Some("events"));
        assert_api(&table, "POST", "/CAMPAIGNAPI/EVENTS", Some("events"));
        assert_api(&table, "POST", "/CampaignAPI/Events", Some("events"));
        assert_api(&table, "GET", "/USERS/AbC", Some("users"));
        assert_api(&table, "GET", "/users/%C3%A9", Some("users"));
        assert_api(&table, "POST", "/campaignapi/events/x", None);

        let table = build(&apis, false);
        assert_api(&table, "POST", "/CampaignAPI/Events", Some("events"));
        assert_api(&table, "POST", "/campaignapi/events", None);
        assert_api(&table, "GET", "/users/AbC", Some("users"));
        assert_api(&table, "GET", "/USERS/AbC", None);
        assert_api(&table, "GET", "/users/%C3%A9", Some("users"));
        assert_api(&table, "GET", "/Users/%C3%A9", Some("users"));
    }

    #[test]
    fn case_insensitive_duplicates_are_found_after_folding() {
        let apis = [("a", routes(&["GET /Items", "GET /items"]))];
        let errors = RouteTable::build(apis.iter().map(|(n, r)| (*n, r.as_slice())), true)
            .expect_err("duplicate after folding");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].route, "GET /items");
        assert!(errors[0].reason.contains("duplicate route"), "{errors:?}");
        // Case-sensitive, they are two routes.
        build(&apis, false);
    }

    #[test]
    fn duplicate_routes_are_reported() {
        let errors = build_errors(&[
            ("a", routes(&["GET /x", "GET /x"])),
            ("b", routes(&["GET /x", "POST /x", "* /y"])),
            ("c", routes(&["* /y"])),
        ]);
        let reported: Vec<(usize, &str, &str)> = errors
            .iter()
            .map(|e| (e.api_index, e.route.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            reported,
            [
                (0, "GET /x", "duplicate route (first declared in apis[0])"),
                (1, "GET /x", "duplicate route (first declared in apis[0])"),
                (2, "* /y", "duplicate route (first declared in apis[1])"),
            ]
        );
    }

    #[test]
    fn conflicting_routes_are_reported_with_matchit_message() {
        let errors = build_errors(&[
            ("a", routes(&["GET /users/{id}"])),
            ("b", routes(&["GET /users/{name}", "GET /files/{*rest}"])),
            ("c", routes(&["GET /files/{*path}"])),
        ]);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(errors[0].api_index, 1);
        assert_eq!(errors[0].route, "GET /users/{name}");
        assert!(
            errors[0].reason.contains("conflict") && errors[0].reason.contains("/users/{id}"),
            "{}",
            errors[0].reason
        );
        assert_eq!(errors[1].api_index, 2);
        assert!(
            errors[1].reason.contains("conflict"),
            "{}",
            errors[1].reason
        );
    }

    #[test]
    fn same_template_under_different_methods_is_fine() {
        let table = build(
            &[
                ("read", routes(&["GET /x/{id}"])),
                ("write", routes(&["PUT /x/{id}", "DELETE /x/{id}"])),
                ("other", routes(&["* /x/{id}"])),
            ],
            false,
        );
        assert_api(&table, "GET", "/x/1", Some("read"));
        assert_api(&table, "PUT", "/x/1", Some("write"));
        assert_api(&table, "DELETE", "/x/1", Some("write"));
        assert_api(&table, "POST", "/x/1", Some("other"));
    }

    #[test]
    fn bad_routes_are_all_reported() {
        let bad = [
            ("GET", "expected"),
            ("", "expected"),
            ("GET  /a", "exactly one space"),
            (" /a", "exactly one space"),
            ("GET /a b", "exactly one space"),
            ("GET /a ", "exactly one space"),
            ("GET\t/a", "expected"),
            ("get /a", "not an upper-case token"),
            ("Get /a", "not an upper-case token"),
            ("G(T /a", "not an upper-case token"),
            ("CONNECT /a", "CONNECT routes are not allowed"),
            ("TRACE /a", "TRACE routes are not allowed"),
            ("GET a", "must start with '/'"),
            ("GET *", "must start with '/'"),
            ("GET /a/{id", "a parameter must be a whole segment"),
            ("GET /a/id}", "a parameter must be a whole segment"),
            ("GET /a/v{id}", "a parameter must be a whole segment"),
            ("GET /a/{id}.json", "a parameter must be a whole segment"),
            ("GET /a/{}", "name must be"),
            ("GET /a/{*}", "name must be"),
            ("GET /a/{a-b}", "name must be"),
            ("GET /a/{*rest}/b", "must be the last segment"),
            ("GET /a/{*rest}/", "must be the last segment"),
            ("GET /a/{id}/{id}", "used twice"),
            ("GET /a/%7e", "write it as \"/a/~\""),
            ("GET /a/%c3/{id}", "write it as \"/a/%C3/{id}\""),
            ("GET /a/%2f", "escaped '/'"),
            ("GET /a/%00", "escaped control"),
            ("GET /a//b", "empty segment"),
            ("GET //{id}", "empty segment"),
            ("GET /a/./b", "'.' or '..' segment"),
            ("GET /a/..", "'.' or '..' segment"),
            ("GET /a;b", "';'"),
            ("GET /a\\b", "raw '\\'"),
            ("GET /a?b", "must be percent-encoded"),
            ("GET /a/%zz", "malformed"),
        ];
        let all = routes(&bad.map(|(route, _)| route));
        let errors = build_errors(&[("bad", all)]);
        assert_eq!(errors.len(), bad.len(), "{errors:#?}");
        for (error, (route, reason)) in errors.iter().zip(bad) {
            assert_eq!(error.route, route);
            assert!(
                error.reason.contains(reason),
                "{route:?}: {:?} does not say {reason:?}",
                error.reason
            );
        }
    }

    #[test]
    fn good_route_shapes_are_accepted() {
        let table = build(
            &[(
                "ok",
                routes(&[
                    "GET /",
                    "OPTIONS /{*any}",
                    "POST /a/{id}/b/{sub_id}/",
                    "M-SEARCH /upnp",
                    "PATCH /a/%C3%A9/x:y@z",
                    "DELETE /a/.../b",
                ]),
            )],
            false,
        );
        assert_api(&table, "GET", "/", Some("ok"));
        assert_api(&table, "OPTIONS", "/anything/at/all", Some("ok"));
        assert_api(&table, "POST", "/a/1/b/2/", Some("ok"));
        assert_api(&table, "M-SEARCH", "/upnp", Some("ok"));
        assert_api(&table, "PATCH", "/a/%C3%A9/x:y@z", Some("ok"));
        assert_api(&table, "DELETE", "/a/.../b", Some("ok"));
    }

    #[test]
    fn api_level_problems_are_reported() {
        let errors = build_errors(&[
            ("", routes(&["GET /a"])),
            ("empty", Vec::new()),
            ("dup", routes(&["GET /b"])),
            ("dup", routes(&["GET /c"])),
        ]);
        let reported: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            reported,
            [
                "apis[0] (): route \"\": API name is empty",
                "apis[1] (empty): route \"\": API has no routes",
                "apis[3] (dup): route \"\": duplicate API name (first declared at apis[2])",
            ]
        );
    }

    #[test]
    fn route_error_names_api_route_and_reason() {
        let errors = build_errors(&[("events", routes(&["get /e"]))]);
        assert_eq!(
            errors[0].to_string(),
            "apis[0] (events): route \"get /e\": method \"get\" is not an upper-case token (e.g. GET, POST) or *"
        );
    }

    #[test]
    fn grants_compile_to_a_set_skipping_unknown_names() {
        let table = build(&catalogue(), false);
        let set = table.compile_grants(&["users", "events", "unknown", ""]);
        assert!(set.contains(table.api_id("users").unwrap()));
        assert!(set.contains(table.api_id("events").unwrap()));
        assert!(!set.contains(table.api_id("campaigns").unwrap()));
        assert!(!set.contains(table.api_id("profiles").unwrap()));
        assert!(!set.is_empty());

        let owned = vec!["profiles".to_owned()];
        assert!(
            table
                .compile_grants(&owned)
                .contains(table.api_id("profiles").unwrap())
        );
        assert!(table.compile_grants::<&str>(&[]).is_empty());
        assert!(table.compile_grants(&["nope"]).is_empty());
    }

    #[test]
    fn api_set_beyond_64_apis() {
        let names: Vec<String> = (0..200).map(|i| format!("api{i}")).collect();
        let route_lists: Vec<Vec<String>> =
            (0..200).map(|i| vec![format!("GET /api/{i}")]).collect();
        let table = RouteTable::build(
            names
                .iter()
                .map(String::as_str)
                .zip(route_lists.iter().map(Vec::as_slice)),
            false,
        )
        .unwrap();
        assert_eq!(table.api_count(), 200);
        assert_eq!(
            table.lookup(&Method::GET, "/api/150"),
            RouteMatch::Api(ApiId(150))
        );

        let granted = [0_u16, 63, 64, 127, 128, 130, 199];
        let grant_names: Vec<String> = granted.iter().map(|i| format!("api{i}")).collect();
        let set = table.compile_grants(&grant_names);
        for i in 0..200_u16 {
            assert_eq!(set.contains(ApiId(i)), granted.contains(&i), "api{i}");
        }
        assert!(!set.contains(ApiId(u16::MAX)));

        // Same members, same set, whatever the insertion order.
        let mut by_hand = ApiSet::default();
        for &i in granted.iter().rev() {
            by_hand.insert(ApiId(i));
        }
        assert_eq!(by_hand, set);
    }

    #[test]
    fn api_set_basics() {
        let mut set = ApiSet::default();
        assert!(set.is_empty());
        assert!(!set.contains(ApiId(0)));
        set.insert(ApiId(u16::MAX));
        assert!(set.contains(ApiId(u16::MAX)));
        assert!(!set.contains(ApiId(u16::MAX - 1)));
        assert!(!set.is_empty());
        set.insert(ApiId(u16::MAX));
        set.insert(ApiId(1));
        assert!(set.contains(ApiId(1)));
        assert_ne!(set, ApiSet::default());
    }

    #[test]
    fn api_set_stays_inline_below_64() {
        let mut set = ApiSet::default();
        set.insert(ApiId(0));
        set.insert(ApiId(63));
        assert!(matches!(set, ApiSet::Inline(_)));
        assert!(set.contains(ApiId(63)) && !set.contains(ApiId(62)));
        assert!(!set.contains(ApiId(64)));
        set.insert(ApiId(64));
        assert!(matches!(set, ApiSet::Boxed(_)));
        assert!(set.contains(ApiId(0)) && set.contains(ApiId(63)) && set.contains(ApiId(64)));
        assert_eq!(std::mem::size_of::<ApiSet>(), 16);
    }

    #[test]
    fn lookup_takes_canonicalized_paths_end_to_end() {
        let table = build(&catalogue(), false);
        let canonical = path::canonicalize("/campaignapi/resources/v3/%65vents").unwrap();
        assert_eq!(
            table.lookup(&Method::POST, &canonical),
            RouteMatch::Api(table.api_id("events").unwrap())
        );
    }
}
