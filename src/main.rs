//! The `campaign-gate` binary: everything is in the library's [`campaign_gate::cli`].

fn main() -> std::process::ExitCode {
    campaign_gate::cli::main()
}
