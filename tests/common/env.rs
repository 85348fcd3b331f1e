//! `TestEnv`: one gateway installation in a temporary directory: a config file (from a
//! template plus per-test settings), an embedded `file:` store beside it, the binary's
//! CLI pointed at both, and the in-process gateway started from the same config.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use campaign_gate::config::Config;
use campaign_gate::server::Gateway;
use tempfile::TempDir;

/// The API catalogue every test environment starts with (a copy of the project's
/// shared `campaign-apis.toml`): `events`, `campaigns`, `profiles`, `users`.
pub const CAMPAIGN_APIS: &str = include_str!("../fixtures/campaign-apis.toml");

/// Tenant given to users made by [`TestEnv::create_api_user`].
pub const TENANT: &str = "acme";

/// The path of the `events` API (`POST` only).
pub const EVENTS: &str = "/campaignapi/resources/v3/events";

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_campaign-gate");

/// Sections in the order they are written; others follow alphabetically.
const SECTION_ORDER: &[&str] = &[
    "server", "admin", "upstream", "store", "auth", "routes", "compat", "tokens",
];

/// Builder for [`TestEnv`]. Values are TOML literals, written as given, so a test can
/// also write invalid ones (`config check` tests).
#[derive(Debug, Clone)]
pub struct TestEnvBuilder {
    settings: BTreeMap<String, BTreeMap<String, String>>,
    apis: String,
    extra: String,
}

impl TestEnvBuilder {
    /// `[upstream] url`.
    pub fn upstream(self, url: &str) -> Self {
        self.set("upstream", "url", &toml_string(url))
    }

    /// Sets `[section] key = value`, `value` being a TOML literal (`"1s"` with quotes,
    /// `true`, `1024`), replacing the template's value if it has one.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        self.settings
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Replaces the `[[apis]]` catalogue.
    pub fn apis(mut self, toml: &str) -> Self {
        self.apis = toml.to_string();
        self
    }

    /// Appends raw TOML after everything else. Only array-of-table entries (`[[apis]]`)
    /// can go there without redefining a table.
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Creates the directory and writes the config file; the store file is left to
    /// the gateway and the CLI to create.
    pub fn build(self) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("campaign-gate-test-")
            .tempdir()
            .expect("create temp dir");
        let store_path = dir.path().join("store.json");
        let config_path = dir.path().join("campaign-gate.toml");
        let store_url = format!("file:{}", store_path.display());
        let config_text = self.set("store", "url", &toml_string(&store_url)).render();
        std::fs::write(&config_path, &config_text).expect("write config file");
        TestEnv {
            dir,
            config_path,
            store_path,
            config_text,
        }
    }

    fn render(&self) -> String {
        let mut sections: Vec<&String> = self.settings.keys().collect();
        sections.sort_by_key(|s| {
            (
                SECTION_ORDER
                    .iter()
                    .position(|o| o == s)
                    .unwrap_or(SECTION_ORDER.len()),
                s.as_str(),
            )
        });
        let mut out = String::new();
        for section in sections {
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in &self.settings[section] {
                out.push_str(&format!("{key} = {value}\n"));
            }
            out.push('\n');
        }
        out.push_str(&self.apis);
        out.push('\n');
        out.push_str(&self.extra);
        out
    }
}

/// A quoted, escaped TOML string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A temporary gateway installation. The directory is removed when dropped.
#[derive(Debug)]
pub struct TestEnv {
    dir: TempDir,
    config_path: PathBuf,
    store_path: PathBuf,
    config_text: String,
}

impl TestEnv {
    /// The template: both listeners on `127.0.0.1:0`, an upstream where nothing
    /// listens (set a backend with [`TestEnvBuilder::upstream`]), the `file:` store in
    /// the temp dir, and the shared API catalogue.
    pub fn builder() -> TestEnvBuilder {
        TestEnvBuilder {
            settings: BTreeMap::new(),
            apis: CAMPAIGN_APIS.to_string(),
            extra: String::new(),
        }
        .set("server", "listen", "\"127.0.0.1:0\"")
        .set("admin", "listen", "\"127.0.0.1:0\"")
        // Port 9 (discard) has no listener on a test machine; tests that forward set
        // their own backend.
        .upstream("http://127.0.0.1:9")
    }

