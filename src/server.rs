//! STUB: listeners and connections (being written).
#![allow(dead_code, unused_variables)]
use std::path::PathBuf;

/// Runs the gateway until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub async fn serve(
    config: crate::config::Config,
    config_path: Option<PathBuf>,
) -> std::io::Result<()> {
    Ok(())
}
