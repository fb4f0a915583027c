//! Exchange Online's SMTP replies sorted by what the relay must do about them: one table,
//! [`SIGNATURES`], from a reply's signature to its class, its action and the advice for the
//! administrator. README's table of Microsoft's answers is generated from it (a test fails when
//! they differ: run `cargo test readme_table -- --nocapture` to print the table).
//!
//! Matching is on the reply code, the exact enhanced status code (`5.7.3` never matches
//! `5.7.30`) and fixed fragments of Microsoft's texts, never the full line: Exchange appends
//! server names and correlation IDs. Where in the dialogue a reply came matters: a 5xx before
//! the envelope (greeting, EHLO, AUTH) says nothing about the message and everything about the
//! account's path to Exchange, so it pauses the account and never bounces mail.
//!
//! Microsoft Graph's answers (the `graph` account kind) are rows of the same table, in the
//! [`Phase::Graph`] phase: there `code` is the HTTP status and `any_text` lists Graph error
//! codes, compared whole (case-insensitive) with every `code` of the error and its nested
//! `innerError`s, never with the message text (see [`classify_graph`]).

use std::time::Duration;

use crate::advice::Advice;
use crate::config::RewriteFrom;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Try again later; counts as an attempt for the recipients.
    Temporary,
    /// Exchange's per-mailbox limits: slow the account down, do not count a failure.
    Throttled(Duration),
    /// Nothing will work until an administrator changes something: pause the account.
    Config(Advice),
    /// The access token itself was refused: get a fresh one and log in again once; if that is
    /// refused too, pause with this advice.
    TokenRefused(Advice),
    /// 10,000 recipients per 24 h reached: hold the account until the window frees.
    Quota,
    /// The message's own sender was refused (SendAs, with `rewrite_from = "never"`): hold this
    /// message with the advice; the account's other mail keeps flowing.
    SenderDenied(Advice),
    /// This recipient or message will never be accepted; the advice, if any, goes with the
    /// failure into the log and the delivery status notification.
    Permanent(Option<Advice>),
}

/// Where in the SMTP dialogue the reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Greeting, EHLO, STARTTLS.
    Connect,
    Auth,
    /// MAIL FROM, RCPT TO, DATA and the end of the message.
    Transaction,
    /// A Microsoft Graph request (the `graph` account kind).
    Graph,
}

/// Account facts quoted in the advice.
pub struct Ctx<'a> {
    pub mailbox: &'a str,
    pub client_id: &'a str,
    pub rewrite_from: RewriteFrom,
}

/// What the relay does, as README states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Retry,
    Throttle,
    /// Graph: wait for `Retry-After`.
    WaitRetryAfter,
    Pause,
    RefreshThenPause,
    Hold,
    /// `rewrite_from = "always"`: pause (the mailbox itself may not send); `"never"`: hold
    /// the message whose sender was refused.
    PauseOrHoldSender,
    Bounce,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Action::Retry => "retry with backoff until `max_age`",
            Action::Throttle => "wait one rate window (not counted as a failure)",
            Action::WaitRetryAfter => {
                "wait as long as `Retry-After` says (a minute without it; not counted as a failure)"
            }
            Action::Pause => "**pause** the account",
            Action::RefreshThenPause => {
                "fetch a fresh token and log in once more; if refused again, **pause** the account"
            }
            Action::Hold => "hold the account until its 24-hour window frees",
            Action::PauseOrHoldSender => {
                "with `rewrite_from = \"never\"`: hold that message in `spool/hold/` with the advice (the device's From: needs SendAs), the account's other mail keeps flowing; with `\"always\"`: **pause** the account"
            }
            Action::Bounce => {
                "fail that recipient (delivery status notification; the message goes to `spool/failed/` once no recipient is pending)"
            }
        }
    }
}

/// How a reply is recognised.
pub struct Match {
    /// The reply code; `None`: any.
    pub code: Option<u16>,
    /// The exact enhanced status code at the start of the text.
    pub enhanced: Option<&'static str>,
    /// Fragments of which at least one must occur (case-insensitive); empty: none needed.
    pub any_text: &'static [&'static str],
    /// The phases it applies to; empty: any.
    pub phases: &'static [Phase],
}

