//! Configuration: the TOML schema, its defaults, `CAMPAIGN_GATE_<SECTION>_<KEY>`
//! overrides and validation. Every problem is reported with its key path, all at once.
//!
//! The schema is declared once, as a table of `(section, key, kind)`; the same table
//! checks the file for unknown keys, parses environment overrides and types the values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Value;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "CAMPAIGN_GATE_";

/// The whole, validated configuration. Built only by [`Config::parse`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub routes: RoutesConfig,
    pub compat: CompatConfig,
    pub tokens: TokensConfig,
    pub apis: Vec<ApiConfig>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How connections are spread over threads (see BENCHMARKS.md for the measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeLayout {
    /// One current-thread runtime per worker, each on its own `SO_REUSEPORT` listener.
    PerCore,
    /// One multi-thread runtime with work stealing over one listener.
    MultiThread,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    pub runtime: RuntimeLayout,
    pub tls: Option<TlsConfig>,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub h2_max_concurrent_streams: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http://host:port`, no path.
    pub url: http::Uri,
    pub connect_timeout: Duration,
    pub forward_authorization: bool,
    pub host: Option<String>,
    pub identity_prefix: String,
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    pub tls: StoreTls,
}

/// The files a `rediss://` store trusts and presents. Unset: the system's trust store
/// and no client certificate. Checked (read, PEM parsed) at config load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreTls {
    /// `[store] tls_ca_file`: PEM CA certificates that replace the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// `[store] tls_client_cert_file`: PEM chain presented to Redis (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    /// `[store] tls_client_key_file`: the PEM private key of that chain.
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub deleted_key_grace: Duration,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub stale_if_error: Duration,
    pub invalidation_check_interval: Duration,
    pub cache_capacity: u64,
    /// Failed authentications per client address per `failure_window` before 429; 0 = off.
    pub failure_limit: u32,
    pub failure_window: Duration,
}

#[derive(Debug, Clone)]
pub struct RoutesConfig {
    pub case_insensitive: bool,
}

#[derive(Debug, Clone)]
pub struct CompatConfig {
    pub campaign_statuses: bool,
}

#[derive(Debug, Clone)]
pub struct TokensConfig {
    pub enabled: bool,
    pub path: String,
    pub lifetime: Duration,
    /// Where the `Link` header of the flow's responses points: the migration note.
    pub migration_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub name: String,
    pub routes: Vec<String>,
}

/// One problem in a configuration: the key path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Uint,
    Duration,
    Addr,
    Cidrs,
    Tls,
}

