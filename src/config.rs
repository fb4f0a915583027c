//! Configuration: the TOML file, its defaults (all in this module) and validation.
//!
//! Contract: [`Config::load`] either returns a config that the rest of the relay can use without
//! further checks (certificates load, users point at real accounts, sizes are sane), or a
//! [`ConfigError`] whose one-line `Display` names the file, the line, the TOML path of the field
//! and what is allowed there. Relative paths are resolved against the working directory.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name used in the banner, the EHLO reply and `Received:` headers.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    /// Where the config was read from; set by [`Config::load`], used in messages.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP only.
    None,
    /// Plain SMTP that offers STARTTLS.
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// AUTH is not offered; only `allowed_networks` may send.
    Off,
    /// AUTH is offered; clients in `allowed_networks` may also send without it.
    Optional,
    /// Every client must authenticate, whatever its address.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    #[serde(default = "default_tls_mode")]
    pub tls: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default = "default_auth_mode")]
    pub auth: AuthMode,
    /// Allow AUTH PLAIN/LOGIN before TLS (passwords cross the LAN in clear).
    #[serde(default)]
    pub plaintext_auth: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Networks whose clients may send without AUTH.
    #[serde(default = "default_allowed_networks")]
    pub allowed_networks: Vec<IpNet>,
    /// Accept `allowed_networks` that include public (internet) addresses. Off by default:
    /// such a network usually means an open relay by mistake.
    #[serde(default)]
    pub allow_public_networks: bool,
    #[serde(default = "default_max_message_size", deserialize_with = "de_size")]
    pub max_message_size: u64,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Concurrent SMTP connections over all listeners.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections at once from one client (an IPv4 address or an IPv6 /64).
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Connections at once from all clients outside `allowed_networks` that have not logged
    /// in, together. They have their own pool and do not count towards `max_connections`.
    #[serde(default = "default_untrusted_max_connections")]
    pub untrusted_max_connections: usize,
    /// Such connections at once from one client.
    #[serde(default = "default_untrusted_max_connections_per_client")]
    pub untrusted_max_connections_per_client: usize,
    /// `command_timeout` for clients outside `allowed_networks` until they log in.
    #[serde(
        default = "default_untrusted_command_timeout",
        deserialize_with = "de_duration"
    )]
    pub untrusted_command_timeout: Duration,
    /// How long to wait for a command (RFC 5321 §4.5.3.2 suggests 5 minutes).
    #[serde(default = "default_command_timeout", deserialize_with = "de_duration")]
    pub command_timeout: Duration,
    /// How long to wait for each block of message data (RFC 5321: 3 minutes).
    #[serde(default = "default_data_timeout", deserialize_with = "de_duration")]
    pub data_timeout: Duration,
    /// Replies of 400 or more before the session is closed with 421.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Delay before answering a failed AUTH (slows down password guessing).
    #[serde(
        default = "default_auth_failure_delay",
        deserialize_with = "de_duration"
    )]
    pub auth_failure_delay: Duration,
    /// Failed AUTH attempts from one address before it is refused for `auth_ban_time`.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    #[serde(default = "default_auth_ban_time", deserialize_with = "de_duration")]
    pub auth_ban_time: Duration,
    /// On shutdown, how long sessions may go on before they get `421 4.3.0`.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An argon2 PHC string, as printed by `exorelay hash-password`.
    pub password_hash: String,
    /// The account this device's mail goes out through (default: the first account).
    pub account: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    #[serde(default = "default_queue_dir")]
    pub dir: PathBuf,
    /// How long a message may stay queued before it is given up.
    #[serde(default = "default_max_age", deserialize_with = "de_duration")]
    pub max_age: Duration,
    /// First retry delay after a temporary failure; doubles on each attempt.
    #[serde(default = "default_retry_initial", deserialize_with = "de_duration")]
    pub retry_initial: Duration,
    /// Upper bound of the retry delay.
    #[serde(default = "default_retry_max", deserialize_with = "de_duration")]
    pub retry_max: Duration,
    /// Messages in the spool above which new mail is refused with `452 4.3.1`.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// Who gets a delivery status notification when a message fails.
    #[serde(default = "default_dsn")]
    pub dsn: DsnTo,
    /// Address for `dsn = "admin"` or `"both"`.
    pub admin_address: Option<String>,
    /// While an account is paused by a configuration error, how often one message is tried.
    #[serde(default = "default_probe_interval", deserialize_with = "de_duration")]
    pub probe_interval: Duration,
    /// How long deleted messages are kept in `deleted/` before they are pruned.
    #[serde(default = "default_keep_deleted", deserialize_with = "de_duration")]
    pub keep_deleted: Duration,
    /// Where delegated accounts keep their refresh tokens (one 0600 file per account).
    /// Default: a folder `state` beside the queue folder (`var/spool` gives `var/state`).
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    /// Write each message into a local folder (quickstart, testing, archiving).
    Capture,
    /// Submit to Exchange Online over STARTTLS with AUTH XOAUTH2.
    Exchange,
    /// Send through Microsoft Graph (`sendMail` with the MIME message; drafts and upload
    /// sessions for large messages), for tenants with SMTP AUTH turned off.
    Graph,
}

impl AccountKind {
    pub fn name(self) -> &'static str {
        match self {
            AccountKind::Capture => "capture",
            AccountKind::Exchange => "exchange",
            AccountKind::Graph => "graph",
        }
    }
}

/// Microsoft cloud: sets the Entra authority, the token scope and the SMTP host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Global,
    Usgov,
    China,
}