pub struct Signature {
    /// The reply as README shows it.
    pub reply: &'static str,
    pub matches: Match,
    pub action: Action,
    /// Cause and fix; `text` is the reply's first line without Exchange's bracketed diagnostics.
    pub advice: fn(&Ctx<'_>, &str) -> Advice,
}

const ANY: &[Phase] = &[];
const BEFORE_ENVELOPE: &[Phase] = &[Phase::Connect, Phase::Auth];
const GRAPH: &[Phase] = &[Phase::Graph];

fn no_advice(_: &Ctx<'_>, text: &str) -> Advice {
    Advice::new(text.to_string(), String::new())
}

/// Every reply the relay treats specially, first match wins. Anything else: 4xx is retried, 5xx
/// in a transaction bounces that recipient, 5xx before the envelope pauses the account (see
/// [`classify`]).
pub static SIGNATURES: &[Signature] = &[
    Signature {
        reply: "`432 4.3.2` (concurrent connections)",
        matches: Match {
            code: Some(432),
            enhanced: None,
            any_text: &[],
            phases: ANY,
        },
        action: Action::Throttle,
        advice: no_advice,
    },
    Signature {
        reply: "`421 4.4.2 Message submission rate … exceeded`",
        matches: Match {
            code: Some(421),
            enhanced: Some("4.4.2"),
            any_text: &["message submission rate", "submission rate for this client"],
            phases: ANY,
        },
        action: Action::Throttle,
        advice: no_advice,
    },
    Signature {
        reply: "`554 5.2.0 … SubmissionQuotaExceededException`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["submissionquotaexceeded"],
            phases: ANY,
        },
        action: Action::Hold,
        advice: no_advice,
    },
    Signature {
        reply: "`535 5.7.139 … disabled for the Tenant`",
        matches: Match {
            code: None,
            enhanced: Some("5.7.139"),
            any_text: &["disabled for the tenant"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            Advice::new(
                format!(
                    "Exchange refused AUTH: SMTP AUTH is disabled for the whole organization ({t})."
                ),
                format!(
                    "In Exchange Online PowerShell run: Set-TransportConfig -SmtpClientAuthenticationDisabled $false   (or, to keep it off for everyone else: Set-CASMailbox -Identity {} -SmtpClientAuthenticationDisabled $false). Changes can take up to an hour to reach every Exchange server.",
                    c.mailbox
                ),
            )
        },
    },
    Signature {
        reply: "`535 5.7.139 … disabled for the Mailbox`",
        matches: Match {
            code: None,
            enhanced: Some("5.7.139"),
            any_text: &["disabled for the mailbox"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            let m = c.mailbox;
            Advice::new(
                format!("Exchange refused AUTH: SMTP AUTH is disabled for mailbox {m} ({t})."),
                format!(
                    "In Exchange Online PowerShell run: Set-CASMailbox -Identity {m} -SmtpClientAuthenticationDisabled $false   (or Microsoft 365 admin center > Users > {m} > Mail > Manage email apps > Authenticated SMTP)"
                ),
            )
        },
    },
    Signature {
        reply: "`535 5.7.139 … security defaults`",
        matches: Match {
            code: None,
            enhanced: Some("5.7.139"),
            any_text: &["security defaults"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            Advice::new(
                format!(
                    "Exchange refused AUTH because the organization uses security defaults ({t}). Security defaults allow no exclusions."
                ),
                format!(
                    "Entra admin center > Overview > Properties > Manage security defaults: set them to Disabled and protect the tenant with Conditional Access policies instead (Protection > Conditional Access), excluding the service principal of app {} and the mailbox {}.",
                    c.client_id, c.mailbox
                ),
            )
        },
    },
    Signature {
        reply: "`535 5.7.139 … did not meet the criteria` (Conditional Access)",
        matches: Match {
            code: None,
            enhanced: Some("5.7.139"),
            any_text: &["did not meet the criteria"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            Advice::new(
                format!("Exchange refused AUTH because of a Conditional Access policy ({t})."),
                format!(
                    "Entra admin center > Protection > Conditional Access > Sign-in logs of app {}: find the policy that blocked it and exclude this app's service principal (workload identity) or the relay's public IP address.",
                    c.client_id
                ),
            )
        },
    },
    Signature {
        reply: "`535 5.7.139` (other)",
        matches: Match {
            code: None,
            enhanced: Some("5.7.139"),
            any_text: &[],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            let m = c.mailbox;
            Advice::new(
                format!("Exchange refused AUTH ({t})."),
                format!(
                    "Check SMTP AUTH for {m}: Get-CASMailbox -Identity {m} | fl SmtpClientAuthenticationDisabled; and Get-TransportConfig | fl SmtpClientAuthenticationDisabled"
                ),
            )
        },
    },
    Signature {
        reply: "`535 5.7.3 Authentication unsuccessful`",
        matches: Match {
            code: Some(535),
            enhanced: Some("5.7.3"),
            any_text: &[],
            phases: ANY,
        },
        action: Action::RefreshThenPause,
        advice: auth_unsuccessful,
    },
    Signature {
        reply: "`501 5.5.124` / `501 5.5.127 … Token will expire soon` (invalid XOAUTH2 data)",
        matches: Match {
            code: Some(501),
            enhanced: None,
            any_text: &["5.5.124", "5.5.127", "xoauth2"],
            phases: &[Phase::Auth],
        },
        action: Action::RefreshThenPause,
        advice: |c, t| {
            Advice::new(
                format!("Exchange refused the XOAUTH2 login data even with a fresh token ({t})."),
                format!(
                    "Check that mailbox ({}) is the exact primary SMTP address of the mailbox and that this machine's clock is right (timedatectl); the token must be for the Exchange resource of the account's cloud (exorelay doctor shows its claims).",
                    c.mailbox
                ),
            )
        },
    },
    Signature {
        reply: "`530 5.7.57 Client not authenticated`",
        matches: Match {
            code: None,
            enhanced: Some("5.7.57"),
            any_text: &[],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |_, t| {
            Advice::new(
                format!("Exchange says the client is not authenticated ({t})."),
                "Check that smtp_host points at Exchange Online (smtp.office365.com) and that nothing between this machine and Exchange strips STARTTLS or AUTH (a firewall's SMTP inspection, such as Cisco ASA `inspect esmtp`).",
            )
        },
    },
    Signature {
        reply: "`550 5.7.30 Basic authentication is not supported`",
        matches: Match {
            code: None,
            enhanced: Some("5.7.30"),
            any_text: &[],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |_, t| {
            Advice::new(
                format!("Exchange refused Basic authentication ({t})."),
                "Use an account with kind = \"exchange\" (OAuth); Basic authentication is retired.",
            )
        },
    },
    Signature {
        reply: "`5.7.60` / `554 5.2.252 SendAsDenied`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["sendasdenied", "5.7.60 ", "5.2.252"],
            phases: ANY,
        },
        action: Action::PauseOrHoldSender,
        advice: |c, t| {
            let m = c.mailbox;
            let fix = match c.rewrite_from {
                RewriteFrom::Never => format!(
                    "Grant SendAs for the device's sender address: Add-RecipientPermission -Identity <sender address> -AccessRights SendAs -Trustee {m}; or set rewrite_from = \"always\" on this account so mail is sent as {m}."
                ),
                RewriteFrom::Always => format!(
                    "rewrite_from is already \"always\", so the message was sent as {m}: the app's service principal needs SendAs on it. Add-RecipientPermission -Identity {m} -AccessRights SendAs -Trustee <service principal of app {}>, or check that mailbox is the mailbox's primary SMTP address.",
                    c.client_id
                ),
            };
            Advice::new(
                format!("Mailbox {m} may not send as the message's sender ({t})."),
                fix,
            )
        },
    },
    Signature {
        reply: "`430 4.2.0 … MapiExceptionLogonFailed` (mailbox logon failure)",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["logonfailed", "mailbox logon failure"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            let (m, app) = (c.mailbox, c.client_id);
            Advice::new(
                format!("Exchange could not open mailbox {m} for the app ({t})."),
                format!(
                    "Give the app's service principal access: Add-MailboxPermission -Identity {m} -User <service principal ObjectId> -AccessRights FullAccess   (the ObjectId is the one under Enterprise applications for app {app}, registered with New-ServicePrincipal)"
                ),
            )
        },
    },
    Signature {
        reply: "`550 5.1.8 Bad outbound sender`",
        matches: Match {
            code: None,
            enhanced: Some("5.1.8"),
            any_text: &[],
            phases: ANY,
        },
        action: Action::Pause,
        advice: restricted_sender,
    },
    Signature {
        reply: "`554 5.2.0 … OutboundSpamException`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["outboundspamexception"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: restricted_sender,
    },
    Signature {
        reply: "`554 5.2.2 mailbox full` / `QuotaExceededException`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["quotaexceededexception", "mailbox full"],
            phases: ANY,
        },
        action: Action::Pause,
        advice: |c, t| {
            let m = c.mailbox;
            Advice::new(
                format!(
                    "Mailbox {m} is full; every message sent over SMTP is kept in its Sent Items ({t})."
                ),
                format!(
                    "Empty Sent Items of {m} and give it a retention policy that deletes old Sent Items."
                ),
            )
        },
    },
    Signature {
        reply: "`552 5.3.4 Message size exceeds fixed maximum message size`",
        matches: Match {
            code: Some(552),
            enhanced: Some("5.3.4"),
            any_text: &[],
            phases: &[Phase::Transaction],
        },
        action: Action::Bounce,
        advice: |c, t| {
            Advice::new(
                format!(
                    "Exchange refused the message as too large for mailbox {} ({t}).",
                    c.mailbox
                ),
                format!(
                    "The mailbox's MaxSendSize (35 MB by default, 150 MB at most; base64 makes attachments a third larger) is below this message. Raise it: Set-Mailbox -Identity {} -MaxSendSize 150MB; or lower [relay] max_message_size so devices are told at once.",
                    c.mailbox
                ),
            )
        },
    },
    Signature {
        reply: "Graph `429 Too Many Requests` (`ApplicationThrottled`, MailboxConcurrency) with `Retry-After`",
        matches: Match {
            code: Some(429),
            enhanced: None,
            any_text: &[],
            phases: GRAPH,
        },
        action: Action::WaitRetryAfter,
        advice: no_advice,
    },
    Signature {
        reply: "Graph `503 Service Unavailable` with `Retry-After`",
        matches: Match {
            code: Some(503),
            enhanced: None,
            any_text: &[],
            phases: GRAPH,
        },
        action: Action::WaitRetryAfter,
        advice: no_advice,
    },
    Signature {
        reply: "Graph `504 Gateway Timeout` (the mail may have gone out: the retry looks in Sent Items first)",
        matches: Match {
            code: Some(504),
            enhanced: None,
            any_text: &[],
            phases: GRAPH,
        },
        action: Action::WaitRetryAfter,
        advice: no_advice,
    },
    Signature {
        reply: "Graph `401` (`InvalidAuthenticationToken`, `WWW-Authenticate: Bearer error=...`)",
        matches: Match {
            code: Some(401),
            enhanced: None,
            any_text: &[],
            phases: GRAPH,
        },
        action: Action::RefreshThenPause,
        advice: |c, t| {
            Advice::new(
                format!("Microsoft Graph refused the access token ({t})."),
                format!(
                    "Check that app {} has the Microsoft Graph application permission Mail.Send with admin consent (Entra admin center > App registrations > API permissions), that the token is for Graph of the account's cloud (exorelay doctor shows its audience and roles) and that this machine's clock is right.",
                    c.client_id
                ),
            )
        },
    },
    Signature {
        reply: "Graph `403 ErrorSendAsDenied`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["ErrorSendAsDenied"],
            phases: GRAPH,
        },
        action: Action::PauseOrHoldSender,
        advice: |c, t| {
            let m = c.mailbox;
            let fix = match c.rewrite_from {
                RewriteFrom::Never => format!(
                    "Grant SendAs for the device's sender address: Add-RecipientPermission -Identity <sender address> -AccessRights SendAs -Trustee {m}; or set rewrite_from = \"always\" on this account so mail is sent as {m}."
                ),
                RewriteFrom::Always => format!(
                    "rewrite_from is already \"always\", so the message was sent as {m}: check that mailbox is the primary SMTP address of the mailbox the Graph URL names."
                ),
            };
            Advice::new(
                format!(
                    "Graph refused to send as the message's From: address from mailbox {m} ({t})."
                ),
                fix,
            )
        },
    },
    Signature {
        reply: "Graph `403 ErrorAccessDenied` (`Access to OData is disabled.`: application access policy or RBAC scope)",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &["ErrorAccessDenied", "AccessDenied"],
            phases: GRAPH,
        },
        action: Action::Pause,
        advice: |c, t| {
            let (m, app) = (c.mailbox, c.client_id);
            Advice::new(
                format!("Microsoft Graph denied app {app} access to mailbox {m} ({t})."),
                format!(
                    "An application access policy or an RBAC for Applications scope excludes {m}: check with Test-ApplicationAccessPolicy -Identity {m} -AppId {app} (add {m} to the policy's mail-enabled security group) or Test-ServicePrincipalAuthorization -Identity <service principal ObjectId> -Resource {m} (widen the management scope of the \"Application Mail.Send\" role assignment). Changes can take more than an hour. Also check the app has Mail.Send (application) with admin consent."
                ),
            )
        },
    },
    Signature {
        reply: "Graph `MailboxNotEnabledForRESTAPI` / `ErrorInvalidUser`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &[
                "MailboxNotEnabledForRESTAPI",
                "MailboxNotSupportedForRESTAPI",
                "ErrorInvalidUser",
            ],
            phases: GRAPH,
        },
        action: Action::Pause,
        advice: |c, t| {
            let m = c.mailbox;
            Advice::new(
                format!(
                    "Microsoft Graph cannot send from {m}: it is not an Exchange Online mailbox Graph can use ({t})."
                ),
                format!(
                    "Check that {m} is the primary SMTP address (or the user principal name) of a licensed Exchange Online user or shared mailbox in this tenant (Get-EXOMailbox -Identity {m}); on-premises and unlicensed mailboxes cannot send through Graph."
                ),
            )
        },
    },
    Signature {
        reply: "Graph `413 Request Entity Too Large` / `ErrorMessageSizeExceeded`",
        matches: Match {
            code: None,
            enhanced: None,
            any_text: &[
                "ErrorMessageSizeExceeded",
                "RequestEntityTooLarge",
                "ErrorRequestEntityTooLarge",
            ],
            phases: GRAPH,
        },
        action: Action::Bounce,
        advice: |c, t| {
            Advice::new(
                format!("Microsoft Graph refused the message as too large ({t})."),
                format!(
                    "The mailbox's send limit applies (default 35 MB, attachments grow by a third in base64): Set-Mailbox -Identity {} -MaxSendSize 150MB, or send smaller files.",
                    c.mailbox
                ),
            )
        },
    },
];