/// The schema: section, key, kind, default (as it would be written in TOML; `None` = unset).
const SCHEMA: &[(&str, &str, Kind, Option<&str>)] = &[
    ("server", "listen", Kind::Addr, Some("0.0.0.0:8080")),
    ("server", "tls", Kind::Tls, None),
    ("server", "header_read_timeout", Kind::Duration, Some("10s")),
    ("server", "request_timeout", Kind::Duration, Some("60s")),
    ("server", "idle_timeout", Kind::Duration, Some("60s")),
    ("server", "body_read_timeout", Kind::Duration, Some("30s")),
    ("server", "max_body_bytes", Kind::Uint, Some("10485760")),
    ("server", "max_header_bytes", Kind::Uint, Some("65536")),
    ("server", "max_headers", Kind::Uint, Some("100")),
    ("server", "max_uri_bytes", Kind::Uint, Some("8192")),
    ("server", "workers", Kind::Uint, Some("0")),
    ("server", "runtime", Kind::Str, Some("per-core")),
    ("server", "max_connections", Kind::Uint, Some("10000")),
    ("server", "max_connections_per_ip", Kind::Uint, Some("1000")),
    (
        "server",
        "h2_max_concurrent_streams",
        Kind::Uint,
        Some("200"),
    ),
    ("server", "trusted_proxies", Kind::Cidrs, Some("")),
    ("server", "shutdown_grace", Kind::Duration, Some("30s")),
    ("admin", "listen", Kind::Addr, Some("127.0.0.1:9901")),
    ("upstream", "url", Kind::Str, Some("http://127.0.0.1:8081")),
    ("upstream", "connect_timeout", Kind::Duration, Some("2s")),
    (
        "upstream",
        "forward_authorization",
        Kind::Bool,
        Some("false"),
    ),
    ("upstream", "host", Kind::Str, None),
    (
        "upstream",
        "identity_prefix",
        Kind::Str,
        Some("x-campaign-"),
    ),
    (
        "upstream",
        "pool_max_idle_per_host",
        Kind::Uint,
        Some("1024"),
    ),
    ("upstream", "pool_idle_timeout", Kind::Duration, Some("90s")),
    (
        "store",
        "url",
        Kind::Str,
        Some("file:./campaign-gate-store.json"),
    ),
    ("store", "prefix", Kind::Str, Some("cg:")),
    ("store", "timeout", Kind::Duration, Some("1s")),
    ("store", "tls_ca_file", Kind::Str, None),
    ("store", "tls_client_cert_file", Kind::Str, None),
    ("store", "tls_client_key_file", Kind::Str, None),
    ("auth", "deleted_key_grace", Kind::Duration, Some("5m")),
    ("auth", "cache_ttl", Kind::Duration, Some("60s")),
    ("auth", "negative_cache_ttl", Kind::Duration, Some("5s")),
    ("auth", "stale_if_error", Kind::Duration, Some("5m")),
    (
        "auth",
        "invalidation_check_interval",
        Kind::Duration,
        Some("1s"),
    ),
    ("auth", "cache_capacity", Kind::Uint, Some("1000000")),
    ("auth", "failure_limit", Kind::Uint, Some("100")),
    ("auth", "failure_window", Kind::Duration, Some("60s")),
    ("routes", "case_insensitive", Kind::Bool, Some("false")),
    ("compat", "campaign_statuses", Kind::Bool, Some("false")),
    ("tokens", "enabled", Kind::Bool, Some("true")),
    (
        "tokens",
        "path",
        Kind::Str,
        Some("/campaignapi/resources/v3/token"),
    ),
    ("tokens", "lifetime", Kind::Duration, Some("60m")),
    (
        "tokens",
        "migration_url",
        Kind::Str,
        Some("https://campaign-gate.invalid/docs/access-tokens"),
    ),
];

/// A typed value of one key, before it is placed in the config struct.
#[derive(Debug, Clone)]
enum Typed {
    Str(String),
    Bool(bool),
    Uint(u64),
    Duration(Duration),
    Addr(SocketAddr),
    Cidrs(Vec<IpNet>),
    Tls(TlsConfig),
}