impl Cloud {
    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Global => "https://login.microsoftonline.com",
            Cloud::Usgov => "https://login.microsoftonline.us",
            Cloud::China => "https://login.partner.microsoftonline.cn",
        }
    }
    pub fn scope(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office365.com/.default",
            Cloud::Usgov => "https://outlook.office365.us/.default",
            Cloud::China => "https://partner.outlook.cn/.default",
        }
    }
    /// Delegated scope: the cloud's `SMTP.Send` permission plus `offline_access`, so Entra
    /// issues a refresh token.
    pub fn delegated_scope(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office.com/SMTP.Send offline_access",
            Cloud::Usgov => "https://outlook.office365.us/SMTP.Send offline_access",
            Cloud::China => "https://partner.outlook.cn/SMTP.Send offline_access",
        }
    }
    /// The Microsoft Graph root (scheme and host) of the cloud.
    pub fn graph_root(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::Usgov => "https://graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }
    pub fn smtp_host(self) -> &'static str {
        match self {
            Cloud::Global => "smtp.office365.com",
            Cloud::Usgov => "smtp.office365.us",
            Cloud::China => "smtp.partner.outlook.cn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewriteFrom {
    /// Envelope sender and `From:` become the mailbox (Exchange refuses other senders unless
    /// the mailbox holds SendAs on them).
    Always,
    /// Send as the device wrote it.
    Never,
}

/// How an `exchange` account obtains its access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountAuth {
    /// App-only: the app's own client secret or certificate (`SMTP.SendAsApp`).
    ClientCredentials,
    /// A user signed in once with `exorelay login`; the relay keeps refreshing that grant
    /// (`SMTP.Send` delegated). A secret or certificate is optional (confidential client).
    Delegated,
}

/// Signature algorithm of the client assertion for certificate credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AssertionAlgorithm {
    /// RSA-PSS with SHA-256 and an `x5t#S256` thumbprint (Microsoft's current format).
    Ps256,
    /// RSA PKCS#1 v1.5 with SHA-256 and a SHA-1 `x5t` thumbprint (older format).
    Rs256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub name: String,
    pub kind: AccountKind,
    /// `capture`: the folder messages are written to.
    pub dir: Option<PathBuf>,
    /// Deliveries of this account that may run at once (for `exchange`: SMTP connections).
    #[serde(default = "default_account_connections")]
    pub max_connections: usize,

    // ---- exchange ----
    /// The sending mailbox (the XOAUTH2 `user=`).
    pub mailbox: Option<String>,
    /// Entra tenant: GUID or verified domain.
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    /// `client_credentials` (default) or `delegated`.
    #[serde(default = "default_account_auth")]
    pub auth: AccountAuth,
    /// For `auth = "delegated"`: the file holding the refresh token,
    /// `<state_dir>/<name>.refresh-token`. Set by [`Config::parse`], not read from the file.
    #[serde(skip)]
    pub token_file: PathBuf,
    pub client_secret_file: Option<PathBuf>,
    /// Certificate (PEM) registered on the app; with `private_key_file` instead of a secret.
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    #[serde(default = "default_assertion_algorithm")]
    pub assertion_algorithm: AssertionAlgorithm,
    #[serde(default = "default_cloud")]
    pub cloud: Cloud,
    /// Overrides the cloud's Entra authority (scheme and host).
    pub authority_url: Option<String>,
    /// When the client secret expires (shown in Entra next to the secret), for warnings ahead
    /// of the day: `client_secret_expires = 2027-05-01`.
    #[serde(default, deserialize_with = "de_date")]
    pub client_secret_expires: Option<chrono::NaiveDate>,
    /// Overrides the cloud's token scope, for clouds the presets miss (e.g. US Government DoD:
    /// `https://outlook-dod.office365.us/.default`).
    pub scope: Option<String>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    /// `graph`: overrides the cloud's Graph root (scheme and host; plain http only on loopback).
    pub graph_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for SMTP and HTTPS, beside the system roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_rewrite_from")]
    pub rewrite_from: RewriteFrom,
    #[serde(default = "default_messages_per_minute")]
    pub max_messages_per_minute: u32,
    #[serde(default = "default_recipients_per_day")]
    pub max_recipients_per_day: u32,
    /// Messages with more recipients are sent as several transactions.
    #[serde(default = "default_recipients_per_message")]
    pub max_recipients_per_message: usize,
    /// The window `max_messages_per_minute` counts over. Leave at one minute for Exchange; tests
    /// shrink it to run a rate-limit scenario in seconds.
    #[serde(default = "default_rate_window", deserialize_with = "de_duration")]
    pub rate_window: Duration,
    /// Another account that sends this account's mail while this one is paused by a
    /// configuration problem (SMTP AUTH disabled, token refused); see "Failover" in the README.
    /// One hop only: the fallback has no fallback of its own.
    pub fallback: Option<String>,
}

/// The HTTP side: health, metrics, queue API, status page. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for the API and the status page's buttons.
    pub admin_token_file: Option<PathBuf>,
    pub tls: Option<HttpTls>,
    /// HTTP connections open at once; more are closed as soon as they are accepted.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// HTTP connections open at once from one client address.
    #[serde(default = "default_http_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Time for the TLS handshake and for a request's headers; also how long a kept-alive
    /// connection may wait idle for its next request.
    #[serde(
        default = "default_http_header_timeout",
        deserialize_with = "de_duration"
    )]
    pub header_timeout: Duration,
    /// Time for reading a request's body and answering it.
    #[serde(
        default = "default_http_request_timeout",
        deserialize_with = "de_duration"
    )]
    pub request_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            admin_token_file: None,
            tls: None,
            max_connections: default_http_max_connections(),
            max_connections_per_client: default_http_max_connections_per_client(),
            header_timeout: default_http_header_timeout(),
            request_timeout: default_http_request_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl HttpConfig {
    /// Reads the admin token (validated to exist and be non-empty by `Config::load`).
    pub fn admin_token(&self) -> Option<String> {
        let path = self.admin_token_file.as_ref()?;
        let t = std::fs::read_to_string(path).ok()?;
        let t = t.trim();
        (!t.is_empty()).then(|| t.to_string())
    }
}

/// Where delivery status notifications for failed messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsnTo {
    Sender,
    Admin,
    Both,
    None,
}

// ---- defaults: the one place they live ----

