//! The `capture` account kind: each message becomes `<ID>.eml` (the spooled bytes) and
//! `<ID>.json` (envelope, client, login) in a folder. Both are written under a temporary name,
//! fsynced and renamed, so a reader never sees half a file; the `.json` appears last. Files are
//! keyed by queue ID, so a repeated attempt after a crash replaces rather than duplicates.
//! Files get mode 0640 and a folder created here 0750, whatever the umask: readable by the
//! relay's group (a mail-reading tool), by no one else.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Attempt, BoxFuture, Job, Outcome, Upstream};
use crate::spool::{Client, Meta};

/// Mode of captured files and of a capture folder created by the relay.
const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o750;

pub struct Capture {
    dir: PathBuf,
}

#[derive(Serialize)]
struct Record<'a> {
    queue_id: &'a str,
    account: &'a str,
    received_at: String,
    mail_from: &'a str,
    recipients: &'a [String],
    client: &'a Client,
    size: u64,
    eight_bit: bool,
    smtputf8: bool,
}

impl Capture {
    pub fn new(dir: PathBuf) -> io::Result<Capture> {
        let created = !dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .and_then(|()| {
                // A folder the administrator made keeps the mode they gave it.
                if created {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(DIR_MODE))
                } else {
                    Ok(())
                }
            })
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(Capture { dir })
    }

    /// A new file at `path` (replacing a leftover one) with [`FILE_MODE`].
    fn create(path: &Path) -> io::Result<std::fs::File> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(path)?;
        // The umask may have taken bits away, and a leftover file may have had another mode.
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        Ok(f)
    }

    fn write(dir: &Path, meta: &Meta, body: &Path, recipients: &[String]) -> io::Result<()> {
        let id = &meta.id;
        let eml_tmp = dir.join(format!(".{id}.eml.tmp"));
        let mut eml = Self::create(&eml_tmp)?;
        io::copy(&mut std::fs::File::open(body)?, &mut eml)?;
        eml.sync_all()?;
        std::fs::rename(&eml_tmp, dir.join(format!("{id}.eml")))?;

        let record = Record {
            queue_id: id,
            account: &meta.account,
            received_at: meta.received_at.to_rfc3339(),
            mail_from: &meta.mail_from,
            recipients,
            client: &meta.client,
            size: meta.size,
            eight_bit: meta.eight_bit,
            smtputf8: meta.smtputf8,
        };
        let json = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        let json_tmp = dir.join(format!(".{id}.json.tmp"));
        let mut f = Self::create(&json_tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&json_tmp, dir.join(format!("{id}.json")))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Upstream for Capture {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let (dir, meta, body, rcpts) = (
                self.dir.clone(),
                job.meta.clone(),
                job.body.clone(),
                job.recipients.clone(),
            );
            let n = rcpts.len();
            let result =
                tokio::task::spawn_blocking(move || Capture::write(&dir, &meta, &body, &rcpts))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
            let outcome = match result {
                Ok(()) => Outcome::Delivered(format!("captured into {}", self.dir.display())),
                Err(e) => Outcome::Temporary(format!(
                    "cannot write into capture folder {}: {e}",
                    self.dir.display()
                )),
            };
            Attempt::all(n, outcome)
        })
    }
}