impl Config {
    /// Reads and validates a config file, applying overrides from `env`.
    /// `path = None` means built-in defaults (plus overrides).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let text = match path {
            None => String::new(),
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: p.display().to_string(),
                    reason: format!("cannot read config file: {e}"),
                }])
            })?,
        };
        Config::parse(&text, env)
    }

    /// Parses TOML text, applies overrides from `env` (pairs of name and value; names
    /// not starting with [`ENV_PREFIX`] are ignored), and validates the result.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                return Err(ConfigErrors(vec![ConfigError {
                    key: "(file)".into(),
                    reason: format!("invalid TOML: {}", e.message()),
                }]));
            }
        };

        let mut values: BTreeMap<(&'static str, &'static str), Typed> = BTreeMap::new();
        for &(section, key, kind, default) in SCHEMA {
            if let Some(d) = default {
                match parse_env_value(kind, d) {
                    Ok(v) => {
                        values.insert((section, key), v);
                    }
                    Err(reason) => errors.push(ConfigError {
                        key: format!("{section}.{key}"),
                        reason: format!("bad built-in default: {reason}"),
                    }),
                }
            }
        }

        let mut apis = Vec::new();
        for (section, value) in &root {
            if section == "apis" {
                apis = parse_apis(value, &mut errors);
                continue;
            }
            let Some(table) = value.as_table() else {
                if SCHEMA.iter().any(|s| s.0 == section) {
                    errors.push(err(section, "expected a table"));
                } else {
                    errors.push(err(section, "unknown section"));
                }
                continue;
            };
            if !SCHEMA.iter().any(|s| s.0 == section) {
                errors.push(err(section, "unknown section"));
                continue;
            }
            for (key, v) in table {
                let path = format!("{section}.{key}");
                match SCHEMA.iter().find(|s| s.0 == section && s.1 == key) {
                    None => errors.push(err(&path, "unknown key")),
                    Some(&(s, k, kind, _)) => match parse_toml_value(kind, v) {
                        Ok(t) => {
                            values.insert((s, k), t);
                        }
                        Err(reason) => errors.push(err(&path, &reason)),
                    },
                }
            }
        }

        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            // Longest section name first is not needed: no section is a prefix of another.
            let Some(&(section, _, _, _)) = SCHEMA
                .iter()
                .find(|s| rest.starts_with(s.0) && rest.as_bytes().get(s.0.len()) == Some(&b'_'))
            else {
                // Not a config section (e.g. CAMPAIGN_GATE_LOG_FORMAT): not ours to judge.
                continue;
            };
            let key = &rest[section.len() + 1..];
            match SCHEMA.iter().find(|s| s.0 == section && s.1 == key) {
                None => errors.push(err(&name, "environment override names no config key")),
                Some(&(s, k, kind, _)) => match parse_env_value(kind, &raw) {
                    Ok(t) => {
                        values.insert((s, k), t);
                    }
                    Err(reason) => errors.push(err(&name, &reason)),
                },
            }
        }

        let cfg = build(&values, apis, &mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

fn err(key: &str, reason: &str) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_apis(value: &Value, errors: &mut Vec<ConfigError>) -> Vec<ApiConfig> {
    let Some(array) = value.as_array() else {
        errors.push(err("apis", "expected an array of tables ([[apis]])"));
        return Vec::new();
    };
    let mut apis = Vec::new();
    for (i, entry) in array.iter().enumerate() {
        let path = format!("apis[{i}]");
        let Some(table) = entry.as_table() else {
            errors.push(err(&path, "expected a table"));
            continue;
        };
        let mut name = None;
        let mut routes = Vec::new();
        for (k, v) in table {
            match k.as_str() {
                "name" => match v.as_str() {
                    Some(s) if valid_api_name(s) => name = Some(s.to_string()),
                    Some(s) => errors.push(err(
                        &format!("{path}.name"),
                        &format!("invalid API name {s:?}: use letters, digits, '-' and '_'"),
                    )),
                    None => errors.push(err(&format!("{path}.name"), "expected a string")),
                },
                "routes" => match v.as_array() {
                    Some(items) => {
                        for (j, r) in items.iter().enumerate() {
                            match r.as_str() {
                                Some(s) => routes.push(s.to_string()),
                                None => errors
                                    .push(err(&format!("{path}.routes[{j}]"), "expected a string")),
                            }
                        }
                    }
                    None => errors.push(err(
                        &format!("{path}.routes"),
                        "expected an array of strings",
                    )),
                },
                other => errors.push(err(&format!("{path}.{other}"), "unknown key")),
            }
        }
        match name {
            Some(name) => apis.push(ApiConfig { name, routes }),
            None if !table.contains_key("name") => {
                errors.push(err(&format!("{path}.name"), "missing"));
            }
            None => {}
        }
    }
    apis
}

/// API names are identifiers: they appear in CLI arguments, headers and metrics.
pub fn valid_api_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn parse_toml_value(kind: Kind, v: &Value) -> Result<Typed, String> {
    match (kind, v) {
        (Kind::Str, Value::String(s)) => Ok(Typed::Str(s.clone())),
        (Kind::Bool, Value::Boolean(b)) => Ok(Typed::Bool(*b)),
        (Kind::Uint, Value::Integer(i)) => u64::try_from(*i)
            .map(Typed::Uint)
            .map_err(|_| format!("expected a non-negative integer, got {i}")),
        (Kind::Duration, Value::String(s)) => parse_duration(s).map(Typed::Duration),
        (Kind::Addr, Value::String(s)) => parse_addr(s).map(Typed::Addr),
        (Kind::Cidrs, Value::Array(items)) => {
            let mut nets = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) => nets.push(parse_cidr(s).map_err(|e| format!("[{i}]: {e}"))?),
                    None => return Err(format!("[{i}]: expected a CIDR string")),
                }
            }
            Ok(Typed::Cidrs(nets))
        }
        (Kind::Tls, Value::Table(t)) => {
            let mut cert = None;
            let mut key = None;
            for (k, v) in t {
                let s = v
                    .as_str()
                    .ok_or_else(|| format!("{k}: expected a file path string"))?;
                match k.as_str() {
                    "cert" => cert = Some(PathBuf::from(s)),
                    "key" => key = Some(PathBuf::from(s)),
                    other => return Err(format!("unknown key {other:?} (expected cert, key)")),
                }
            }
            match (cert, key) {
                (Some(cert), Some(key)) => Ok(Typed::Tls(TlsConfig { cert, key })),
                _ => Err("needs both cert and key".into()),
            }
        }
        (kind, v) => Err(format!(
            "expected {}, got {}",
            kind_name(kind),
            v.type_str()
        )),
    }
}

