//! The `redis://` store: the records of DESIGN.md section 3 in one Redis shared by every
//! replica, each change one Lua script that also announces itself on `<prefix>invalidate`.
//!
//! Layout (prefix `cg:` by default; details and the reasons in `docs/redis.md`):
//! - `cg:key:<sha256-hex>`: string, the owning user's id; `PEXPIREAT` just after the
//!   grace deadline once the key is deleted, deleted at once when revoked now;
//! - `cg:user:{<id>}`: hash `type`, `tenant`, `name`, `disabled` (`0`/`1`), `grants`
//!   (sorted, comma-separated API names), `created_ms`;
//! - `cg:user:{<id>}:keys`: hash token hash -> JSON object of strings `key_id`, `slot`
//!   (`1`/`2`, empty once deleted), `created_ms`, `expires_ms` (empty until deleted),
//!   `last_used_ms` (empty until the key is first used);
//! - `cg:tok:<sha256-hex>`: string, JSON `user`, `parent` (key hash), `expires_ms` of an
//!   access token (deprecated flow); `PEXPIREAT` just after its expiry;
//! - `cg:user:{<id>}:tokens`: hash access-token hash -> JSON `parent`, `expires_ms` (the
//!   user's tokens, for pruning and deletion); `cg:user:{<id>}:token_requests`: sorted
//!   set of the last minute's token requests (rate limit), scored by time;
//! - `cg:users`: set of user ids (for `users list`);
//! - `cg:seq`: the invalidation sequence; channel `cg:invalidate`: `<seq> key <hash>`,
//!   `<seq> user <id>`, `<seq> all`.
//!
//! The scripts apply the rules of [`super::records`] line for line, with the same refusal
//! messages, on Redis' clock (`TIME`). Rules that need no stored state (field checks,
//! grant normalisation, listing order) are the Rust functions themselves.
//!
//! Every call runs under `[store] timeout`. Commands go over a [`ConnectionManager`]
//! (reconnects on I/O errors) per thread that runs a current-thread runtime, so that each
//! gateway worker's lookups stay on its own thread, and one shared by all other callers;
//! a call that times out also drops its connection, so a half-open connection is
//! replaced instead of timing out forever.
//!
//! `rediss://` runs every connection (commands, pub/sub) over TLS (rustls with ring),
//! always verifying the server's certificate: against `[store] tls_ca_file` when set,
//! else the system's trust store. `#insecure` (no verification) is refused.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{
    ClientTlsConfig, ConnectionAddr, IntoConnectionInfo as _, RedisError, Script, TlsCertificates,
    Value,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use thread_local::ThreadLocal;

use super::records::{self, UserRecords};
use super::{
    AccessToken, Invalidation, KeyUse, NewUser, Owner, Resolved, Revocation, SecretKey, StoreError,
    TokenHash, User, UserType,
};
use crate::config::{ConfigError, StoreTls};

/// First in every script but [`LOOKUP`]: Redis' clock, whether a key entry works at a time
/// (records::SecretKey::valid_at), a key entry's stored JSON.
const BASICS: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function valid_at(k, now) return k.expires_ms == '' or tonumber(k.expires_ms) > now end
local function entry(k)
  return cjson.encode({key_id = k.key_id, slot = k.slot, created_ms = k.created_ms,
    expires_ms = k.expires_ms, last_used_ms = k.last_used_ms})
end
"#;

