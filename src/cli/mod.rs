//! The command line: parses arguments, loads the config, runs one command and turns its
//! outcome into output and an exit code (0 done, 1 refused or failed, 2 bad usage).
//!
//! Admin commands on the store live in [`admin`]; `demo` in [`demo`]. Every command prints
//! for people by default and JSON with `--json`; a failure is one line on stderr.

pub mod admin;
pub mod demo;

use std::borrow::Cow;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config::{Config, ConfigErrors};
use crate::routes::RouteMatch;
use crate::store::StoreError;

/// Config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "./campaign-gate.toml";

/// campaign-gate: a reverse-proxy auth gateway for Campaign-style APIs.
#[derive(Debug, Parser)]
#[command(name = "campaign-gate", version, propagate_version = true)]
pub struct Cli {
    /// Config file [default: ./campaign-gate.toml if it exists, else built-in defaults]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Key store URL, overriding `[store] url` (file:PATH, redis://, rediss://)
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,
    /// Print JSON instead of text for people
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway
    Serve,
    /// Run a demo: embedded store, built-in echo backend, a demo user and key
    Demo,
    /// Check the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show which API a request would match, or why none
    Route {
        /// Request method, e.g. GET
        method: String,
        /// Request path, e.g. /campaignapi/resources/v3/campaigns
        path: String,
    },
    /// Manage users
    #[command(subcommand)]
    Users(admin::UsersCommand),
    /// Manage users' API grants
    #[command(subcommand)]
    Grants(admin::GrantsCommand),
    /// Manage API users' secret keys
    #[command(subcommand)]
    Keys(admin::KeysCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config: prints "ok" or every problem, one per line
    Check,
}

/// Why a command did not succeed. Printed on stderr; exit code 1.
#[derive(Debug)]
pub enum Failure {
    /// One line for people: a refused operation or a runtime error.
    Message(String),
    /// The configuration is invalid: every problem, one per line.
    Config(ConfigErrors),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Message(e.to_string())
    }
}

impl Failure {
    pub fn msg(m: impl Into<String>) -> Failure {
        Failure::Message(m.into())
    }
}

/// What a finished command prints on stdout, and whether it counts as success.
#[derive(Debug, Default)]
pub struct Done {
    pub stdout: String,
    /// False for an answer that is also a "no" (e.g. `route` finding no API): exit 1.
    pub ok: bool,
}

impl Done {
    pub fn ok(stdout: String) -> Done {
        Done { stdout, ok: true }
    }
    pub fn json(value: &serde_json::Value) -> Done {
        Done::ok(format!("{value}\n"))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = run(cli);
    report(outcome)
}

fn report(outcome: Result<Done, Failure>) -> ExitCode {
    match outcome {
        Ok(done) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`| head`) is the reader's choice, not our failure.
            let _ = stdout
                .write_all(done.stdout.as_bytes())
                .and_then(|()| stdout.flush());
            if done.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(Failure::Message(m)) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
        Err(Failure::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<Done, Failure> {
    if let Command::Demo = cli.command {
        let _log = crate::telemetry::init_logging();
        return multi_thread_runtime(None)?
            .block_on(demo::run())
            .map(|()| Done::ok(String::new()))
            .map_err(|e| Failure::msg(format!("demo: {e}")));
    }
    let config_path = cli.config.clone().or_else(|| {
        Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| DEFAULT_CONFIG.into())
    });
    let loaded = load_config(config_path.as_deref(), cli.store.as_deref(), process_env());
    match cli.command {
        Command::Demo => Ok(Done::default()),
        Command::Config(ConfigCommand::Check) => Ok(config_check(loaded, cli.json)),
        Command::Serve => {
            let config = loaded.map_err(Failure::Config)?;
            let _log = crate::telemetry::init_logging();
            // Per-core workers run their own runtimes; this one only carries the admin
            // listener and the store's invalidation tasks.
            let threads =
                (config.server.runtime == crate::config::RuntimeLayout::PerCore).then_some(1);
            multi_thread_runtime(threads)?
                .block_on(crate::server::serve(config, config_path))
                .map(|()| Done::ok(String::new()))
                .map_err(|e| Failure::msg(format!("serve: {e}")))
        }
        Command::Route { method, path } => {
            route(&loaded.map_err(Failure::Config)?, &method, &path, cli.json)
        }
        Command::Users(cmd) => admin::users(&loaded.map_err(Failure::Config)?, cmd, cli.json),
        Command::Grants(cmd) => admin::grants(&loaded.map_err(Failure::Config)?, cmd, cli.json),
        Command::Keys(cmd) => admin::keys(&loaded.map_err(Failure::Config)?, cmd, cli.json),
    }
}

/// The process environment. Not `env::vars()`: it panics on a variable that is not UTF-8.
fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    })
}

