//! Exchange Online's SMTP replies sorted by what the relay must do about them
//! (the table in the Exchange reference, §3). Matching is on the code and the start of the text,
//! never the full line: Exchange appends server names and correlation IDs.

use std::time::Duration;

use crate::advice::Advice;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Try again later; counts as an attempt for the recipients.
    Temporary,
    /// Exchange's per-mailbox limits: slow the account down, do not count a failure.
    Throttled(Duration),
    /// Nothing will work until an administrator changes something: pause the account.
    Config(Advice),
    /// 10,000 recipients per 24 h reached: hold the account until the window frees.
    Quota,
    /// This recipient or message will never be accepted.
    Permanent,
}

/// Account facts quoted in the advice.
pub struct Ctx<'a> {
    pub mailbox: &'a str,
    pub client_id: &'a str,
}

pub fn classify(code: u16, text: &str, ctx: &Ctx<'_>) -> Class {
    let t = text.to_ascii_lowercase();
    let mailbox = ctx.mailbox;
    let client = ctx.client_id;
    if code == 432 || (code == 421 && (t.starts_with("4.4.2") || t.contains("rate"))) {
        return Class::Throttled(Duration::from_secs(60));
    }
    if t.contains("submissionquotaexceeded") {
        return Class::Quota;
    }
    if t.starts_with("5.7.139") {
        let advice = if t.contains("disabled for the tenant") {
            Advice::new(
                format!(
                    "Exchange refused AUTH: SMTP AUTH is disabled for the whole organization ({}).",
                    first(text)
                ),
                format!(
                    "In Exchange Online PowerShell run: Set-TransportConfig -SmtpClientAuthenticationDisabled $false   (or, to keep it off for everyone else: Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false)"
                ),
            )
        } else if t.contains("disabled for the mailbox") {
            Advice::new(
                format!(
                    "Exchange refused AUTH: SMTP AUTH is disabled for mailbox {mailbox} ({}).",
                    first(text)
                ),
                format!(
                    "In Exchange Online PowerShell run: Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false   (or Microsoft 365 admin center > Users > {mailbox} > Mail > Manage email apps > Authenticated SMTP)"
                ),
            )
        } else if t.contains("security defaults") || t.contains("did not meet the criteria") {
            Advice::new(
                format!("Exchange refused AUTH because of Conditional Access or security defaults ({}).", first(text)),
                "Exclude this app's service principal from the blocking Conditional Access policy (Entra admin center > Protection > Conditional Access).".to_string(),
            )
        } else {
            Advice::new(
                format!("Exchange refused AUTH ({}).", first(text)),
                format!(
                    "Check SMTP AUTH for {mailbox}: Get-CASMailbox -Identity {mailbox} | fl SmtpClientAuthenticationDisabled"
                ),
            )
        };
        return Class::Config(advice);
    }
    if t.starts_with("5.7.3") || (code == 535 && !t.starts_with("5.7.139")) {
        return Class::Config(auth_unsuccessful(text, ctx));
    }
    if t.starts_with("5.7.57") {
        return Class::Config(Advice::new(
            format!(
                "Exchange says the client is not authenticated ({}).",
                first(text)
            ),
            "This should not happen with exorelay; check that smtp_host points at Exchange Online (smtp.office365.com) and report the log line.",
        ));
    }
    if t.starts_with("5.7.30") {
        return Class::Config(Advice::new(
            format!("Exchange refused Basic authentication ({}).", first(text)),
            "Use an account with kind = \"exchange\" (OAuth); Basic authentication is retired.",
        ));
    }
    if t.starts_with("5.7.60") || t.contains("sendasdenied") || t.starts_with("5.2.252") {
        return Class::Config(Advice::new(
            format!(
                "Mailbox {mailbox} may not send as the message's sender ({}).",
                first(text)
            ),
            format!(
                "Set rewrite_from = \"always\" on this account so mail is sent as {mailbox}, or grant SendAs: Add-RecipientPermission -Identity <sender address> -AccessRights SendAs -Trustee {mailbox}"
            ),
        ));
    }
    if code == 430 || t.contains("logonfailed") || t.contains("mailbox logon failure") {
        return Class::Config(Advice::new(
            format!(
                "Exchange could not open mailbox {mailbox} for the app ({}).",
                first(text)
            ),
            format!(
                "Give the app's service principal access: Add-MailboxPermission -Identity {mailbox} -User <service principal ObjectId> -AccessRights FullAccess   (the ObjectId is the one under Enterprise applications for app {client}, registered with New-ServicePrincipal)"
            ),
        ));
    }
    if t.starts_with("5.1.8") {
        return Class::Config(Advice::new(
            format!(
                "Mailbox {mailbox} is blocked from sending: restricted as a suspected spam source ({}).",
                first(text)
            ),
            "Release it in Microsoft Defender portal > Email & collaboration > Review > Restricted entities, then find out why it sent spam.",
        ));
    }
    if t.contains("quotaexceededexception") || t.contains("mailbox full") {
        return Class::Config(Advice::new(
            format!(
                "Mailbox {mailbox} is full; every message sent over SMTP is kept in its Sent Items ({}).",
                first(text)
            ),
            format!(
                "Empty Sent Items of {mailbox} and give it a retention policy that deletes old Sent Items."
            ),
        ));
    }
    match code / 100 {
        4 => Class::Temporary,
        5 => Class::Permanent,
        _ => Class::Temporary,
    }
}