/// After [`BASICS`] in every script but [`LOOKUP`] and [`RECORD_USES`]: key names,
/// missing users, pruning, announcing. `ARGV[1]` is always the prefix.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function num(n) return string.format('%.0f', n) end
local function user_key(id) return P .. 'user:{' .. id .. '}' end
local function keys_key(id) return P .. 'user:{' .. id .. '}:keys' end
local function token_key(h) return P .. 'key:' .. h end
local function tokens_key(id) return P .. 'user:{' .. id .. '}:tokens' end
local function requests_key(id) return P .. 'user:{' .. id .. '}:token_requests' end
local function access_key(h) return P .. 'tok:' .. h end
local function refused(msg) return {'refused', msg} end
local function split(csv)
  local t = {}
  for part in string.gmatch(csv, '[^,]+') do t[#t + 1] = part end
  return t
end
local function missing(id)
  if redis.call('EXISTS', user_key(id)) == 0 then return 'user ' .. id .. ' does not exist' end
  return nil
end
local function user_reply(id) return redis.call('HGETALL', user_key(id)) end
local function save_key(id, k) redis.call('HSET', keys_key(id), k.hash, entry(k)) end
local function drop_key(id, k)
  redis.call('HDEL', keys_key(id), k.hash)
  if redis.call('GET', token_key(k.hash)) == id then redis.call('DEL', token_key(k.hash)) end
end
-- The user's keys split into those that still work and those past their deadline
-- (records::UserRecords::prune), without writing: a refused change writes nothing.
local function live_keys(id, now)
  local flat = redis.call('HGETALL', keys_key(id))
  local live, dead = {}, {}
  for i = 1, #flat, 2 do
    local k = cjson.decode(flat[i + 1])
    k.hash = flat[i]
    if valid_at(k, now) then live[#live + 1] = k else dead[#dead + 1] = k end
  end
  return live, dead
end
-- Drops the dead keys, and the access tokens that expired or whose parent is not among
-- the live keys (records::UserRecords::prune).
local function prune(id, now, live, dead)
  for _, k in ipairs(dead) do drop_key(id, k) end
  local parents = {}
  for _, k in ipairs(live) do parents[k.hash] = true end
  local flat = redis.call('HGETALL', tokens_key(id))
  for i = 1, #flat, 2 do
    local t = cjson.decode(flat[i + 1])
    if tonumber(t.expires_ms) <= now or not parents[t.parent] then
      redis.call('HDEL', tokens_key(id), flat[i])
      redis.call('DEL', access_key(flat[i]))
    end
  end
end
local function has_tokens(id, parent)
  local flat = redis.call('HGETALL', tokens_key(id))
  for i = 2, #flat, 2 do
    if cjson.decode(flat[i]).parent == parent then return true end
  end
  return false
end
local function announce(what)
  local seq = redis.call('INCR', P .. 'seq')
  redis.call('PUBLISH', P .. 'invalidate', num(seq) .. ' ' .. what)
end
"#;

/// Token hash -> its principal if it is a key that works now, or a working access token
/// (records::UserRecords::resolve); read-only unless given a use to record (below).
/// Self-contained, without [`BASICS`] or [`PRELUDE`] (closures built on every call, and
/// this runs on every cache miss), and
/// Redis' clock is read only where a deadline needs it: for a deleted key (in grace) or
/// an access token, not for an active key. Answers one string of [`LOOKUP_FIELDS`]
/// fields joined by `\n` in one Lua concatenation: the head (five fields), then the
/// user's [`OWNER_FIELDS`] (`\0` for a missing one). No field can hold a newline or be
/// `\0`: ids, hashes, times, tenants and grants are restricted (records); one that does
/// makes the answer the wrong length, a corrupt record. One string instead of an array
/// of seven cost Redis 66k instead of 74k instructions (converting a Lua table to a
/// reply looks up five type fields per table) and the gateway's reply parser about
/// 1,000 instructions per item fewer; leaving out the user's name and creation time,
/// which authentication does not use, 59k (BENCHMARKS.md, "One string per lookup").
/// Redis CPU per call (`redis-benchmark`, one run): 14.8 µs with [`BASICS`]' closures,
/// 12.2 µs as it is, 9.3 µs for its three reads with no checks at all (docs/redis.md,
/// "Reads", which also has why plain commands were not kept).
///
/// A request's lookup also records the key's use (the parent key's, for an access
/// token): `ARGV[2]` is the gateway's time of the request, and the key entry's
/// `last_used_ms` is set to it when the stored time is `ARGV[3]` (a minute before) or
/// earlier, so a key's use is written at most once a minute whatever the number of
/// replicas; not for a disabled user (refused), nor into an entry whose time cannot be
/// read. The same write as [`RECORD_USES`], without a second script call per new key:
/// one call instead of two cost Redis 91k instructions instead of 128k for a key seen for
/// the first time (BENCHMARKS.md, "Key uses recorded by the lookup").
const LOOKUP: &str = r#"
local P, h = PREFIX, ARGV[1]
local field = h
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local kind, id, key, deadline, parent = 'key', redis.call('GET', P .. 'key:' .. h), nil, nil, ''
if id then
  local raw = redis.call('HGET', P .. 'user:{' .. id .. '}:keys', h)
  if not raw then return false end
  key = cjson.decode(raw)
  deadline = key.expires_ms
  if type(deadline) ~= 'string' then return redis.error_reply('corrupt key entry ' .. h) end
  if deadline ~= '' and tonumber(deadline) <= now_ms() then return false end
else
  local t = redis.call('GET', P .. 'tok:' .. h)
  if not t then return false end
  t = cjson.decode(t)
  local now = now_ms()
  if tonumber(t.expires_ms) <= now then return false end
  kind, id, parent, deadline = 'token', t.user, t.parent, t.expires_ms
  if type(id) ~= 'string' or type(parent) ~= 'string' then
    return redis.error_reply('corrupt access token ' .. h)
  end
  if redis.call('HEXISTS', P .. 'user:{' .. id .. '}:tokens', h) == 0 then return false end
  field = parent
  local raw = redis.call('HGET', P .. 'user:{' .. id .. '}:keys', parent)
  if not raw then return false end
  key = cjson.decode(raw)
  local d = key.expires_ms
  if type(d) ~= 'string' then return redis.error_reply('corrupt key entry ' .. parent) end
  if d ~= '' then
    if tonumber(d) <= now then return false end
    if tonumber(d) < tonumber(deadline) then deadline = d end
  end
end
-- `id` is a string here: `GET`'s answer, or checked above.
if type(key.key_id) ~= 'string' or type(deadline) ~= 'string' then
  return redis.error_reply('corrupt key entry or access token of ' .. h)
end
local u = redis.call('HMGET', P .. 'user:{' .. id .. '}', 'type', 'tenant', 'disabled', 'grants')
if not (u[1] or u[2] or u[3] or u[4]) then return false end
-- Times compared as digit strings (shorter is earlier): `tonumber` is `strtod`, and
-- three of them cost Redis 3,000 instructions a lookup. The digits are checked last,
-- only for a time that would be written over (a pattern costs as much again).
local last, b = key.last_used_ms, ARGV[3]
if b and u[3] ~= '1' and type(last) == 'string'
    and (#last < #b or (#last == #b and last <= b)) and not string.find(last, '%D') then
  redis.call('HSET', P .. 'user:{' .. id .. '}:keys', field, cjson.encode({key_id = key.key_id,
    slot = key.slot, created_ms = key.created_ms, expires_ms = key.expires_ms,
    last_used_ms = ARGV[2]}))
end
return kind .. '\n' .. id .. '\n' .. key.key_id .. '\n' .. deadline .. '\n' .. parent .. '\n' ..
  (u[1] or '\0') .. '\n' .. (u[2] or '\0') .. '\n' .. (u[3] or '\0') .. '\n' .. (u[4] or '\0')
"#;

/// The fields of [`LOOKUP`]'s answer: the head (`key`/`token`, the user id, the key id,
/// an access token's parent's, the deadline, empty for none, and the parent key's hash,
/// empty for a key), then the user hash's fields [`OWNER_FIELDS`], `\0` for a missing one.
const LOOKUP_FIELDS: usize = 5 + OWNER_FIELDS.len();

/// The fields of `cg:user:{<id>}` that [`LOOKUP`] reads, in its order: those of
/// [`Owner`].
const OWNER_FIELDS: [&str; 4] = ["type", "tenant", "disabled", "grants"];

/// The fields of `cg:user:{<id>}`, in the order [`build_user`] takes them.
const USER_FIELDS: [&str; 6] = ["type", "tenant", "name", "disabled", "grants", "created_ms"];

/// Records key uses: `KEYS[2]` the user's key entries, then `ARGV[3..]` pairs of key
/// hash and ms. A later time wins; keys no longer stored are skipped, and so are entries
/// that cannot be read (not JSON, or a `last_used_ms` that is not a time): a use is not
/// worth failing the batch for, and such an entry already fails its key's lookup (503)
/// and `keys list`. Announces nothing: no cached answer depends on when a key was last
/// used. Without [`PRELUDE`], whose closures are built on every call, as for [`LOOKUP`].
const RECORD_USES: &str = r#"
for i = 3, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local ok, k = pcall(cjson.decode, raw)
    local last = ok and type(k) == 'table' and k.last_used_ms
    if last == '' or (type(last) == 'string' and tonumber(last)
      and tonumber(last) < tonumber(ARGV[i + 1])) then
      k.last_used_ms = ARGV[i + 1]
      redis.call('HSET', KEYS[2], ARGV[i], entry(k))
    end
  end
end
return 1
"#;

/// `{now, exists, key entries}` of one user; read-only.
const KEYS: &str = r#"
local id = ARGV[2]
local now = now_ms()
if redis.call('EXISTS', user_key(id)) == 0 then return {num(now), '0', {}} end
return {num(now), '1', redis.call('HGETALL', keys_key(id))}
"#;

/// ARGV: prefix, id, type, tenant, name, grants (checked and normalised by the caller).
const CREATE_USER: &str = r#"
local id = ARGV[2]
if redis.call('EXISTS', user_key(id)) == 1 then return refused('user ' .. id .. ' already exists') end
local now = now_ms()
redis.call('DEL', keys_key(id), tokens_key(id), requests_key(id))
redis.call('HSET', user_key(id), 'type', ARGV[3], 'tenant', ARGV[4], 'name', ARGV[5],
  'disabled', '0', 'grants', ARGV[6], 'created_ms', num(now))
redis.call('SADD', P .. 'users', id)
announce('user ' .. id)
return {'ok', user_reply(id)}
"#;

/// ARGV: prefix, id, `0`/`1`.
const SET_DISABLED: &str = r#"
local id = ARGV[2]
local why = missing(id)
if why then return refused(why) end
local now = now_ms()
local live, dead = live_keys(id, now)
prune(id, now, live, dead)
redis.call('HSET', user_key(id), 'disabled', ARGV[3])
announce('user ' .. id)
return {'ok', user_reply(id)}
"#;

/// ARGV: prefix, id, API names to add (comma-separated). records::UserRecords::grant.
const GRANT: &str = r#"
local id = ARGV[2]
local why = missing(id)
if why then return refused(why) end
local add = split(ARGV[3])
if #add > 0 then
  if redis.call('HGET', user_key(id), 'type') == 'ui' then
    return refused('user ' .. id .. ' is a ui user; ui users cannot be granted APIs')
  end
  local set, list = {}, {}
  for _, g in ipairs(split(redis.call('HGET', user_key(id), 'grants') or '')) do set[g] = true end
  for _, g in ipairs(add) do set[g] = true end
  for g in pairs(set) do list[#list + 1] = g end
  table.sort(list)
  redis.call('HSET', user_key(id), 'grants', table.concat(list, ','))
end
local now = now_ms()
local live, dead = live_keys(id, now)
prune(id, now, live, dead)
announce('user ' .. id)
return {'ok', user_reply(id)}
"#;

/// ARGV: prefix, id, API names to remove. records::UserRecords::revoke_grants.
const REVOKE_GRANTS: &str = r#"
local id = ARGV[2]
local why = missing(id)
if why then return refused(why) end
local have = split(redis.call('HGET', user_key(id), 'grants') or '')
local set, gone, list = {}, {}, {}
for _, g in ipairs(have) do set[g] = true end
for _, g in ipairs(split(ARGV[3])) do
  if not set[g] then return refused('user ' .. id .. ' has no grant ' .. g) end
  gone[g] = true
end
for _, g in ipairs(have) do
  if not gone[g] then list[#list + 1] = g end
end
redis.call('HSET', user_key(id), 'grants', table.concat(list, ','))
local now = now_ms()
local live, dead = live_keys(id, now)
prune(id, now, live, dead)
announce('user ' .. id)
return {'ok', user_reply(id)}
"#;

/// ARGV: prefix, id, token hash, key id. FileStore::add_key + records::UserRecords::add_key.
const ADD_KEY: &str = r#"
local id, h = ARGV[2], ARGV[3]
local now = now_ms()
local owner = redis.call('GET', token_key(h))
if owner and owner ~= id then
  local raw = redis.call('HGET', keys_key(owner), h)
  if raw and valid_at(cjson.decode(raw), now) then
    return refused('this key is already registered to another user')
  end
end
local why = missing(id)
if why then return refused(why) end
local live, dead = live_keys(id, now)
if redis.call('HGET', user_key(id), 'type') == 'ui' then
  return refused('user ' .. id .. ' is a ui user; ui users cannot have keys')
end
local taken = {}
for _, k in ipairs(live) do
  if k.hash == h then return refused('user ' .. id .. ' already has this key') end
  if k.slot ~= '' then taken[k.slot] = true end
end
local slot = nil
if not taken['1'] then slot = '1' elseif not taken['2'] then slot = '2' end
if not slot then
  return refused('user ' .. id .. ' already has two active keys; delete one first')
end
prune(id, now, live, dead)
local k = {hash = h, key_id = ARGV[4], slot = slot, created_ms = num(now), expires_ms = '',
  last_used_ms = ''}
save_key(id, k)
redis.call('SET', token_key(h), id)
announce('key ' .. h)
return {'ok', h, entry(k)}
"#;

/// ARGV: prefix, id, slot, `now` or grace in ms. records::UserRecords::delete_key.
const DELETE_KEY: &str = r#"
local id, slot = ARGV[2], ARGV[3]
local why = missing(id)
if why then return refused(why) end
local now = now_ms()
local live, dead = live_keys(id, now)
if slot ~= '1' and slot ~= '2' then
  return refused('slot ' .. slot .. ' does not exist; slots are 1 and 2')
end
local deadline = now
if ARGV[4] ~= 'now' then deadline = now + tonumber(ARGV[4]) end
local victim = nil
for _, k in ipairs(live) do
  if k.slot == slot then victim = k end
end
if not victim then return refused('user ' .. id .. ' has no key ' .. slot) end
-- Cached access tokens of this key must learn its deadline too: announce the user.
local what = 'key ' .. victim.hash
if has_tokens(id, victim.hash) then what = 'user ' .. id end
victim.slot = ''
victim.expires_ms = num(deadline)
if slot == '1' then
  for _, k in ipairs(live) do
    if k.slot == '2' then
      k.slot = '1'
      save_key(id, k)
    end
  end
end
if deadline > now then
  save_key(id, victim)
  redis.call('PEXPIREAT', token_key(victim.hash), num(deadline + 1))
else
  local kept = {}
  for _, k in ipairs(live) do
    if k.hash ~= victim.hash then kept[#kept + 1] = k end
  end
  live = kept
  dead[#dead + 1] = victim
end
prune(id, now, live, dead)
announce(what)
return {'ok', victim.hash, entry(victim)}
"#;

/// ARGV: prefix, id. Keys stop working at once.
const DELETE_USER: &str = r#"
local id = ARGV[2]
local why = missing(id)
if why then return refused(why) end
local live, dead = live_keys(id, now_ms())
for _, k in ipairs(dead) do drop_key(id, k) end
for _, k in ipairs(live) do drop_key(id, k) end
local flat = redis.call('HGETALL', tokens_key(id))
for i = 1, #flat, 2 do redis.call('DEL', access_key(flat[i])) end
redis.call('DEL', keys_key(id), tokens_key(id), requests_key(id), user_key(id))
redis.call('SREM', P .. 'users', id)
announce('user ' .. id)
return {'ok'}
"#;

/// ARGV: prefix, id, parent key hash, token hash, lifetime ms, requests allowed per
/// window, window ms. records::UserRecords::issue_token.
const ISSUE_TOKEN: &str = r#"
local id, parent, h = ARGV[2], ARGV[3], ARGV[4]
local why = missing(id)
if why then return refused(why) end
local now = now_ms()
local live, dead = live_keys(id, now)
if redis.call('HGET', user_key(id), 'type') == 'ui'
  or redis.call('HGET', user_key(id), 'disabled') == '1' then
  return refused('user ' .. id .. ' cannot get access tokens')
end
local known = false
for _, k in ipairs(live) do
  if k.hash == parent then known = true end
end
if not known then return refused('the credentials are not a key of this user') end
local limit, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local since = '(' .. num(now - window)
if redis.call('ZCOUNT', requests_key(id), since, '+inf') >= limit then
  local oldest = redis.call('ZRANGEBYSCORE', requests_key(id), since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return {'limited', num(math.max(tonumber(oldest[2]) + window - now, 1))}
end
prune(id, now, live, dead)
redis.call('ZREMRANGEBYSCORE', requests_key(id), '-inf', num(now - window))
redis.call('ZADD', requests_key(id), num(now), h)
redis.call('PEXPIRE', requests_key(id), num(window))
local expires = num(now + tonumber(ARGV[5]))
redis.call('HSET', tokens_key(id), h, cjson.encode({parent = parent, expires_ms = expires}))
redis.call('SET', access_key(h), cjson.encode({user = id, parent = parent, expires_ms = expires}))
redis.call('PEXPIREAT', access_key(h), num(tonumber(expires) + 1))
announce('key ' .. h)
return {'ok', h, expires}
"#;

/// Users whose key uses go in one pipeline of `record_uses` scripts.
const USES_PER_PIPELINE: usize = 256;

/// The scripts, each the prelude plus its body (the lookup and key uses without it).
struct Scripts {
    lookup: Script,
    keys: Script,
    create_user: Script,
    set_disabled: Script,
    grant: Script,
    revoke_grants: Script,
    add_key: Script,
    delete_key: Script,
    delete_user: Script,
    issue_token: Script,
    record_uses: Script,
    /// The sources of the two scripts sent by hash with traffic (the lookup and key
    /// uses), for `SCRIPT LOAD` (`Script` does not give its source back). The others are
    /// sent through `ScriptInvocation::invoke_async`, which loads a script on its first
    /// `NOSCRIPT`.
    by_hash: [String; 2],
}

impl Scripts {
    /// `prefix`: `[store] prefix`, written into the lookup's source (see [`lookup_source`]).
    fn new(prefix: &str) -> Scripts {
        let lookup = lookup_source(prefix);
        let record_uses = format!("{BASICS}{RECORD_USES}");
        let s = |body: &str| Script::new(&format!("{BASICS}{PRELUDE}{body}"));
        Scripts {
            lookup: Script::new(&lookup),
            keys: s(KEYS),
            create_user: s(CREATE_USER),
            set_disabled: s(SET_DISABLED),
            grant: s(GRANT),
            revoke_grants: s(REVOKE_GRANTS),
            add_key: s(ADD_KEY),
            delete_key: s(DELETE_KEY),
            delete_user: s(DELETE_USER),
            issue_token: s(ISSUE_TOKEN),
            record_uses: Script::new(&record_uses),
            by_hash: [lookup, record_uses],
        }
    }

    /// `SCRIPT LOAD` of the scripts sent by hash, in one pipeline: on a new connection,
    /// and after a `NOSCRIPT` (a Redis that restarted or was flushed). Loading all eleven
    /// on every new connection (each CLI command opens one) cost Redis about 880k
    /// instructions, the SHA-1 of every source, four times a `keys delete` itself
    /// (BENCHMARKS.md, "Lookups without the shared helpers").
    fn load(&self) -> redis::Pipeline {
        let mut load = redis::pipe();
        for code in &self.by_hash {
            load.cmd("SCRIPT").arg("LOAD").arg(code);
        }
        load
    }
}

/// [`LOOKUP`] with the key prefix in its source, as a Lua string of decimal escapes (any
/// bytes are safe in it), instead of an argument of every call: one argument fewer cost
/// Redis about 2,000 of a lookup's 59,000 instructions (BENCHMARKS.md, "One string per
/// lookup"). Gateways on one Redis with different prefixes load different scripts.
fn lookup_source(prefix: &str) -> String {
    use std::fmt::Write;
    let mut literal = String::with_capacity(2 + 4 * prefix.len());
    literal.push('\'');
    for b in prefix.bytes() {
        let _ = write!(literal, "\\{b}");
    }
    literal.push('\'');
    LOOKUP.replacen("PREFIX", &literal, 1)
}

/// One key entry as stored in `cg:user:{<id>}:keys`: every field a string, empty for
/// "none", so that `redis-cli` shows exactly what the scripts compare.
#[derive(Debug, Deserialize)]
struct KeyEntry {
    key_id: String,
    slot: String,
    created_ms: String,
    expires_ms: String,
    last_used_ms: String,
}

/// The `redis://` store. Cheap to share; connects on first use.
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// The command connections of threads that run a current-thread runtime (the
    /// gateway's workers), one per thread (see [`Slot`]).
    slots: ThreadLocal<Slot>,
    /// The command connection of every other caller (the main multi-thread runtime:
    /// admin listener, background tasks), shared, so a many-core host does not hold a
    /// connection per thread of that runtime.
    shared: Slot,
    scripts: Scripts,
}

/// A command connection. Each gateway worker is a current-thread runtime on its own
/// thread; a connection opened there runs its reader/writer task on that same runtime,
/// so a cache miss's round trip never wakes another thread (with one shared connection,
/// the task lived on the main runtime and every lookup crossed threads twice;
/// BENCHMARKS.md, "Cold keys").
#[derive(Default)]
struct Slot {
    /// The connection and the thread that opened it (`None` for the shared slot); `None`
    /// until first use and after a call timed out. (`ThreadLocal` reuses a slot for a new
    /// thread once the old one has exited, and the old connection's task may have died
    /// with its runtime: a per-thread connection is used only by the thread that opened
    /// it.)
    conn: ArcSwapOption<(Option<ThreadId>, ConnectionManager)>,
    /// Serialises (re)connecting, so a burst of calls opens one connection.
    connecting: tokio::sync::Mutex<()>,
}

type Conn = Arc<(Option<ThreadId>, ConnectionManager)>;

impl Slot {
    fn current(&self, owner: Option<ThreadId>) -> Option<Conn> {
        self.conn.load_full().filter(|c| c.0 == owner)
    }
}

impl RedisStore {
    /// Checks the URL and reads the TLS files ([`client`]); connecting waits for the
    /// first call.
    pub fn open(
        url: &str,
        prefix: &str,
        timeout: Duration,
        tls: &StoreTls,
    ) -> Result<RedisStore, StoreError> {
        let client = client(url, tls).map_err(|errors| {
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            StoreError::Unavailable(reasons.join("; "))
        })?;
        if matches!(
            client.get_connection_info().addr,
            ConnectionAddr::TcpTls { .. }
        ) {
            install_crypto_provider();
        }
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            timeout,
            slots: ThreadLocal::new(),
            shared: Slot::default(),
            scripts: Scripts::new(prefix),
        })
    }

    /// The key prefix (`[store] prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The invalidation channel, `<prefix>invalidate`.
    pub fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    fn user_key(&self, id: &str) -> String {
        format!("{}user:{{{id}}}", self.prefix)
    }

    fn keys_key(&self, id: &str) -> String {
        format!("{}user:{{{id}}}:keys", self.prefix)
    }

    fn users_key(&self) -> String {
        format!("{}users", self.prefix)
    }

    fn seq_key(&self) -> String {
        format!("{}seq", self.prefix)
    }

    /// The slot of the calling thread and the owner its connection must have: the
    /// thread's own on a current-thread runtime (a gateway worker), else the shared one.
    fn slot(&self) -> (&Slot, Option<ThreadId>) {
        let own = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if own {
            (
                self.slots.get_or_default(),
                Some(std::thread::current().id()),
            )
        } else {
            (&self.shared, None)
        }
    }

    /// The slot's command connection, opening it (and loading the scripts that run with
    /// traffic) if there is none.
    async fn connection(&self, slot: &Slot, owner: Option<ThreadId>) -> Result<Conn, RedisError> {
        if let Some(c) = slot.current(owner) {
            return Ok(c);
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some(c) = slot.current(owner) {
            return Ok(c);
        }
        // No retries inside the manager: its backoff starts at 1 s, longer than any call
        // may take; the next call simply tries again.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(self.timeout);
        let mut manager = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        self.scripts.load().query_async::<()>(&mut manager).await?;
        let conn = Arc::new((owner, manager));
        slot.conn.store(Some(conn.clone()));
        Ok(conn)
    }

    /// Runs one call on the command connection within `[store] timeout`. A read is
    /// tried once more when the connection turns out to be broken (Redis restarted, say);
    /// a change never is, since it may have been applied before the connection broke.
    async fn call<T, F, Fut>(&self, what: &str, kind: Call, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (slot, owner) = self.slot();
        let used = slot.conn.load_full();
        let attempt = async {
            let conn = self.connection(slot, owner).await?;
            match f(conn.1.clone()).await {
                Err(e)
                    if kind == Call::Read
                        && (e.is_unrecoverable_error() || e.is_connection_dropped()) =>
                {
                    // The manager reconnects in the background; wait for it.
                    f(conn.1.clone()).await
                }
                result => result,
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis {what}: {e}"))),
            Err(_) => {
                // Possibly half-open: let the next call connect afresh.
                if used.is_some() {
                    slot.conn.compare_and_swap(&used, None);
                }
                Err(StoreError::Unavailable(format!(
                    "redis {what}: no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Runs a script with `ARGV = [prefix, args...]` and the user's keys as `KEYS`.
    async fn script(
        &self,
        what: &str,
        kind: Call,
        script: &Script,
        user: &str,
        args: &[&str],
    ) -> Result<Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.user_key(user)).key(self.keys_key(user));
        invocation.arg(&self.prefix);
        for a in args {
            invocation.arg(*a);
        }
        let invocation = &invocation;
        self.call(what, kind, move |mut conn| async move {
            invocation.invoke_async::<Value>(&mut conn).await
        })
        .await
    }

    /// Runs a mutation script: `Ok` with the payload after `"ok"`, or its refusal.
    async fn mutate(
        &self,
        what: &str,
        script: &Script,
        user: &str,
        args: &[&str],
    ) -> Result<Vec<Value>, StoreError> {
        let reply = self.script(what, Call::Change, script, user, args).await?;
        let mut items = array(reply, what)?.into_iter();
        let status = items.next().map(|v| string(v, what)).transpose()?;
        match status.as_deref() {
            Some("ok") => Ok(items.collect()),
            Some("limited") => {
                let ms = items
                    .next()
                    .map(|v| string(v, what))
                    .transpose()?
                    .unwrap_or_default();
                Err(StoreError::RateLimited {
                    retry_after_ms: parse_ms(&ms, what)?,
                })
            }
            Some("refused") => {
                let msg = items
                    .next()
                    .map(|v| string(v, what))
                    .transpose()?
                    .unwrap_or_default();
                Err(StoreError::Refused(msg))
            }
            _ => Err(corrupt(what, "unexpected script reply")),
        }
    }

    /// `use_at`: the time of the request this lookup serves, recorded as the key's use
    /// in the same script (see the `LOOKUP` script); `None` writes nothing.
    pub async fn lookup(
        &self,
        hash: &TokenHash,
        use_at: Option<u64>,
    ) -> Result<Option<Resolved>, StoreError> {
        let hex = hash.hex();
        let sha = self.scripts.lookup.get_hash();
        // Sized up front: grown argument by argument, the buffers took three reallocations.
        let mut cmd = redis::Cmd::with_capacity(6, 7 + sha.len() + 1 + 104);
        cmd.arg("EVALSHA").arg(sha).arg(0).arg(&hex[..]);
        if let Some(at) = use_at {
            cmd.arg(at).arg(at.saturating_sub(super::USE_RESOLUTION_MS));
        }
        let cmd = &cmd;
        // After `SCRIPT FLUSH` (or a Redis that lost it) the script is loaded again and
        // the lookup sent again. Read once more after a broken connection (`Call::Read`)
        // even when it records a use: written twice, a use is the same use.
        let reply = self
            .call("lookup", Call::Read, move |mut conn| async move {
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                        self.scripts.load().query_async::<()>(&mut conn).await?;
                        cmd.query_async::<Value>(&mut conn).await
                    }
                    r => r,
                }
            })
            .await?;
        match reply {
            Value::Nil => Ok(None),
            Value::BulkString(answer) => decode_lookup(*hash, &answer).map(Some),
            other => Err(corrupt(
                "lookup",
                &format!("expected a string, got {other:?}"),
            )),
        }
    }

    /// One script per user (each user's records live in one hash slot), sent as one
    /// pipeline per `USES_PER_PIPELINE` users: a burst of first uses (a fleet of new
    /// clients, a restart) costs a round trip per few hundred users, not one per user.
    pub async fn record_uses(&self, uses: &[KeyUse]) -> Result<usize, StoreError> {
        let users = super::group_uses(uses);
        let script = self.scripts.record_uses.get_hash();
        for chunk in users.chunks(USES_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for (id, keys) in chunk {
                pipe.cmd("EVALSHA")
                    .arg(script)
                    .arg(2)
                    .arg(self.user_key(id))
                    .arg(self.keys_key(id))
                    .arg(&self.prefix)
                    .arg(id);
                for (hash, at_ms) in keys {
                    pipe.arg(&hash.hex()[..]).arg(*at_ms);
                }
                pipe.ignore();
            }
            let pipe = &pipe;
            // This script is loaded with each new connection; after a `SCRIPT FLUSH` (or a
            // Redis that lost it) it is loaded again and the pipeline sent again: a use
            // recorded twice is the same use (the later time wins).
            self.call(
                "record key uses",
                Call::Change,
                move |mut conn| async move {
                    match pipe.query_async::<()>(&mut conn).await {
                        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                            self.scripts.load().query_async::<()>(&mut conn).await?;
                            pipe.query_async::<()>(&mut conn).await
                        }
                        r => r,
                    }
                },
            )
            .await?;
        }
        Ok(users.len())
    }

    pub async fn create_user(&self, new: NewUser) -> Result<User, StoreError> {
        // Field rules are records' own; a user that exists is reported first, as the
        // file store does.
        let checked = match UserRecords::create(new.clone(), 0) {
            Ok(r) => r.user,
            Err(refusal) => {
                if records::validate_user_id(&new.id).is_ok() && self.user(&new.id).await?.is_some()
                {
                    return Err(StoreError::refused(format!(
                        "user {} already exists",
                        new.id
                    )));
                }
                return Err(refusal);
            }
        };
        check_api_names(&checked.grants)?;
        let grants = checked.grants.join(",");
        let reply = self
            .mutate(
                "create user",
                &self.scripts.create_user,
                &checked.id,
                &[
                    &checked.id,
                    checked.kind.as_str(),
                    &checked.tenant,
                    &checked.name,
                    &grants,
                ],
            )
            .await?;
        user_payload(&checked.id, reply)
    }

    pub async fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let key = &self.user_key(id);
        let reply = self
            .call("read user", Call::Read, move |mut conn| async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        if is_empty(&reply) {
            return Ok(None);
        }
        decode_user(id, reply).map(Some)
    }

    /// Every user, ordered by id.
    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        let set = &self.users_key();
        let mut ids: Vec<String> = self
            .call("list users", Call::Read, move |mut conn| async move {
                redis::cmd("SMEMBERS").arg(set).query_async(&mut conn).await
            })
            .await?;
        ids.sort();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.user_key(id));
        }
        let pipe = &pipe;
        let replies: Vec<Value> = self
            .call("read users", Call::Read, move |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        let mut users = Vec::with_capacity(ids.len());
        for (id, reply) in ids.iter().zip(replies) {
            // Deleted between the two reads.
            if !is_empty(&reply) {
                users.push(decode_user(id, reply)?);
            }
        }
        Ok(users)
    }

    pub async fn set_disabled(&self, id: &str, disabled: bool) -> Result<User, StoreError> {
        let flag = if disabled { "1" } else { "0" };
        let reply = self
            .mutate("set disabled", &self.scripts.set_disabled, id, &[id, flag])
            .await?;
        user_payload(id, reply)
    }

    pub async fn delete_user(&self, id: &str) -> Result<(), StoreError> {
        self.mutate("delete user", &self.scripts.delete_user, id, &[id])
            .await
            .map(drop)
    }

    pub async fn grant(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        check_api_names(apis)?;
        let csv = apis.join(",");
        let reply = self
            .mutate("grant", &self.scripts.grant, id, &[id, &csv])
            .await?;
        user_payload(id, reply)
    }

    pub async fn revoke_grants(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        check_api_names(apis)?;
        let csv = apis.join(",");
        let reply = self
            .mutate(
                "revoke grants",
                &self.scripts.revoke_grants,
                id,
                &[id, &csv],
            )
            .await?;
        user_payload(id, reply)
    }

    pub async fn add_key(
        &self,
        id: &str,
        hash: TokenHash,
        key_id: &str,
    ) -> Result<SecretKey, StoreError> {
        let hex = hash.to_hex();
        let reply = self
            .mutate("add key", &self.scripts.add_key, id, &[id, &hex, key_id])
            .await?;
        key_payload(reply, "add key")
    }

    /// The user's keys that work now (by Redis' clock), slot 1 first.
    pub async fn keys(&self, id: &str) -> Result<Vec<SecretKey>, StoreError> {
        let reply = self
            .script("list keys", Call::Read, &self.scripts.keys, id, &[id])
            .await?;
        let mut items = array(reply, "list keys")?.into_iter();
        let (Some(now), Some(exists), Some(flat)) = (items.next(), items.next(), items.next())
        else {
            return Err(corrupt("list keys", "short reply"));
        };
        let now: u64 = parse_ms(&string(now, "list keys")?, "list keys")?;
        if string(exists, "list keys")? != "1" {
            return Err(StoreError::refused(format!("user {id} does not exist")));
        }
        let mut keys = Vec::new();
        let mut fields = array(flat, "list keys")?.into_iter();
        while let (Some(h), Some(raw)) = (fields.next(), fields.next()) {
            let h = string(h, "list keys")?;
            let hash = TokenHash::from_hex(&h).ok_or_else(|| corrupt("list keys", "bad hash"))?;
            keys.push(decode_key(hash, &string(raw, "list keys")?)?);
        }
        Ok(records::valid_keys(&keys, now))
    }

    pub async fn delete_key(
        &self,
        id: &str,
        slot: u8,
        how: Revocation,
    ) -> Result<SecretKey, StoreError> {
        let slot = slot.to_string();
        let mode = match how {
            Revocation::Now => "now".to_string(),
            Revocation::Grace(grace) => u64::try_from(grace.as_millis())
                .unwrap_or(u64::MAX)
                // Lua numbers are doubles: keep the deadline an exact integer.
                .min(1 << 52)
                .to_string(),
        };
        let reply = self
            .mutate(
                "delete key",
                &self.scripts.delete_key,
                id,
                &[id, &slot, &mode],
            )
            .await?;
        key_payload(reply, "delete key")
    }

    /// Issues an access token (deprecated flow) for the user's key `parent`; at most
    /// [`records::TOKEN_REQUESTS_PER_WINDOW`] per user per window.
    pub async fn issue_access_token(
        &self,
        id: &str,
        parent: TokenHash,
        hash: TokenHash,
        lifetime: Duration,
    ) -> Result<AccessToken, StoreError> {
        let lifetime_ms = u64::try_from(lifetime.as_millis())
            .unwrap_or(u64::MAX)
            .min(1 << 52)
            .to_string();
        let reply = self
            .mutate(
                "issue access token",
                &self.scripts.issue_token,
                id,
                &[
                    id,
                    &parent.to_hex(),
                    &hash.to_hex(),
                    &lifetime_ms,
                    &records::TOKEN_REQUESTS_PER_WINDOW.to_string(),
                    &records::TOKEN_RATE_WINDOW_MS.to_string(),
                ],
            )
            .await?;
        let what = "issue access token";
        let mut items = reply.into_iter();
        let (Some(_), Some(expires)) = (items.next(), items.next()) else {
            return Err(corrupt(what, "short reply"));
        };
        Ok(AccessToken {
            hash,
            user_id: id.to_string(),
            parent,
            expires_ms: parse_ms(&string(expires, what)?, what)?,
        })
    }

    /// The current invalidation sequence number (0 before the first change).
    pub async fn seq(&self) -> Result<u64, StoreError> {
        let key = &self.seq_key();
        let seq: Option<u64> = self
            .call("read seq", Call::Read, move |mut conn| async move {
                redis::cmd("GET").arg(key).query_async(&mut conn).await
            })
            .await?;
        Ok(seq.unwrap_or(0))
    }

    /// Opens a dedicated pub/sub connection subscribed to the invalidation channel.
    pub async fn subscribe(&self) -> Result<Subscription, StoreError> {
        let channel = self.channel();
        let connect = async {
            let pubsub = self.client.get_async_pubsub().await?;
            let (mut sink, messages) = pubsub.split();
            sink.subscribe(&channel).await?;
            Ok::<_, RedisError>(Subscription {
                sink,
                messages,
                channel: channel.clone(),
            })
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis subscribe: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis subscribe: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// The client of a `[store] url` and its TLS files: the URL parsed and, for
/// `rediss://`, `#insecure` refused and every file read and parsed as the connections
/// will use it, so that `config check` reports a bad setting under its key instead of
/// the first connect failing. Reads the files; no network.
pub fn client(url: &str, tls: &StoreTls) -> Result<redis::Client, Vec<ConfigError>> {
    let info = url
        .into_connection_info()
        .map_err(|e| vec![config_error("store.url", format!("invalid Redis URL: {e}"))])?;
    let certificates = match info.addr {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(vec![config_error(
                "store.url",
                "#insecure (no certificate verification) is not supported; trust the \
                 server's CA with store.tls_ca_file instead"
                    .into(),
            )]);
        }
        ConnectionAddr::TcpTls { .. } => tls_certificates(tls)?,
        _ => {
            let unused = tls_unused(tls);
            if !unused.is_empty() {
                return Err(unused);
            }
            None
        }
    };
    match certificates {
        Some(c) => redis::Client::build_with_tls(info, c),
        None => redis::Client::open(info),
    }
    .map_err(|e| vec![config_error("store.url", format!("invalid Redis URL: {e}"))])
}

/// One error per TLS file set for a store that is not `rediss://`: a file that would
/// be ignored means the operator believes in a TLS that is not there.
pub fn tls_unused(tls: &StoreTls) -> Vec<ConfigError> {
    [
        ("store.tls_ca_file", &tls.ca_file),
        ("store.tls_client_cert_file", &tls.client_cert_file),
        ("store.tls_client_key_file", &tls.client_key_file),
    ]
    .into_iter()
    .filter(|(_, path)| path.is_some())
    .map(|(key, _)| config_error(key, "only used with a rediss:// store.url".into()))
    .collect()
}

/// The CA and client identity for the redis crate, as the PEM bytes it parses itself,
/// after parsing them here the same way; `None` when no file is set (system trust
/// store, no client certificate).
fn tls_certificates(tls: &StoreTls) -> Result<Option<TlsCertificates>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let root_cert = match tls.ca_file.as_deref().map(read_ca) {
        Some(Err(reason)) => {
            errors.push(config_error("store.tls_ca_file", reason));
            None
        }
        Some(Ok(pem)) => Some(pem),
        None => None,
    };
    let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
        (None, None) => None,
        (Some(_), None) => {
            errors.push(config_error(
                "store.tls_client_key_file",
                "missing: store.tls_client_cert_file is set and needs its key".into(),
            ));
            None
        }
        (None, Some(_)) => {
            errors.push(config_error(
                "store.tls_client_cert_file",
                "missing: store.tls_client_key_file is set and needs its certificate".into(),
            ));
            None
        }
        (Some(cert), Some(key)) => match read_identity(cert, key) {
            Ok(identity) => Some(identity),
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// `[store] tls_ca_file`: at least one certificate, each usable as a trust anchor.
fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| {
            format!(
                "{}: certificate {} is not usable as a CA: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (BEGIN CERTIFICATE) in the file",
            path.display()
        ));
    }
    Ok(pem)
}

/// `[store] tls_client_cert_file` and `tls_client_key_file`: a chain and the private
/// key of its first certificate.
fn read_identity(cert: &Path, key: &Path) -> Result<ClientTlsConfig, Vec<ConfigError>> {
    let chain = read(cert).and_then(|pem| {
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: bad PEM: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "{}: no PEM certificate (BEGIN CERTIFICATE) in the file",
                cert.display()
            ));
        }
        Ok((pem, chain))
    });
    let private_key = read(key).and_then(|pem| {
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: no usable PEM private key: {e}", key.display()))?;
        Ok((pem, der))
    });
    let ((cert_pem, chain), (key_pem, der)) = match (chain, private_key) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => {
            let mut errors = Vec::new();
            if let Err(reason) = c {
                errors.push(config_error("store.tls_client_cert_file", reason));
            }
            if let Err(reason) = k {
                errors.push(config_error("store.tls_client_key_file", reason));
            }
            return Err(errors);
        }
    };
    let unusable = |e: rustls::Error| {
        vec![config_error(
            "store.tls_client_key_file",
            format!(
                "{}: not usable with the certificate of store.tls_client_cert_file: {e}",
                key.display()
            ),
        )]
    };
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, der)
        .map_err(unusable)?;
    Ok(ClientTlsConfig {
        client_cert: cert_pem,
        client_key: key_pem,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn config_error(key: &str, reason: String) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        reason,
    }
}

/// The redis crate builds its rustls configs on the process-wide default provider:
/// make that ring, the provider of our own TLS, before the first connect. One that
/// the process installed earlier stays.
fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// Whether a call may be repeated after a broken connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Change,
}

/// A live subscription to the invalidation channel on its own connection.
pub struct Subscription {
    sink: PubSubSink,
    messages: PubSubStream,
    channel: String,
}

impl Subscription {
    /// The next announcement, or `Err` with the raw payload of one that cannot be read;
    /// `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Result<Announcement, String>> {
        let msg = self.messages.next().await?;
        let payload: String = msg.get_payload().unwrap_or_default();
        Some(Announcement::parse(&payload).ok_or(payload))
    }

    /// One round trip on the subscriber connection. A subscribed RESP2 connection takes
    /// no `PING` through this client, so this repeats the `SUBSCRIBE`, which Redis
    /// confirms again without changing anything.
    pub async fn ping(&mut self, within: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(within, self.sink.subscribe(&self.channel)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis subscriber: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis subscriber: no answer to a ping within {within:?}"
            ))),
        }
    }
}

