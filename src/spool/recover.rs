//! Startup recovery: the spool's folders are read back after a stop or a crash and put in order.
//! Idempotent; never deletes anything that was acknowledged; whatever it cannot read, and every
//! queued body that fails its length/CRC32C check, is quarantined in `corrupt/` with a loud log
//! line, never deleted, never a panic.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

use super::VerifyError;
use super::{Area, Recovered, Spool, fsync_dir, is_queue_id};

impl Spool {
    /// Startup recovery. Idempotent; never deletes anything that was acknowledged.
    pub(super) fn recover(&self) -> io::Result<Recovered> {
        let mut out = Recovered::default();
        // Nothing in tmp/ was acknowledged: half-written messages become spares like the rest.
        let mut highest = 0;
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match name
                .strip_prefix("spare-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n) => {
                    highest = highest.max(n + 1);
                    let metadata = entry.metadata();
                    if metadata.as_ref().is_ok_and(|m| m.nlink() > 1) {
                        // Still linked in an area too (a rename a crash left half done on a
                        // file system without a journal): the inode belongs to that message.
                        std::fs::remove_file(entry.path())?;
                        continue;
                    }
                    self.spares.keep(entry.path(), metadata.map(|m| m.len()));
                }
                None => std::fs::remove_file(entry.path())?,
            }
        }
        self.spares.next.fetch_max(highest, Ordering::Relaxed);
        // What each area holds.
        let mut bodies: HashMap<Area, HashSet<String>> = HashMap::new();
        let mut metas: HashMap<Area, HashSet<String>> = HashMap::new();
        for area in Area::ALL {
            for entry in std::fs::read_dir(self.dir(area))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                match name.rsplit_once('.') {
                    Some((id, "eml")) if is_queue_id(id) => {
                        bodies.entry(area).or_default().insert(id.to_string());
                    }
                    Some((id, "json")) if is_queue_id(id) => {
                        metas.entry(area).or_default().insert(id.to_string());
                    }
                    _ => {
                        tracing::warn!(file = %entry.path().display(), "unexpected file in the spool; left alone")
                    }
                }
            }
        }
        let has = |m: &HashMap<Area, HashSet<String>>, a: Area, id: &str| {
            m.get(&a).is_some_and(|s| s.contains(id))
        };
        // 1. A meta in two areas (a crash inside `fail`): keep the one beside its body.
        for area in Area::ALL {
            let ids: Vec<String> = metas
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                let twin = Area::ALL
                    .into_iter()
                    .find(|b| *b != area && has(&metas, *b, &id));
                if let Some(b) = twin
                    && !has(&bodies, area, &id)
                    && has(&bodies, b, &id)
                {
                    std::fs::remove_file(self.dir(area).join(format!("{id}.json")))?;
                    if let Some(s) = metas.get_mut(&area) {
                        s.remove(&id);
                    }
                }
            }
        }
        // 2. Bodies follow their meta; a queue body without any meta was never acknowledged.
        for area in Area::ALL {
            let ids: Vec<String> = bodies
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                if has(&metas, area, &id) {
                    continue;
                }
                let name = format!("{id}.eml");
                if let Some(b) = Area::ALL.into_iter().find(|b| has(&metas, *b, &id)) {
                    std::fs::rename(self.dir(area).join(&name), self.dir(b).join(&name))?;
                    bodies.entry(b).or_default().insert(id.clone());
                } else if area == Area::Queue {
                    std::fs::remove_file(self.queue.join(&name))?;
                    out.removed += 1;
                } else {
                    tracing::error!(queue_id = %id, area = area.name(), "spool: body without meta; moved to corrupt/ for inspection");
                    self.quarantine(area, &name)?;
                    out.quarantined += 1;
                }
                if let Some(s) = bodies.get_mut(&area) {
                    s.remove(&id);
                }
            }
        }
        // 3. Metas must have a body and parse.
        for area in Area::ALL {
            let mut ids: Vec<String> = metas
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            ids.sort();
            for id in ids {
                if !has(&bodies, area, &id) {
                    tracing::error!(queue_id = %id, area = area.name(), "spool: meta file without its body; moved to corrupt/ for inspection");
                    self.quarantine(area, &format!("{id}.json"))?;
                    out.quarantined += 1;
                    continue;
                }
                let parsed = self
                    .load_in(area, &id)
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        if m.id == id {
                            Ok(m)
                        } else {
                            Err(format!("meta names ID {}", m.id))
                        }
                    });
                match parsed {
                    Ok(meta) if area == Area::Queue => match self.verify(&meta) {
                        Ok(()) => out.messages.push(meta),
                        Err(VerifyError::Corrupt(why)) => {
                            self.quarantine_corrupt(&meta, &why)?;
                            out.quarantined += 1;
                        }
                        // Not shown corrupt: it stays queued, and its delivery attempt checks again.
                        Err(VerifyError::Io(e)) => {
                            tracing::warn!(queue_id = %id, error = %e, "spool: cannot read a queued body to check it; left queued");
                            out.messages.push(meta);
                        }
                    },
                    Ok(_) => {}
                    Err(reason) => {
                        tracing::error!(queue_id = %id, area = area.name(), %reason, "spool: unreadable meta file; message moved to corrupt/ for inspection");
                        self.quarantine(area, &format!("{id}.json"))?;
                        self.quarantine(area, &format!("{id}.eml"))?;
                        out.quarantined += 1;
                    }
                }
            }
        }
        for area in Area::ALL {
            fsync_dir(self.dir(area))?;
        }
        Ok(out)
    }
}
