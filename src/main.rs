use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use exorelay::config::Config;

/// SMTP relay for printers, scanners and other devices that cannot do OAuth: they send plain
/// SMTP to exorelay, which queues every message durably and forwards it.
#[derive(Parser)]
#[command(name = "exorelay", version, about, long_about = None)]
struct Cli {
    /// Log format on standard error. The level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// The TOML configuration file.
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and print the effective settings (secrets redacted).
    /// Exits with status 2 when the file is not valid.
    Check {
        /// The TOML configuration file.
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
    },
    /// Read a password from standard input and print its argon2id hash for `[[user]] password_hash`.
    HashPassword,
    /// Check each account step by step (endpoints, token and its claims, STARTTLS, AUTH) and
    /// print the cause and the fix of every failure. Exits non-zero when a check fails.
    Doctor {
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
        /// Check only this account.
        #[arg(long)]
        account: Option<String>,
    },
    /// Send a test message through the spool and an account's upstream, wait for the outcome and
    /// print it. Uses a private spool, so a running relay is not disturbed.
    SendTest {
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
        /// Recipient of the test message.
        #[arg(long)]
        to: String,
        /// The account to send through (default: the first).
        #[arg(long)]
        account: Option<String>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(config: &std::path::Path) -> Result<Config, ExitCode> {
    exorelay::tls::install_provider();
    Config::load(config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", c.describe());
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::HashPassword => {
            let mut input = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("error: cannot read the password from standard input: {e}");
                return ExitCode::FAILURE;
            }
            let password = input.strip_suffix('\n').unwrap_or(&input);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                eprintln!(
                    "error: empty password; pipe it in, e.g. `printf '%s' 'secret' | exorelay hash-password`"
                );
                return ExitCode::FAILURE;
            }
            match exorelay::smtp::auth::hash_password(password) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot hash the password: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor { config, account } => {
            init_logging(cli.log_format, "error");
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let report = match runtime() {
                Ok(rt) => rt.block_on(exorelay::diagnose::doctor(&config, account.as_deref())),
                Err(code) => return code,
            };
            print!("{}", report.text);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::SendTest {
            config,
            to,
            account,
            timeout,
        } => {
            init_logging(cli.log_format, "warn");
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let report = match runtime() {
                Ok(rt) => rt.block_on(exorelay::diagnose::send_test(
                    &config,
                    account.as_deref(),
                    &to,
                    timeout,
                )),
                Err(code) => return code,
            };
            print!("{}", report.text);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run { config } => {
            init_logging(cli.log_format, "info");
            let config = match load(&config) {
                Ok(c) => Arc::new(c),
                Err(code) => return code,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let listeners = match exorelay::bind_listeners(&config).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("{e}");
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                match exorelay::run(config, listeners, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