/// One message of the invalidation channel: `<seq> key <hash>`, `<seq> user <id>` or
/// `<seq> all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub seq: u64,
    pub what: Invalidation,
}

impl Announcement {
    pub fn parse(s: &str) -> Option<Announcement> {
        let mut parts = s.splitn(3, ' ');
        let seq = parts.next()?.parse().ok()?;
        let what = match (parts.next()?, parts.next()) {
            ("key", Some(h)) => Invalidation::Key(TokenHash::from_hex(h)?),
            ("user", Some(id)) if !id.is_empty() => Invalidation::User(id.to_string()),
            ("all", None) => Invalidation::All,
            _ => return None,
        };
        Some(Announcement { seq, what })
    }
}

/// API names go into a comma-separated field: only config-valid names are stored.
fn check_api_names(apis: &[String]) -> Result<(), StoreError> {
    match apis.iter().find(|a| !crate::config::valid_api_name(a)) {
        Some(bad) => Err(StoreError::refused(format!("invalid API name {bad:?}"))),
        None => Ok(()),
    }
}

fn user_payload(id: &str, payload: Vec<Value>) -> Result<User, StoreError> {
    let user = payload
        .into_iter()
        .next()
        .ok_or_else(|| corrupt("user", "no user in reply"))?;
    decode_user(id, user)
}