fn default_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
fn default_tls_mode() -> TlsMode {
    TlsMode::None
}
fn default_auth_mode() -> AuthMode {
    AuthMode::Optional
}
fn default_allowed_networks() -> Vec<IpNet> {
    vec![
        IpNet::V4(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(127, 0, 0, 0),
            8,
        )),
        IpNet::from(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
    ]
}
fn default_max_message_size() -> u64 {
    35 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    500
}
fn default_max_connections() -> usize {
    200
}
fn default_max_connections_per_client() -> usize {
    20
}
fn default_untrusted_max_connections() -> usize {
    20
}
fn default_untrusted_max_connections_per_client() -> usize {
    5
}
fn default_untrusted_command_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_max_errors() -> u32 {
    10
}
fn default_auth_failure_delay() -> Duration {
    Duration::from_secs(2)
}
fn default_max_auth_failures() -> u32 {
    5
}
fn default_auth_ban_time() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_queue_dir() -> PathBuf {
    PathBuf::from("var/spool")
}
fn default_max_age() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(60)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_messages() -> usize {
    100_000
}
fn default_account_connections() -> usize {
    2
}
fn default_assertion_algorithm() -> AssertionAlgorithm {
    AssertionAlgorithm::Ps256
}
fn default_account_auth() -> AccountAuth {
    AccountAuth::ClientCredentials
}
fn default_cloud() -> Cloud {
    Cloud::Global
}
fn default_rewrite_from() -> RewriteFrom {
    RewriteFrom::Always
}
fn default_messages_per_minute() -> u32 {
    30
}
fn default_recipients_per_day() -> u32 {
    10_000
}
fn default_recipients_per_message() -> usize {
    500
}
fn default_rate_window() -> Duration {
    Duration::from_secs(60)
}
fn default_dsn() -> DsnTo {
    DsnTo::Sender
}
fn default_http_max_connections() -> usize {
    64
}
fn default_http_max_connections_per_client() -> usize {
    16
}
fn default_http_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_http_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_keep_deleted() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(300)
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            allowed_networks: default_allowed_networks(),
            allow_public_networks: false,
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            untrusted_max_connections: default_untrusted_max_connections(),
            untrusted_max_connections_per_client: default_untrusted_max_connections_per_client(),
            untrusted_command_timeout: default_untrusted_command_timeout(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_timeout(),
            max_errors: default_max_errors(),
            auth_failure_delay: default_auth_failure_delay(),
            max_auth_failures: default_max_auth_failures(),
            auth_ban_time: default_auth_ban_time(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: default_queue_dir(),
            max_age: default_max_age(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            max_messages: default_max_messages(),
            dsn: default_dsn(),
            admin_address: None,
            probe_interval: default_probe_interval(),
            keep_deleted: default_keep_deleted(),
            state_dir: None,
        }
    }
}

// ---- value parsers ----

/// A date written as a TOML date (`2027-05-01`) or a string (`"2027-05-01"`).
fn de_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<chrono::NaiveDate>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Date(toml::value::Datetime),
        Text(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Date(dt) => dt.to_string(),
        Raw::Text(s) => s,
    };
    chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map(Some)
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid date {text:?} ({e}); write it as 2027-05-01"
            ))
        })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write a number and a unit, like \"30s\", \"5m\", \"2h\" or \"5d\""
        ))
    })
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses sizes like `"35MB"`, `"512 KiB"` or `"1048576"`. K, M and G are powers of 1024 in
/// either spelling, as Exchange means them (its "35 MB" limit is 35 MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "invalid size {s:?}; write a whole number and a unit, like \"35MB\", \"512KB\" or \"1GB\""
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1024,
        "M" | "MB" | "MIB" => 1024 * 1024,
        "G" | "GB" | "GIB" => 1024 * 1024 * 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

// ---- errors ----

/// A configuration problem, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// TOML path of the offending field, e.g. `listener[0].cert`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn path_string(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Line (1-based) at byte offset `pos` of `text`.
fn line_at(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of the value at `segs`, or of its closest existing parent.
fn line_of(text: &str, segs: &[Seg]) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let root_value = toml::de::DeValue::Table(root.into_inner());
    let mut cur = &root_value;
    let mut best: Option<usize> = None;
    for seg in segs {
        let next = match seg {
            Seg::Key(k) => cur.get(k.as_str()),
            Seg::Index(i) => cur.get(*i),
        };
        match next {
            Some(spanned) => {
                best = Some(line_at(text, spanned.span().start));
                cur = spanned.get_ref();
            }
            None => break,
        }
    }
    best
}