/// The advice for a refused token (535 5.7.3), also after the one refresh.
pub fn auth_unsuccessful(c: &Ctx<'_>, text: &str) -> Advice {
    let (mailbox, client) = (c.mailbox, c.client_id);
    Advice::new(
        format!("Exchange refused the access token for {mailbox} even after a refresh ({text})."),
        format!(
            "Register the app in Exchange and give it the mailbox: New-ServicePrincipal -AppId {client} -ObjectId <ObjectId from Enterprise applications>; then Add-MailboxPermission -Identity {mailbox} -User <that ObjectId> -AccessRights FullAccess (or, with RBAC for Applications, New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp' -App <that ObjectId> and check it with Test-ServicePrincipalAuthorization -Identity <that ObjectId> -Resource {mailbox}). Check the app has the SMTP.SendAsApp application permission with admin consent, that mailbox is the exact address of that mailbox, and that Get-TransportConfig | fl OAuth2ClientProfileEnabled is True. Changes in Exchange can take up to 30 minutes to take effect; exorelay keeps trying every probe_interval."
        ),
    )
}

fn restricted_sender(c: &Ctx<'_>, t: &str) -> Advice {
    Advice::new(
        format!(
            "Mailbox {} is blocked from sending: restricted as a suspected spam source ({t}).",
            c.mailbox
        ),
        "Release it in Microsoft Defender portal > Email & collaboration > Review > Restricted entities, then find out why it sent spam (compromised device or credentials?).",
    )
}