fn key_payload(payload: Vec<Value>, what: &str) -> Result<SecretKey, StoreError> {
    let mut items = payload.into_iter();
    let (Some(h), Some(raw)) = (items.next(), items.next()) else {
        return Err(corrupt(what, "no key in reply"));
    };
    let h = string(h, what)?;
    let hash = TokenHash::from_hex(&h).ok_or_else(|| corrupt(what, "bad hash"))?;
    decode_key(hash, &string(raw, what)?)
}

fn decode_user(id: &str, flat: Value) -> Result<User, StoreError> {
    let what = "user record";
    let mut fields: [Option<String>; USER_FIELDS.len()] = Default::default();
    let mut items = array(flat, what)?.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        let k = string(k, what)?;
        if let Some(i) = USER_FIELDS.iter().position(|f| *f == k) {
            fields[i] = Some(string(v, what)?);
        }
    }
    build_user(id, fields.each_ref().map(Option::as_deref))
}

/// A user from the fields of its hash, in [`USER_FIELDS`] order.
fn build_user(id: &str, fields: [Option<&str>; USER_FIELDS.len()]) -> Result<User, StoreError> {
    let [kind, tenant, name, disabled, grants, created_ms] = fields;
    let owner = build_owner(id, [kind, tenant, disabled, grants])?;
    Ok(User {
        name: name
            .ok_or_else(|| no_field(id, USER_FIELDS[2]))?
            .to_string(),
        created_ms: parse_ms(
            created_ms.ok_or_else(|| no_field(id, USER_FIELDS[5]))?,
            "user record",
        )?,
        id: owner.id,
        kind: owner.kind,
        tenant: owner.tenant,
        disabled: owner.disabled,
        grants: owner.grants,
    })
}