/// Builds errors for one file; keeps the text so it can find lines.
struct Located<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn err(&self, segs: &[Seg], message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: line_of(self.text, segs),
            field: if segs.is_empty() {
                None
            } else {
                Some(path_string(segs))
            },
            message: message.into(),
        }
    }
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let here = Located { file: path, text };
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: e.span().map(|s| line_at(text, s.start)),
            field: None,
            message: first_line(e.message()),
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let segs: Vec<Seg> = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                    serde_path_to_error::Segment::Enum { variant } => {
                        Some(Seg::Key(variant.clone()))
                    }
                    serde_path_to_error::Segment::Unknown => None,
                })
                .collect();
            let inner = e.inner();
            let line = inner
                .span()
                .map(|s| line_at(text, s.start))
                .or_else(|| line_of(text, &segs));
            ConfigError {
                file: path.to_path_buf(),
                line,
                field: if segs.is_empty() {
                    None
                } else {
                    Some(path_string(&segs))
                },
                message: first_line(inner.message()),
            }
        })?;
        config.source = path.to_path_buf();
        let state_dir = config.state_dir();
        for a in &mut config.accounts {
            a.token_file = state_dir.join(format!("{}.refresh-token", a.name));
        }
        config.validate(&here)?;
        Ok(config)
    }

    fn validate(&self, here: &Located<'_>) -> Result<(), ConfigError> {
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 255
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(here.err(
                &[key("hostname")],
                format!("{h:?} is not a host name; use letters, digits, '-' and '.', like \"relay.example.lan\""),
            ));
        }

        if self.listeners.is_empty() {
            return Err(here.err(
                &[],
                "no [[listener]] is configured; add one, e.g. [[listener]] address = \"0.0.0.0:2525\"",
            ));
        }
        let mut seen = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |k: &str| vec![key("listener"), Seg::Index(i), key(k)];
            if l.address.port() != 0 && !seen.insert(l.address) {
                return Err(here.err(
                    &at("address"),
                    format!("{} is used by two listeners", l.address),
                ));
            }
            if l.tls != TlsMode::None {
                for (name, file) in [("cert", &l.cert), ("key", &l.key)] {
                    let Some(file) = file else {
                        return Err(here.err(
                            &at("tls"),
                            format!("tls = \"{}\" needs `{name}` (a PEM file)", tls_name(l.tls)),
                        ));
                    };
                    if !file.is_file() {
                        return Err(here.err(
                            &at(name),
                            format!("file {:?} not found", file.display().to_string()),
                        ));
                    }
                }
                if let Err(e) = crate::tls::load_server_config(l) {
                    return Err(here.err(&at("cert"), e.to_string()));
                }
            }
            if l.auth == AuthMode::Required && self.users.is_empty() {
                return Err(here.err(
                    &at("auth"),
                    "auth = \"required\" but no [[user]] is configured, so nobody could send; add a [[user]] or set auth = \"optional\"",
                ));
            }
        }

        for (i, net) in self.relay.allowed_networks.iter().enumerate() {
            let at = [key("relay"), key("allowed_networks"), Seg::Index(i)];
            // Refused even with the override: no LAN is the whole internet.
            if net.prefix_len() == 0 {
                return Err(here.err(
                    &at,
                    format!("{net} would let anyone send through this relay (an open relay); list only your LAN's networks"),
                ));
            }
            if !self.relay.allow_public_networks && crate::smtp::networks::includes_public(net) {
                return Err(here.err(
                    &at,
                    format!(
                        "{net} includes public (internet) addresses, so hosts there could send through this relay without logging in; \
                         list only your LAN's private networks (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7), \
                         or set allow_public_networks = true in [relay] if your LAN really uses public addresses"
                    ),
                ));
            }
        }
        let relay_at = |k: &str| vec![key("relay"), key(k)];
        if self.relay.max_message_size < 1024 {
            return Err(here.err(&relay_at("max_message_size"), "must be at least 1KB"));
        }
        if self.relay.max_recipients == 0 {
            return Err(here.err(&relay_at("max_recipients"), "must be at least 1"));
        }
        for (name, value) in [
            ("max_connections", self.relay.max_connections),
            (
                "max_connections_per_client",
                self.relay.max_connections_per_client,
            ),
            (
                "untrusted_max_connections",
                self.relay.untrusted_max_connections,
            ),
            (
                "untrusted_max_connections_per_client",
                self.relay.untrusted_max_connections_per_client,
            ),
        ] {
            if value == 0 {
                return Err(here.err(&relay_at(name), "must be at least 1"));
            }
        }
        if self.relay.untrusted_command_timeout.is_zero() {
            return Err(here.err(&relay_at("untrusted_command_timeout"), "must be above zero"));
        }
        if self.relay.max_errors == 0 {
            return Err(here.err(&relay_at("max_errors"), "must be at least 1"));
        }
        if self.queue.retry_initial.is_zero() || self.queue.retry_max < self.queue.retry_initial {
            return Err(here.err(
                &[key("queue"), key("retry_max")],
                "retry_initial must be above zero and retry_max at least retry_initial",
            ));
        }
        if matches!(self.queue.dsn, DsnTo::Admin | DsnTo::Both)
            && self.queue.admin_address.is_none()
        {
            return Err(here.err(
                &[key("queue"), key("dsn")],
                "dsn = \"admin\" or \"both\" needs [queue] admin_address",
            ));
        }
        if self.queue.max_messages == 0 {
            return Err(here.err(&[key("queue"), key("max_messages")], "must be at least 1"));
        }

        if self.accounts.is_empty() {
            return Err(here.err(
                &[],
                "no [[account]] is configured; add one, e.g. [[account]] name = \"local\" kind = \"capture\" dir = \"var/capture\"",
            ));
        }
        let mut names = HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let at = |k: &str| vec![key("account"), Seg::Index(i), key(k)];
            if a.name.is_empty() {
                return Err(here.err(&at("name"), "must not be empty"));
            }
            if !names.insert(a.name.as_str()) {
                return Err(here.err(
                    &at("name"),
                    format!(
                        "account name {:?} is used twice; names must be unique",
                        a.name
                    ),
                ));
            }
            if a.max_connections == 0 {
                return Err(here.err(&at("max_connections"), "must be at least 1"));
            }
            match a.kind {
                AccountKind::Capture => {
                    if a.dir.is_none() {
                        return Err(here.err(
                            &at("kind"),
                            "kind = \"capture\" needs `dir`, the folder to write messages to",
                        ));
                    }
                    let exchange_only = [
                        ("mailbox", a.mailbox.is_some()),
                        ("tenant", a.tenant.is_some()),
                        ("client_id", a.client_id.is_some()),
                        ("client_secret_file", a.client_secret_file.is_some()),
                        ("certificate_file", a.certificate_file.is_some()),
                        ("smtp_host", a.smtp_host.is_some()),
                    ];
                    if let Some((k, _)) = exchange_only.iter().find(|(_, set)| *set) {
                        return Err(here.err(&at(k), "only used by kind = \"exchange\""));
                    }
                }
                AccountKind::Exchange => {
                    if let Err((k, msg)) = validate_exchange(a) {
                        return Err(here.err(&at(k), msg));
                    }
                    if a.graph_url.is_some() {
                        return Err(here.err(&at("graph_url"), "only used by kind = \"graph\""));
                    }
                }
                AccountKind::Graph => {
                    if let Err((k, msg)) = validate_graph(a) {
                        return Err(here.err(&at(k), msg));
                    }
                }
            }
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if let Err(msg) = validate_fallback(a, &self.accounts) {
                return Err(here.err(&[key("account"), Seg::Index(i), key("fallback")], msg));
            }
        }

        if let Some(listen) = self.http.listen {
            let at = |k: &str| vec![key("http"), key(k)];
            match &self.http.admin_token_file {
                Some(f) => {
                    check_private_file(f).map_err(|e| here.err(&at("admin_token_file"), e))?;
                    if self.http.admin_token().is_none_or(|t| t.len() < 16) {
                        return Err(here.err(
                            &at("admin_token_file"),
                            "the token must be at least 16 characters; create one with: head -c 32 /dev/urandom | base64 > FILE",
                        ));
                    }
                }
                None if !listen.ip().is_loopback() => {
                    return Err(here.err(
                        &at("listen"),
                        format!("{listen} is reachable from the network, so [http] admin_token_file is required"),
                    ));
                }
                None => {}
            }
            if self.http.max_connections == 0 {
                return Err(here.err(&at("max_connections"), "must be at least 1"));
            }
            if self.http.max_connections_per_client == 0
                || self.http.max_connections_per_client > self.http.max_connections
            {
                return Err(here.err(
                    &at("max_connections_per_client"),
                    format!(
                        "must be between 1 and max_connections ({})",
                        self.http.max_connections
                    ),
                ));
            }
            for (k, d) in [
                ("header_timeout", self.http.header_timeout),
                ("request_timeout", self.http.request_timeout),
            ] {
                if d.is_zero() {
                    return Err(here.err(&at(k), "must be longer than 0s"));
                }
            }
            if let Some(t) = &self.http.tls
                && let Err(e) = crate::tls::server_config_from_files(&t.cert, &t.key)
            {
                return Err(here.err(&[key("http"), key("tls"), key("cert")], e.to_string()));
            }
        }

        let mut users = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let at = |k: &str| vec![key("user"), Seg::Index(i), key(k)];
            if u.name.is_empty() {
                return Err(here.err(&at("name"), "must not be empty"));
            }
            if !users.insert(u.name.as_str()) {
                return Err(here.err(&at("name"), format!("user {:?} is defined twice", u.name)));
            }
            if argon2::PasswordHash::new(&u.password_hash).is_err() {
                return Err(here.err(
                    &at("password_hash"),
                    "not a password hash; create one with `exorelay hash-password` and paste its output",
                ));
            }
            if let Some(acct) = &u.account
                && !names.contains(acct.as_str())
            {
                let known: Vec<&str> = self.accounts.iter().map(|a| a.name.as_str()).collect();
                return Err(here.err(
                    &at("account"),
                    format!(
                        "unknown account {acct:?}; defined accounts: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where delegated accounts keep their refresh tokens: `[queue] state_dir`, else a folder
    /// `state` beside the queue folder.
    pub fn state_dir(&self) -> PathBuf {
        self.queue.state_dir.clone().unwrap_or_else(|| {
            self.queue
                .dir
                .parent()
                .unwrap_or(Path::new(""))
                .join("state")
        })
    }

    /// The account a message goes out through: the user's own, else the first.
    pub fn account_for(&self, login: Option<&str>) -> &AccountConfig {
        let by_user = login
            .and_then(|l| self.users.iter().find(|u| u.name == l))
            .and_then(|u| u.account.as_deref())
            .and_then(|name| self.accounts.iter().find(|a| a.name == name));
        // validate() guarantees at least one account.
        by_user.unwrap_or(&self.accounts[0])
    }

    /// A human-readable summary of the effective configuration, secrets redacted.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "config: {}", self.source.display());
        let _ = writeln!(s, "hostname: {}", self.hostname);
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener {}: tls={} auth={} plaintext_auth={}{}",
                l.address,
                tls_name(l.tls),
                match l.auth {
                    AuthMode::Off => "off",
                    AuthMode::Optional => "optional",
                    AuthMode::Required => "required",
                },
                l.plaintext_auth,
                match (&l.cert, &l.key) {
                    (Some(c), Some(k)) => format!(" cert={} key={}", c.display(), k.display()),
                    _ => String::new(),
                }
            );
        }
        let nets: Vec<String> = self
            .relay
            .allowed_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(
            s,
            "allowed networks (may send without AUTH): {}{}",
            nets.join(", "),
            if self.relay.allow_public_networks {
                " (public addresses allowed by allow_public_networks)"
            } else {
                ""
            }
        );
        let r = &self.relay;
        let _ = writeln!(
            s,
            "limits: max_message_size={} bytes, max_recipients={}, max_connections={} ({} per client), command_timeout={}, data_timeout={}",
            r.max_message_size,
            r.max_recipients,
            r.max_connections,
            r.max_connections_per_client,
            humantime::format_duration(r.command_timeout),
            humantime::format_duration(r.data_timeout)
        );
        let _ = writeln!(
            s,
            "outside allowed networks until logged in: untrusted_max_connections={} ({} per client), untrusted_command_timeout={}",
            r.untrusted_max_connections,
            r.untrusted_max_connections_per_client,
            humantime::format_duration(r.untrusted_command_timeout)
        );
        for u in &self.users {
            let _ = writeln!(
                s,
                "user {}: password_hash=<redacted> account={}",
                u.name,
                self.account_for(Some(&u.name)).name
            );
        }
        let _ = writeln!(
            s,
            "queue: dir={} max_age={} retry={}..{}",
            self.queue.dir.display(),
            humantime::format_duration(self.queue.max_age),
            humantime::format_duration(self.queue.retry_initial),
            humantime::format_duration(self.queue.retry_max)
        );
        match self.http.listen {
            Some(l) => {
                let _ = writeln!(
                    s,
                    "http: {}://{l} admin token {}; max_connections={} (per client {}) header_timeout={} request_timeout={}",
                    if self.http.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    },
                    if self.http.admin_token_file.is_some() {
                        "<redacted>"
                    } else {
                        "not set (read-only on loopback)"
                    },
                    self.http.max_connections,
                    self.http.max_connections_per_client,
                    humantime::format_duration(self.http.header_timeout),
                    humantime::format_duration(self.http.request_timeout)
                );
            }
            None => {
                let _ = writeln!(s, "http: off");
            }
        }
        for (i, a) in self.accounts.iter().enumerate() {
            let default = if i == 0 { " (default)" } else { "" };
            match a.kind {
                AccountKind::Capture => {
                    let dir = a
                        .dir
                        .as_deref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default();
                    let _ = writeln!(s, "account {}{default}: kind=capture dir={dir}", a.name);
                }
                AccountKind::Exchange | AccountKind::Graph => {
                    let mut credential = match (&a.client_secret_file, &a.certificate_file) {
                        (Some(f), _) => format!("client secret from {} (<redacted>)", f.display()),
                        (None, Some(c)) => {
                            format!("certificate {} ({:?})", c.display(), a.assertion_algorithm)
                        }
                        _ => String::new(),
                    };
                    if a.auth == AccountAuth::Delegated {
                        credential = format!(
                            "delegated sign-in, refresh token in {} (<redacted>){}{credential}",
                            a.token_file.display(),
                            if credential.is_empty() { "" } else { "; " }
                        );
                    }
                    let endpoint = match a.kind {
                        AccountKind::Graph => format!("Graph {}", a.graph_root()),
                        _ => format!("SMTP {}:{}", a.smtp_host(), a.smtp_port()),
                    };
                    let _ = writeln!(
                        s,
                        "account {}{default}: kind={} mailbox={} tenant={} client_id={} {credential}\n  token endpoint {} scope {}\n  {endpoint} rewrite_from={:?} max_connections={} max_messages_per_minute={} max_recipients_per_day={}",
                        a.name,
                        a.kind.name(),
                        a.mailbox.as_deref().unwrap_or(""),
                        a.tenant.as_deref().unwrap_or(""),
                        a.client_id.as_deref().unwrap_or(""),
                        a.token_url(),
                        a.scope(),
                        a.rewrite_from,
                        a.max_connections,
                        a.max_messages_per_minute,
                        a.max_recipients_per_day
                    );
                }
            }
        }
        s
    }
}

