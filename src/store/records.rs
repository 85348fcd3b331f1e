//! Domain rules of users and keys as pure functions over one user's records.
