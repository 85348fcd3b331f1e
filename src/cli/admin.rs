//! Admin commands on the key store: `users`, `grants` and `keys`. Each opens the store
//! named by the config, makes one change or one read, and describes the result.
//!
//! Checks that need the config (API names exist) are made here, before the store is
//! touched; every domain rule is the store's (see [`crate::store::records`]).

use std::io::Read as _;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::{Done, Failure, table, timestamp};
use crate::auth::bearer::{MAX_TOKEN_BYTES, valid_b64token};
use crate::config::Config;
use crate::store::records::{generate_secret_key, imported_key_id};
use crate::store::{NewUser, Revocation, SecretKey, Store, TokenHash, User, UserType};

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user
    Create {
        /// User id: 1 to 128 of A-Z a-z 0-9 . _ @ -
        id: String,
        /// api users call APIs with keys; ui users never call APIs
        #[arg(long = "type", value_enum)]
        kind: Kind,
        /// Tenant the user belongs to
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Display name
        #[arg(long, default_value = "")]
        name: String,
        /// Grant an API defined in the config (repeatable)
        #[arg(long = "grant", value_name = "API")]
        grants: Vec<String>,
    },
    /// List every user
    List,
    /// Show a user, its grants and keys
    Show { id: String },
    /// Disable a user: its keys are refused until it is enabled again
    Disable { id: String },
    /// Enable a disabled user
    Enable { id: String },
    /// Delete a user: its keys and access tokens stop working at once
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Api,
    Ui,
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Grant APIs to a user
    Add {
        id: String,
        #[arg(required = true, value_name = "API")]
        apis: Vec<String>,
    },
    /// Take APIs away from a user
    Remove {
        id: String,
        #[arg(required = true, value_name = "API")]
        apis: Vec<String>,
    },
    /// List a user's grants
    List { id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key in the first free slot; prints the token, shown only this once
    Generate { id: String },
    /// List the keys that work: active ones and those in their grace period
    List { id: String },
    /// Delete a key: it keeps working for its grace period, unless --now
    Delete {
        id: String,
        /// Slot of the key to delete (deleting key 1 promotes key 2 to key 1)
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        slot: u8,
        // The help text as an attribute, not a doc comment: rustdoc would read its
        // `[auth]` as a link.
        #[arg(
            long,
            value_parser = parse_grace,
            conflicts_with = "now",
            help = "How long the key keeps working [default: [auth] deleted_key_grace]"
        )]
        grace: Option<Duration>,
        /// Revoke at once (a leaked key)
        #[arg(long)]
        now: bool,
    },
    /// Import a key issued elsewhere; the token is read from stdin
    Import { id: String },
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

pub fn users(config: &Config, cmd: UsersCommand, json: bool) -> Result<Done, Failure> {
    // Checked before the store is opened: a refused command touches nothing.
    if let UsersCommand::Create { grants, .. } = &cmd {
        check_apis_defined(config, grants)?;
    }
    with_store(config, async |store| match cmd {
        UsersCommand::Create {
            id,
            kind,
            tenant,
            name,
            grants,
        } => {
            let kind = match kind {
                Kind::Api => UserType::Api,
                Kind::Ui => UserType::Ui,
            };
            let user = store
                .create_user(NewUser {
                    id,
                    kind,
                    tenant,
                    name,
                    grants,
                })
                .await?;
            Ok(if json {
                Done::json(&user_json(&user))
            } else {
                Done::ok(format!(
                    "created {} user {} (tenant {}){}\n",
                    user.kind.as_str(),
                    user.id,
                    user.tenant,
                    grants_suffix(&user)
                ))
            })
        }
        UsersCommand::List => {
            let users = store.users().await?;
            if json {
                let list: Vec<Value> = users.iter().map(user_json).collect();
                return Ok(Done::json(&Value::Array(list)));
            }
            if users.is_empty() {
                return Ok(Done::ok("no users\n".into()));
            }
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.id.clone(),
                        u.kind.as_str().into(),
                        u.tenant.clone(),
                        state(u).into(),
                        dash_if_empty(u.grants.join(",")),
                        timestamp(u.created_ms),
                        dash_if_empty(u.name.clone()),
                    ]
                })
                .collect();
            Ok(Done::ok(table(
                &["ID", "TYPE", "TENANT", "STATE", "GRANTS", "CREATED", "NAME"],
                &rows,
            )))
        }
        UsersCommand::Show { id } => {
            let user = existing_user(store, &id).await?;
            let keys = store.keys(&id).await?;
            if json {
                let mut value = user_json(&user);
                value["keys"] = Value::Array(keys.iter().map(key_json).collect());
                return Ok(Done::json(&value));
            }
            let mut out = table(
                &["user", &user.id],
                &[
                    vec!["type".into(), user.kind.as_str().into()],
                    vec!["tenant".into(), user.tenant.clone()],
                    vec!["name".into(), dash_if_empty(user.name.clone())],
                    vec!["state".into(), state(&user).into()],
                    vec!["grants".into(), dash_if_empty(user.grants.join(", "))],
                    vec!["created".into(), timestamp(user.created_ms)],
                ],
            );
            if user.kind == UserType::Api {
                if keys.is_empty() {
                    out.push_str("keys     none\n");
                } else {
                    out.push_str("keys:\n");
                    for line in keys_table(&keys).lines() {
                        out.push_str(&format!("  {line}\n"));
                    }
                }
            }
            Ok(Done::ok(out))
        }
        UsersCommand::Disable { id } => {
            let user = store.set_disabled(&id, true).await?;
            Ok(if json {
                Done::json(&user_json(&user))
            } else {
                Done::ok(format!(
                    "user {} disabled: its keys are refused until it is enabled again\n",
                    user.id
                ))
            })
        }
        UsersCommand::Enable { id } => {
            let user = store.set_disabled(&id, false).await?;
            Ok(if json {
                Done::json(&user_json(&user))
            } else {
                Done::ok(format!("user {} enabled\n", user.id))
            })
        }
        UsersCommand::Delete { id } => {
            store.delete_user(&id).await?;
            Ok(if json {
                Done::json(&json!({"user": id, "deleted": true}))
            } else {
                Done::ok(format!(
                    "user {id} deleted; its keys and access tokens stopped working\n"
                ))
            })
        }
    })
}

