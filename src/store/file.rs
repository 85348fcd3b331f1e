//! The embedded `file:` store: one JSON file, written whole and atomically by whichever
//! process changes it (the CLI or a server), read into an immutable snapshot.
//!
//! File format (`version` 1): `{"version":1,"generation":N,"users":{"<id>":{<user
//! fields>,"keys":[...]}}}`. Keys are stored as the hex SHA-256 of the token, never the
//! token. A missing file is an empty store; it is created by the first change.
//!
//! Writers serialise on an exclusive lock of the sidecar file `<path>.lock`, re-read the
//! file under it (another process may have written since), apply a rule from
//! [`super::records`], bump `generation`, and replace the file by rename after fsync.
//! Readers never lock: [`FileStore::lookup`] is a map read in the current snapshot, and a
//! server calls [`FileStore::reload_if_changed`] periodically to see other writers' changes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::records::UserRecords;
use super::{
    AccessToken, KeyUse, NewUser, Owner, Resolved, Revocation, SecretKey, StoreError, TokenHash,
    User,
};

/// The only file format this version reads and writes.
const FORMAT_VERSION: u32 = 1;

/// The file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    /// Bumped by every change; lets people and tools see that the file moved.
    generation: u64,
    users: BTreeMap<String, UserRecords>,
}

/// Just enough of the file to refuse a format this version does not know.
#[derive(Deserialize)]
struct FormatHeader {
    version: u32,
}

/// What `stat` says about the file: changes whenever a writer replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }
}

/// How long after its modification time a file's stamp is not trusted: a second write
/// within the same timestamp tick, of the same length, onto a reused inode would look
/// unchanged. Covers the coarsest common mtime granularity (2 s on FAT).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// One parsed version of the file, with the token index. Never changed once built.
struct Snapshot {
    data: StoreFile,
    /// Every stored token hash -> the id of the user holding it.
    index: HashMap<TokenHash, String>,
    /// `None` when the file did not exist.
    stamp: Option<FileStamp>,
    /// When the file was read (or written by us).
    read_at: SystemTime,
}

impl Snapshot {
    fn build(path: &Path, loaded: Loaded) -> Result<Snapshot, StoreError> {
        let Loaded {
            data,
            stamp,
            read_at,
        } = loaded;
        let mut index = HashMap::new();
        for (id, records) in &data.users {
            if records.user.id != *id {
                return Err(corrupt(
                    path,
                    format!("user {id:?} has id {:?}", records.user.id),
                ));
            }
            for hash in records
                .keys
                .iter()
                .map(|k| k.hash)
                .chain(records.tokens.iter().map(|t| t.hash))
            {
                if let Some(other) = index.insert(hash, id.clone()) {
                    return Err(corrupt(
                        path,
                        format!("users {other:?} and {id:?} hold the same key"),
                    ));
                }
            }
        }
        Ok(Snapshot {
            data,
            index,
            stamp,
            read_at,
        })
    }

    /// Whether the file may have changed again without its stamp showing it.
    fn racy(&self) -> bool {
        self.stamp
            .is_some_and(|s| s.modified.is_none_or(|m| m + RACY_WINDOW > self.read_at))
    }

    fn records(&self, id: &str) -> Result<&UserRecords, StoreError> {
        self.data.users.get(id).ok_or_else(|| unknown_user(id))
    }
}

/// The `file:` store. Cheap to read from many threads; changes go through the file.
pub struct FileStore {
    path: PathBuf,
    lock_path: PathBuf,
    snapshot: ArcSwap<Snapshot>,
    /// Orders this process's own writes and reloads, so that an older snapshot is never
    /// installed over a newer one. Never taken by readers.
    refresh: Mutex<()>,
    /// Set when this process installed a version of the file that another process had
    /// written (a write of ours re-reads the file first): the next
    /// [`FileStore::reload_if_changed`] reports a change even though the stamp on disk
    /// is then our own.
    foreign_change: std::sync::atomic::AtomicBool,
}

