#![no_main]
//! The spool's meta file parser must never panic on what it finds on disk, and what it accepts
//! must survive a write/read round trip unchanged.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = exorelay::spool::Meta::decode(data) {
        let again = exorelay::spool::Meta::decode(&meta.encode()).expect("re-decode");
        assert_eq!(again, meta);
    }
});
