//! The inbound SMTP session as a sans-IO state machine: bytes in, [`Step`]s out.
//!
//! The driver (`listener.rs`) calls [`Session::advance`] with the bytes it has read. The session
//! consumes what it can, queues replies in its outbox and returns the next thing only the driver
//! can do: read more, verify a password, open/write/commit a spool file, start TLS or close.
//! Where the driver must report back (`auth_result`, `message_opened`, `body_written`,
//! `committed`), the session waits in [`Mode::Wait`] and consumes nothing until it is told.
//! Pipelining needs nothing special: replies pile up in the outbox until the driver must read.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};

use super::reply::{self, Reply};
use super::sasl::{self, Credentials, SaslError};
use crate::config::AuthMode;
use crate::spool::{Client, SpoolError};
use crate::submission::{AddressRole, Normalizer, Source, Submission, parse_address};

/// Longest command line accepted, CRLF included. RFC 5321 says 512; AUTH lines and old devices
/// need more headroom, and RFC 4954 suggests 12288 for SASL.
pub const MAX_COMMAND_LINE: usize = 12288;

/// Body bytes gathered before the driver is asked to write them out.
const BODY_CHUNK: usize = 64 * 1024;

/// Per-listener policy, shared by its sessions.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub hostname: String,
    /// The listener offers STARTTLS.
    pub starttls: bool,
    pub auth: AuthMode,
    pub plaintext_auth: bool,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Flush the outbox; then read more input.
    Read,
    /// Verify these credentials, then call [`Session::auth_result`].
    Authenticate(Credentials),
    /// Create a spool file, then call [`Session::message_opened`].
    OpenMessage,
    /// Append [`Session::body`] to the spool file, then call [`Session::body_written`].
    Body,
    /// The message is complete: commit it with this envelope, then call [`Session::committed`].
    Commit {
        submission: Submission,
        /// Bare CR/LF line endings normalised in the body (for the log).
        bare_line_endings: u64,
    },
    /// Throw the spool file away (the reply is already in the outbox).
    AbortMessage,
    /// Flush the outbox, drop any input already read, then do the TLS handshake and call
    /// [`Session::tls_started`].
    StartTls,
    /// Flush the outbox and close the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Success,
    Failure,
    /// This address failed too often and is refused for a while.
    Banned,
}

#[derive(Debug)]
struct DataState {
    reader: Normalizer,
    size: u64,
    too_big: bool,
    failed: Option<Reply>,
    finished: bool,
}

#[derive(Debug)]
enum Mode {
    Command,
    SaslPlain,
    SaslLoginUser,
    SaslLoginPass {
        user: String,
    },
    Data(Box<DataState>),
    /// Waiting for the driver to report back; nothing is consumed.
    Wait,
    Closing,
}

#[derive(Debug)]
pub struct Session {
    params: Arc<SessionParams>,
    peer: IpAddr,
    network_allowed: bool,
    tls: bool,
    helo: Option<(String, bool)>,
    login: Option<String>,
    envelope: Option<Submission>,
    mode: Mode,
    line: Vec<u8>,
    line_overflow: bool,
    outbox: Vec<u8>,
    body: Vec<u8>,
    errors: u32,
}

const HTTP_VERBS: [&[u8]; 7] = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"CONNECT ",
    b"OPTIONS ",
    b"DELETE ",
];

impl Session {
    /// A new session; `tls` is true on implicit-TLS listeners. The greeting is already queued.
    pub fn new(
        params: Arc<SessionParams>,
        peer: IpAddr,
        network_allowed: bool,
        tls: bool,
    ) -> Session {
        let mut s = Session {
            params,
            peer,
            network_allowed,
            tls,
            helo: None,
            login: None,
            envelope: None,
            mode: Mode::Command,
            line: Vec::with_capacity(256),
            line_overflow: false,
            outbox: Vec::with_capacity(512),
            body: Vec::new(),
            errors: 0,
        };
        let banner = format!("{} ESMTP exorelay ready", s.params.hostname);
        s.outbox
            .extend_from_slice(format!("220 {banner}\r\n").as_bytes());
        s
    }

