//! The `stacyvm` binary: parse the command line, run it, map the outcome to a
//! documented exit code (see `stacyvm_node::cli::ExitCode`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    stacyvm_runtimes::sys::limit_malloc_arenas(2);
    // Every TLS user (QUIC, reqwest, axum-server) needs the ring provider first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STACYVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = stacyvm_node::cli::Cli::parse();
    if cli.command.is_client() {
        stacyvm_runtimes::sys::default_sigpipe();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(stacyvm_node::cli::ExitCode::Failed as u8);
        }
    };
    match runtime.block_on(stacyvm_node::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::from(err.exit_code() as u8)
        }
    }
}
