//! The binary's command line: issue 2, point 6 (`config check` names every bad key),
//! the admin commands' refusals (exit 1, one line, nothing written), usage errors
//! (exit 2), and `serve` announcing itself and forwarding.

mod common;

use std::process::Output;

use common::{EVENTS, RecordingBackend, Req, TestEnv, describe};

/// Everything the process printed, for "does it name X" checks.
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `config check` and asserts it rejects the config (exit 1) naming each of
/// `names` (key paths, plus words of the reason where the path alone is ambiguous).
#[track_caller]
fn assert_check_rejects(env: &TestEnv, names: &[&str]) {
    let out = env.cli(&["config", "check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "config check must reject:\n{}\n--- config\n{}",
        describe(&out),
        env.config_text()
    );
    let text = printed(&out);
    for name in names {
        assert!(
            text.contains(name),
            "config check does not name {name:?}:\n{}\n--- config\n{}",
            describe(&out),
            env.config_text()
        );
    }
    assert!(
        !text.contains("\nok\n") && !text.starts_with("ok"),
        "{text}"
    );
}

#[test]
fn config_check_accepts_the_template() {
    let env = TestEnv::builder().build();
    let out = env.cli(&["config", "check"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn config_check_names_a_misspelled_key() {
    let env = TestEnv::builder()
        .set("server", "request_timout", "\"5s\"")
        .build();
    assert_check_rejects(&env, &["server.request_timout"]);
}

#[test]
fn config_check_names_a_bad_duration() {
    let env = TestEnv::builder()
        .set("auth", "cache_ttl", "\"5 parsecs\"")
        .build();
    assert_check_rejects(&env, &["auth.cache_ttl"]);
}

/// "An unknown API in a route": routes are declared inside their API, so there is no
/// route naming an API that does not exist. What can be wrong is the route's own
/// method (the part that must name something the gateway knows) and an API entry
/// that names nothing. Both must be reported with their place in `[[apis]]`. (A grant
/// naming an undefined API is refused by the CLI: see `admin_refusals_...` below.)
#[test]
fn config_check_names_a_route_without_a_valid_method() {
    // The catalogue has four APIs, so the added one is apis[4].
    for route in ["/campaignapi/resources/v3/broken", "G@T /campaignapi/x"] {
        let env = TestEnv::builder()
            .extra_toml(&format!(
                "[[apis]]\nname = \"broken\"\nroutes = [{}]\n",
                common::env::toml_string(route)
            ))
            .build();
        assert_check_rejects(&env, &["apis[4].routes", route]);
    }
}

#[test]
fn config_check_names_an_api_without_a_name() {
    let env = TestEnv::builder()
        .extra_toml("[[apis]]\nroutes = [\"GET /campaignapi/unnamed\"]\n")
        .build();
    assert_check_rejects(&env, &["apis[4].name"]);
}

#[test]
fn config_check_names_a_duplicate_route() {
    let env = TestEnv::builder()
        .extra_toml(&format!(
            "[[apis]]\nname = \"events-again\"\nroutes = [\"POST {EVENTS}\"]\n"
        ))
        .build();
    assert_check_rejects(&env, &["apis[4].routes", "duplicate", EVENTS]);
}

#[test]
fn config_check_names_a_duplicate_api_name() {
    let env = TestEnv::builder()
        .extra_toml("[[apis]]\nname = \"events\"\nroutes = [\"GET /campaignapi/other\"]\n")
        .build();
    assert_check_rejects(&env, &["apis[4]", "duplicate"]);
}

#[test]
fn config_check_lists_every_problem_at_once() {
    let env = TestEnv::builder()
        .set("server", "request_timout", "\"5s\"")
        .set("auth", "cache_ttl", "\"5 parsecs\"")
        .extra_toml(&format!(
            "[[apis]]\nname = \"broken\"\nroutes = [\"/campaignapi/x\"]\n\
             [[apis]]\nname = \"events-again\"\nroutes = [\"POST {EVENTS}\"]\n"
        ))
        .build();
    assert_check_rejects(
        &env,
        &[
            "server.request_timout",
            "auth.cache_ttl",
            "apis[4].routes",
            "apis[5].routes",
        ],
    );
    // And --json gives the same list, machine-readably.
    let out = env.cli(&["config", "check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("config check --json prints JSON");
    let keys: Vec<&str> = json["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    for key in [
        "server.request_timout",
        "auth.cache_ttl",
        "apis[4].routes",
        "apis[5].routes",
    ] {
        assert!(keys.contains(&key), "{key} missing from {json}");
    }
}

#[test]
fn serve_refuses_a_bad_config_before_binding() {
    let env = TestEnv::builder()
        .set("server", "request_timout", "\"5s\"")
        .build();
    let out = env.cli(&["serve"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        printed(&out).contains("server.request_timout"),
        "{}",
        describe(&out)
    );
    assert!(
        !printed(&out).contains("listening"),
        "it must not start: {}",
        describe(&out)
    );
}

#[test]
fn admin_refusals_exit_1_with_one_line_and_write_nothing() {
    let env = TestEnv::builder().build();
    env.create_api_user("alice", &["events"]);
    env.generate_key("alice");
    env.create_api_user("bob", &["events"]);
    env.cli_ok(&["users", "create", "ursula", "--type", "ui"]);

    let refusals: &[&[&str]] = &[
        &["keys", "generate", "alice"],
        &["keys", "generate", "ursula"],
        &["grants", "add", "bob", "no-such-api"],
        &[
            "users",
            "create",
            "carol",
            "--type",
            "api",
            "--grant",
            "no-such-api",
        ],
        &["keys", "delete", "bob", "--slot", "2", "--now"],
        &["keys", "delete", "ursula", "--slot", "1", "--now"],
        &["keys", "generate", "nobody"],
        &["users", "disable", "nobody"],
        &["grants", "add", "nobody", "events"],
        &["users", "create", "alice", "--type", "api"],
    ];
    for args in refusals {
        let before = std::fs::read(env.store_path()).expect("read store");
        let reason = env.cli_refused(args);
        let after = std::fs::read(env.store_path()).expect("read store");
        assert!(
            before == after,
            "refused `{}` ({reason}) changed the store file",
            args.join(" ")
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let env = TestEnv::builder().build();
    for args in [
        &["frobnicate"][..],
        &["keys", "delete", "alice"],
        &["users", "create"],
        &[
            "keys", "delete", "alice", "--slot", "1", "--grace", "2s", "--now",
        ],
    ] {
        let out = env.cli(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "`{}` is a usage error: {}",
            args.join(" "),
            describe(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_announces_its_addresses_and_forwards() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let server = env.spawn_serve();
    let resp = Req::post(EVENTS).bearer(&token).send(server.addr).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        backend
            .single_request()
            .header("x-campaign-user-id")
            .as_deref(),
        Some("alice")
    );
    let health = Req::get("/healthz").send(server.admin_addr).await;
    assert_eq!(health.status, 200, "{}", health.text());
}
