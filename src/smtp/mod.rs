//! Inbound SMTP: the session state machine, its replies, SASL, logins and the socket driver.

pub mod auth;
pub use crate::client;
pub mod data;
pub mod limits;
pub mod listener;
pub mod networks;
pub mod reply;
pub mod sasl;
pub mod session;