    /// The template with `backend` as upstream.
    pub fn with_upstream(url: &str) -> TestEnv {
        TestEnv::builder().upstream(url).build()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn store_path(&self) -> &Path {
        &self.store_path
    }

    /// Where [`TestEnv::spawn_serve`] writes the server's log.
    pub fn serve_log_path(&self) -> PathBuf {
        self.dir().join("serve.log")
    }

    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// The config as the gateway sees it (no environment overrides).
    pub fn config(&self) -> Config {
        Config::parse(&self.config_text, Vec::new())
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{}", self.config_text))
    }

    /// Starts the gateway in-process on the current runtime.
    pub async fn start_gateway(&self) -> Gateway {
        Gateway::start(self.config())
            .await
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// A `campaign-gate` command with `args` and this environment's `--config`, and no
    /// `CAMPAIGN_GATE_*` variables inherited from the test runner.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CAMPAIGN_GATE_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs the CLI to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run campaign-gate")
    }

    /// Runs the CLI with `input` on its standard input (e.g. `keys import`).
    pub fn cli_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn campaign-gate");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .expect("write to campaign-gate's stdin");
        drop(stdin);
        child.wait_with_output().expect("wait for campaign-gate")
    }

    /// Runs the CLI and returns its stdout; panics with everything it printed unless it
    /// exited 0.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "campaign-gate {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Runs a read command with `--json` and parses its stdout.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.cli_ok(&args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("campaign-gate {args:?}: stdout is not JSON ({e}): {stdout}")
        })
    }

    /// Runs the CLI and asserts it refused: exit 1, one line on stderr. Returns that line.
    #[track_caller]
    pub fn cli_refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert_refused(&out, &format!("campaign-gate {args:?}"));
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    }

    /// Creates an API user of tenant [`TENANT`] with `grants` and generates its key 1.
    #[track_caller]
    pub fn create_api_user(&self, id: &str, grants: &[&str]) -> String {
        let mut args = vec!["users", "create", id, "--type", "api", "--tenant", TENANT];
        for g in grants {
            args.extend(["--grant", g]);
        }
        self.cli_ok(&args);
        self.generate_key(id)
    }

    /// `keys generate`: the token, which must be alone on stdout.
    #[track_caller]
    pub fn generate_key(&self, id: &str) -> String {
        let stdout = self.cli_ok(&["keys", "generate", id]);
        let token = stdout.trim_end_matches(['\r', '\n']);
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "keys generate must print the token alone on one line, got {stdout:?}"
        );
        token.to_string()
    }

    /// Reads the store file as JSON, lets `edit` change it, and writes it back
    /// atomically (temp file + rename). For records the CLI cannot make.
    pub fn edit_store(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let text = std::fs::read(&self.store_path).expect("read store file");
        let mut json: serde_json::Value =
            serde_json::from_slice(&text).expect("store file is JSON");
        edit(&mut json);
        let tmp = self.dir().join("store.json.test-edit");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&json).expect("serialize"))
            .expect("write store copy");
        std::fs::rename(&tmp, &self.store_path).expect("replace store file");
    }

    /// Starts `campaign-gate serve` as a child process and waits for its ready line.
    /// Its log (stderr) goes to [`TestEnv::serve_log_path`].
    pub fn spawn_serve(&self) -> ServeProcess {
        let log = std::fs::File::create(self.serve_log_path()).expect("create serve log");
        let mut child = self
            .command(&["serve"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn campaign-gate serve");
        let stdout = child.stdout.take().expect("piped stdout");
        // A thread, so that a child that never prints cannot hang the test past the
        // deadline below.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(self.serve_log_path()).unwrap_or_default();
                panic!("campaign-gate serve printed no ready line within 20 s; log:\n{log}");
            }
        };
        let (addr, admin_addr) = parse_ready_line(&line).unwrap_or_else(|| {
            let _ = child.kill();
            let log = std::fs::read_to_string(self.serve_log_path()).unwrap_or_default();
            panic!("unexpected ready line from campaign-gate serve: {line:?}; log:\n{log}")
        });
        ServeProcess {
            child,
            addr,
            admin_addr,
        }
    }
}

/// `campaign-gate listening on http://ADDR (admin http://ADDR)`.
pub fn parse_ready_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line
        .trim()
        .strip_prefix("campaign-gate listening on http://")?;
    let (addr, rest) = rest.split_once(' ')?;
    let admin = rest.strip_prefix("(admin http://")?.strip_suffix(')')?;
    Some((addr.parse().ok()?, admin.parse().ok()?))
}

/// A `campaign-gate serve` child process; killed (by its own pid) when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key id inside a generated token: base64 of `<key-id>:<secret>`.
pub fn key_id_of(token: &str) -> String {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .unwrap_or_else(|e| panic!("token {token:?} is not standard base64: {e}"));
    let text = String::from_utf8(decoded).expect("decoded token is UTF-8");
    let (key_id, _secret) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("decoded token has no ':'"));
    key_id.to_string()
}

/// Asserts a CLI refusal: exit code 1 and exactly one non-empty line on stderr.
#[track_caller]
pub fn assert_refused(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} must be refused with exit 1: {}",
        describe(out)
    );
    assert_eq!(
        stderr.trim_end_matches('\n').lines().count(),
        1,
        "{what} must say why on one stderr line: {}",
        describe(out)
    );
    assert!(!stderr.trim().is_empty(), "{what}: empty reason");
}

/// Exit status and both streams, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