pub fn grants(config: &Config, cmd: GrantsCommand, json: bool) -> Result<Done, Failure> {
    if let GrantsCommand::Add { apis, .. } = &cmd {
        check_apis_defined(config, apis)?;
    }
    with_store(config, async |store| {
        let user = match cmd {
            GrantsCommand::Add { id, apis } => store.grant(&id, &apis).await?,
            GrantsCommand::Remove { id, apis } => store.revoke_grants(&id, &apis).await?,
            GrantsCommand::List { id } => existing_user(store, &id).await?,
        };
        Ok(if json {
            Done::json(&json!({"user": user.id, "grants": user.grants}))
        } else if user.grants.is_empty() {
            Done::ok(format!("user {} has no grants\n", user.id))
        } else {
            Done::ok(format!(
                "user {} is granted: {}\n",
                user.id,
                user.grants.join(", ")
            ))
        })
    })
}

pub fn keys(config: &Config, cmd: KeysCommand, json: bool) -> Result<Done, Failure> {
    // Read before the store is opened, so a bad token is refused without touching it.
    let imported = match &cmd {
        KeysCommand::Import { .. } => Some(read_imported_token()?),
        _ => None,
    };
    let default_grace = config.auth.deleted_key_grace;
    with_store(config, async |store| match cmd {
        KeysCommand::Generate { id } => {
            let (token, key_id) = generate_secret_key();
            let key = store
                .add_key(&id, TokenHash::of(token.as_bytes()), &key_id)
                .await?;
            let slot = key.slot.unwrap_or(0);
            if json {
                return Ok(Done::json(
                    &json!({"user": id, "slot": slot, "key_id": key.key_id, "token": token}),
                ));
            }
            eprintln!(
                "generated key {slot} for {id} (key id {}); store the token now, it is not shown again",
                key.key_id
            );
            Ok(Done::ok(format!("{token}\n")))
        }
        KeysCommand::Import { id } => {
            let token = imported.unwrap_or_default();
            let key_id = imported_key_id(&token);
            let key = store
                .add_key(&id, TokenHash::of(token.as_bytes()), &key_id)
                .await?;
            let slot = key.slot.unwrap_or(0);
            Ok(if json {
                Done::json(&json!({"user": id, "slot": slot, "key_id": key.key_id}))
            } else {
                Done::ok(format!(
                    "imported key {slot} for {id} (key id {})\n",
                    key.key_id
                ))
            })
        }
        KeysCommand::List { id } => {
            let keys = store.keys(&id).await?;
            if json {
                return Ok(Done::json(&Value::Array(
                    keys.iter().map(key_json).collect(),
                )));
            }
            if keys.is_empty() {
                return Ok(Done::ok(format!("user {id} has no keys\n")));
            }
            Ok(Done::ok(keys_table(&keys)))
        }
        KeysCommand::Delete {
            id,
            slot,
            grace,
            now,
        } => {
            let how = if now {
                Revocation::Now
            } else {
                Revocation::Grace(grace.unwrap_or(default_grace))
            };
            let deleted = store.delete_key(&id, slot, how).await?;
            // Deleting key 1 promotes key 2: say so, it changes what "key 1" means.
            let promoted = if slot == 1 {
                store
                    .keys(&id)
                    .await?
                    .into_iter()
                    .find(|k| k.slot == Some(1))
            } else {
                None
            };
            let deadline = deleted.expires_ms.unwrap_or(0);
            if json {
                return Ok(Done::json(&json!({
                    "user": id,
                    "slot": slot,
                    "key_id": deleted.key_id,
                    "deadline_ms": deadline,
                    "promoted_key_id": promoted.as_ref().map(|k| &k.key_id),
                })));
            }
            let mut out = match how {
                Revocation::Now => format!(
                    "revoked key {slot} of {id} (key id {}) at once\n",
                    deleted.key_id
                ),
                Revocation::Grace(_) => format!(
                    "deleted key {slot} of {id} (key id {}); it keeps working until {}\n",
                    deleted.key_id,
                    timestamp(deadline)
                ),
            };
            if let Some(k) = promoted {
                out.push_str(&format!("key 2 (key id {}) is now key 1\n", k.key_id));
            }
            Ok(Done::ok(out))
        }
    })
}

