//! STUB: `campaign-gate demo` (being written).

/// Runs the demo until Ctrl-C.
pub async fn run() -> std::io::Result<()> {
    Ok(())
}
