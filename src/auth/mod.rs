//! Authentication: bearer parsing, token hashing, principals, and the cache over the store.

pub mod bearer;