/// Advice when a TLS handshake with `endpoint` failed on the server's certificate: almost always a
/// TLS-inspecting firewall or proxy presenting its own certificate, or a missing CA bundle.
pub fn untrusted_certificate(endpoint: &str, why: &str) -> Advice {
    Advice::new(
        format!(
            "The TLS certificate presented by {endpoint} was not trusted ({why}). TLS inspection on a firewall or proxy?"
        ),
        format!(
            "Exempt {endpoint} from TLS inspection on the firewall or proxy (exorelay needs smtp.office365.com:587 and the Entra login host, login.microsoftonline.com:443, uninspected), or give exorelay the inspection CA with ca_file; also check that the system CA bundle is installed (apt-get install ca-certificates) and that the clock is right."
        ),
    )
}

/// Advice when EHLO after STARTTLS offers no `AUTH XOAUTH2`.
pub fn no_xoauth2(endpoint: &str, banner_masked: bool) -> Advice {
    let cause = if banner_masked {
        format!(
            "{endpoint} offers no AUTH XOAUTH2 and its banner is masked with asterisks: a firewall's SMTP inspection is rewriting the session (for example Cisco ASA `inspect esmtp`)."
        )
    } else {
        format!(
            "{endpoint} offers no AUTH XOAUTH2 after STARTTLS: it is not Exchange Online's submission endpoint (a tenant MX host such as contoso-com.mail.protection.outlook.com takes no logins), or something in between strips AUTH."
        )
    };
    Advice::new(
        cause,
        "Set smtp_host to smtp.office365.com (port 587), and turn off SMTP/ESMTP inspection for it on the firewall (Cisco ASA: no inspect esmtp in the policy map).",
    )
}