/// A user record without `field`.
fn no_field(id: &str, field: &str) -> StoreError {
    corrupt("user record", &format!("user {id} has no {field}"))
}

/// A token's user from the fields of its hash, in [`OWNER_FIELDS`] order.
fn build_owner(id: &str, fields: [Option<&str>; OWNER_FIELDS.len()]) -> Result<Owner, StoreError> {
    let what = "user record";
    let field = |i: usize| fields[i].ok_or_else(|| no_field(id, OWNER_FIELDS[i]));
    let kind: UserType = field(0)?.parse().map_err(|e: String| corrupt(what, &e))?;
    let disabled = match field(2)? {
        "0" => false,
        "1" => true,
        other => return Err(corrupt(what, &format!("disabled = {other:?}"))),
    };
    let grants = field(3)?
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Owner {
        id: id.to_string(),
        kind,
        tenant: field(1)?.to_string(),
        disabled,
        grants,
    })
}

/// The principal of [`LOOKUP`]'s answer for `hash`.
fn decode_lookup(hash: TokenHash, answer: &[u8]) -> Result<Resolved, StoreError> {
    let what = "lookup";
    let text = std::str::from_utf8(answer).map_err(|_| corrupt(what, "not UTF-8"))?;
    let mut fields = [""; LOOKUP_FIELDS];
    let mut parts = text.split('\n');
    for f in &mut fields {
        *f = parts.next().ok_or_else(|| corrupt(what, "short answer"))?;
    }
    if parts.next().is_some() {
        return Err(corrupt(what, "long answer"));
    }
    let [kind, id, key_id, deadline, parent, user @ ..] = fields;
    let access_token = match kind {
        "key" => false,
        "token" => true,
        other => return Err(corrupt(what, &format!("kind {other:?}"))),
    };
    let deadline_ms = match deadline {
        "" => None,
        ms => Some(parse_ms(ms, what)?),
    };
    let key_hash = if access_token {
        TokenHash::from_hex(parent).ok_or_else(|| corrupt(what, "bad parent"))?
    } else {
        hash
    };
    Ok(Resolved {
        user: build_owner(id, user.map(|f| (f != "\0").then_some(f)))?,
        key_id: key_id.to_string(),
        deadline_ms,
        access_token,
        key_hash,
    })
}