impl FileStore {
    /// Opens the store at `path`, reading it if it exists.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        let snapshot = Snapshot::build(path, read_file(path)?)?;
        let mut lock_path = OsString::from(path.as_os_str());
        lock_path.push(".lock");
        Ok(FileStore {
            path: path.to_path_buf(),
            lock_path: PathBuf::from(lock_path),
            snapshot: ArcSwap::from_pointee(snapshot),
            refresh: Mutex::new(()),
            foreign_change: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The key behind `hash` if it works now, from memory: no I/O, no lock.
    pub fn lookup(&self, hash: &TokenHash) -> Result<Option<Resolved>, StoreError> {
        let snap = self.snapshot.load();
        let Some(records) = snap.index.get(hash).and_then(|id| snap.data.users.get(id)) else {
            return Ok(None);
        };
        Ok(records
            .resolve(hash, now_ms())
            .map(|(key_id, deadline_ms, parent)| Resolved {
                user: Owner::from(&records.user),
                key_id,
                deadline_ms,
                access_token: parent.is_some(),
                key_hash: parent.unwrap_or(*hash),
            }))
    }

    pub fn record_uses(&self, uses: &[KeyUse]) -> Result<usize, StoreError> {
        if uses.is_empty() {
            return Ok(0);
        }
        let users = super::group_uses(uses);
        self.mutate(|data, _| {
            for (id, keys) in &users {
                if let Some(r) = data.users.get_mut(*id) {
                    for (hash, at_ms) in keys {
                        r.record_use(hash, *at_ms);
                    }
                }
            }
            Ok(())
        })?;
        Ok(users.len())
    }

    pub fn issue_access_token(
        &self,
        id: &str,
        parent: TokenHash,
        hash: TokenHash,
        lifetime: Duration,
    ) -> Result<AccessToken, StoreError> {
        let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        self.mutate_user(id, |r, now| r.issue_token(parent, hash, lifetime_ms, now))
    }

    pub fn create_user(&self, user: NewUser) -> Result<User, StoreError> {
        self.mutate(|data, now| {
            super::records::validate_user_id(&user.id)?;
            if data.users.contains_key(&user.id) {
                return Err(StoreError::refused(format!(
                    "user {} already exists",
                    user.id
                )));
            }
            let records = UserRecords::create(user, now)?;
            let created = records.user.clone();
            data.users.insert(created.id.clone(), records);
            Ok(created)
        })
    }

    pub fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .snapshot
            .load()
            .data
            .users
            .get(id)
            .map(|r| r.user.clone()))
    }