impl AccountConfig {
    /// `https://<authority>/<tenant>/oauth2/v2.0/token`
    pub fn token_url(&self) -> String {
        let authority = self
            .authority_url
            .as_deref()
            .unwrap_or(self.cloud.authority())
            .trim_end_matches('/');
        format!(
            "{authority}/{}/oauth2/v2.0/token",
            self.tenant.as_deref().unwrap_or("")
        )
    }
    pub fn smtp_host(&self) -> &str {
        self.smtp_host.as_deref().unwrap_or(self.cloud.smtp_host())
    }
    /// `graph`: the Graph root requests go to, without a trailing slash.
    pub fn graph_root(&self) -> &str {
        self.graph_url
            .as_deref()
            .unwrap_or(self.cloud.graph_root())
            .trim_end_matches('/')
    }
    /// The token scope: `scope`, else the cloud's Exchange resource with `/.default`
    /// (client credentials) or its `SMTP.Send offline_access` (delegated). A `graph` account
    /// asks for the cloud's Graph resource with `/.default` (always the cloud's own root, also
    /// when `graph_url` points elsewhere: the token is for Graph, not for a host).
    pub fn scope(&self) -> String {
        if let Some(s) = &self.scope {
            return s.clone();
        }
        match (self.kind, self.auth) {
            (AccountKind::Graph, _) => format!("{}/.default", self.cloud.graph_root()),
            (_, AccountAuth::ClientCredentials) => self.cloud.scope().to_string(),
            (_, AccountAuth::Delegated) => self.cloud.delegated_scope().to_string(),
        }
    }
    /// `https://<authority>/<tenant>/oauth2/v2.0/<endpoint>` (`authorize`, `devicecode`).
    pub fn entra_url(&self, endpoint: &str) -> String {
        let token = self.token_url();
        format!(
            "{}{endpoint}",
            token.strip_suffix("token").unwrap_or(&token)
        )
    }
    pub fn smtp_port(&self) -> u16 {
        self.smtp_port.unwrap_or(587)
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Secrets and keys must not be readable by every user on the machine.
fn check_private_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {:?}: {e}", path.display().to_string()))?;
    if !meta.is_file() {
        return Err(format!("{:?} is not a file", path.display().to_string()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(format!(
            "{:?} is readable by every user on this machine (mode {mode:o}); run: chmod 600 {}",
            path.display().to_string(),
            path.display()
        ));
    }
    Ok(())
}

/// `fallback` names another configured account that has no fallback of its own (one hop, so
/// no chains and no cycles); only an `exchange` account may name one.
fn validate_fallback(a: &AccountConfig, accounts: &[AccountConfig]) -> Result<(), String> {
    let Some(fallback) = &a.fallback else {
        return Ok(());
    };
    if a.kind != AccountKind::Exchange {
        return Err("only used by kind = \"exchange\"".into());
    }
    if fallback == &a.name {
        return Err(format!(
            "{fallback:?} is this account itself; name another [[account]]"
        ));
    }
    let Some(target) = accounts.iter().find(|t| &t.name == fallback) else {
        return Err(format!("no [[account]] is named {fallback:?}"));
    };
    if target.fallback.is_some() {
        return Err(format!(
            "account {fallback:?} has a fallback of its own; failover is one hop only"
        ));
    }
    Ok(())
}

/// `url` is a URL for https, or plain http on a loopback test server.
fn check_https_root(key: &'static str, url: &str) -> Result<(), (&'static str, String)> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| (key, format!("{url:?} is not a URL: {e}")))?;
    let host = parsed.host_str().unwrap_or("");
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(host) => Ok(()),
        _ => Err((
            key,
            format!("{url:?} must use https (plain http only for loopback test servers)"),
        )),
    }
}