/// Advice when the server answered the token with a `334` challenge instead of a reply.
pub fn challenge_refused(c: &Ctx<'_>, what: &str) -> Advice {
    let mut a = auth_unsuccessful(c, what);
    a.cause = format!(
        "The server answered AUTH XOAUTH2 with an error challenge (334) even after a fresh token ({what}): the token was refused."
    );
    a
}

/// The enhanced status code at the start of a reply text ("5.7.3 Authentication ..." → "5.7.3").
fn enhanced_code(text: &str) -> Option<&str> {
    let first = text.split_whitespace().next()?;
    let parts: Vec<&str> = first.split('.').collect();
    (parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())))
    .then_some(first)
}

impl Match {
    fn test(&self, phase: Phase, code: u16, enhanced: Option<&str>, lower: &str) -> bool {
        self.code.is_none_or(|c| c == code)
            && self.enhanced.is_none_or(|e| enhanced == Some(e))
            && (self.any_text.is_empty() || self.any_text.iter().any(|f| lower.contains(f)))
            && (self.phases.is_empty() || self.phases.contains(&phase))
    }
}

impl Signature {
    fn matches_graph(&self, status: u16, codes: &[String]) -> bool {
        let m = &self.matches;
        if !m.phases.contains(&Phase::Graph) {
            return false;
        }
        m.code.is_none_or(|c| c == status)
            && (m.any_text.is_empty()
                || codes
                    .iter()
                    .any(|c| m.any_text.iter().any(|f| c.eq_ignore_ascii_case(f))))
    }
}