fn parse_env_value(kind: Kind, s: &str) -> Result<Typed, String> {
    match kind {
        Kind::Str => Ok(Typed::Str(s.to_string())),
        Kind::Bool => match s {
            "true" => Ok(Typed::Bool(true)),
            "false" => Ok(Typed::Bool(false)),
            _ => Err(format!("expected true or false, got {s:?}")),
        },
        Kind::Uint => s
            .parse()
            .map(Typed::Uint)
            .map_err(|_| format!("expected a non-negative integer, got {s:?}")),
        Kind::Duration => parse_duration(s).map(Typed::Duration),
        Kind::Addr => parse_addr(s).map(Typed::Addr),
        Kind::Cidrs => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_cidr)
            .collect::<Result<Vec<_>, _>>()
            .map(Typed::Cidrs),
        Kind::Tls => {
            let (cert, key) = s
                .split_once(',')
                .ok_or_else(|| "expected CERT_PATH,KEY_PATH".to_string())?;
            Ok(Typed::Tls(TlsConfig {
                cert: cert.trim().into(),
                key: key.trim().into(),
            }))
        }
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Bool => "a boolean",
        Kind::Uint => "a non-negative integer",
        Kind::Duration => "a duration string such as \"5s\"",
        Kind::Addr => "an address string such as \"0.0.0.0:8080\"",
        Kind::Cidrs => "an array of CIDR strings",
        Kind::Tls => "a table { cert, key }",
    }
}

/// Parses a humantime duration ("5m", "1500ms", "2s 500ms").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid socket address {s:?} (expected IP:PORT)"))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("invalid CIDR {s:?}"))
}