/// A `graph` account: the credentials and limits of an `exchange` one, minus SMTP, with Graph's
/// limit of 4 concurrent requests per mailbox and app-only (client credentials) access.
fn validate_graph(a: &AccountConfig) -> Result<(), (&'static str, String)> {
    for (k, set) in [
        ("smtp_host", a.smtp_host.is_some()),
        ("smtp_port", a.smtp_port.is_some()),
    ] {
        if set {
            return Err((
                k,
                "not used by kind = \"graph\" (it sends over HTTPS)".into(),
            ));
        }
    }
    if a.auth == AccountAuth::Delegated {
        return Err((
            "auth",
            "kind = \"graph\" uses client credentials (application Mail.Send); remove auth = \"delegated\"".into(),
        ));
    }
    if let Some(url) = &a.graph_url {
        check_https_root("graph_url", url)?;
    }
    if let Some(scope) = &a.scope
        && !(scope.starts_with("https://") && scope.ends_with("/.default"))
    {
        return Err((
            "scope",
            format!(
                "{scope:?} must be the Graph resource of your cloud with /.default, e.g. \"https://dod-graph.microsoft.us/.default\""
            ),
        ));
    }
    if a.max_connections > 4 {
        return Err((
            "max_connections",
            "Microsoft Graph allows 4 concurrent requests per mailbox; use 1 to 4".into(),
        ));
    }
    // The rest is shared with `exchange`; its SMTP-only checks pass for a graph account
    // (no scope override reaches them, and max_connections is checked above).
    let mut shared = a.clone();
    shared.scope = None;
    shared.max_connections = shared.max_connections.min(3);
    validate_exchange(&shared)
}

