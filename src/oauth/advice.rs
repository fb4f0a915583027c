//! Entra ID token errors (AADSTS codes) turned into a cause and a fix. Branches on `error` and
//! `error_codes[0]`, never on the description text, as Microsoft advises.

use crate::advice::Advice;

/// Facts about the account, quoted in the fixes.
pub struct Context<'a> {
    pub account: &'a str,
    pub tenant: &'a str,
    pub client_id: &'a str,
    pub certificate: bool,
}

/// Returns the advice and whether the failure is a configuration problem (true) or worth
/// retrying as it is (false).
pub fn advise(code: Option<u32>, error: &str, ctx: &Context<'_>) -> (Advice, bool) {
    let acct = ctx.account;
    let (tenant, client) = (ctx.tenant, ctx.client_id);
    let secret_or_cert = if ctx.certificate {
        "certificate"
    } else {
        "client secret"
    };
    let a = |cause: String, fix: String| Advice::new(cause, fix);
    let config = |adv: Advice| (adv, true);
    match code {
        Some(7000215) => config(a(
            "Entra rejected the client secret (AADSTS7000215: invalid client secret). Often the secret's ID was copied instead of its Value.".into(),
            format!("In Entra admin center > App registrations > {client} > Certificates & secrets, create a new client secret and put its Value (not the Secret ID) into the client_secret_file of account {acct:?}. No restart is needed: the next token request reads the file (exorelay reload tries at once)."),
        )),
        Some(7000222) => config(a(
            "The client secret has expired (AADSTS7000222).".into(),
            format!("Create a new client secret for app {client} (App registrations > Certificates & secrets), write its Value into the client_secret_file of account {acct:?} (the next token request reads it, no restart needed) and update client_secret_expires; or switch to a certificate (certificate_file)."),
        )),
        Some(7000218) => config(a(
            "The token request carried neither a client secret nor a client assertion (AADSTS7000218).".into(),
            format!("Set client_secret_file, or certificate_file and private_key_file, for account {acct:?}."),
        )),
        Some(700016) => config(a(
            format!("Application {client} was not found in tenant {tenant} (AADSTS700016)."),
            format!("Check client_id (the Application (client) ID on the app's Overview page) and tenant of account {acct:?}; if the app lives in another tenant, an administrator of {tenant} must consent to it first."),
        )),
        Some(700027) | Some(50012) => config(a(
            format!("Entra could not validate the client assertion signed with the {secret_or_cert} (AADSTS{}).", code.unwrap_or(700027)),
            format!("Upload the certificate in certificate_file to App registrations > {client} > Certificates & secrets > Certificates, and make sure private_key_file is its key."),
        )),
        Some(700024) | Some(500133) => config(a(
            "The client assertion's time range was refused; this machine's clock is probably wrong.".into(),
            "Synchronise the clock (timedatectl set-ntp true) and try again.".into(),
        )),
        Some(700025) => config(a(
            "The app is registered as a public client, which may not use a secret or certificate (AADSTS700025).".into(),
            format!("In App registrations > {client} > Authentication, set 'Allow public client flows' to No."),
        )),
        Some(7000229) => config(a(
            format!("App {client} has no service principal in tenant {tenant} (AADSTS7000229): it was registered, or consented to, but never instantiated there."),
            format!("An administrator of {tenant} creates it: open https://login.microsoftonline.com/{tenant}/adminconsent?client_id={client} and accept, or run in Microsoft Graph PowerShell: New-MgServicePrincipal -AppId {client}. Then New-ServicePrincipal in Exchange Online as in the setup."),
        )),
        Some(900382) => config(a(
            "The token request went to a different Microsoft cloud from the tenant's (AADSTS900382: cross-cloud request).".into(),
            format!("Set cloud on account {acct:?} to the tenant's cloud: cloud = \"usgov\" for GCC High or DoD (login.microsoftonline.us), cloud = \"china\" for 21Vianet; GCC (moderate) stays \"global\"."),
        )),
        Some(1000502) => config(a(
            "The certificate used to sign the client assertion is outside its validity period (AADSTS1000502).".into(),
            format!("Create a new certificate, upload it under App registrations > {client} > Certificates & secrets > Certificates, and point certificate_file and private_key_file of account {acct:?} at it; check the clock of this machine too (timedatectl)."),
        )),
        Some(7000112) => config(a(
            format!("Application {client} is disabled in tenant {tenant} (AADSTS7000112)."),
            format!("Entra admin center > Enterprise applications > {client} > Properties: set 'Enabled for users to sign-in?' to Yes (or ask who disabled it and why)."),
        )),
        Some(500011) => config(a(
            format!("The Exchange Online resource was not found in tenant {tenant} (AADSTS500011): the tenant has no Exchange Online, or the token went to the wrong cloud."),
            format!("Check that {tenant} has Exchange Online licences and mailboxes, and that cloud on account {acct:?} matches the tenant (global, usgov, china); for a cloud the presets miss, set scope explicitly."),
        )),
        Some(65001) | Some(650056) | Some(650057) => config(a(
            format!("The app has no consented permission to send mail through Exchange Online (AADSTS{}).", code.unwrap_or(65001)),
            format!("In App registrations > {client} > API permissions: Add a permission > APIs my organization uses > Office 365 Exchange Online > Application permissions > SMTP.SendAsApp, then 'Grant admin consent for {tenant}'."),
        )),
        Some(53003) => config(a(
            "A Conditional Access policy blocked the token request (AADSTS53003).".into(),
            format!("In Entra admin center > Protection > Conditional Access, exclude the service principal of app {client} (workload identity) from the blocking policy, or allow this relay's public IP address."),
        )),
        Some(530035) => config(a(
            "Security defaults blocked the sign-in (AADSTS530035). Security defaults allow no exclusions.".into(),
            format!("Either turn security defaults off and replace them with Conditional Access policies that exclude the service principal of app {client} (Entra admin center > Overview > Properties > Manage security defaults > Disabled, then Protection > Conditional Access), or keep them and use client credentials with a certificate for account {acct:?} (app-only sign-ins are not blocked by security defaults)."),
        )),
        Some(90002) | Some(900023) | Some(90038) => config(a(
            format!("Tenant {tenant:?} was not found (AADSTS{}).", code.unwrap_or(90002)),
            format!("Set tenant of account {acct:?} to your Directory (tenant) ID (a GUID) or a verified domain such as contoso.onmicrosoft.com; check that cloud matches (global, usgov, china)."),
        )),
        Some(9001023) | Some(50194) => config(a(
            format!("The grant is not supported on the tenant-independent endpoint (AADSTS{}).", code.unwrap_or(9001023)),
            format!("Set tenant of account {acct:?} to your tenant's GUID or domain, not common/organizations."),
        )),
        Some(70011) | Some(700022) => config(a(
            format!("The requested scope was refused (AADSTS{}).", code.unwrap_or(70011)),
            "Check the cloud setting of the account; the scope must be the Exchange resource of that cloud with /.default.".into(),
        )),
        Some(50196) | Some(90055) => (
            a(
                format!("Entra is throttling this client (AADSTS{}).", code.unwrap_or(50196)),
                "Nothing to change: exorelay caches tokens and backs off; it retries on its own.".into(),
            ),
            false,
        ),
        _ => match error {
            "invalid_client" | "unauthorized_client" => config(a(
                format!("Entra refused the app's credentials ({error})."),
                format!("Check client_id, tenant and the {secret_or_cert} of account {acct:?} in App registrations > {client}."),
            )),
            "invalid_scope" | "invalid_resource" => config(a(
                format!("Entra refused the requested scope ({error})."),
                "Check the cloud setting of the account.".into(),
            )),
            "temporarily_unavailable" | "server_error" => (
                a(format!("Entra is temporarily unavailable ({error})."), "Nothing to change: exorelay retries with backoff.".into()),
                false,
            ),
            _ => config(a(
                format!("Entra refused the token request ({error}{})", code.map(|c| format!(", AADSTS{c}")).unwrap_or_default()),
                format!("Look the code up at https://login.microsoftonline.com/error?code={} and check the app registration {client}.", code.unwrap_or(0)),
            )),
        },
    }
}