fn decode_key(hash: TokenHash, raw: &str) -> Result<SecretKey, StoreError> {
    let what = "key entry";
    let e: KeyEntry = serde_json::from_str(raw).map_err(|err| corrupt(what, &err.to_string()))?;
    let optional = |s: &str| -> Result<Option<u64>, StoreError> {
        if s.is_empty() {
            Ok(None)
        } else {
            parse_ms(s, what).map(Some)
        }
    };
    let slot = match e.slot.as_str() {
        "" => None,
        "1" => Some(1),
        "2" => Some(2),
        other => return Err(corrupt(what, &format!("slot {other:?}"))),
    };
    Ok(SecretKey {
        hash,
        key_id: e.key_id,
        slot,
        created_ms: parse_ms(&e.created_ms, what)?,
        expires_ms: optional(&e.expires_ms)?,
        last_used_ms: optional(&e.last_used_ms)?,
    })
}

fn parse_ms(s: &str, what: &str) -> Result<u64, StoreError> {
    s.parse()
        .map_err(|_| corrupt(what, &format!("{s:?} is not a time in ms")))
}

fn array(v: Value, what: &str) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(what, &format!("expected an array, got {other:?}"))),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.is_empty(),
        Value::Map(items) => items.is_empty(),
        Value::Nil => true,
        _ => false,
    }
}

