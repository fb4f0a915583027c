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
    /// Run the relay until SIGTERM or SIGINT; SIGHUP reloads the configuration file.
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
    /// Inspect and manage the running relay's queue (through its HTTP API, [http] in the config).
    Queue {
        #[arg(long, short, env = "EXORELAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Show each account's state, last success and, when paused, the cause and fix; pause or
    /// resume an account.
    Accounts {
        #[arg(long, short, env = "EXORELAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<AccountAction>,
    },
    /// Make the running relay read its configuration file again (through its HTTP API, [http]
    /// in the config). `systemctl reload exorelay` and `kill -HUP <pid>` do the same. An invalid
    /// file, or one that changes a setting needing a restart (queue.dir, [http] listen), is
    /// refused with the reason, and the running configuration stays.
    Reload {
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
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
        /// Send as this address (envelope and From:), as a device would: with
        /// rewrite_from = "never" this tests the mailbox's SendAs right for it.
        #[arg(long)]
        from: Option<String>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Sign a delegated account (auth = "delegated") in as the mailbox's user and save its
    /// refresh token; the running relay picks it up by itself. Device code by default.
    Login {
        #[arg(long, short, env = "EXORELAY_CONFIG")]
        config: PathBuf,
        /// The account to sign in.
        #[arg(long)]
        account: String,
        /// Sign in with a browser on this machine (authorization code with PKCE; the redirect
        /// comes back to a one-shot listener on 127.0.0.1) instead of a device code.
        #[arg(long)]
        browser: bool,
        /// With --browser: the listener's port (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// With --browser: open the URL with xdg-open (otherwise it is only printed).
        #[arg(long)]
        open: bool,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// List messages (queued, deferred, held and failed by default).
    List {
        #[arg(long)]
        account: Option<String>,
        /// queued, deferred, held, failed, deleted or all.
        #[arg(long)]
        state: Option<String>,
        /// Only messages older than this, e.g. "30m" or "2h".
        #[arg(long)]
        older_than: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one message: envelope, client, attempts and the last reply per recipient.
    Show {
        id: String,
        /// Include the message itself.
        #[arg(long)]
        body: bool,
    },
    /// Deliver now (a failed or deleted message goes back to the queue).
    Retry { id: String },
    /// Keep a queued message from being delivered until released.
    Hold { id: String },
    /// Release a held message.
    Release { id: String },
    /// Move a message to deleted/ (kept until pruned; `retry` brings it back).
    Delete { id: String },
}

#[derive(Subcommand)]
enum AccountAction {
    /// List accounts (the default).
    List,
    /// Stop delivering through an account; its mail stays queued.
    Pause { name: String },
    /// Resume a paused account.
    Resume { name: String },
}

fn admin_config(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    let Some(path) = config else {
        eprintln!("error: --config is required (or set EXORELAY_CONFIG)");
        return Err(ExitCode::from(2));
    };
    load(&path)
}

/// Runs one admin API call and prints its result as JSON or text.
fn admin_call(
    config: &Config,
    json: bool,
    render: fn(&serde_json::Value) -> String,
    call: impl AsyncFnOnce(&exorelay::admin::AdminClient) -> Result<serde_json::Value, String>,
) -> ExitCode {
    let client = match exorelay::admin::AdminClient::from_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(call(&client)) {
        Ok(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn queue_op(config: &Config, json: bool, verb: &str, id: &str) -> ExitCode {
    let path = format!("/api/v1/queue/{}/{verb}", exorelay::admin::q(id));
    admin_call(config, json, result_line, async move |c| {
        c.post(&path).await
    })
}

fn result_line(v: &serde_json::Value) -> String {
    format!("{}\n", v["result"].as_str().unwrap_or("done"))
}

fn reload_text(v: &serde_json::Value) -> String {
    let mut out = String::from("configuration reloaded\n");
    for c in v["changes"].as_array().into_iter().flatten() {
        out.push_str(&format!("  {}\n", c.as_str().unwrap_or_default()));
    }
    out
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
        Command::Queue {
            config,
            json,
            action,
        } => {
            use exorelay::admin::{message_text, q, queue_table};
            let config = match admin_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match action {
                QueueAction::List {
                    account,
                    state,
                    older_than,
                    limit,
                } => {
                    let mut path = format!("/api/v1/queue?limit={limit}");
                    for (k, v) in [
                        ("account", account),
                        ("state", state),
                        ("older_than", older_than),
                    ] {
                        if let Some(v) = v {
                            path.push_str(&format!("&{k}={}", q(&v)));
                        }
                    }
                    admin_call(&config, json, queue_table, async move |c| {
                        c.get(&path).await
                    })
                }
                QueueAction::Show { id, body } => {
                    let path = format!(
                        "/api/v1/queue/{}{}",
                        q(&id),
                        if body { "?body=true" } else { "" }
                    );
                    admin_call(&config, json, message_text, async move |c| {
                        c.get(&path).await
                    })
                }
                QueueAction::Retry { id } => queue_op(&config, json, "retry", &id),
                QueueAction::Hold { id } => queue_op(&config, json, "hold", &id),
                QueueAction::Release { id } => queue_op(&config, json, "release", &id),
                QueueAction::Delete { id } => queue_op(&config, json, "delete", &id),
            }
        }
        Command::Accounts {
            config,
            json,
            action,
        } => {
            use exorelay::admin::{accounts_table, q};
            let config = match admin_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match action.unwrap_or(AccountAction::List) {
                AccountAction::List => admin_call(&config, json, accounts_table, async |c| {
                    c.get("/api/v1/accounts").await
                }),
                AccountAction::Pause { name } => {
                    let path = format!("/api/v1/accounts/{}/pause", q(&name));
                    admin_call(&config, json, result_line, async move |c| {
                        c.post(&path).await
                    })
                }
                AccountAction::Resume { name } => {
                    let path = format!("/api/v1/accounts/{}/resume", q(&name));
                    admin_call(&config, json, result_line, async move |c| {
                        c.post(&path).await
                    })
                }
            }
        }
        Command::Reload { config, json } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            admin_call(&config, json, reload_text, async |c| {
                c.post("/api/v1/reload").await
            })
        }
        Command::Login {
            config,
            account,
            browser,
            port,
            open,
            timeout,
        } => {
            init_logging(cli.log_format, "warn");
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            login(&config, &account, browser, port, open, timeout)
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
            from,
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
                    from.as_deref(),
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
            // Said before binding: a second relay started with the same config would otherwise
            // only report that its ports are taken. (`run` takes the lock for real.)
            if let Err(exorelay::spool::OpenError::Locked(locked)) =
                exorelay::spool::SpoolLock::probe(&config.queue.dir)
            {
                let e = exorelay::RunError::SpoolLocked(locked);
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
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

/// `exorelay login`: signs the account in, then asks the running relay to try it now.
fn login(
    config: &Config,
    account: &str,
    browser: bool,
    port: u16,
    open: bool,
    timeout: std::time::Duration,
) -> ExitCode {
    use exorelay::oauth::login::{DeviceEvent, browser_login, device_login};
    let Some(a) = config.accounts.iter().find(|a| a.name == account) else {
        let known: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "error: no account {account:?} in {}; defined accounts: {}",
            config.source.display(),
            known.join(", ")
        );
        return ExitCode::from(2);
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        if browser {
            browser_login(a, port, timeout, open, |url| {
                println!("Open this URL in a browser on this machine and sign in as the mailbox's user:\n\n  {url}\n\nWaiting for the sign-in (up to {})...", humantime::format_duration(timeout));
            })
            .await
        } else {
            device_login(a, timeout, |event| match event {
                DeviceEvent::Started { uri, code, expires_in } => println!(
                    "To sign in, open {uri} in any browser and enter the code {code}\n(sign in as the mailbox's user; the code expires in {}).\nWaiting for the sign-in...",
                    humantime::format_duration(expires_in)
                ),
                DeviceEvent::SlowDown { interval } => println!(
                    "Entra asked to poll more slowly; next check in {}.",
                    humantime::format_duration(interval)
                ),
            })
            .await
        }
    });
    let signed_in = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: sign-in of account {account} failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Signed in{} for account {}; refresh token saved in {} (mode 600).",
        signed_in
            .user
            .as_deref()
            .map(|u| format!(" as {u}"))
            .unwrap_or_default(),
        signed_in.account,
        signed_in.token_file.display()
    );
    let told = if config.http.listen.is_some() && config.http.admin_token_file.is_some() {
        let path = format!(
            "/api/v1/accounts/{}/resume",
            exorelay::admin::q(&signed_in.account)
        );
        exorelay::admin::AdminClient::from_config(config)
            .ok()
            .map(|c| rt.block_on(async move { c.post(&path).await }))
    } else {
        None
    };
    match told {
        Some(Ok(_)) => println!("The running relay was told to try the account now."),
        _ => println!(
            "The running relay picks the sign-in up by itself at its next attempt (a paused account is tried every [queue] probe_interval)."
        ),
    }
    ExitCode::SUCCESS
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