fn build(
    values: &BTreeMap<(&'static str, &'static str), Typed>,
    apis: Vec<ApiConfig>,
    errors: &mut Vec<ConfigError>,
) -> Config {
    let get = |s: &'static str, k: &'static str| values.get(&(s, k));
    let string = |s: &'static str, k: &'static str| match get(s, k) {
        Some(Typed::Str(v)) => v.clone(),
        _ => String::new(),
    };
    let opt_string = |s: &'static str, k: &'static str| match get(s, k) {
        Some(Typed::Str(v)) => Some(v.clone()),
        _ => None,
    };
    let boolean = |s: &'static str, k: &'static str| matches!(get(s, k), Some(Typed::Bool(true)));
    let uint = |s: &'static str, k: &'static str| match get(s, k) {
        Some(Typed::Uint(v)) => *v,
        _ => 0,
    };
    let dur = |s: &'static str, k: &'static str| match get(s, k) {
        Some(Typed::Duration(v)) => *v,
        _ => Duration::ZERO,
    };
    let addr = |s: &'static str, k: &'static str| match get(s, k) {
        Some(Typed::Addr(v)) => *v,
        _ => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let positive = |s: &'static str, k: &'static str, errors: &mut Vec<ConfigError>| {
        let v = uint(s, k);
        if v == 0 {
            errors.push(err(&format!("{s}.{k}"), "must be greater than 0"));
        }
        v
    };
    let usize_of = |s: &'static str, k: &'static str, errors: &mut Vec<ConfigError>| {
        usize::try_from(positive(s, k, errors)).unwrap_or(usize::MAX)
    };

    let upstream_raw = string("upstream", "url");
    let upstream_url = match parse_upstream_url(&upstream_raw) {
        Ok(u) => u,
        Err(reason) => {
            errors.push(err("upstream.url", &reason));
            http::Uri::from_static("http://127.0.0.1:8081")
        }
    };

    let store_url = string("store", "url");
    if !(store_url.starts_with("file:")
        || store_url.starts_with("redis://")
        || store_url.starts_with("rediss://"))
    {
        errors.push(err(
            "store.url",
            &format!("unsupported store {store_url:?} (expected file:PATH, redis:// or rediss://)"),
        ));
    } else if store_url == "file:" {
        errors.push(err("store.url", "file: needs a path"));
    }
    let store_tls = StoreTls {
        ca_file: opt_string("store", "tls_ca_file").map(PathBuf::from),
        client_cert_file: opt_string("store", "tls_client_cert_file").map(PathBuf::from),
        client_key_file: opt_string("store", "tls_client_key_file").map(PathBuf::from),
    };
    if store_url.starts_with("redis://") || store_url.starts_with("rediss://") {
        // Built here only to be checked: the URL, and the TLS files read and parsed.
        if let Err(e) = crate::store::redis::client(&store_url, &store_tls) {
            errors.extend(e);
        }
    } else {
        errors.extend(crate::store::redis::tls_unused(&store_tls));
    }

    let identity_prefix = string("upstream", "identity_prefix").to_ascii_lowercase();
    if identity_prefix.is_empty()
        || http::HeaderName::from_bytes(identity_prefix.as_bytes()).is_err()
    {
        errors.push(err(
            "upstream.identity_prefix",
            "must be a non-empty header-name prefix",
        ));
    }
    let host = opt_string("upstream", "host");
    if let Some(h) = &host
        && (http::HeaderValue::from_str(h).is_err() || h.is_empty())
    {
        errors.push(err("upstream.host", "not a valid Host header value"));
    }

    let tokens_path = string("tokens", "path");
    if !tokens_path.starts_with('/') {
        errors.push(err("tokens.path", "must start with '/'"));
    }

    let h2_streams = positive("server", "h2_max_concurrent_streams", errors);
    let runtime = match string("server", "runtime").as_str() {
        "per-core" => RuntimeLayout::PerCore,
        "multi-thread" => RuntimeLayout::MultiThread,
        other => {
            errors.push(err(
                "server.runtime",
                &format!("unknown layout {other:?} (expected \"per-core\" or \"multi-thread\")"),
            ));
            RuntimeLayout::PerCore
        }
    };
    let server = ServerConfig {
        listen: addr("server", "listen"),
        workers: usize::try_from(uint("server", "workers")).unwrap_or(usize::MAX),
        runtime,
        tls: match get("server", "tls") {
            Some(Typed::Tls(t)) => Some(t.clone()),
            _ => None,
        },
        header_read_timeout: dur("server", "header_read_timeout"),
        request_timeout: dur("server", "request_timeout"),
        idle_timeout: dur("server", "idle_timeout"),
        body_read_timeout: dur("server", "body_read_timeout"),
        max_body_bytes: uint("server", "max_body_bytes"),
        max_header_bytes: usize_of("server", "max_header_bytes", errors),
        max_headers: usize_of("server", "max_headers", errors),
        max_uri_bytes: usize_of("server", "max_uri_bytes", errors),
        max_connections: usize_of("server", "max_connections", errors),
        max_connections_per_ip: usize_of("server", "max_connections_per_ip", errors),
        h2_max_concurrent_streams: u32::try_from(h2_streams).unwrap_or(u32::MAX),
        trusted_proxies: match get("server", "trusted_proxies") {
            Some(Typed::Cidrs(v)) => v.clone(),
            _ => Vec::new(),
        },
        shutdown_grace: dur("server", "shutdown_grace"),
    };
    for (key, d) in [
        ("server.header_read_timeout", server.header_read_timeout),
        ("server.request_timeout", server.request_timeout),
        ("server.idle_timeout", server.idle_timeout),
        ("server.body_read_timeout", server.body_read_timeout),
    ] {
        if d.is_zero() {
            errors.push(err(key, "must be greater than 0"));
        }
    }
    if server.max_header_bytes < 8192 {
        errors.push(err("server.max_header_bytes", "must be at least 8192"));
    }

    let auth = AuthConfig {
        deleted_key_grace: dur("auth", "deleted_key_grace"),
        cache_ttl: dur("auth", "cache_ttl"),
        negative_cache_ttl: dur("auth", "negative_cache_ttl"),
        stale_if_error: dur("auth", "stale_if_error"),
        invalidation_check_interval: dur("auth", "invalidation_check_interval"),
        cache_capacity: positive("auth", "cache_capacity", errors),
        failure_limit: u32::try_from(uint("auth", "failure_limit")).unwrap_or(u32::MAX),
        failure_window: dur("auth", "failure_window"),
    };
    if auth.cache_ttl.is_zero() {
        errors.push(err("auth.cache_ttl", "must be greater than 0"));
    }
    if auth.invalidation_check_interval.is_zero() {
        errors.push(err(
            "auth.invalidation_check_interval",
            "must be greater than 0",
        ));
    }

    let lifetime = dur("tokens", "lifetime");
    if lifetime.is_zero() {
        errors.push(err("tokens.lifetime", "must be greater than 0"));
    }

    let store_timeout = dur("store", "timeout");
    if store_timeout.is_zero() {
        errors.push(err("store.timeout", "must be greater than 0"));
    }

    let cfg = Config {
        server,
        admin: AdminConfig {
            listen: addr("admin", "listen"),
        },
        upstream: UpstreamConfig {
            url: upstream_url,
            connect_timeout: dur("upstream", "connect_timeout"),
            forward_authorization: boolean("upstream", "forward_authorization"),
            host,
            identity_prefix,
            pool_max_idle_per_host: usize::try_from(uint("upstream", "pool_max_idle_per_host"))
                .unwrap_or(usize::MAX),
            pool_idle_timeout: dur("upstream", "pool_idle_timeout"),
        },
        store: StoreConfig {
            url: store_url,
            prefix: string("store", "prefix"),
            timeout: store_timeout,
            tls: store_tls,
        },
        auth,
        routes: RoutesConfig {
            case_insensitive: boolean("routes", "case_insensitive"),
        },
        compat: CompatConfig {
            campaign_statuses: boolean("compat", "campaign_statuses"),
        },
        tokens: TokensConfig {
            enabled: boolean("tokens", "enabled"),
            path: tokens_path,
            lifetime,
            migration_url: string("tokens", "migration_url"),
        },
        apis,
    };

    if let Err(route_errors) = cfg.route_table() {
        for e in route_errors {
            errors.push(ConfigError {
                key: format!("apis[{}].routes", e.api_index),
                reason: format!("{} ({:?}): {}", e.route, e.api, e.reason),
            });
        }
    }
    cfg
}

impl Config {
    /// Compiles the `[[apis]]` section into the route table.
    pub fn route_table(&self) -> Result<crate::routes::RouteTable, Vec<crate::routes::RouteError>> {
        crate::routes::RouteTable::build(
            self.apis
                .iter()
                .map(|a| (a.name.as_str(), a.routes.as_slice())),
            self.routes.case_insensitive,
        )
    }
}

fn parse_upstream_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{s:?}: only http:// upstreams are supported"));
    }
    if uri.host().is_none() {
        return Err(format!("{s:?}: missing host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{s:?}: must not have a path or query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn keys(e: &ConfigErrors) -> Vec<&str> {
        e.0.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse("", no_env()).expect("defaults");
        assert_eq!(c.auth.deleted_key_grace, Duration::from_secs(300));
        assert_eq!(c.auth.cache_ttl, Duration::from_secs(60));
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.store.prefix, "cg:");
        assert_eq!(c.tokens.lifetime, Duration::from_secs(3600));
        assert_eq!(c.upstream.identity_prefix, "x-campaign-");
    }

    #[test]
    fn every_bad_key_is_reported() {
        let text = r#"
[server]
listenn = "0.0.0.0:1"
[auth]
cache_ttl = "6o s"
negative_cache_ttl = 5
[nosuch]
x = 1
"#;
        let e = Config::parse(text, no_env()).expect_err("must fail");
        let k = keys(&e);
        assert!(k.contains(&"server.listenn"), "{e}");
        assert!(k.contains(&"auth.cache_ttl"), "{e}");
        assert!(k.contains(&"auth.negative_cache_ttl"), "{e}");
        assert!(k.contains(&"nosuch"), "{e}");
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![
            (
                "CAMPAIGN_GATE_STORE_URL".to_string(),
                "redis://127.0.0.1:1/0".to_string(),
            ),
            ("CAMPAIGN_GATE_AUTH_CACHE_TTL".to_string(), "2s".to_string()),
            ("CAMPAIGN_GATE_LOG_FORMAT".to_string(), "json".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::parse("", env).expect("valid");
        assert_eq!(c.store.url, "redis://127.0.0.1:1/0");
        assert_eq!(c.auth.cache_ttl, Duration::from_secs(2));

        let env = vec![
            (
                "CAMPAIGN_GATE_AUTH_CACHE_TTLX".to_string(),
                "2s".to_string(),
            ),
            (
                "CAMPAIGN_GATE_SERVER_MAX_BODY_BYTES".to_string(),
                "-1".to_string(),
            ),
        ];
        let e = Config::parse("", env).expect_err("must fail");
        assert_eq!(
            keys(&e),
            vec![
                "CAMPAIGN_GATE_AUTH_CACHE_TTLX",
                "CAMPAIGN_GATE_SERVER_MAX_BODY_BYTES"
            ]
        );
    }

    #[test]
    fn api_errors_name_the_entry() {
        let text = r#"
[[apis]]
name = "events"
routes = ["POST /a"]
colour = "red"
[[apis]]
routes = ["GET /b"]
"#;
        let e = Config::parse(text, no_env()).expect_err("must fail");
        assert!(keys(&e).contains(&"apis[0].colour"), "{e}");
        assert!(keys(&e).contains(&"apis[1].name"), "{e}");
    }

    /// The reason reported for `key`, if any.
    fn reason<'a>(e: &'a ConfigErrors, key: &str) -> Option<&'a str> {
        e.0.iter().find(|e| e.key == key).map(|e| e.reason.as_str())
    }

    #[test]
    fn store_tls_files_are_read_and_checked_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["redis.internal".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let other_key = rcgen::KeyPair::generate().expect("key");
        for (name, content) in [
            ("ca.pem", cert.pem()),
            ("client.key", key.serialize_pem()),
            ("other.key", other_key.serialize_pem()),
            ("garbage.pem", "not a certificate\n".to_string()),
        ] {
            std::fs::write(dir.path().join(name), content).expect("write");
        }
        let store = |url: &str, files: &[(&str, String)]| {
            let mut text = format!("[store]\nurl = {url:?}\n");
            for (key, file) in files {
                text.push_str(&format!("{key} = {file:?}\n"));
            }
            text
        };
        let rediss = "rediss://127.0.0.1:6380/0";

        let c = Config::parse(
            &store(
                rediss,
                &[
                    ("tls_ca_file", path("ca.pem")),
                    ("tls_client_cert_file", path("ca.pem")),
                    ("tls_client_key_file", path("client.key")),
                ],
            ),
            no_env(),
        )
        .expect("valid");
        assert_eq!(c.store.tls.ca_file, Some(PathBuf::from(path("ca.pem"))));

        let e = Config::parse(
            &store(
                rediss,
                &[
                    ("tls_ca_file", path("missing.pem")),
                    ("tls_client_cert_file", path("ca.pem")),
                    ("tls_client_key_file", path("other.key")),
                ],
            ),
            no_env(),
        )
        .expect_err("must fail");
        assert_eq!(
            keys(&e),
            vec!["store.tls_ca_file", "store.tls_client_key_file"],
            "{e}"
        );
        assert!(
            reason(&e, "store.tls_ca_file").is_some_and(|r| r.contains("cannot read")),
            "{e}"
        );
        assert!(
            reason(&e, "store.tls_client_key_file").is_some_and(|r| r.contains("not usable")),
            "{e}"
        );

        // A CA file without a certificate (garbage, or a key), a key without its
        // certificate; the same key set through the environment.
        for ca in ["garbage.pem", "client.key"] {
            let e = Config::parse(
                &store(rediss, &[("tls_ca_file", path(ca))]),
                vec![(
                    "CAMPAIGN_GATE_STORE_TLS_CLIENT_KEY_FILE".to_string(),
                    path("client.key"),
                )],
            )
            .expect_err("must fail");
            assert_eq!(
                keys(&e),
                vec!["store.tls_ca_file", "store.tls_client_cert_file"],
                "{e}"
            );
            assert!(
                reason(&e, "store.tls_ca_file").is_some_and(|r| r.contains("no PEM certificate")),
                "{e}"
            );
        }

        // TLS files where there is no TLS; verification turned off.
        for url in ["redis://127.0.0.1:6379/0", "file:./s.json"] {
            let e = Config::parse(&store(url, &[("tls_ca_file", path("ca.pem"))]), no_env())
                .expect_err("must fail");
            assert_eq!(keys(&e), vec!["store.tls_ca_file"], "{e}");
        }
        let e = Config::parse(&store(&format!("{rediss}#insecure"), &[]), no_env())
            .expect_err("must fail");
        assert_eq!(keys(&e), vec!["store.url"], "{e}");
    }

    #[test]
    fn upstream_must_be_plain_http() {
        let e = Config::parse("[upstream]\nurl = \"https://x:1/p\"", no_env()).expect_err("fail");
        assert_eq!(keys(&e), vec!["upstream.url"]);
    }
}
