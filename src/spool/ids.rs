//! Queue IDs: 17 upper-case hex digits, sortable by arrival. The same ID names the message's
//! files, appears in the `250` reply, in every log line and in the queue API.

use std::sync::atomic::{AtomicU64, Ordering};

static LAST_ID_MICROS: AtomicU64 = AtomicU64::new(0);

/// A new queue ID: 13 hex digits of microseconds since the epoch (strictly increasing within
/// the process, so IDs sort by arrival), then 4 random hex digits against clashes across
/// restarts with a clock that stepped back.
pub fn new_queue_id() -> String {
    let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
    let mut prev = LAST_ID_MICROS.load(Ordering::Relaxed);
    let micros = loop {
        let next = now.max(prev + 1);
        match LAST_ID_MICROS.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => break next,
            Err(p) => prev = p,
        }
    };
    format!("{:013X}{:04X}", micros, fastrand::u16(..))
}

/// When a queue ID was made (its first 13 hex digits are microseconds since the epoch).
pub fn id_time(id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let micros = i64::from_str_radix(id.get(..13)?, 16).ok()?;
    chrono::DateTime::from_timestamp_micros(micros)
}

/// True for strings that look like our queue IDs (guards every path built from an ID).
pub fn is_queue_id(s: &str) -> bool {
    s.len() == 17
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_arrival_and_validate() {
        let a = new_queue_id();
        let b = new_queue_id();
        assert!(a < b, "{a} {b}");
        assert!(is_queue_id(&a));
        assert!(!is_queue_id("../../etc/passwd"));
        assert!(id_time(&a).is_some_and(|t| (chrono::Utc::now() - t).num_seconds() < 60));
    }
}