/// Loads the config with the environment's overrides; `--store` goes last, so it wins
/// over both the file and `CAMPAIGN_GATE_STORE_URL`, and is validated like them.
fn load_config(
    path: Option<&Path>,
    store: Option<&str>,
    env: impl Iterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let env = env.chain(store.map(|url| {
        (
            format!("{}STORE_URL", crate::config::ENV_PREFIX),
            url.to_string(),
        )
    }));
    Config::load(path, env)
}

/// `threads = None`: one per core.
fn multi_thread_runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| Failure::msg(format!("cannot start the async runtime: {e}")))
}

fn config_check(loaded: Result<Config, ConfigErrors>, json: bool) -> Done {
    match (loaded, json) {
        (Ok(_), false) => Done::ok("ok\n".into()),
        (Ok(_), true) => Done::json(&json!({"ok": true, "errors": []})),
        (Err(errors), false) => {
            // The list is the answer here, so it goes to stdout like "ok" does.
            let mut out = String::new();
            for e in &errors.0 {
                out.push_str(&format!("{e}\n"));
            }
            Done {
                stdout: out,
                ok: false,
            }
        }
        (Err(errors), true) => {
            let list: Vec<_> = errors
                .0
                .iter()
                .map(|e| json!({"key": e.key, "reason": e.reason}))
                .collect();
            Done {
                ok: false,
                ..Done::json(&json!({"ok": false, "errors": list}))
            }
        }
    }
}

/// Why a request matches no API, in the gateway's own refusal names.
enum NoApi {
    InvalidMethod,
    MethodNotAllowed,
    InvalidPath(String),
    UnknownApi,
}

