//! Prometheus metrics in an explicit per-instance registry (several relays can run in one test
//! process, each with its own `/metrics`). Names follow Prometheus conventions: `exorelay_`
//! prefix, `_total` on counters (added by the encoder), base units.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    pub account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub account: String,
    /// `certificate` or `client_secret`.
    pub credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountStateLabels {
    pub account: String,
    /// `active`, `throttled`, `paused`, `held`, `paused_by_admin`, or `degraded` (beside the
    /// others: the upstream has not been reachable for several attempts in a row).
    pub state: String,
}

/// Every value of [`AccountStateLabels::state`] but `degraded`; exactly one of them is 1.
pub const ACCOUNT_STATES: [&str; 5] = ["active", "throttled", "paused", "held", "paused_by_admin"];

/// The `credential` values of `exorelay_credential_expiry_timestamp_seconds`.
pub const CREDENTIALS: [&str; 2] = ["certificate", "client_secret"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` (the new config is in force) or `refused` (the old one stays).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub account: String,
    /// `permanent` (a 5xx for every remaining recipient) or `expired` (max_age reached).
    pub class: String,
}

/// An account and the fallback that sends its mail while it is paused (failover).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub account: String,
    pub fallback: String,
}

fn latency_histogram() -> Histogram {
    // 50 ms .. about 4.6 days.
    Histogram::new(exponential_buckets(0.05, 3.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub received: Family<AccountLabel, Counter>,
    pub delivered: Family<AccountLabel, Counter>,
    pub deferred: Family<AccountLabel, Counter>,
    pub failed: Family<FailedLabels, Counter>,
    pub delivery_latency: Family<AccountLabel, Histogram, fn() -> Histogram>,
    pub queue_depth: Gauge,
    pub queue_oldest_age: Gauge<f64, AtomicU64>,
    pub held: Gauge,
    pub spare_files: Gauge,
    pub spool_corrupt: Counter,
    pub smtp_sessions: Counter,
    pub smtp_active_sessions: Gauge,
    pub smtp_auth_failures: Counter,
    pub smtp_rejected: Counter,
    pub token_requests: Family<AccountLabel, Counter>,
    pub token_failures: Family<AccountLabel, Counter>,
    pub token_expiry: Family<AccountLabel, Gauge>,
    pub credential_expiry: Family<CredentialLabels, Gauge>,
    pub account_paused: Family<AccountLabel, Gauge>,
    pub account_state: Family<AccountStateLabels, Gauge>,
    pub throttled: Family<AccountLabel, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub config_last_reload_success: Gauge,
    pub account_failover: Family<FallbackLabels, Gauge>,
    pub fallback_deliveries: Family<FallbackLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("exorelay");
        let m = Metrics {
            received: Family::default(),
            delivered: Family::default(),
            deferred: Family::default(),
            failed: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            held: Gauge::default(),
            spare_files: Gauge::default(),
            spool_corrupt: Counter::default(),
            smtp_sessions: Counter::default(),
            smtp_active_sessions: Gauge::default(),
            smtp_auth_failures: Counter::default(),
            smtp_rejected: Counter::default(),
            token_requests: Family::default(),
            token_failures: Family::default(),
            token_expiry: Family::default(),
            credential_expiry: Family::default(),
            account_paused: Family::default(),
            account_state: Family::default(),
            throttled: Family::default(),
            config_reloads: Family::default(),
            config_last_reload_success: Gauge::default(),
            account_failover: Family::default(),
            fallback_deliveries: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "messages_received",
            "Messages accepted into the spool (SMTP or HTTP)",
            m.received.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages delivered to every recipient",
            m.delivered.clone(),
        );
        registry.register(
            "messages_deferred",
            "Delivery attempts that left recipients pending",
            m.deferred.clone(),
        );
        registry.register(
            "messages_failed",
            "Messages moved to failed/, by reason class",
            m.failed.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from acceptance to delivery",
            m.delivery_latency.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages in the spool waiting for delivery",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest queued message",
            m.queue_oldest_age.clone(),
        );
        registry.register("queue_held_messages", "Messages on hold", m.held.clone());
        registry.register(
            "spool_spare_files",
            "Files kept in the spool's tmp/ for the next messages to reuse",
            m.spare_files.clone(),
        );
        registry.register(
            "spool_corrupt",
            "Messages moved to corrupt/ (unreadable, or a body failing its length/CRC32C check); never delivered",
            m.spool_corrupt.clone(),
        );
        registry.register(
            "smtp_sessions",
            "SMTP connections accepted",
            m.smtp_sessions.clone(),
        );
        registry.register(
            "smtp_active_sessions",
            "SMTP connections open now",
            m.smtp_active_sessions.clone(),
        );
        registry.register(
            "smtp_auth_failures",
            "Failed AUTH attempts",
            m.smtp_auth_failures.clone(),
        );
        registry.register(
            "smtp_rejected_transactions",
            "Messages refused during DATA (size, storage)",
            m.smtp_rejected.clone(),
        );
        registry.register(
            "token_requests",
            "Access token requests sent to Entra ID",
            m.token_requests.clone(),
        );
        registry.register(
            "token_failures",
            "Access token requests that failed",
            m.token_failures.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "Unix time at which the current access token expires",
            m.token_expiry.clone(),
        );
        registry.register(
            "credential_expiry_timestamp_seconds",
            "Unix time at which an account's certificate or client secret expires",
            m.credential_expiry.clone(),
        );
        registry.register(
            "account_paused",
            "1 while an account is paused by a configuration error",
            m.account_paused.clone(),
        );
        registry.register(
            "account_state",
            "1 for an account's current state (active, throttled, paused, held, paused_by_admin); state=\"degraded\" is 1 while its upstream has been unreachable for several attempts in a row",
            m.account_state.clone(),
        );
        registry.register(
            "account_throttled",
            "Throttle replies from Exchange",
            m.throttled.clone(),
        );
        // The names Prometheus and Alertmanager use for the same thing, so existing alerts fit.
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP or POST /api/v1/reload), by result (ok, refused)",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that took effect (start or reload)",
            m.config_last_reload_success.clone(),
        );
        registry.register(
            "account_failover",
            "1 while an account's mail goes out through its fallback account (failover)",
            m.account_failover.clone(),
        );
        registry.register(
            "fallback_deliveries",
            "Delivery attempts that delivered a message's recipients through the account's fallback",
            m.fallback_deliveries.clone(),
        );
        for result in ["ok", "refused"] {
            let _ = m.config_reloads.get_or_create(&ReloadLabels {
                result: result.into(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Counts a reload; a successful one also sets the last-success time to now.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.config_reloads
            .get_or_create(&ReloadLabels {
                result: result.into(),
            })
            .inc();
        if ok {
            self.config_loaded();
        }
    }

    /// Sets `exorelay_config_last_reload_success_timestamp_seconds` to now.
    pub fn config_loaded(&self) {
        self.config_last_reload_success
            .set(chrono::Utc::now().timestamp());
    }

    pub fn fallback(account: &str, fallback: &str) -> FallbackLabels {
        FallbackLabels {
            account: account.to_string(),
            fallback: fallback.to_string(),
        }
    }

    pub fn account(name: &str) -> AccountLabel {
        AccountLabel {
            account: name.to_string(),
        }
    }

    pub fn set_credential_expiry(&self, account: &str, credential: &str, at: i64) {
        self.credential_expiry
            .get_or_create(&CredentialLabels {
                account: account.to_string(),
                credential: credential.to_string(),
            })
            .set(at);
    }

    pub fn remove_credential_expiry(&self, account: &str, credential: &str) {
        self.credential_expiry.remove(&CredentialLabels {
            account: account.to_string(),
            credential: credential.to_string(),
        });
    }

    /// Removes every per-account credential series of `account` (gone from the config), so no
    /// stale expiry keeps an alert firing.
    pub fn remove_account_credentials(&self, account: &str) {
        let label = Self::account(account);
        self.token_expiry.remove(&label);
        self.token_requests.remove(&label);
        self.token_failures.remove(&label);
        for credential in CREDENTIALS {
            self.remove_credential_expiry(account, credential);
        }
    }

    /// Sets `exorelay_account_state` for `account`: 1 for `state` (one of [`ACCOUNT_STATES`]),
    /// 0 for the others, and `degraded` as given.
    pub fn set_account_state(&self, account: &str, state: &str, degraded: bool) {
        for s in ACCOUNT_STATES.iter().chain(["degraded"].iter()) {
            let on = if *s == "degraded" {
                degraded
            } else {
                *s == state
            };
            self.account_state
                .get_or_create(&AccountStateLabels {
                    account: account.to_string(),
                    state: s.to_string(),
                })
                .set(i64::from(on));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions() {
        let m = Metrics::new();
        m.received.get_or_create(&Metrics::account("local")).inc();
        m.delivery_latency
            .get_or_create(&Metrics::account("local"))
            .observe(0.2);
        let text = m.encode();
        assert!(
            text.contains("exorelay_messages_received_total{account=\"local\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("exorelay_delivery_latency_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