    /// Replies waiting to be written. The driver writes them and clears the buffer.
    pub fn outbox(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    /// Message bytes waiting to be written to the spool (after [`Step::Body`]).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn login(&self) -> Option<&str> {
        self.login.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Inside DATA: the driver uses the data timeout instead of the command timeout.
    pub fn in_data(&self) -> bool {
        matches!(self.mode, Mode::Data(_))
    }

    /// True between MAIL and the end of the transaction, or during AUTH: closing now would
    /// cut a client off mid-way, so shutdown waits (up to its grace time).
    pub fn busy(&self) -> bool {
        self.envelope.is_some() || !matches!(self.mode, Mode::Command | Mode::Closing)
    }

    /// Queues a reply and counts errors; too many errors turn the session to closing.
    fn reply(&mut self, r: Reply) {
        r.write_to(&mut self.outbox);
        if r.is_error() && r.code != 421 {
            self.errors += 1;
            if self.errors >= self.params.max_errors {
                reply::too_many_errors().write_to(&mut self.outbox);
                self.mode = Mode::Closing;
            }
        }
        if r.code == 421 {
            self.mode = Mode::Closing;
        }
    }

    /// Queues a final reply and closes (used by the driver for timeouts and shutdown).
    pub fn close_with(&mut self, r: Reply) {
        r.write_to(&mut self.outbox);
        self.mode = Mode::Closing;
    }

    /// Consumes input and returns the next step. Bytes not consumed stay in `input`.
    pub fn advance(&mut self, input: &mut &[u8]) -> Step {
        loop {
            match &mut self.mode {
                Mode::Closing => return Step::Close,
                Mode::Wait => return Step::Read,
                Mode::Data(d) => {
                    if !d.finished && !input.is_empty() {
                        let before = self.body.len();
                        d.finished = d.reader.feed(input, &mut self.body);
                        d.size += (self.body.len() - before) as u64;
                        if d.size > self.params.max_message_size {
                            d.too_big = true;
                        }
                    }
                    if d.too_big || d.failed.is_some() {
                        // Draining: the excess is read and thrown away, never buffered.
                        self.body.clear();
                    }
                    if !self.body.is_empty()
                        && (d.finished || input.is_empty() || self.body.len() >= BODY_CHUNK)
                    {
                        return Step::Body;
                    }
                    if !d.finished {
                        return Step::Read;
                    }
                    return self.finish_data();
                }
                Mode::Command
                | Mode::SaslPlain
                | Mode::SaslLoginUser
                | Mode::SaslLoginPass { .. } => {
                    let Some(line) = self.take_line(input) else {
                        return Step::Read;
                    };
                    let line = match line {
                        Ok(l) => l,
                        Err(()) => {
                            self.mode = Mode::Command;
                            self.reply(reply::line_too_long());
                            continue;
                        }
                    };
                    let step = if matches!(self.mode, Mode::Command) {
                        self.command(&line)
                    } else {
                        self.sasl_line(&line)
                    };
                    if let Some(step) = step {
                        return step;
                    }
                }
            }
        }
    }

    /// Takes one complete line (LF included) from `input` into `self.line`. `None`: need more
    /// input. `Some(Err)`: the line was too long and has been discarded up to its end.
    fn take_line(&mut self, input: &mut &[u8]) -> Option<Result<Vec<u8>, ()>> {
        let buf = *input;
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(pos) => (&buf[..=pos], true),
            None => (buf, false),
        };
        *input = &buf[chunk.len()..];
        if !self.line_overflow {
            if self.line.len() + chunk.len() > MAX_COMMAND_LINE {
                self.line_overflow = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(chunk);
            }
        }
        if !done {
            return None;
        }
        if std::mem::take(&mut self.line_overflow) {
            return Some(Err(()));
        }
        Some(Ok(std::mem::take(&mut self.line)))
    }

    fn auth_available(&self) -> bool {
        self.params.auth != AuthMode::Off && (self.tls || self.params.plaintext_auth)
    }

    fn may_relay(&self) -> bool {
        self.login.is_some() || (self.network_allowed && self.params.auth != AuthMode::Required)
    }

