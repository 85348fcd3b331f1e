//! STUB: command line (being written).
pub mod demo;