/// The 535 5.7.3 advice (Exchange refused a token we just refreshed).
pub fn auth_unsuccessful(text: &str, ctx: &Ctx<'_>) -> Advice {
    let (mailbox, client) = (ctx.mailbox, ctx.client_id);
    Advice::new(
        format!(
            "Exchange refused the access token for {mailbox} even after a refresh ({}).",
            first(text)
        ),
        format!(
            "Register the app in Exchange and give it the mailbox: New-ServicePrincipal -AppId {client} -ObjectId <ObjectId from Enterprise applications>; then Add-MailboxPermission -Identity {mailbox} -User <that ObjectId> -AccessRights FullAccess. Check the app has the SMTP.SendAsApp application permission with admin consent, and that mailbox is the exact address of that mailbox."
        ),
    )
}

fn first(text: &str) -> &str {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn c(code: u16, text: &str) -> Class {
        classify(
            code,
            text,
            &Ctx {
                mailbox: "relay@contoso.com",
                client_id: "app",
            },
        )
    }

    #[test]
    fn reference_table() {
        assert_eq!(
            c(432, "4.3.2 Concurrent connections limit exceeded. [X]"),
            Class::Throttled(Duration::from_secs(60))
        );
        assert_eq!(
            c(
                421,
                "4.4.2 Message submission rate for this client has exceeded the configured limit"
            ),
            Class::Throttled(Duration::from_secs(60))
        );
        assert_eq!(
            c(451, "4.7.500 Server busy. Please try again later."),
            Class::Temporary
        );
        assert!(
            matches!(c(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit ..."), Class::Config(a) if a.fix.contains("Set-TransportConfig"))
        );
        assert!(
            matches!(c(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."), Class::Config(a) if a.fix.contains("Set-CASMailbox -Identity relay@contoso.com"))
        );
        assert!(
            matches!(c(554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@y"), Class::Config(a) if a.fix.contains("Add-RecipientPermission"))
        );
        assert!(
            matches!(c(430, "4.2.0 STOREDRV; mailbox logon failure; MapiExceptionLogonFailed"), Class::Config(a) if a.fix.contains("Add-MailboxPermission"))
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
            Class::Permanent
        );
        assert_eq!(
            c(552, "5.3.4 Message size exceeds fixed maximum message size"),
            Class::Permanent
        );
        assert!(
            matches!(c(535, "5.7.3 Authentication unsuccessful [SN2PR]"), Class::Config(a) if a.fix.contains("New-ServicePrincipal"))
        );
    }
}