    /// Every user, ordered by id.
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        Ok(self
            .snapshot
            .load()
            .data
            .users
            .values()
            .map(|r| r.user.clone())
            .collect())
    }

    pub fn set_disabled(&self, id: &str, disabled: bool) -> Result<User, StoreError> {
        self.mutate_user(id, |r, _| {
            r.set_disabled(disabled);
            Ok(r.user.clone())
        })
    }

    pub fn delete_user(&self, id: &str) -> Result<(), StoreError> {
        self.mutate(|data, _| {
            data.users
                .remove(id)
                .map(drop)
                .ok_or_else(|| unknown_user(id))
        })
    }

    pub fn grant(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        self.mutate_user(id, |r, _| {
            r.grant(apis)?;
            Ok(r.user.clone())
        })
    }

    pub fn revoke_grants(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        self.mutate_user(id, |r, _| {
            r.revoke_grants(apis)?;
            Ok(r.user.clone())
        })
    }

    pub fn add_key(
        &self,
        id: &str,
        hash: TokenHash,
        key_id: &str,
    ) -> Result<SecretKey, StoreError> {
        self.mutate(|data, now| {
            let held_elsewhere = data
                .users
                .iter()
                .any(|(other, r)| other != id && r.keys.iter().any(|k| k.hash == hash));
            if held_elsewhere {
                return Err(StoreError::refused(
                    "this key is already registered to another user",
                ));
            }
            let records = data.users.get_mut(id).ok_or_else(|| unknown_user(id))?;
            records.add_key(hash, key_id, now)
        })
    }

    /// The user's keys that work now: slot 1, slot 2, then keys in grace.
    pub fn keys(&self, id: &str) -> Result<Vec<SecretKey>, StoreError> {
        Ok(self.snapshot.load().records(id)?.valid_keys(now_ms()))
    }

    pub fn delete_key(&self, id: &str, slot: u8, how: Revocation) -> Result<SecretKey, StoreError> {
        self.mutate_user(id, |r, now| r.delete_key(slot, how, now))
    }

    /// Re-reads the file if another process changed it; true when it did. Costs one
    /// `stat` when nothing changed (and a re-read during `RACY_WINDOW` after a write).
    /// On error the current snapshot stays in place.
    pub fn reload_if_changed(&self) -> Result<bool, StoreError> {
        let current = match fs::metadata(&self.path) {
            Ok(meta) => Some(FileStamp::of(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(unavailable(&self.path, &e)),
        };
        let take_foreign = || {
            self.foreign_change
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        };
        let snap = self.snapshot.load();
        if current == snap.stamp && !snap.racy() {
            return Ok(take_foreign());
        }
        drop(snap);
        let _order = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let loaded = read_file(&self.path)?;
        let snap = self.snapshot.load();
        let changed = loaded.stamp != snap.stamp || loaded.data.generation != snap.data.generation;
        drop(snap);
        self.install(loaded)?;
        Ok(take_foreign() || changed)
    }

    /// Applies `change` to one existing user's records.
    fn mutate_user<T>(
        &self,
        id: &str,
        change: impl FnOnce(&mut UserRecords, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.mutate(|data, now| {
            let records = data.users.get_mut(id).ok_or_else(|| unknown_user(id))?;
            change(records, now)
        })
    }

    /// Runs one change under the file lock on the file's latest content and writes the
    /// result. A refused change writes nothing, but still refreshes the snapshot.
    fn mutate<T>(
        &self,
        change: impl FnOnce(&mut StoreFile, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _order = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let lock = self.lock()?;
        let mut loaded = read_file(&self.path)?;
        self.note_foreign(&loaded);
        let now = now_ms();
        let outcome = match change(&mut loaded.data, now) {
            Ok(v) => v,
            Err(refusal) => {
                self.install(loaded)?;
                return Err(refusal);
            }
        };
        let data = &mut loaded.data;
        for records in data.users.values_mut() {
            records.prune(now);
        }
        data.version = FORMAT_VERSION;
        data.generation += 1;
        loaded.stamp = Some(self.write(data)?);
        loaded.read_at = SystemTime::now();
        self.install(loaded)?;
        drop(lock);
        Ok(outcome)
    }

    /// Takes the exclusive writer lock; released when the returned file is dropped.
    fn lock(&self) -> Result<File, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| unavailable(&self.lock_path, &e))?;
        file.lock().map_err(|e| unavailable(&self.lock_path, &e))?;
        Ok(file)
    }

    /// Replaces the file with `data`: temp file in the same directory, fsync, rename,
    /// fsync of the directory. Called only under the writer lock.
    fn write(&self, data: &StoreFile) -> Result<FileStamp, StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut json = serde_json::to_vec_pretty(data).map_err(|e| {
            StoreError::Corrupt(format!("{}: cannot encode: {e}", self.path.display()))
        })?;
        json.push(b'\n');

        let written = (|| -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            if let Ok(meta) = fs::metadata(&self.path) {
                // Keep whatever access the operator gave the store file.
                file.set_permissions(meta.permissions())?;
            }
            file.write_all(&json)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            // Best effort: a stray temp file is harmless, the store file is intact.
            let _ = fs::remove_file(&tmp);
            return Err(unavailable(&self.path, &e));
        }
        let meta = fs::metadata(&self.path).map_err(|e| unavailable(&self.path, &e))?;
        Ok(FileStamp::of(&meta))
    }

    fn install(&self, loaded: Loaded) -> Result<(), StoreError> {
        let snapshot = Snapshot::build(&self.path, loaded)?;
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }

    /// Notes whether `loaded`, read under the lock before a change of ours, already
    /// differs from what this process had: then someone else wrote in between.
    fn note_foreign(&self, loaded: &Loaded) {
        if loaded.data.generation != self.snapshot.load().data.generation {
            self.foreign_change
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The file as read at one instant.
struct Loaded {
    data: StoreFile,
    stamp: Option<FileStamp>,
    read_at: SystemTime,
}

/// Reads and parses the file; a missing or empty file is an empty store. The stamp is
/// taken from the open handle, so it describes exactly the content that was read.
fn read_file(path: &Path) -> Result<Loaded, StoreError> {
    let read_at = SystemTime::now();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Loaded {
                data: empty_store(),
                stamp: None,
                read_at,
            });
        }
        Err(e) => return Err(unavailable(path, &e)),
    };
    let meta = file.metadata().map_err(|e| unavailable(path, &e))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| unavailable(path, &e))?;
    let stamp = Some(FileStamp::of(&meta));
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Loaded {
            data: empty_store(),
            stamp,
            read_at,
        });
    }
    let header: FormatHeader =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    if header.version != FORMAT_VERSION {
        return Err(corrupt(
            path,
            format!(
                "file format version {} (this build reads version {FORMAT_VERSION})",
                header.version
            ),
        ));
    }
    let data = serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    Ok(Loaded {
        data,
        stamp,
        read_at,
    })
}