    fn reset_transaction(&mut self) {
        self.envelope = None;
    }

    fn command(&mut self, line: &[u8]) -> Option<Step> {
        if HTTP_VERBS.iter().any(|v| line.starts_with(v)) {
            self.reply(Reply::new(
                554,
                "5.7.0",
                "This is an SMTP server, not a web server; closing",
            ));
            self.mode = Mode::Closing;
            return Some(Step::Close);
        }
        let trimmed = trim_line(line);
        // Old devices send a bare "HELO"; the intent is plain, so take it.
        let upper = trimmed.to_ascii_uppercase();
        if upper == b"HELO" || upper == b"EHLO" {
            return self.helo(String::new(), upper == b"EHLO");
        }
        let parsed = Request::parse(&mut line.iter()).or_else(|e| match bracket_address(line) {
            Some(fixed) => Request::parse(&mut fixed.iter())
                .map(Request::into_owned)
                .map(owned_to_cow),
            None => Err(e),
        });
        let request = match parsed {
            Ok(r) => r,
            Err(e) => {
                let r = parse_error_reply(e);
                self.reply(r);
                return None;
            }
        };
        match request {
            Request::Ehlo { host } => self.helo(host.into_owned(), true),
            Request::Helo { host } => self.helo(host.into_owned(), false),
            Request::Lhlo { .. } => {
                self.reply(reply::not_implemented());
                None
            }
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response),
            Request::Mail { from } => {
                self.mail(from.address.trim(), from.flags, from.size as u64);
                None
            }
            Request::Rcpt { to } => {
                self.rcpt(to.address.trim());
                None
            }
            Request::Data => self.data(),
            Request::Bdat { .. } => {
                self.reply(Reply::new(
                    502,
                    "5.5.1",
                    "BDAT is not supported here; use DATA",
                ));
                None
            }
            Request::Rset => {
                self.reset_transaction();
                self.reply(reply::ok());
                None
            }
            Request::Noop { .. } => {
                self.reply(reply::ok());
                None
            }
            Request::Quit => {
                let host = self.params.hostname.clone();
                self.reply(reply::bye(&host));
                self.mode = Mode::Closing;
                Some(Step::Close)
            }
            Request::Help { .. } => {
                self.reply(Reply::new(
                    214,
                    "2.0.0",
                    "exorelay: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY QUIT",
                ));
                None
            }
            Request::Vrfy { .. } => {
                self.reply(Reply::new(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept the message and attempt delivery",
                ));
                None
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.reply(reply::not_implemented());
                None
            }
        }
    }

    fn helo(&mut self, host: String, esmtp: bool) -> Option<Step> {
        self.reset_transaction();
        let host = sanitize_helo(&host, self.peer);
        let p = self.params.clone();
        let greeting = format!("{} Hello {} [{}]", p.hostname, host, self.peer);
        self.helo = Some((host, esmtp));
        if !esmtp {
            self.reply(Reply::new(250, "", greeting));
            return None;
        }
        let mut lines = vec![
            greeting,
            "PIPELINING".into(),
            format!("SIZE {}", p.max_message_size),
        ];
        lines.extend([
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
        ]);
        if p.starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.auth_available() && self.login.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
            // Some old clients only recognise the pre-standard form.
            lines.push("AUTH=PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        self.reply(Reply::new(250, "", lines.join("\n")));
        None
    }

    fn starttls(&mut self) -> Option<Step> {
        if !self.params.starttls {
            self.reply(Reply::new(
                502,
                "5.5.1",
                "STARTTLS is not offered on this port",
            ));
            return None;
        }
        if self.tls {
            self.reply(Reply::new(503, "5.5.1", "TLS is already active"));
            return None;
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.mode = Mode::Wait;
        Some(Step::StartTls)
    }

    /// After the handshake: everything learnt before it is forgotten (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.login = None;
        self.envelope = None;
        self.line.clear();
        self.line_overflow = false;
        self.mode = Mode::Command;
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Option<Step> {
        if self.helo.is_none() {
            self.reply(reply::bad_sequence("Send HELO or EHLO first"));
            return None;
        }
        if self.login.is_some() {
            self.reply(reply::bad_sequence("Already authenticated"));
            return None;
        }
        if self.envelope.is_some() {
            self.reply(reply::bad_sequence(
                "AUTH is not allowed during a mail transaction",
            ));
            return None;
        }
        if self.params.auth == AuthMode::Off {
            self.reply(Reply::new(
                502,
                "5.5.1",
                "Authentication is not enabled on this port",
            ));
            return None;
        }
        if !self.auth_available() {
            self.reply(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism; use STARTTLS first",
            ));
            return None;
        }
        let initial = initial.trim();
        if mechanism == AUTH_PLAIN {
            if initial.is_empty() {
                self.reply(Reply::new(334, "", ""));
                self.mode = Mode::SaslPlain;
                return None;
            }
            return self.plain_response(initial);
        }
        if mechanism == AUTH_LOGIN {
            if initial.is_empty() {
                self.reply(Reply::new(334, "", "VXNlcm5hbWU6"));
                self.mode = Mode::SaslLoginUser;
                return None;
            }
            return self.login_user(initial);
        }
        self.reply(Reply::new(
            504,
            "5.5.4",
            "Unrecognized authentication type; use PLAIN or LOGIN",
        ));
        None
    }

    fn sasl_error(&mut self, e: SaslError) -> Option<Step> {
        self.mode = Mode::Command;
        match e {
            SaslError::Encoding => self.reply(Reply::new(
                501,
                "5.5.2",
                "Cannot decode the AUTH response (base64 expected)",
            )),
            SaslError::Malformed => self.reply(Reply::new(501, "5.5.2", "Malformed AUTH response")),
        }
        None
    }

    fn plain_response(&mut self, b64: &str) -> Option<Step> {
        match sasl::decode_plain(b64) {
            Ok(c) => {
                self.mode = Mode::Wait;
                Some(Step::Authenticate(c))
            }
            Err(e) => self.sasl_error(e),
        }
    }

    fn login_user(&mut self, b64: &str) -> Option<Step> {
        match sasl::decode_text(b64) {
            Ok(user) if !user.is_empty() => {
                self.reply(Reply::new(334, "", "UGFzc3dvcmQ6"));
                self.mode = Mode::SaslLoginPass { user };
                None
            }
            Ok(_) => self.sasl_error(SaslError::Malformed),
            Err(e) => self.sasl_error(e),
        }
    }

    fn sasl_line(&mut self, line: &[u8]) -> Option<Step> {
        let text = String::from_utf8_lossy(trim_line(line)).into_owned();
        if text == "*" {
            self.mode = Mode::Command;
            self.reply(Reply::new(501, "5.7.0", "Authentication cancelled"));
            return None;
        }
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::SaslPlain => self.plain_response(&text),
            Mode::SaslLoginUser => self.login_user(&text),
            Mode::SaslLoginPass { user } => match sasl::decode_text(&text) {
                Ok(password) => {
                    self.mode = Mode::Wait;
                    Some(Step::Authenticate(Credentials { user, password }))
                }
                Err(e) => self.sasl_error(e),
            },
            other => {
                self.mode = other;
                None
            }
        }
    }

    /// The driver's verdict on [`Step::Authenticate`].
    pub fn auth_result(&mut self, user: &str, outcome: AuthOutcome) {
        self.mode = Mode::Command;
        match outcome {
            AuthOutcome::Success => {
                self.login = Some(user.to_string());
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            }
            AuthOutcome::Failure => self.reply(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            )),
            AuthOutcome::Banned => self.reply(reply::banned()),
        }
    }

    fn mail(&mut self, from: &str, flags: u64, declared: u64) {
        if self.helo.is_none() {
            return self.reply(reply::bad_sequence("Send HELO or EHLO first"));
        }
        if self.envelope.is_some() {
            return self.reply(reply::bad_sequence("Nested MAIL command; send RSET first"));
        }
        if !self.may_relay() {
            let r = if self.params.auth != AuthMode::Off
                && (self.auth_available() || self.params.starttls)
            {
                Reply::new(530, "5.7.0", "Authentication required")
            } else {
                Reply::new(
                    550,
                    "5.7.1",
                    "Relaying denied: your address is not allowed to send through this relay",
                )
            };
            return self.reply(r);
        }
        if declared > self.params.max_message_size {
            return self.reply(reply::message_too_big(self.params.max_message_size));
        }
        let mail_from = match parse_address(from, AddressRole::Sender) {
            Ok(a) => a,
            Err(e) => {
                return self.reply(Reply::new(
                    501,
                    "5.1.7",
                    format!("Bad sender address syntax: {e}"),
                ));
            }
        };
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        self.envelope = Some(Submission {
            source: Source::Smtp { esmtp },
            client: Client {
                ip: self.peer,
                helo,
                login: self.login.clone(),
                tls: self.tls,
            },
            mail_from,
            recipients: Vec::new(),
            eight_bit: flags & MAIL_BODY_8BITMIME != 0,
            smtputf8: flags & MAIL_SMTPUTF8 != 0,
        });
        self.reply(Reply::new(250, "2.1.0", "Sender OK"));
    }

    fn rcpt(&mut self, to: &str) {
        let max = self.params.max_recipients;
        let Some(env) = self.envelope.as_mut() else {
            return self.reply(reply::bad_sequence("Need MAIL command first"));
        };
        let to = match parse_address(to, AddressRole::Recipient) {
            Ok(a) => a,
            Err(e) => {
                return self.reply(Reply::new(
                    501,
                    "5.1.3",
                    format!("Bad recipient address syntax: {e}"),
                ));
            }
        };
        if env.recipients.len() >= max {
            return self.reply(Reply::new(
                452,
                "4.5.3",
                format!("Too many recipients (at most {max} per message)"),
            ));
        }
        env.recipients.push(to);
        self.reply(Reply::new(250, "2.1.5", "Recipient OK"));
    }

    fn data(&mut self) -> Option<Step> {
        match &self.envelope {
            None => {
                self.reply(reply::bad_sequence("Need MAIL command first"));
                None
            }
            Some(e) if e.recipients.is_empty() => {
                self.reply(reply::bad_sequence("Need RCPT command first"));
                None
            }
            Some(_) => {
                self.mode = Mode::Wait;
                Some(Step::OpenMessage)
            }
        }
    }

    /// The driver's answer to [`Step::OpenMessage`]: the new queue ID, or why no file could be made.
    pub fn message_opened(&mut self, result: Result<String, &SpoolError>) {
        self.mode = Mode::Command;
        let id = match result {
            Ok(id) => id,
            Err(e) => {
                self.reset_transaction();
                return self.reply(spool_error_reply(e));
            }
        };
        let Some(env) = self.envelope.as_ref() else {
            return self.reply(reply::local_error());
        };
        self.body.clear();
        self.mode = Mode::Data(Box::new(DataState {
            reader: env.normalizer(&self.params.hostname, &id, true),
            size: 0,
            too_big: false,
            failed: None,
            finished: false,
        }));
        self.reply(Reply::new(
            354,
            "",
            "Start mail input; end with <CRLF>.<CRLF>",
        ));
    }

    /// The driver's answer to [`Step::Body`]. On error the rest of the message is drained and
    /// the client told 452/451 at its end; nothing partial is ever committed.
    pub fn body_written(&mut self, result: Result<(), &SpoolError>) {
        self.body.clear();
        if let (Err(e), Mode::Data(d)) = (result, &mut self.mode)
            && d.failed.is_none()
        {
            d.failed = Some(spool_error_reply(e));
        }
    }

    fn finish_data(&mut self) -> Step {
        let Mode::Data(d) = std::mem::replace(&mut self.mode, Mode::Command) else {
            return Step::Read;
        };
        let env = self.envelope.take();
        if d.too_big {
            self.reply(reply::message_too_big(self.params.max_message_size));
            return Step::AbortMessage;
        }
        if let Some(r) = d.failed {
            self.reply(r);
            return Step::AbortMessage;
        }
        let Some(mut env) = env else {
            self.reply(reply::local_error());
            return Step::AbortMessage;
        };
        env.eight_bit |= d.reader.eight_bit();
        self.mode = Mode::Wait;
        Step::Commit {
            submission: env,
            bare_line_endings: d.reader.bare_line_endings(),
        }
    }

    /// The driver's answer to [`Step::Commit`]: 250 only once the spool says it is durable.
    pub fn committed(&mut self, result: Result<&str, &SpoolError>) {
        self.mode = Mode::Command;
        match result {
            Ok(id) => self.reply(Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))),
            Err(e) => self.reply(spool_error_reply(e)),
        }
    }
}

