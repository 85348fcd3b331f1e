//! The embedded `file:` store (stub, being written).
#![allow(dead_code, unused_variables, clippy::missing_errors_doc)]
use super::*;
pub struct FileStore;
impl FileStore {
    pub fn open(path: &std::path::Path) -> Result<FileStore, StoreError> {
        Err(StoreError::Unavailable("stub".into()))
    }
    pub fn lookup(&self, hash: &TokenHash) -> Result<Option<Resolved>, StoreError> {
        Ok(None)
    }
    pub fn create_user(&self, user: NewUser) -> Result<User, StoreError> {
        Err(StoreError::refused("stub"))
    }
    pub fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        Ok(None)
    }
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        Ok(vec![])
    }
    pub fn set_disabled(&self, id: &str, disabled: bool) -> Result<User, StoreError> {
        Err(StoreError::refused("stub"))
    }
    pub fn delete_user(&self, id: &str) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn grant(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        Err(StoreError::refused("stub"))
    }
    pub fn revoke_grants(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        Err(StoreError::refused("stub"))
    }
    pub fn add_key(
        &self,
        id: &str,
        hash: TokenHash,
        key_id: &str,
    ) -> Result<SecretKey, StoreError> {
        Err(StoreError::refused("stub"))
    }
    pub fn keys(&self, id: &str) -> Result<Vec<SecretKey>, StoreError> {
        Ok(vec![])
    }
    pub fn delete_key(&self, id: &str, slot: u8, how: Revocation) -> Result<SecretKey, StoreError> {
        Err(StoreError::refused("stub"))
    }
    /// Re-reads the file if another process changed it; true when it did.
    pub fn reload_if_changed(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}