fn validate_exchange(a: &AccountConfig) -> Result<(), (&'static str, String)> {
    let required = |k: &'static str, v: &Option<String>| -> Result<(), (&'static str, String)> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(()),
            _ => Err((k, format!("kind = \"{}\" needs `{k}`", a.kind.name()))),
        }
    };
    required("kind", &a.mailbox.as_ref().map(|_| "x".to_string())).map_err(|_| {
        (
            "kind",
            format!(
                "kind = \"{}\" needs `mailbox`, the sending mailbox (e.g. \"relay@contoso.com\")",
                a.kind.name()
            ),
        )
    })?;
    let mailbox = a.mailbox.as_deref().unwrap_or("");
    if !mailbox.contains('@') || mailbox.contains(char::is_whitespace) {
        return Err((
            "mailbox",
            format!("{mailbox:?} is not a mailbox address like \"relay@contoso.com\""),
        ));
    }
    required("tenant", &a.tenant)?;
    let tenant = a.tenant.as_deref().unwrap_or("");
    let delegated = a.auth == AccountAuth::Delegated;
    // Delegated sign-in works on the multi-tenant endpoints too; client credentials do not.
    let refused: &[&str] = if delegated {
        &["consumers"]
    } else {
        &["common", "organizations", "consumers"]
    };
    if refused.contains(&tenant.to_ascii_lowercase().as_str()) {
        return Err((
            "tenant",
            format!(
                "{tenant:?} cannot be used with client credentials (AADSTS9001023); use your tenant's GUID or domain, e.g. \"contoso.onmicrosoft.com\""
            ),
        ));
    }
    required("client_id", &a.client_id)?;
    match (
        &a.client_secret_file,
        &a.certificate_file,
        &a.private_key_file,
    ) {
        (Some(_), Some(_), _) => {
            return Err((
                "certificate_file",
                "set either client_secret_file or certificate_file, not both".into(),
            ));
        }
        (Some(secret), None, _) => {
            check_private_file(secret).map_err(|e| ("client_secret_file", e))?;
            let text = std::fs::read_to_string(secret)
                .map_err(|e| ("client_secret_file", e.to_string()))?;
            if text.trim().is_empty() {
                return Err((
                    "client_secret_file",
                    format!(
                        "{:?} is empty; put the secret's Value (not its ID) in it",
                        secret.display().to_string()
                    ),
                ));
            }
        }
        (None, Some(cert), key) => {
            let key = key.as_ref().unwrap_or(cert);
            check_private_file(key).map_err(|e| {
                (
                    if a.private_key_file.is_some() {
                        "private_key_file"
                    } else {
                        "certificate_file"
                    },
                    e,
                )
            })?;
            if !cert.is_file() {
                return Err((
                    "certificate_file",
                    format!("file {:?} not found", cert.display().to_string()),
                ));
            }
        }
        (None, None, _) if delegated => {}
        (None, None, _) => {
            return Err((
                "kind",
                format!(
                    "kind = \"{}\" needs a credential: client_secret_file, or certificate_file and private_key_file",
                    a.kind.name()
                ),
            ));
        }
    }
    if let Some(url) = &a.authority_url {
        check_https_root("authority_url", url)?;
    }
    if delegated {
        let name_ok = !a.name.starts_with('.')
            && a.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err((
                "name",
                format!(
                    "{:?}: a delegated account's name is part of its token file name; use letters, digits, '-', '_' and '.'",
                    a.name
                ),
            ));
        }
        if let Some(scope) = &a.scope
            && !scope.split_whitespace().any(|s| s == "offline_access")
        {
            return Err((
                "scope",
                format!(
                    "{scope:?} lacks offline_access, so Entra would issue no refresh token; e.g. \"https://outlook.office.com/SMTP.Send offline_access\""
                ),
            ));
        }
    } else if let Some(scope) = &a.scope
        && !(scope.starts_with("https://") && scope.ends_with("/.default"))
    {
        return Err((
            "scope",
            format!(
                "{scope:?} must be the Exchange resource of your cloud with /.default, e.g. \"https://outlook-dod.office365.us/.default\""
            ),
        ));
    }
    if let Some(ca) = &a.ca_file
        && !ca.is_file()
    {
        return Err((
            "ca_file",
            format!("file {:?} not found", ca.display().to_string()),
        ));
    }
    if a.max_connections > 3 {
        return Err((
            "max_connections",
            "Exchange Online allows 3 connections per mailbox; use 1 to 3 (2 leaves headroom)"
                .into(),
        ));
    }
    if a.max_messages_per_minute == 0
        || a.max_recipients_per_day == 0
        || a.max_recipients_per_message == 0
    {
        return Err((
            "max_messages_per_minute",
            "rate limits must be at least 1".into(),
        ));
    }
    if a.rate_window.is_zero() {
        return Err(("rate_window", "must be above zero".into()));
    }
    Ok(())
}