/// Classifies a Graph answer: `status` is the HTTP status, `codes` the error's `code` and those
/// of its nested `innerError`s, outermost first; `shown` is what the log and advice quote.
/// `retry_after` is the answer's `Retry-After` (seconds), honoured for throttling. Anything not
/// in the table: 5xx is temporary, any other 4xx fails the message.
pub fn classify_graph(
    status: u16,
    codes: &[String],
    shown: &str,
    retry_after: Option<Duration>,
    ctx: &Ctx<'_>,
) -> Class {
    let throttle = || Class::Throttled(retry_after.unwrap_or(Duration::from_secs(60)));
    if let Some(s) = SIGNATURES.iter().find(|s| s.matches_graph(status, codes)) {
        let advice = || (s.advice)(ctx, shown);
        return match s.action {
            Action::Retry => Class::Temporary,
            Action::Throttle | Action::WaitRetryAfter => throttle(),
            Action::Pause => Class::Config(advice()),
            Action::RefreshThenPause => Class::TokenRefused(advice()),
            Action::Hold => Class::Quota,
            Action::PauseOrHoldSender if ctx.rewrite_from == RewriteFrom::Never => {
                Class::SenderDenied(advice())
            }
            Action::PauseOrHoldSender => Class::Config(advice()),
            Action::Bounce => Class::Permanent(Some(advice())),
        };
    }
    match status {
        500..=599 | 408 => Class::Temporary,
        _ => Class::Permanent(None),
    }
}

/// The signature a reply matches, if any.
pub fn signature(phase: Phase, code: u16, text: &str) -> Option<&'static Signature> {
    let lower = text.to_ascii_lowercase();
    let enhanced = enhanced_code(text);
    SIGNATURES
        .iter()
        .find(|s| s.matches.test(phase, code, enhanced, &lower))
}

pub fn classify(phase: Phase, code: u16, text: &str, ctx: &Ctx<'_>) -> Class {
    let shown = first(text);
    if let Some(s) = signature(phase, code, text) {
        let advice = || (s.advice)(ctx, shown);
        return match s.action {
            Action::Retry => Class::Temporary,
            Action::Throttle | Action::WaitRetryAfter => Class::Throttled(Duration::from_secs(60)),
            Action::Pause => Class::Config(advice()),
            Action::RefreshThenPause => Class::TokenRefused(advice()),
            Action::Hold => Class::Quota,
            Action::PauseOrHoldSender if ctx.rewrite_from == RewriteFrom::Never => {
                Class::SenderDenied(advice())
            }
            Action::PauseOrHoldSender => Class::Config(advice()),
            Action::Bounce => Class::Permanent(Some(advice())),
        };
    }
    match (code / 100, phase) {
        (5, Phase::Connect | Phase::Auth) => {
            Class::Config(refused_before_envelope(phase, code, shown))
        }
        (5, Phase::Transaction) => Class::Permanent(None),
        _ => Class::Temporary,
    }
}

/// A 5xx at the greeting, EHLO or AUTH that is none of Microsoft's documented replies: something
/// is between the relay and Exchange, or smtp_host is not Exchange Online.
fn refused_before_envelope(phase: Phase, code: u16, text: &str) -> Advice {
    let when = match phase {
        Phase::Connect => "greeting or EHLO",
        _ => "AUTH",
    };
    Advice::new(
        format!(
            "The SMTP server refused the session at the {when} with {code} {text}; this is not one of Exchange Online's replies."
        ),
        "Check that smtp_host is smtp.office365.com (not a tenant MX host such as contoso-com.mail.protection.outlook.com) and that no firewall, proxy or antivirus between this machine and Exchange answers for it (test: openssl s_client -starttls smtp -connect smtp.office365.com:587 should show a Microsoft banner). Mail stays queued meanwhile.",
    )
}

/// The reply's first line without Exchange's bracketed diagnostics.
pub fn first(text: &str) -> &str {
    let t = text.lines().next().unwrap_or("").trim();
    match t.find(" [") {
        Some(i) => &t[..i],
        None => t,
    }
}

/// Splits lettre's error text "permanent error (550): 5.1.10 ..." into code and text.
pub fn split_lettre_error(e: &lettre::transport::smtp::Error) -> Option<(u16, String)> {
    let code = u16::from(e.status()?);
    let s = e.to_string();
    let text = s.split_once("): ").map(|(_, t)| t.to_string()).unwrap_or(s);
    Some((code, text))
}