fn spool_error_reply(e: &SpoolError) -> Reply {
    match e {
        SpoolError::Full(_) | SpoolError::NoSpace => reply::storage_full(),
        SpoolError::Io(_) => reply::local_error(),
    }
}

fn parse_error_reply(e: smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => reply::unrecognized(),
        E::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, "5.1.3", "Bad recipient address syntax"),
        E::SyntaxError { syntax } => reply::syntax(format!("Syntax: {syntax}")),
        E::InvalidParameter { param } => {
            reply::syntax(format!("Invalid value for parameter {param}"))
        }
        E::UnsupportedParameter { param } => {
            let p: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect();
            Reply::new(555, "5.5.4", format!("Unsupported parameter {p}"))
        }
        _ => Reply::new(500, "5.5.2", "Syntax error"),
    }
}

fn owned_to_cow(r: Request<String>) -> Request<Cow<'static, str>> {
    match r {
        Request::Mail { from } => Request::Mail {
            from: smtp_proto::MailFrom {
                address: Cow::Owned(from.address),
                flags: from.flags,
                size: from.size,
                ..Default::default()
            },
        },
        Request::Rcpt { to } => Request::Rcpt {
            to: smtp_proto::RcptTo {
                address: Cow::Owned(to.address),
                ..Default::default()
            },
        },
        _ => Request::Noop {
            value: Cow::Borrowed(""),
        },
    }
}