fn tls_name(t: TlsMode) -> &'static str {
    match t {
        TlsMode::None => "none",
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:2525"
[[account]]
name = "local"
kind = "capture"
dir = "cap"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.relay.max_message_size, 35 * 1024 * 1024);
        assert_eq!(c.queue.max_age, Duration::from_secs(5 * 86400));
        assert_eq!(c.relay.allowed_networks[0].to_string(), "127.0.0.0/8");
        assert_eq!(c.account_for(None).name, "local");
    }

    #[test]
    fn graph_account_gets_graph_scope_and_refuses_smtp_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let base = format!(
            r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:2525"
[[account]]
name = "g"
kind = "graph"
mailbox = "relay@contoso.com"
tenant = "contoso.onmicrosoft.com"
client_id = "abc"
client_secret_file = "{}"
"#,
            secret.display()
        );
        let c = parse(&base).expect("valid");
        assert_eq!(
            c.accounts[0].scope(),
            "https://graph.microsoft.com/.default"
        );
        assert_eq!(c.accounts[0].graph_root(), "https://graph.microsoft.com");
        let c = parse(&format!("{base}cloud = \"usgov\"\n")).expect("valid");
        assert_eq!(c.accounts[0].scope(), "https://graph.microsoft.us/.default");
        assert_eq!(c.accounts[0].graph_root(), "https://graph.microsoft.us");
        let c =
            parse(&format!("{base}graph_url = \"http://127.0.0.1:8080/\"\n")).expect("loopback");
        assert_eq!(c.accounts[0].graph_root(), "http://127.0.0.1:8080");
        for (extra, field, words) in [
            (
                "smtp_host = \"smtp.office365.com\"",
                "smtp_host",
                "not used by kind = \"graph\"",
            ),
            (
                "max_connections = 5",
                "max_connections",
                "4 concurrent requests",
            ),
            (
                "graph_url = \"http://graph.example.com\"",
                "graph_url",
                "must use https",
            ),
            ("auth = \"delegated\"", "auth", "client credentials"),
        ] {
            let e = parse(&format!("{base}{extra}\n")).unwrap_err();
            assert_eq!(
                e.field.as_deref(),
                Some(format!("account[0].{field}").as_str()),
                "{e}"
            );
            assert!(e.message.contains(words), "{e}");
        }
        let e = parse(&base.replace("client_secret_file", "#")).unwrap_err();
        assert!(
            e.message.contains("kind = \"graph\" needs a credential"),
            "{e}"
        );
    }

    #[test]
    fn delegated_account_needs_no_secret_and_gets_its_own_scope_and_token_file() {
        let base = r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:2525"
[queue]
dir = "/var/lib/exorelay/spool"
[[account]]
name = "frontdesk"
kind = "exchange"
mailbox = "frontdesk@contoso.com"
tenant = "contoso.onmicrosoft.com"
client_id = "abc"
"#;
        let e = parse(base).unwrap_err();
        assert!(e.message.contains("needs a credential"), "{e}");
        let c = parse(&format!("{base}auth = \"delegated\"\n")).expect("public client");
        let a = &c.accounts[0];
        assert_eq!(
            a.scope(),
            "https://outlook.office.com/SMTP.Send offline_access"
        );
        assert_eq!(
            a.token_file,
            Path::new("/var/lib/exorelay/state/frontdesk.refresh-token")
        );
        assert!(c.describe().contains("delegated sign-in"));
        let c = parse(&format!(
            "{}auth = \"delegated\"\n",
            base.replace("[queue]", "[queue]\nstate_dir = \"/srv/tokens\"")
        ))
        .unwrap();
        assert_eq!(
            c.accounts[0].token_file,
            Path::new("/srv/tokens/frontdesk.refresh-token")
        );
        let e = parse(&format!(
            "{base}auth = \"delegated\"\nscope = \"https://outlook.office.com/SMTP.Send\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("offline_access"), "{e}");
        assert_eq!(e.field.as_deref(), Some("account[0].scope"));
        let e = parse(&format!("{base}auth = \"sometimes\"\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("account[0].auth"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("35MB"), Ok(35 * 1024 * 1024));
        assert_eq!(parse_size("512 KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5XB").is_err());
    }

    #[test]
    fn http_limits_default_and_are_checked() {
        let http = "\n[http]\nlisten = \"127.0.0.1:8025\"\n";
        let c = parse(&format!("{MINIMAL}{http}")).expect("valid");
        assert_eq!(c.http.max_connections, 64);
        assert_eq!(c.http.max_connections_per_client, 16);
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.request_timeout, Duration::from_secs(60));
        for (extra, field) in [
            ("max_connections = 0", "http.max_connections"),
            (
                "max_connections_per_client = 0",
                "http.max_connections_per_client",
            ),
            (
                "max_connections = 4\nmax_connections_per_client = 5",
                "http.max_connections_per_client",
            ),
            ("header_timeout = \"0s\"", "http.header_timeout"),
            ("request_timeout = \"0s\"", "http.request_timeout"),
        ] {
            let e = parse(&format!("{MINIMAL}{http}{extra}\n")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_path_and_line() {
        let text = MINIMAL.replace(
            "kind = \"capture\"",
            "kind = \"capture\"\ncolour = \"blue\"",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, Some(8), "{e}");
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        assert!(e.to_string().contains("account[0]"), "{e}");
    }

    #[test]
    fn bad_duration_names_field() {
        let text = format!("{MINIMAL}\n[queue]\nmax_age = \"five days\"\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queue.max_age"), "{e}");
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn public_allowed_networks_need_the_override() {
        let nets = |list: &str, extra: &str| {
            parse(&format!(
                "{MINIMAL}\n[relay]\n{extra}\nallowed_networks = {list}\n"
            ))
        };
        let e = nets(r#"["10.0.0.0/8", "0.0.0.0/1", "128.0.0.0/1"]"#, "").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("relay.allowed_networks[1]"), "{e}");
        assert!(e.message.contains("public"), "{e}");
        assert!(e.message.contains("allow_public_networks = true"), "{e}");
        assert!(nets(r#"["2000::/3"]"#, "").is_err());
        assert!(nets(r#"["10.0.0.0/8", "fd00::/8"]"#, "").is_ok());
        let c = nets(
            r#"["0.0.0.0/1", "128.0.0.0/1"]"#,
            "allow_public_networks = true",
        )
        .expect("override");
        assert!(c.relay.allow_public_networks);
        let e = nets(r#"["::/0"]"#, "allow_public_networks = true").unwrap_err();
        assert!(e.message.contains("open relay"), "{e}");
    }

    #[test]
    fn open_relay_refused() {
        let text = format!("{MINIMAL}\n[relay]\nallowed_networks = [\"0.0.0.0/0\"]\n");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("open relay"), "{e}");
        assert_eq!(e.field.as_deref(), Some("relay.allowed_networks[0]"));
    }

    #[test]
    fn fallback_names_another_account_one_hop_only() {
        let exchange = |name: &str, fallback: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\nkind = \"exchange\"\nmailbox = \"{name}@contoso.com\"\ntenant = \"contoso.com\"\nclient_id = \"abc\"\nauth = \"delegated\"\n{fallback}\n"
            )
        };
        let with = |accounts: &str| parse(&format!("{MINIMAL}{accounts}"));
        let c = with(&exchange("smtp", "fallback = \"local\"")).expect("capture fallback");
        assert_eq!(c.accounts[1].fallback.as_deref(), Some("local"));
        assert_eq!(c.accounts[0].fallback, None);
        let two = exchange("smtp", "fallback = \"spare\"") + &exchange("spare", "");
        assert!(with(&two).is_ok(), "another exchange account");
        for (accounts, message, line) in [
            (
                exchange("smtp", "fallback = \"nowhere\""),
                "no [[account]] is named \"nowhere\"",
                16,
            ),
            (
                exchange("smtp", "fallback = \"smtp\""),
                "this account itself",
                16,
            ),
            (
                exchange("smtp", "fallback = \"spare\"")
                    + &exchange("spare", "fallback = \"local\""),
                "one hop only",
                16,
            ),
            (
                exchange("smtp", "fallback = \"spare\"")
                    + &exchange("spare", "fallback = \"smtp\""),
                "one hop only",
                16,
            ),
        ] {
            let e = with(&accounts).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("account[1].fallback"), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains(message), "{e}");
        }
        let e = parse(&MINIMAL.replace("dir = \"cap\"", "dir = \"cap\"\nfallback = \"local\""))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("account[0].fallback"), "{e}");
        assert!(
            e.message.contains("only used by kind = \"exchange\""),
            "{e}"
        );
    }
}