/// Opens the store on a current-thread runtime and runs one command against it.
fn with_store(
    config: &Config,
    command: impl AsyncFnOnce(&Store) -> Result<Done, Failure>,
) -> Result<Done, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::msg(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let store = Store::from_config(&config.store).await?;
        command(&store).await
    })
}

async fn existing_user(store: &Store, id: &str) -> Result<User, Failure> {
    store
        .user(id)
        .await?
        .ok_or_else(|| Failure::msg(format!("user {id} does not exist")))
}

/// Refuses API names the config does not define: a grant must name something routable.
fn check_apis_defined(config: &Config, apis: &[String]) -> Result<(), Failure> {
    let Some(unknown) = apis
        .iter()
        .find(|a| !config.apis.iter().any(|d| d.name == **a))
    else {
        return Ok(());
    };
    let defined: Vec<&str> = config.apis.iter().map(|a| a.name.as_str()).collect();
    Err(Failure::msg(if defined.is_empty() {
        format!("API {unknown} is not defined in the config (it defines no APIs)")
    } else {
        format!(
            "API {unknown} is not defined in the config (defined: {})",
            defined.join(", ")
        )
    }))
}

/// The token for `keys import`: stdin less one trailing newline, a b64token of at most
/// [`MAX_TOKEN_BYTES`], exactly what the gateway accepts on the wire.
fn read_imported_token() -> Result<String, Failure> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| Failure::msg(format!("cannot read the token from stdin: {e}")))?;
    check_imported_token(input)
}

fn check_imported_token(mut input: String) -> Result<String, Failure> {
    if input.ends_with('\n') {
        input.pop();
        if input.ends_with('\r') {
            input.pop();
        }
    }
    if input.len() > MAX_TOKEN_BYTES || !valid_b64token(input.as_bytes()) {
        return Err(Failure::msg(format!(
            "the token on stdin must be an RFC 6750 b64token of 1 to {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(input)
}

fn keys_table(keys: &[SecretKey]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.slot.map_or_else(|| "-".into(), |s| s.to_string()),
                k.key_id.clone(),
                timestamp(k.created_ms),
                match k.expires_ms {
                    None => "active".into(),
                    Some(d) => format!("grace until {}", timestamp(d)),
                },
                k.last_used_ms.map_or_else(|| "never".into(), timestamp),
            ]
        })
        .collect();
    table(&["SLOT", "KEY ID", "CREATED", "STATE", "LAST USED"], &rows)
}

/// A user for scripts: the stored fields, times in ms since the epoch.
fn user_json(user: &User) -> Value {
    json!({
        "id": user.id,
        "type": user.kind.as_str(),
        "tenant": user.tenant,
        "name": user.name,
        "disabled": user.disabled,
        "grants": user.grants,
        "created_ms": user.created_ms,
    })
}

/// A key for scripts; `slot` is null and `deadline_ms` set for a key in grace.
fn key_json(key: &SecretKey) -> Value {
    json!({
        "slot": key.slot,
        "key_id": key.key_id,
        "state": if key.expires_ms.is_some() { "grace" } else { "active" },
        "created_ms": key.created_ms,
        "deadline_ms": key.expires_ms,
        "last_used_ms": key.last_used_ms,
    })
}

fn state(user: &User) -> &'static str {
    if user.disabled { "disabled" } else { "enabled" }
}

fn grants_suffix(user: &User) -> String {
    if user.grants.is_empty() {
        String::new()
    } else {
        format!(", granted {}", user.grants.join(", "))
    }
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imported_tokens_lose_one_newline_and_must_be_b64tokens() {
        assert_eq!(check_imported_token("abc==\n".into()).expect("ok"), "abc==");
        assert_eq!(check_imported_token("abc\r\n".into()).expect("ok"), "abc");
        assert_eq!(check_imported_token("abc".into()).expect("ok"), "abc");
        for bad in ["", "\n", "abc\n\n", "a b", " abc", "é", "=abc"] {
            assert!(check_imported_token(bad.into()).is_err(), "{bad:?}");
        }
        assert!(check_imported_token("a".repeat(512)).is_ok());
        assert!(check_imported_token("a".repeat(513)).is_err());
    }

    #[test]
    fn grants_must_name_configured_apis() {
        let config = Config::parse(
            "[[apis]]\nname = \"events\"\nroutes = [\"POST /e\"]\n",
            Vec::<(String, String)>::new(),
        )
        .expect("config");
        assert!(check_apis_defined(&config, &["events".into()]).is_ok());
        match check_apis_defined(&config, &["events".into(), "nope".into()]) {
            Err(Failure::Message(m)) => {
                assert_eq!(m, "API nope is not defined in the config (defined: events)");
            }
            other => panic!("{other:?}"),
        }
    }
}