/// README's table of Microsoft's answers, generated from [`SIGNATURES`].
pub fn readme_table() -> String {
    let mut out = String::from("| answer | action |\n|---|---|\n");
    for s in SIGNATURES {
        let mut action = s.action.describe().to_string();
        if s.matches.phases == BEFORE_ENVELOPE {
            action.push_str(" (at the greeting, EHLO or AUTH)");
        }
        out.push_str(&format!("| {} | {action} |\n", s.reply));
    }
    for (answer, action) in [
        (
            "the server's TLS certificate is not trusted (TLS inspection, missing CA), on SMTP or at the token endpoint",
            Action::Pause,
        ),
        (
            "EHLO after STARTTLS offers no `AUTH XOAUTH2` (a tenant MX host, firewall SMTP inspection), or no STARTTLS",
            Action::Pause,
        ),
        (
            "a `334` error challenge after the token",
            Action::RefreshThenPause,
        ),
    ] {
        out.push_str(&format!("| {answer} | {} |\n", action.describe()));
    }
    out.push_str(&format!(
        "| any other 5xx at the greeting, EHLO or AUTH (a middlebox's banner, a wrong host) | {} |\n",
        Action::Pause.describe()
    ));
    out.push_str(&format!(
        "| any other 4xx, dropped connection, timeout | {} |\n",
        Action::Retry.describe()
    ));
    out.push_str(&format!(
        "| any other 5xx to MAIL, RCPT or DATA | {} |\n",
        Action::Bounce.describe()
    ));
    out.push_str(&format!(
        "| Graph: any other 5xx, a timeout or a dropped connection | {} (a retry first looks for the message in Sent Items, see \"Sending through Microsoft Graph\") |\n",
        Action::Retry.describe()
    ));
    out.push_str(&format!(
        "| Graph: any other 4xx | {} |\n",
        Action::Bounce.describe()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(rewrite_from: RewriteFrom) -> Ctx<'static> {
        Ctx {
            mailbox: "relay@contoso.com",
            client_id: "app",
            rewrite_from,
        }
    }

    fn c(code: u16, text: &str) -> Class {
        classify(Phase::Transaction, code, text, &ctx(RewriteFrom::Always))
    }

    fn fix(class: Class) -> String {
        match class {
            Class::Config(a)
            | Class::TokenRefused(a)
            | Class::Permanent(Some(a))
            | Class::SenderDenied(a) => a.fix,
            other => panic!("no advice: {other:?}"),
        }
    }

    #[test]
    fn reference_table() {
        let throttle = Class::Throttled(Duration::from_secs(60));
        assert_eq!(
            c(432, "4.3.2 Concurrent connections limit exceeded. [X]"),
            throttle
        );
        assert_eq!(
            c(
                421,
                "4.4.2 Message submission rate for this client has exceeded the configured limit"
            ),
            throttle
        );
        assert_eq!(
            c(451, "4.7.500 Server busy. Please try again later."),
            Class::Temporary
        );
        assert!(fix(c(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit ...")).contains("Set-TransportConfig"));
        assert!(fix(c(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.")).contains("Set-CASMailbox -Identity relay@contoso.com"));
        assert!(fix(c(535, "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy")).contains("Manage security defaults: set them to Disabled"));
        assert!(
            fix(c(
                554,
                "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@y"
            ))
            .contains("service principal")
        );
        assert!(
            fix(c(
                430,
                "4.2.0 STOREDRV; mailbox logon failure; MapiExceptionLogonFailed"
            ))
            .contains("Add-MailboxPermission")
        );
        assert_eq!(
            c(
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
            ),
            Class::Quota
        );
        assert_eq!(
            c(550, "5.1.10 RESOLVER.ADR.RecipientNotFound"),
            Class::Permanent(None)
        );
        assert!(
            fix(c(
                552,
                "5.3.4 Message size exceeds fixed maximum message size"
            ))
            .contains("MaxSendSize")
        );
        let refused = fix(c(535, "5.7.3 Authentication unsuccessful [SN2PR]"));
        assert!(
            refused.contains("New-ServicePrincipal")
                && refused.contains("Test-ServicePrincipalAuthorization")
                && refused.contains("OAuth2ClientProfileEnabled")
                && refused.contains("30 minutes")
        );
    }

    #[test]
    fn exact_codes_not_prefixes() {
        // 5.7.30 is its own reply, not 5.7.3.
        assert!(
            fix(c(
                550,
                "5.7.30 Basic authentication is not supported for Client Submission."
            ))
            .contains("Basic authentication is retired")
        );
        // "rate" inside another word is no throttle.
        assert_eq!(
            c(
                421,
                "4.3.2 Service not available, closing to separate traffic"
            ),
            Class::Temporary
        );
        assert_eq!(
            c(421, "4.4.2 Connection dropped due to SocketError"),
            Class::Temporary
        );
    }

    #[test]
    fn outbound_spam_pauses_like_5_1_8() {
        let a = fix(c(
            554,
            "5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; Failed to process message",
        ));
        assert!(a.contains("Restricted entities"));
        assert!(
            fix(c(550, "5.1.8 Access denied, bad outbound sender")).contains("Restricted entities")
        );
    }

    #[test]
    fn failures_before_the_envelope_are_account_level() {
        let cx = ctx(RewriteFrom::Always);
        // A middlebox's banner, a bad EHLO reply: pause, never bounce.
        for (phase, code, text) in [
            (
                Phase::Connect,
                554,
                "5.7.1 Access denied by firewall policy",
            ),
            (Phase::Connect, 501, "5.5.4 Invalid domain name"),
            (Phase::Auth, 504, "5.7.4 Unrecognized authentication type"),
        ] {
            assert!(
                matches!(classify(phase, code, text, &cx), Class::Config(_)),
                "{text}"
            );
        }
        for text in [
            "5.5.124 Invalid XOAUTH2 auth data",
            "5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
        ] {
            assert!(
                matches!(
                    classify(Phase::Auth, 501, text, &cx),
                    Class::TokenRefused(_)
                ),
                "{text}"
            );
        }
        assert!(matches!(
            classify(Phase::Connect, 421, "4.3.2 Service not available", &cx),
            Class::Temporary
        ));
    }

    #[test]
    fn send_as_advice_knows_the_rewrite_setting() {
        let always = fix(c(
            554,
            "5.2.252 SendAsDenied; relay@contoso.com not allowed",
        ));
        assert!(
            !always.contains("set rewrite_from = \"always\""),
            "{always}"
        );
        let never = classify(
            Phase::Transaction,
            550,
            "5.7.60 SMTP; Client does not have permissions to send as this sender",
            &ctx(RewriteFrom::Never),
        );
        let Class::SenderDenied(a) = never else {
            panic!("{never:?}")
        };
        assert!(a.fix.contains("set rewrite_from = \"always\""), "{a:?}");
    }

    #[test]
    fn graph_answers_take_their_table_action_by_code_not_message() {
        let g = |status: u16, codes: &[&str], rf: RewriteFrom| {
            let codes: Vec<String> = codes.iter().map(|c| c.to_string()).collect();
            classify_graph(status, &codes, "x", Some(Duration::from_secs(7)), &ctx(rf))
        };
        let always = RewriteFrom::Always;
        assert_eq!(
            g(429, &["ApplicationThrottled"], always),
            Class::Throttled(Duration::from_secs(7))
        );
        assert_eq!(
            g(503, &[], always),
            Class::Throttled(Duration::from_secs(7))
        );
        assert_eq!(
            g(504, &[], always),
            Class::Throttled(Duration::from_secs(7))
        );
        assert!(matches!(
            g(401, &["InvalidAuthenticationToken"], always),
            Class::TokenRefused(_)
        ));
        assert!(matches!(
            g(403, &["ErrorSendAsDenied"], RewriteFrom::Never),
            Class::SenderDenied(_)
        ));
        assert!(matches!(
            g(403, &["ErrorSendAsDenied"], always),
            Class::Config(_)
        ));
        // The code may sit in a nested innerError.
        assert!(
            fix(g(403, &["Forbidden", "ErrorAccessDenied"], always))
                .contains("Test-ApplicationAccessPolicy")
        );
        assert!(
            fix(g(404, &["MailboxNotEnabledForRESTAPI"], always))
                .contains("licensed Exchange Online")
        );
        assert!(fix(g(413, &["RequestEntityTooLarge"], always)).contains("MaxSendSize"));
        // Codes are compared whole: a longer code is not its prefix.
        assert_eq!(
            g(400, &["ErrorSendAsDeniedSomething"], always),
            Class::Permanent(None)
        );
        assert_eq!(g(500, &["InternalServerError"], always), Class::Temporary);
        // SMTP replies never match Graph rows, nor Graph answers SMTP rows.
        assert_eq!(
            classify(Phase::Transaction, 429, "4.7.0 x", &ctx(always)),
            Class::Temporary
        );
    }

    #[test]
    fn readme_table_is_generated_from_the_signatures() {
        let readme = include_str!("../../../README.md");
        let start = "<!-- generated by classify::readme_table: start -->\n";
        let end = "<!-- generated by classify::readme_table: end -->";
        let table = readme_table();
        println!("{table}");
        let (_, rest) = readme.split_once(start).expect("README start marker");
        let (current, _) = rest.split_once(end).expect("README end marker");
        assert_eq!(
            current, table,
            "README's table differs from classify::SIGNATURES; paste the table printed above"
        );
    }
}