/// A delegated account that nobody has signed in to yet (no token file), or whose token file
/// cannot be used.
pub fn not_signed_in(account: &str, file: &std::path::Path, why: Option<&str>) -> Advice {
    let cause = match why {
        None => format!(
            "Nobody has signed in for delegated account {account:?} yet (no refresh token in {}).",
            file.display()
        ),
        Some(why) => {
            format!("The refresh token of delegated account {account:?} cannot be used: {why}.")
        }
    };
    Advice::new(
        cause,
        format!(
            "Run exorelay login --account {account} as the mailbox's user (device code; add --browser to sign in with a browser on this machine). The relay picks the new sign-in up by itself; queued mail stays queued until then."
        ),
    )
}

/// Like [`advise`], for the delegated flows: a refresh token that no longer works
/// (`invalid_grant`: expired, revoked, MFA or consent needed) is fixed by signing in again, so
/// the fix names `exorelay login --account NAME`. Everything else is as for client credentials.
pub fn advise_delegated(code: Option<u32>, error: &str, ctx: &Context<'_>) -> (Advice, bool) {
    let acct = ctx.account;
    let client = ctx.client_id;
    let login = format!("run exorelay login --account {acct}");
    let relogin = |cause: String| {
        (
            Advice::new(
                cause,
                format!(
                    "Sign in again: {login} (as the mailbox's user). Queued mail stays queued and goes out by itself after the sign-in."
                ),
            ),
            true,
        )
    };
    match code {
        Some(700082) => relogin("The refresh token expired after 90 days without use (AADSTS700082).".into()),
        Some(c @ (50173 | 70043)) => relogin(format!(
            "The sign-in was revoked or has to be renewed (AADSTS{c}): a password change, an administrator's revocation or a sign-in frequency policy."
        )),
        Some(c @ (50076 | 50079)) => relogin(format!(
            "Entra requires multi-factor authentication for this user (AADSTS{c}), which only an interactive sign-in can satisfy."
        )),
        Some(65001) => (
            Advice::new(
                "Consent to send mail as the user (SMTP.Send) was revoked or never granted (AADSTS65001).".to_string(),
                format!("In App registrations > {client} > API permissions, add Office 365 Exchange Online > Delegated permissions > SMTP.Send (and offline_access) and grant consent; then {login}."),
            ),
            true,
        ),
        Some(c @ (70011 | 700022)) => (
            Advice::new(
                format!("Entra refused the requested scope (AADSTS{c})."),
                format!("Leave scope unset on account {acct:?} (the cloud's SMTP.Send plus offline_access), or set it to the cloud's SMTP.Send permission and offline_access, e.g. \"https://outlook.office.com/SMTP.Send offline_access\"."),
            ),
            true,
        ),
        Some(54005) => relogin("The authorization code was already redeemed (AADSTS54005).".into()),
        Some(53003) => (
            Advice::new(
                "A Conditional Access policy blocks this user's sign-in for this app (AADSTS53003).".to_string(),
                format!("In Entra admin center > Protection > Conditional Access, check the sign-in logs of the mailbox's user for app {client}: exclude the app or meet the policy (compliant device, location); then {login}."),
            ),
            true,
        ),
        Some(530035) => (
            Advice::new(
                "Security defaults block this sign-in (AADSTS530035).".to_string(),
                format!("Security defaults require MFA registration and block legacy sign-ins: register MFA for the mailbox's user and {login}; or use an app-only account (client credentials) for this mailbox."),
            ),
            true,
        ),
        Some(700025) => (
            Advice::new(
                "The app is registered as a public client, which may not send a secret or certificate (AADSTS700025).".to_string(),
                format!("Remove client_secret_file and certificate_file from account {acct:?}, or set 'Allow public client flows' to No in App registrations > {client} > Authentication."),
            ),
            true,
        ),
        Some(7000218) => (
            Advice::new(
                "The app is a confidential client, but the request carried no client secret or assertion (AADSTS7000218).".to_string(),
                format!("In App registrations > {client} > Authentication, set 'Allow public client flows' to Yes, or set client_secret_file (or certificate_file) on account {acct:?}."),
            ),
            true,
        ),
        _ if matches!(error, "invalid_grant" | "interaction_required" | "consent_required") => {
            relogin(format!(
                "Entra no longer accepts the stored sign-in ({error}{}).",
                code.map(|c| format!(", AADSTS{c}")).unwrap_or_default()
            ))
        }
        _ => advise(code, error, ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegated_grant_failures_say_run_login() {
        let ctx = Context {
            account: "frontdesk",
            tenant: "contoso.onmicrosoft.com",
            client_id: "abc",
            certificate: false,
        };
        for code in [700082, 50173, 70043, 50076, 65001] {
            let (adv, config) = advise_delegated(Some(code), "invalid_grant", &ctx);
            assert!(config, "{code} pauses the account");
            assert!(
                adv.fix.contains("exorelay login --account frontdesk"),
                "{code}: {adv}"
            );
            assert!(adv.cause.contains(&code.to_string()), "{code}: {adv}");
        }
        let (adv, _) = advise_delegated(None, "invalid_grant", &ctx);
        assert!(adv.fix.contains("exorelay login --account frontdesk"));
        let (_, config) = advise_delegated(None, "temporarily_unavailable", &ctx);
        assert!(!config, "a passing fault is retried, not paused");
        let adv = not_signed_in(
            "frontdesk",
            std::path::Path::new("/s/frontdesk.refresh-token"),
            None,
        );
        assert!(adv.fix.contains("exorelay login --account frontdesk"));
        assert!(adv.cause.contains("/s/frontdesk.refresh-token"));
    }

    #[test]
    fn codes_map_to_fixes() {
        let ctx = Context {
            account: "contoso",
            tenant: "contoso.onmicrosoft.com",
            client_id: "abc",
            certificate: false,
        };
        let (adv, cfg) = advise(Some(7000215), "invalid_client", &ctx);
        assert!(cfg);
        assert!(adv.fix.contains("Value (not the Secret ID)"));
        let (adv, _) = advise(Some(65001), "invalid_grant", &ctx);
        assert!(adv.fix.contains("SMTP.SendAsApp"));
        let (_, cfg) = advise(None, "temporarily_unavailable", &ctx);
        assert!(!cfg);
        assert!(
            advise(Some(900382), "invalid_request", &ctx)
                .0
                .fix
                .contains("cloud = \"usgov\"")
        );
        assert!(
            advise(Some(7000229), "invalid_client", &ctx)
                .0
                .fix
                .contains("New-MgServicePrincipal -AppId abc")
        );
        assert!(
            advise(Some(1000502), "invalid_client", &ctx)
                .0
                .fix
                .contains("certificate_file")
        );
        assert!(
            advise(Some(7000112), "unauthorized_client", &ctx)
                .0
                .fix
                .contains("Enterprise applications")
        );
        assert!(
            advise(Some(500011), "invalid_resource", &ctx)
                .0
                .cause
                .contains("no Exchange Online")
        );
        for code in [
            7000222, 700016, 700027, 53003, 90002, 900023, 9001023, 50196, 7000229, 900382,
            1000502, 7000112, 500011, 530035,
        ] {
            let (adv, _) = advise(Some(code), "x", &ctx);
            assert!(
                adv.cause.contains(&code.to_string()) || code == 7000222,
                "{code}: {adv}"
            );
        }
    }
}
