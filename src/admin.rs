//! `exorelay queue …` and `exorelay accounts …`: talk to the running relay through its HTTP API
//! (address and admin token from the config) and print tables or JSON.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Config;

pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn truncate(s: &str, n: usize) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() <= n {
        s
    } else {
        format!(
            "{}…",
            s.chars().take(n.saturating_sub(1)).collect::<String>()
        )
    }
}

impl AdminClient {
    pub fn from_config(config: &Config) -> Result<AdminClient, String> {
        let Some(listen) = config.http.listen else {
            return Err(format!(
                "{}: [http] listen is not set, so the running relay has no API to talk to; add e.g. [http] listen = \"127.0.0.1:8025\"",
                config.source.display()
            ));
        };
        let host = match listen.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
            ip if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            ip => ip.to_string(),
        };
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        let scheme = match &config.http.tls {
            Some(t) => {
                let pem = std::fs::read(&t.cert)
                    .map_err(|e| format!("cannot read {}: {e}", t.cert.display()))?;
                for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
                    b = b.add_root_certificate(c);
                }
                // The certificate names the relay's public name; we connect by address.
                b = b.danger_accept_invalid_hostnames(
                    listen.ip().is_loopback() || listen.ip().is_unspecified(),
                );
                "https"
            }
            None => "http",
        };
        Ok(AdminClient {
            base: format!("{scheme}://{host}:{}", listen.port()),
            token: config.http.admin_token(),
            http: b.build().map_err(|e| e.to_string())?,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<serde_json::Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| {
            format!(
                "cannot reach the relay at {}: {e}. Is `exorelay run` running with this config?",
                self.base
            )
        })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let msg = body["error"].as_str().unwrap_or("").to_string();
        Err(match status.as_u16() {
            401 => {
                format!("the relay refused the admin token: {msg} (check [http] admin_token_file)")
            }
            _ => format!("{status}: {msg}"),
        })
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.call(reqwest::Method::GET, path).await
    }

    pub async fn post(&self, path: &str) -> Result<serde_json::Value, String> {
        self.call(reqwest::Method::POST, path).await
    }
}

fn age(received: &str) -> String {
    received
        .parse::<chrono::DateTime<chrono::Utc>>()
        .map(|t| {
            let s = (chrono::Utc::now() - t).num_seconds().max(0) as u64;
            match s {
                0..=59 => format!("{s}s"),
                60..=3599 => format!("{}m", s / 60),
                3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
                _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
            }
        })
        .unwrap_or_default()
}

/// `exorelay queue list` as a table.
pub fn queue_table(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<17}  {:<8}  {:>6}  {:<10}  {:<28}  {:<28}  {:>3}  SUBJECT / LAST REPLY",
        "QUEUE ID", "STATE", "AGE", "ACCOUNT", "FROM", "TO", "TRY"
    );
    for m in v["messages"].as_array().into_iter().flatten() {
        let rcpts: Vec<&str> = m["recipients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect();
        let to = if rcpts.len() > 1 {
            format!("{} +{}", rcpts[0], rcpts.len() - 1)
        } else {
            rcpts.join("")
        };
        let note = match (m["subject"].as_str(), m["last_reply"].as_str()) {
            (Some(s), Some(r)) => format!("{s} / {r}"),
            (Some(s), None) => s.to_string(),
            (None, Some(r)) => r.to_string(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<17}  {:<8}  {:>6}  {:<10}  {:<28}  {:<28}  {:>3}  {}",
            m["id"].as_str().unwrap_or(""),
            m["state"].as_str().unwrap_or(""),
            age(m["received_at"].as_str().unwrap_or("")),
            truncate(m["account"].as_str().unwrap_or(""), 10),
            truncate(m["mail_from"].as_str().unwrap_or(""), 28),
            truncate(&to, 28),
            m["attempts"].as_u64().unwrap_or(0),
            truncate(&note, 80)
        );
    }
    let shown = v["messages"].as_array().map(|a| a.len()).unwrap_or(0);
    let _ = writeln!(
        out,
        "{shown} of {} message(s)",
        v["total"].as_u64().unwrap_or(0)
    );
    out
}

/// `exorelay queue show` as text.
pub fn message_text(m: &serde_json::Value) -> String {
    let mut out = String::new();
    let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
    let _ = writeln!(out, "queue ID:    {}", s("id"));
    let _ = writeln!(out, "state:       {}", s("state"));
    let _ = writeln!(out, "account:     {}", s("account"));
    let _ = writeln!(
        out,
        "received:    {} ({} ago)",
        s("received_at"),
        age(&s("received_at"))
    );
    let _ = writeln!(
        out,
        "from:        {}",
        if s("mail_from").is_empty() {
            "<>".into()
        } else {
            s("mail_from")
        }
    );
    let _ = writeln!(out, "subject:     {}", s("subject"));
    let _ = writeln!(
        out,
        "size:        {} bytes",
        m["size"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "client:      {} (helo {}, login {})",
        m["client"]["ip"].as_str().unwrap_or(""),
        m["client"]["helo"].as_str().unwrap_or(""),
        m["client"]["login"].as_str().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "attempts:    {}; next attempt {}",
        m["attempts"].as_u64().unwrap_or(0),
        m["next_attempt_at"].as_str().unwrap_or("-")
    );
    let _ = writeln!(out, "recipients:");
    for r in m["recipients"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<40} {:<9} attempts {}  {}",
            r["address"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["attempts"].as_u64().unwrap_or(0),
            r["last_reply"].as_str().unwrap_or("")
        );
    }
    if let Some(b) = m["body"].as_str() {
        let _ = writeln!(out, "\n{b}");
    }
    out
}

/// `exorelay accounts` as a table, with the fix for paused accounts.
pub fn accounts_table(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12}  {:<8}  {:<9}  {:<26}  {:<25}  LAST SUCCESS",
        "ACCOUNT", "KIND", "STATE", "MAILBOX", "TOKEN EXPIRES"
    );
    for a in v["accounts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<12}  {:<8}  {:<9}  {:<26}  {:<25}  {}",
            a["name"].as_str().unwrap_or(""),
            a["kind"].as_str().unwrap_or(""),
            a["state"].as_str().unwrap_or(""),
            a["mailbox"].as_str().unwrap_or("-"),
            a["token_expires_at"].as_str().unwrap_or("-"),
            a["last_success"].as_str().unwrap_or("-")
        );
        if let Some(f) = a["failing_over"].as_str() {
            let _ = writeln!(out, "    {f}");
        }
        match a.get("sign_in") {
            Some(serde_json::Value::Null) => {
                let _ = writeln!(out, "    not signed in");
            }
            Some(g) => {
                let _ = writeln!(
                    out,
                    "    signed in as {} at {}",
                    g["user"].as_str().unwrap_or("a user"),
                    g["at"].as_str().unwrap_or("?")
                );
            }
            None => {}
        }
        if let Some(adv) = a.get("advice") {
            let _ = writeln!(out, "    cause: {}", adv["cause"].as_str().unwrap_or(""));
            let _ = writeln!(out, "    fix:   {}", adv["fix"].as_str().unwrap_or(""));
        } else if let Some(r) = a["reason"].as_str() {
            let _ = writeln!(out, "    {r}");
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn q(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
