//! Issue 2, point 5: concurrent CLI writers on the `file:` store. Two processes racing
//! for the last key slot end with exactly two keys and one clear refusal; a writer
//! killed with SIGKILL at any moment never leaves the store corrupt or locked.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{TestEnv, assert_refused, describe};

const RACE_ROUNDS: usize = 20;

/// Writers started and killed at a random moment of their run.
const KILLS: usize = 40;

#[test]
fn racing_key_generations_end_with_two_keys_and_one_refusal() {
    let env = TestEnv::builder().build();
    for round in 0..RACE_ROUNDS {
        let user = format!("racer{round}");
        let first = env.create_api_user(&user, &["events"]);

        // Both started before either is waited for, so they really overlap.
        let spawn = || {
            env.command(&["keys", "generate", &user])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn keys generate")
        };
        let (a, b) = (spawn(), spawn());
        let outputs = [a, b].map(|c| c.wait_with_output().expect("wait for keys generate"));

        let (won, lost): (Vec<_>, Vec<_>) = outputs.iter().partition(|o| o.status.success());
        assert_eq!(
            (won.len(), lost.len()),
            (1, 1),
            "round {round}: exactly one of two racers must win:\n{}\n{}",
            describe(&outputs[0]),
            describe(&outputs[1])
        );
        assert_refused(lost[0], &format!("round {round}: the losing keys generate"));
        let second = String::from_utf8_lossy(&won[0].stdout).trim().to_string();

        let listed = env.cli_json(&["keys", "list", &user]);
        let ids: Vec<(u64, &str)> = listed
            .as_array()
            .expect("keys list is an array")
            .iter()
            .map(|k| {
                assert_eq!(k["state"], "active", "round {round}: {listed}");
                (
                    k["slot"].as_u64().expect("active key has a slot"),
                    k["key_id"].as_str().expect("key id"),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                (1, common::key_id_of(&first).as_str()),
                (2, common::key_id_of(&second).as_str())
            ],
            "round {round}: the existing key and the winner's"
        );
    }
}

/// A small xorshift generator: the kill delays must vary, and a failure must be
/// reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Users added to the store before the kills, so that a write takes long enough
/// (a few hundred KB of JSON) for a kill to land inside it, not only around it.
const FILLER_USERS: usize = 1000;

/// Copies user `model` (without its keys) as `filler0`.. in the store file, in one
/// edit: the CLI would rewrite the whole file once per user.
fn pad_store(env: &TestEnv, model: &str, n: usize) {
    env.edit_store(|json| {
        let users = json["users"]
            .as_object_mut()
            .expect("the store file keeps users in a \"users\" map");
        let mut template = users[model].clone();
        template["keys"] = serde_json::json!([]);
        for i in 0..n {
            let id = format!("filler{i}");
            let mut user = template.clone();
            user["id"] = id.clone().into();
            users.insert(id, user);
        }
    });
    let listed = env.cli_json(&["users", "list"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(n + 1),
        "padded store reads back"
    );
}

#[test]
fn writers_killed_mid_write_never_corrupt_the_store() {
    let env = TestEnv::builder().build();
    env.cli_ok(&[
        "users", "create", "anchor", "--type", "api", "--grant", "events",
    ]);
    pad_store(&env, "anchor", FILLER_USERS);
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill delays seeded with KILL_SEED={seed}");
    let mut rng = Rng(seed);

    // How long a whole write takes here, so that kills land anywhere in it: before
    // the lock, while writing the temp file, around the rename.
    let started = Instant::now();
    env.cli_ok(&["users", "create", "calibrate", "--type", "api"]);
    let span_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);

    let mut killed = 0;
    for i in 0..KILLS {
        let args: Vec<String> = match i % 3 {
            0 => vec!["users".into(), "create".into(), format!("victim{i}")]
                .into_iter()
                .chain(["--type", "api", "--grant", "events"].map(String::from))
                .collect(),
            1 => ["keys", "generate", "anchor"].map(String::from).to_vec(),
            _ => ["keys", "delete", "anchor", "--slot", "1", "--now"]
                .map(String::from)
                .to_vec(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child: Child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        // The write is the end of a run (after start-up and reading the store): aim
        // most kills there, some past it.
        let delay = Duration::from_micros(span_us / 3 + rng.below(span_us));
        std::thread::sleep(delay);
        // `Child::kill` is SIGKILL on Unix, sent to this child's pid only.
        if child.kill().is_ok() {
            killed += 1;
        }
        let _ = child.wait();

        // After every kill: the file (if any) is whole JSON and the store still
        // answers; a lock left behind would make the next write hang or fail.
        if env.store_path().exists() {
            let text = std::fs::read(env.store_path()).expect("read store file");
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&text) {
                let tail = &text[text.len().saturating_sub(300)..];
                panic!(
                    "store file corrupt after killing `{}` after {delay:?} (KILL_SEED={seed}): \
                     {e}; {} bytes, ending in:\n{}",
                    args.join(" "),
                    text.len(),
                    String::from_utf8_lossy(tail)
                );
            }
        }
    }
    assert!(killed > 0, "no writer was killed while running");

    let users = env.cli_json(&["users", "list"]);
    assert!(users.is_array(), "users list --json: {users}");
    let started = Instant::now();
    env.cli_ok(&["users", "create", "after-the-kills", "--type", "api"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a write after the kills waited {:?}: a lock was left behind",
        started.elapsed()
    );
    let users = env.cli_json(&["users", "list"]);
    let ids: Vec<&str> = users
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|u| u["id"].as_str())
        .collect();
    assert!(ids.len() > FILLER_USERS, "users lost: {} left", ids.len());
    for id in ["anchor", "calibrate", "after-the-kills"] {
        assert!(ids.contains(&id), "user {id} lost: {ids:?}");
    }
}