fn string(v: Value, what: &str) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b).map_err(|_| corrupt(what, "a string is not UTF-8"))
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(corrupt(what, &format!("expected a string, got {other:?}"))),
    }
}

fn corrupt(what: &str, why: &str) -> StoreError {
    StoreError::Corrupt(format!("redis {what}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse() {
        let h = TokenHash::of(b"t");
        assert_eq!(
            Announcement::parse(&format!("7 key {}", h.to_hex())),
            Some(Announcement {
                seq: 7,
                what: Invalidation::Key(h)
            })
        );
        assert_eq!(
            Announcement::parse("8 user alice"),
            Some(Announcement {
                seq: 8,
                what: Invalidation::User("alice".into())
            })
        );
        assert_eq!(
            Announcement::parse("9 all"),
            Some(Announcement {
                seq: 9,
                what: Invalidation::All
            })
        );
        for bad in [
            "",
            "x key a",
            "1 key nothex",
            "1 user",
            "1 user ",
            "1 all x",
            "1 gone",
        ] {
            assert_eq!(Announcement::parse(bad), None, "{bad:?}");
        }
    }

    /// A lookup answer as the script sends it: the fields joined by `\n`, a `None` in
    /// the head left out and a `None` among the user's fields sent as `\0`.
    fn answer(fields: [Option<&str>; LOOKUP_FIELDS]) -> Vec<u8> {
        let head = fields[..5].iter().flatten().copied();
        let user = fields[5..].iter().map(|f| f.unwrap_or("\0"));
        head.chain(user)
            .collect::<Vec<&str>>()
            .join("\n")
            .into_bytes()
    }

    const KEY: [Option<&str>; LOOKUP_FIELDS] = [
        Some("key"),
        Some("alice"),
        Some("k-1"),
        Some(""),
        Some(""),
        Some("api"),
        Some("acme"),
        Some("0"),
        Some("campaigns,events"),
    ];

    #[test]
    fn lookup_answers_decode() {
        let h = TokenHash::of(b"t");
        let r = decode_lookup(h, &answer(KEY)).expect("a key");
        assert_eq!(r.user.id, "alice");
        assert_eq!(r.user.kind, UserType::Api);
        assert_eq!(r.user.tenant, "acme");
        assert!(!r.user.disabled);
        assert_eq!(r.user.grants, ["campaigns", "events"]);
        assert_eq!((r.key_id.as_str(), r.deadline_ms), ("k-1", None));
        assert!(!r.access_token);
        assert_eq!(r.key_hash, h);

        // An access token: its deadline and its parent key.
        let parent = TokenHash::of(b"parent");
        let parent_hex = parent.to_hex();
        let mut token = KEY;
        token[0] = Some("token");
        token[3] = Some("1700000060000");
        token[4] = Some(&parent_hex);
        token[7] = Some("1");
        token[8] = Some("");
        let r = decode_lookup(h, &answer(token)).expect("a token");
        assert!(r.access_token && r.user.disabled && r.user.grants.is_empty());
        assert_eq!(
            (r.deadline_ms, r.key_hash),
            (Some(1_700_000_060_000), parent)
        );
    }

    #[test]
    fn malformed_lookup_answers_are_corrupt_not_principals() {
        let h = TokenHash::of(b"t");
        let with = |i: usize, v: Option<&'static str>| {
            let mut f = KEY;
            f[i] = v;
            answer(f)
        };
        let mut cases = vec![
            (
                "short",
                answer(KEY)[..answer(KEY).len() - "\ncampaigns,events".len()].to_vec(),
            ),
            ("a key id with a newline", with(2, Some("k\n1"))),
            ("a tenant with a newline", with(6, Some("ac\nme"))),
            ("long", [answer(KEY), b"\nx".to_vec()].concat()),
            ("kind", with(0, Some("session"))),
            ("no user id", with(1, None)),
            ("no key id", with(2, None)),
            ("deadline", with(3, Some("soon"))),
            ("type", with(5, Some("robot"))),
            ("no tenant", with(6, None)),
            ("disabled", with(7, Some("yes"))),
            ("no grants", with(8, None)),
            ("empty", Vec::new()),
        ];
        let mut token = KEY;
        token[0] = Some("token");
        token[4] = Some("not a hash");
        cases.push(("parent", answer(token)));
        let mut bytes = answer(KEY);
        bytes[4] = 0xff;
        cases.push(("not UTF-8", bytes));
        for (what, answer) in cases {
            match decode_lookup(h, &answer) {
                Err(StoreError::Corrupt(_)) => {}
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn rediss_opens_and_insecure_is_refused() {
        let no_files = StoreTls::default();
        let store = RedisStore::open(
            "rediss://127.0.0.1:6380/0",
            "cg:",
            Duration::from_secs(1),
            &no_files,
        );
        assert!(store.is_ok(), "rediss:// must open");
        let Err(StoreError::Unavailable(msg)) = RedisStore::open(
            "rediss://127.0.0.1:6380/0#insecure",
            "cg:",
            Duration::from_secs(1),
            &no_files,
        ) else {
            panic!("#insecure must be refused");
        };
        assert!(
            msg.contains("store.url") && msg.contains("#insecure"),
            "{msg}"
        );
    }

    #[test]
    fn key_entries_round_trip() {
        let raw = r#"{"key_id":"k","slot":"","created_ms":"1700000000000","expires_ms":"1700000300000","last_used_ms":""}"#;
        let k = decode_key(TokenHash([1; 32]), raw).expect("decode");
        assert_eq!(k.slot, None);
        assert_eq!(k.expires_ms, Some(1_700_000_300_000));
        assert_eq!(k.last_used_ms, None);
        assert!(decode_key(TokenHash([1; 32]), &raw.replace("\"\"", "\"3\"")).is_err());
    }
}