/// Old devices write `MAIL FROM:user@host` or `MAIL FROM: <user@host>`: rewrite such a line into
/// the bracketed form. Returns `None` when the line is not MAIL/RCPT or already bracketed.
fn bracket_address(line: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(line).ok()?;
    let upper = text.to_ascii_uppercase();
    let prefix_len = ["MAIL FROM:", "RCPT TO:"]
        .iter()
        .find(|p| upper.starts_with(*p))?
        .len();
    let rest = text[prefix_len..].trim_start();
    let rest = rest.trim_end_matches(['\r', '\n']);
    // `Scan Destination <a@b> SIZE=1`: the address is the bracketed part, a display name
    // before it is dropped, parameters follow it.
    let (addr, params) = match (rest.find('<'), rest.find('>')) {
        (Some(open), Some(close)) if open < close => (&rest[open + 1..close], &rest[close + 1..]),
        _ => match rest.find(' ') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        },
    };
    let addr = addr.trim_start_matches('<').trim_end_matches('>');
    let verb = &text[..prefix_len];
    Some(format!("{verb}<{addr}>{params}\r\n").into_bytes())
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut l = line;
    while let [rest @ .., b'\r' | b'\n' | b' ' | b'\t'] = l {
        l = rest;
    }
    l
}

/// The HELO name as it may appear in headers: printable ASCII only, bounded length; the
/// client's address literal when it gave nothing usable.
fn sanitize_helo(host: &str, peer: IpAddr) -> String {
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if clean.is_empty() {
        format!("[{peer}]")
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(auth: AuthMode, plaintext: bool, starttls: bool) -> Arc<SessionParams> {
        Arc::new(SessionParams {
            hostname: "relay.test".into(),
            starttls,
            auth,
            plaintext_auth: plaintext,
            max_message_size: 1000,
            max_recipients: 2,
            max_errors: 5,
        })
    }

    /// Drives a session with a fake driver: the spool always works, "pw" is the password.
    struct Harness {
        s: Session,
        body: Vec<u8>,
        committed: Vec<Submission>,
        started_tls: bool,
        closed: bool,
    }

    impl Harness {
        fn new(p: Arc<SessionParams>, allowed: bool) -> Harness {
            let mut h = Harness {
                s: Session::new(p, "127.0.0.2".parse().unwrap(), allowed, false),
                body: Vec::new(),
                committed: Vec::new(),
                started_tls: false,
                closed: false,
            };
            h.s.outbox().clear();
            h
        }

        fn feed(&mut self, bytes: &[u8]) -> String {
            let mut input = bytes;
            loop {
                match self.s.advance(&mut input) {
                    Step::Read => {
                        if input.is_empty() {
                            break;
                        }
                    }
                    Step::Authenticate(c) => {
                        let ok = if c.password == "pw" {
                            AuthOutcome::Success
                        } else {
                            AuthOutcome::Failure
                        };
                        self.s.auth_result(&c.user, ok);
                    }
                    Step::OpenMessage => self.s.message_opened(Ok("ID1".into())),
                    Step::Body => {
                        self.body.extend_from_slice(self.s.body());
                        self.s.body_written(Ok(()));
                    }
                    Step::Commit { submission, .. } => {
                        self.committed.push(submission);
                        self.s.committed(Ok("ID1"));
                    }
                    Step::AbortMessage => self.body.clear(),
                    Step::StartTls => {
                        input = &[];
                        self.started_tls = true;
                        self.s.tls_started();
                    }
                    Step::Close => {
                        self.closed = true;
                        break;
                    }
                }
            }
            String::from_utf8(std::mem::take(self.s.outbox())).unwrap()
        }
    }

    fn codes(out: &str) -> Vec<&str> {
        out.lines()
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..3])
            .collect()
    }

    #[test]
    fn pipelined_transaction() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(b"EHLO dev\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nSubject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(
            codes(&out),
            ["250", "250", "250", "354", "250", "221"],
            "{out}"
        );
        assert!(out.contains("queued as ID1"));
        assert!(h.closed);
        assert_eq!(h.committed[0].recipients, ["b@y"]);
        let body = String::from_utf8(h.body.clone()).unwrap();
        assert!(
            body.starts_with("Received: from dev ([127.0.0.2])"),
            "{body}"
        );
        assert!(body.contains("\r\nSubject: t\r\nDate: "), "{body}");
        assert!(
            body.ends_with("Message-ID: <ID1@relay.test>\r\nFrom: <a@x>\r\n\r\nhello\r\n"),
            "{body}"
        );
    }

    #[test]
    fn display_names_before_the_bracket_are_dropped() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(
            b"HELO scanner\r\nMAIL FROM:Scanner 2F <scan@printer.local>\r\nRCPT TO:Scan Destination <boss@example.com> \r\nDATA\r\nx\r\n.\r\n",
        );
        assert_eq!(codes(&out), ["250", "250", "250", "354", "250"], "{out}");
        assert_eq!(h.committed[0].mail_from, "scan@printer.local");
        assert_eq!(h.committed[0].recipients, ["boss@example.com"]);
    }

    #[test]
    fn control_characters_in_addresses_are_refused() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(b"EHLO d\r\nMAIL FROM:<a\x01b@x>\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b\x7f@y>\r\nRCPT TO:<nodomain>\r\n");
        assert_eq!(codes(&out), ["250", "501", "250", "501", "501"], "{out}");
    }

    #[test]
    fn addresses_without_brackets_and_helo() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out =
            h.feed(b"HELO\r\nMAIL FROM: scanner@printer.local\r\nRCPT TO:boss@example.com\r\n");
        assert_eq!(codes(&out), ["250", "250", "250"], "{out}");
        let out = h.feed(b"DATA\r\nx\r\n.\r\n");
        assert!(out.contains("queued"), "{out}");
        assert_eq!(h.committed[0].mail_from, "scanner@printer.local");
        assert_eq!(h.committed[0].recipients, ["boss@example.com"]);
    }

    #[test]
    fn relay_denied_without_network_or_auth() {
        let mut h = Harness::new(params(AuthMode::Optional, true, false), false);
        let out = h.feed(b"EHLO d\r\nMAIL FROM:<a@x>\r\n");
        assert!(out.contains("530 5.7.0 Authentication required"), "{out}");
        let mut h = Harness::new(params(AuthMode::Off, false, false), false);
        let out = h.feed(b"EHLO d\r\nMAIL FROM:<a@x>\r\n");
        assert!(out.contains("550 5.7.1 Relaying denied"), "{out}");
    }

    #[test]
    fn auth_plain_and_login() {
        let mut h = Harness::new(params(AuthMode::Optional, true, false), false);
        let out = h.feed(
            format!(
                "EHLO d\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@x>\r\n",
                sasl::encode_b64(b"\0dev\0pw")
            )
            .as_bytes(),
        );
        assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");
        assert!(out.contains("235 2.7.0"), "{out}");
        assert!(out.contains("250 2.1.0"), "{out}");

        let mut h = Harness::new(params(AuthMode::Optional, true, false), false);
        let out = h.feed(b"HELO d\r\nAUTH LOGIN\r\n");
        assert!(out.ends_with("334 VXNlcm5hbWU6\r\n"), "{out}");
        let out = h.feed(format!("{}\r\n", sasl::encode_b64(b"dev")).as_bytes());
        assert_eq!(out, "334 UGFzc3dvcmQ6\r\n");
        let out = h.feed(format!("{}\r\n", sasl::encode_b64(b"wrong")).as_bytes());
        assert!(out.starts_with("535 5.7.8"), "{out}");
        let out = h.feed(b"AUTH LOGIN\r\n*\r\n");
        assert!(out.contains("501 5.7.0 Authentication cancelled"), "{out}");
    }

    #[test]
    fn auth_before_tls_refused_unless_plaintext() {
        let mut h = Harness::new(params(AuthMode::Optional, false, true), false);
        let out = h.feed(b"EHLO d\r\n");
        assert!(!out.contains("AUTH"), "{out}");
        assert!(out.contains("STARTTLS"), "{out}");
        let out = h.feed(format!("AUTH PLAIN {}\r\n", sasl::encode_b64(b"\0dev\0pw")).as_bytes());
        assert!(out.starts_with("538 5.7.11"), "{out}");
        let out = h.feed(b"MAIL FROM:<a@x>\r\n");
        assert!(out.starts_with("530 5.7.0"), "{out}");
    }

    #[test]
    fn starttls_drops_pipelined_commands() {
        let mut h = Harness::new(params(AuthMode::Optional, false, true), true);
        let out = h.feed(b"EHLO d\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n");
        assert!(h.started_tls);
        assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{out}");
        // After TLS the injected MAIL is gone: a new MAIL needs EHLO first.
        let out = h.feed(b"RCPT TO:<b@y>\r\n");
        assert!(out.starts_with("503"), "{out}");
        let out = h.feed(b"EHLO d\r\n");
        assert!(
            out.contains("AUTH PLAIN LOGIN") && !out.contains("STARTTLS"),
            "{out}"
        );
    }

    #[test]
    fn limits() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(b"EHLO d\r\nMAIL FROM:<a@x> SIZE=5000\r\n");
        assert!(out.contains("552 5.3.4"), "{out}");
        let out = h.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\n");
        assert!(out.contains("452 4.5.3"), "{out}");
        let big = vec![b'x'; 2000];
        let mut msg = b"DATA\r\n".to_vec();
        msg.extend_from_slice(&big);
        msg.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let out = h.feed(&msg);
        assert!(out.contains("552 5.3.4"), "{out}");
        assert!(out.ends_with("250 2.0.0 OK\r\n"), "{out}");
        assert!(h.committed.is_empty());
        let mut long = vec![b'N'; MAX_COMMAND_LINE + 10];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        let out = h.feed(&long);
        assert_eq!(codes(&out), ["500", "250"], "{out}");
    }

    #[test]
    fn garbage_and_errors_close() {
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(b"\x00\x01\x02\r\nfoo\r\nbar\r\nbaz\r\nqux\r\nquux\r\n");
        assert!(out.contains("421 4.7.0"), "{out}");
        assert!(h.closed);
        let mut h = Harness::new(params(AuthMode::Optional, false, false), true);
        let out = h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("554 5.7.0"), "{out}");
        assert!(h.closed);
    }
}