fn empty_store() -> StoreFile {
    StoreFile {
        version: FORMAT_VERSION,
        generation: 0,
        users: BTreeMap::new(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unknown_user(id: &str) -> StoreError {
    StoreError::refused(format!("user {id} does not exist"))
}

fn unavailable(path: &Path, e: &io::Error) -> StoreError {
    StoreError::Unavailable(format!("{}: {e}", path.display()))
}

fn corrupt(path: &Path, why: String) -> StoreError {
    StoreError::Corrupt(format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserType;
    use crate::store::records::generate_secret_key;

    fn new_user(id: &str, kind: UserType) -> NewUser {
        NewUser {
            id: id.into(),
            kind,
            tenant: "acme".into(),
            name: id.into(),
            grants: vec!["events".into()],
        }
    }

    fn is_refused<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Refused(_)))
    }

    #[test]
    fn missing_file_is_an_empty_store_created_on_first_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.json");
        let store = FileStore::open(&path).expect("open");
        assert!(store.users().expect("users").is_empty());
        assert!(!path.exists());
        assert!(!store.reload_if_changed().expect("reload"));
        store
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        let text = fs::read_to_string(&path).expect("file written");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["version"], 1);
        assert_eq!(json["generation"], 1);
        assert_eq!(json["users"]["alice"]["type"], "api");
        assert_eq!(json["users"]["alice"]["keys"], serde_json::json!([]));
    }

    #[test]
    fn round_trip_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.json");
        let store = FileStore::open(&path).expect("open");
        store
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        let (token, key_id) = generate_secret_key();
        let hash = TokenHash::of(token.as_bytes());
        let key = store.add_key("alice", hash, &key_id).expect("add");
        assert_eq!(key.slot, Some(1));

        // Nothing secret reaches the file: only the hash.
        let text = fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&token));
        assert!(text.contains(&hash.to_hex()));

        let reopened = FileStore::open(&path).expect("reopen");
        let resolved = reopened.lookup(&hash).expect("lookup").expect("found");
        assert_eq!(resolved.user.id, "alice");
        assert_eq!(resolved.user.grants, vec!["events"]);
        assert_eq!(resolved.key_id, key_id);
        assert_eq!(resolved.deadline_ms, None);
        assert_eq!(reopened.keys("alice").expect("keys"), vec![key]);
        assert_eq!(
            reopened.users().expect("users"),
            store.users().expect("users")
        );
        assert_eq!(
            reopened.lookup(&TokenHash::of(b"other")).expect("lookup"),
            None
        );
    }

    #[test]
    fn deleted_keys_and_users_stop_resolving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(&dir.path().join("s.json")).expect("open");
        store
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        let h1 = TokenHash::of(b"one");
        let h2 = TokenHash::of(b"two");
        store.add_key("alice", h1, "k1").expect("k1");
        store.add_key("alice", h2, "k2").expect("k2");

        let grace = Duration::from_secs(300);
        let deleted = store
            .delete_key("alice", 1, Revocation::Grace(grace))
            .expect("delete");
        let resolved = store.lookup(&h1).expect("lookup").expect("in grace");
        assert_eq!(resolved.deadline_ms, deleted.expires_ms);
        let keys = store.keys("alice").expect("keys");
        assert_eq!(keys[0].key_id, "k2");
        assert_eq!(keys[0].slot, Some(1));

        store
            .delete_key("alice", 1, Revocation::Now)
            .expect("revoke");
        assert_eq!(store.lookup(&h2).expect("lookup"), None);

        store.delete_user("alice").expect("delete user");
        assert_eq!(store.lookup(&h1).expect("lookup"), None);
        assert!(is_refused(store.delete_user("alice")));
        assert!(is_refused(store.keys("alice")));
    }

    #[test]
    fn refusals_write_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        let store = FileStore::open(&path).expect("open");
        store
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        store
            .create_user(NewUser {
                grants: Vec::new(),
                ..new_user("uma", UserType::Ui)
            })
            .expect("create ui");
        let before = fs::read(&path).expect("read");
        assert!(is_refused(
            store.create_user(new_user("alice", UserType::Api))
        ));
        assert!(is_refused(
            store.create_user(new_user("bad id", UserType::Api))
        ));
        assert!(is_refused(store.add_key("uma", TokenHash::of(b"x"), "x")));
        assert!(is_refused(store.add_key(
            "nobody",
            TokenHash::of(b"x"),
            "x"
        )));
        assert!(is_refused(store.delete_key("alice", 1, Revocation::Now)));
        assert!(is_refused(store.set_disabled("nobody", true)));
        assert_eq!(fs::read(&path).expect("read"), before);
    }

    #[test]
    fn a_token_belongs_to_one_user_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(&dir.path().join("s.json")).expect("open");
        for id in ["alice", "bob"] {
            store
                .create_user(new_user(id, UserType::Api))
                .expect("create");
        }
        let h = TokenHash::of(b"shared");
        store.add_key("alice", h, "k").expect("alice");
        assert!(is_refused(store.add_key("bob", h, "k")));
        assert!(is_refused(store.add_key("alice", h, "k")));
    }

    #[test]
    fn instances_see_each_others_writes_after_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        let cli = FileStore::open(&path).expect("cli");
        let server = FileStore::open(&path).expect("server");
        assert!(!server.reload_if_changed().expect("unchanged"));

        cli.create_user(new_user("alice", UserType::Api))
            .expect("create");
        let h = TokenHash::of(b"token");
        cli.add_key("alice", h, "k1").expect("add");
        assert_eq!(server.lookup(&h).expect("lookup"), None, "not yet reloaded");
        assert!(server.reload_if_changed().expect("changed"));
        assert!(!server.reload_if_changed().expect("settled"));
        assert!(server.lookup(&h).expect("lookup").is_some());

        // The other way round: a write re-reads the file first, so nothing is lost.
        server.set_disabled("alice", true).expect("disable");
        assert!(!server.reload_if_changed().expect("own write"));
        cli.grant("alice", &["campaigns".into()]).expect("grant");
        assert!(server.reload_if_changed().expect("changed"));
        let user = server.user("alice").expect("user").expect("exists");
        assert!(user.disabled);
        assert_eq!(user.grants, vec!["campaigns", "events"]);

        cli.delete_user("alice").expect("delete");
        assert!(server.reload_if_changed().expect("changed"));
        assert_eq!(server.lookup(&h).expect("lookup"), None);
    }

    /// A write of this process re-reads the file under the lock: a change another
    /// process made just before must still be reported, or the cache over it would
    /// never be flushed (a deleted user's cached keys would keep working).
    #[test]
    fn a_foreign_change_swallowed_by_our_own_write_is_still_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        let cli = FileStore::open(&path).expect("cli");
        let server = FileStore::open(&path).expect("server");
        cli.create_user(new_user("alice", UserType::Api))
            .expect("create");
        let h = TokenHash::of(b"token");
        cli.add_key("alice", h, "k1").expect("add");
        assert!(server.reload_if_changed().expect("changed"));
        assert!(!server.reload_if_changed().expect("settled"));

        cli.delete_user("alice").expect("delete");
        // The server writes before it polls: its write carries the deletion in.
        server
            .record_uses(&[KeyUse {
                user_id: "alice".into(),
                key_hash: h,
                at_ms: 1,
            }])
            .expect("record");
        assert_eq!(server.lookup(&h).expect("lookup"), None);
        assert!(
            server.reload_if_changed().expect("reload"),
            "the deletion must be reported as a change"
        );
        assert!(!server.reload_if_changed().expect("settled"));
    }

    #[test]
    fn concurrent_writers_fill_exactly_two_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        FileStore::open(&path)
            .expect("open")
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        let outcomes: Vec<Result<SecretKey, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12u8)
                .map(|i| {
                    let path = &path;
                    s.spawn(move || {
                        let store = FileStore::open(path).expect("open");
                        store.add_key("alice", TokenHash::of(&[i]), &format!("k{i}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let added: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(added.len(), 2, "{outcomes:?}");
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Err(StoreError::Refused(_))))
                .count(),
            10
        );
        let store = FileStore::open(&path).expect("open");
        let slots: Vec<_> = store
            .keys("alice")
            .expect("keys")
            .iter()
            .map(|k| k.slot)
            .collect();
        assert_eq!(slots, vec![Some(1), Some(2)]);
        let text = fs::read_to_string(&path).expect("read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["generation"], 3);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn corrupt_files_are_reported_with_their_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        for bad in [
            "{not json",
            r#"{"version":2,"generation":1,"users":{}}"#,
            r#"{"version":1,"generation":1,"users":{"a":{"id":"b","type":"api","tenant":"t","name":"","disabled":false,"grants":[],"created_ms":0}}}"#,
        ] {
            fs::write(&path, bad).expect("write");
            match FileStore::open(&path) {
                Err(StoreError::Corrupt(m)) => {
                    assert!(m.contains(&path.display().to_string()), "{m}");
                }
                Err(e) => panic!("{bad}: expected Corrupt, got {e}"),
                Ok(_) => panic!("{bad}: expected Corrupt, got a store"),
            }
        }
        // A server that already runs keeps its snapshot and reports the corruption.
        fs::remove_file(&path).expect("rm");
        let store = FileStore::open(&path).expect("open");
        store
            .create_user(new_user("alice", UserType::Api))
            .expect("create");
        fs::write(&path, "garbage").expect("write");
        assert!(matches!(
            store.reload_if_changed(),
            Err(StoreError::Corrupt(_))
        ));
        assert!(store.user("alice").expect("user").is_some());
        assert!(matches!(
            store.create_user(new_user("bob", UserType::Api)),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(fs::read_to_string(&path).expect("read"), "garbage");
    }
}