fn route(config: &Config, method: &str, target: &str, json: bool) -> Result<Done, Failure> {
    let table = config.route_table().map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Failure::msg(lines.join("; "))
    })?;
    // The query is forwarded untouched and never matched.
    let path = target.split_once('?').map_or(target, |(p, _)| p);

    let mut canonical: Option<Cow<'_, str>> = None;
    let answer = match http::Method::from_bytes(method.as_bytes()) {
        Err(_) => Err(NoApi::InvalidMethod),
        Ok(m) if m == http::Method::CONNECT || m == http::Method::TRACE => {
            Err(NoApi::MethodNotAllowed)
        }
        Ok(m) if !table.method_allowed(&m) => Err(NoApi::MethodNotAllowed),
        Ok(m) => {
            let checked = crate::path::canonicalize(path).map_err(|e| e.to_string());
            match checked {
                Err(reason) => Err(NoApi::InvalidPath(reason)),
                Ok(c) => {
                    let matched = table.lookup(&m, &c);
                    canonical = Some(c);
                    match matched {
                        RouteMatch::Api(id) => Ok(table.api_name(id).to_string()),
                        RouteMatch::NoApi => Err(NoApi::UnknownApi),
                    }
                }
            }
        }
    };

    if json {
        let (api, error, detail) = match &answer {
            Ok(api) => (Some(api.as_str()), None, None),
            Err(NoApi::InvalidMethod) => (
                None,
                Some("method_not_allowed"),
                Some("not an HTTP method".into()),
            ),
            Err(NoApi::MethodNotAllowed) => (None, Some("method_not_allowed"), None),
            Err(NoApi::InvalidPath(reason)) => (None, Some("invalid_path"), Some(reason.clone())),
            Err(NoApi::UnknownApi) => (None, Some("unknown_api"), None),
        };
        let value = json!({
            "method": method,
            "path": path,
            "canonical_path": canonical.as_deref(),
            "api": api,
            "error": error,
            "detail": detail,
        });
        return Ok(Done {
            ok: answer.is_ok(),
            ..Done::json(&value)
        });
    }

    let shown = match canonical.as_deref() {
        Some(c) if c != path => format!("{method} {path} (canonical: {c})"),
        _ => format!("{method} {path}"),
    };
    match answer {
        Ok(api) => Ok(Done::ok(format!("{shown}: API {api}\n"))),
        Err(NoApi::InvalidMethod) => Err(Failure::msg(format!(
            "{shown}: no API: {method:?} is not an HTTP method (405 method_not_allowed)"
        ))),
        Err(NoApi::MethodNotAllowed) => Err(Failure::msg(format!(
            "{shown}: no API: method not allowed (405 method_not_allowed)"
        ))),
        Err(NoApi::InvalidPath(reason)) => Err(Failure::msg(format!(
            "{shown}: no API: invalid path: {reason} (400 invalid_path)"
        ))),
        Err(NoApi::UnknownApi) => Err(Failure::msg(format!(
            "{shown}: no API matches (404 unknown_api)"
        ))),
    }
}

/// Renders rows under a header as left-aligned columns two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// An instant for people: RFC 3339, UTC, whole seconds.
pub(crate) fn timestamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors() {
        for args in [
            vec!["keys", "delete", "alice", "--slot", "3"],
            vec!["keys", "delete", "alice"],
            vec![
                "keys", "delete", "alice", "--slot", "1", "--grace", "5m", "--now",
            ],
            vec!["keys", "delete", "alice", "--slot", "1", "--grace", "soon"],
            vec!["users", "create", "alice", "--type", "robot"],
            vec!["users", "create", "alice"],
            vec!["grants", "add", "alice"],
            vec!["route", "GET"],
        ] {
            let mut argv = vec!["campaign-gate"];
            argv.extend(&args);
            let e = Cli::try_parse_from(&argv).expect_err(&args.join(" "));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
        let ok = Cli::try_parse_from([
            "campaign-gate",
            "keys",
            "delete",
            "alice",
            "--slot",
            "2",
            "--json",
            "--grace",
            "2s",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn tables_are_aligned() {
        let t = table(
            &["SLOT", "KEY ID", "STATE"],
            &[
                vec!["1".into(), "abc".into(), "active".into()],
                vec!["-".into(), "a-much-longer-id".into(), "grace".into()],
            ],
        );
        assert_eq!(
            t,
            "SLOT  KEY ID            STATE\n\
             1     abc               active\n\
             -     a-much-longer-id  grace\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(1_700_000_000_999), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn store_flag_overrides_config_and_is_validated() {
        let env = || {
            [(
                "CAMPAIGN_GATE_STORE_URL".to_string(),
                "file:/from/env.json".to_string(),
            )]
            .into_iter()
        };
        let c = load_config(None, None, env()).expect("valid");
        assert_eq!(c.store.url, "file:/from/env.json");
        let c = load_config(None, Some("file:/tmp/x.json"), env()).expect("valid");
        assert_eq!(c.store.url, "file:/tmp/x.json");
        let e = load_config(None, Some("ftp://x"), env()).expect_err("invalid");
        assert!(e.0.iter().any(|e| e.key == "store.url"), "{e}");
    }
}
