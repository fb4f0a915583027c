//! The spool's unit tests: commit, recovery, recycling, areas, integrity checks, the lock.

use super::spares::KEEP_STALE;
use super::writer::BUFFER;
use super::*;
use std::sync::Arc;

fn meta() -> Meta {
    Meta {
        version: meta::FORMAT_VERSION,
        id: String::new(),
        received_at: chrono::Utc::now(),
        account: "local".into(),
        mail_from: "a@b".into(),
        recipients: vec![Recipient {
            address: "c@d".into(),
            status: RecipientStatus::Pending,
            attempts: 0,
            last_reply: None,
            via: None,
        }],
        client: Client {
            ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            login: None,
            tls: false,
        },
        size: 0,
        crc32c: None,
        eight_bit: false,
        smtputf8: false,
        attempts: 0,
        next_attempt_at: None,
        requeued_at: None,
        deleted_at: None,
    }
}

#[tokio::test]
async fn commit_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
    assert!(rec.messages.is_empty());
    let spool = Arc::new(spool);
    let mut w = spool.create().await.unwrap();
    w.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
    let id = w.commit(&spool, meta()).await.unwrap();
    assert_eq!(spool.len(), 1);
    // A half-written message and an orphan body, as a crash would leave them.
    std::fs::write(dir.path().join("tmp").join("spare-77"), b"Subject: half").unwrap();
    std::fs::write(
        dir.path()
            .join("queue")
            .join(format!("{}.eml", new_queue_id())),
        b"x",
    )
    .unwrap();
    // Garbage meta for another message.
    let bad = new_queue_id();
    std::fs::write(dir.path().join("queue").join(format!("{bad}.eml")), b"x").unwrap();
    std::fs::write(
        dir.path().join("queue").join(format!("{bad}.json")),
        b"{garbage",
    )
    .unwrap();
    drop(spool);

    let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
    let spool = Arc::new(spool);
    assert_eq!(rec.messages.len(), 1);
    assert_eq!(rec.messages[0].id, id);
    assert_eq!(rec.messages[0].size, 20);
    assert_eq!(rec.removed, 1);
    assert_eq!(rec.quarantined, 1);
    assert!(
        dir.path()
            .join("corrupt")
            .join(format!("{bad}.json"))
            .exists()
    );
    assert_eq!(
        std::fs::read(spool.body_path(&id)).unwrap(),
        b"Subject: x\r\n\r\nbody\r\n"
    );
    // Only spare files are left in tmp/, and the half-written one is the next to be reused.
    for f in std::fs::read_dir(dir.path().join("tmp")).unwrap() {
        assert!(
            f.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("spare-")
        );
    }
    let mut w = spool.create().await.unwrap();
    w.write(b"x").await.unwrap();
    let next = w.commit(&spool, meta()).await.unwrap();
    assert_eq!(std::fs::read(spool.body_path(&next)).unwrap(), b"x");
}

async fn commit_body(spool: &Arc<Spool>, chunks: &[&[u8]]) -> String {
    let mut w = spool.create().await.unwrap();
    for c in chunks {
        w.write(c).await.unwrap();
    }
    w.commit(spool, meta()).await.unwrap()
}

fn spare_lengths(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn delivered_files_are_reused_and_cut_to_length() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let long = vec![b'L'; 5000];
    let id = commit_body(&spool, &[&long]).await;
    let body_inode = inode(&spool.body_path(&id));
    spool.remove(&id).unwrap();
    assert_eq!(spool.len(), 0);
    assert_eq!(spool.locate(&id), None);
    spool.spares.settle().unwrap();
    // Small spares keep their bytes (no blocks freed and reallocated)...
    let lengths = spare_lengths(dir.path());
    assert_eq!(lengths.len(), 2, "body and meta kept as spares");
    assert_eq!(lengths[1], 5000);
    // ...and the next messages overwrite those same files, cut to their own length.
    let id2 = commit_body(&spool, &[b"Subject: again\r\n", b"\r\nx\r\n"]).await;
    assert_eq!(
        std::fs::read(spool.body_path(&id2)).unwrap(),
        b"Subject: again\r\n\r\nx\r\n"
    );
    let new_inodes = [
        inode(&spool.body_path(&id2)),
        inode(&spool.dir(Area::Queue).join(format!("{id2}.json"))),
    ];
    assert!(
        new_inodes.contains(&body_inode),
        "the delivered body's inode is reused"
    );
    assert!(spare_lengths(dir.path()).is_empty());
    let meta2 = spool.load(&id2).unwrap();
    assert_eq!(meta2.size, 21);
    spool.remove(&id2).unwrap();

    // A large body streams through the file in pieces and is emptied when recycled.
    let chunk: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let id3 = commit_body(&spool, &[&chunk, &chunk, b"tail", &chunk[..10]]).await;
    let mut want = [&chunk[..], &chunk[..], b"tail", &chunk[..10]].concat();
    assert_eq!(std::fs::read(spool.body_path(&id3)).unwrap(), want);
    assert_eq!(spool.load(&id3).unwrap().size, want.len() as u64);
    spool.remove(&id3).unwrap();
    // Emptied once its removal is durable (not before: a crash could bring its name back).
    assert!(spare_lengths(dir.path()).iter().any(|l| *l > KEEP_STALE));
    assert_eq!(spool.spares.settle().unwrap(), 2);
    assert!(spare_lengths(dir.path()).iter().all(|l| *l <= KEEP_STALE));
    // A body larger than the buffer written into a spare holding shorter stale bytes.
    want.truncate(BUFFER + 7);
    let id4 = commit_body(&spool, &[&want[..BUFFER - 1], &want[BUFFER - 1..]]).await;
    assert_eq!(std::fs::read(spool.body_path(&id4)).unwrap(), want);
}

#[tokio::test]
async fn aborted_messages_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let mut small = spool.create().await.unwrap();
    small.write(b"Subject: never\r\n").await.unwrap();
    small.abort().await;
    assert!(
        spare_lengths(dir.path()).is_empty(),
        "a small body never reached a file"
    );
    let mut big = spool.create().await.unwrap();
    big.write(&vec![b'b'; BUFFER + 1]).await.unwrap();
    big.abort().await;
    assert_eq!(
        spare_lengths(dir.path()),
        vec![0],
        "emptied and kept as a spare"
    );
    assert!(spool.ids(Area::Queue).unwrap().is_empty());
}

/// A fresh spool in a temporary folder holding one committed message.
async fn spool_with_one_message() -> (tempfile::TempDir, Arc<Spool>, String) {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), 10).unwrap();
    let spool = Arc::new(spool);
    let w = spool.create().await.unwrap();
    let id = w.commit(&spool, meta()).await.unwrap();
    (dir, spool, id)
}

#[tokio::test]
async fn moves_between_areas_survive_a_crash_halfway() {
    let (dir, spool, id) = spool_with_one_message().await;
    spool
        .move_message(&id, Area::Queue, Area::Hold, None)
        .unwrap();
    assert_eq!(spool.locate(&id), Some(Area::Hold));
    assert_eq!(spool.len(), 0);
    // Simulate a crash in the middle of a release: meta moved back, body not yet.
    std::fs::rename(
        dir.path().join(format!("hold/{id}.json")),
        dir.path().join(format!("queue/{id}.json")),
    )
    .unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
    assert_eq!(
        rec.messages.len(),
        1,
        "the meta decides where the message is"
    );
    assert!(spool.body_path(&id).exists());
    assert_eq!(spool.len(), 1);
    assert!(id_time(&id).is_some_and(|t| (chrono::Utc::now() - t).num_seconds() < 60));
}

#[tokio::test]
async fn full_spool_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), 1).unwrap();
    let spool = Arc::new(spool);
    let w = spool.create().await.unwrap();
    w.commit(&spool, meta()).await.unwrap();
    assert!(matches!(spool.create().await, Err(SpoolError::Full(1))));
}

/// Commits `body` and returns the message's ID and its meta as the spool wrote it.
async fn commit_with(spool: &Arc<Spool>, body: &[u8]) -> (String, Meta) {
    let mut w = spool.create().await.unwrap();
    w.write(body).await.unwrap();
    let id = w.commit(spool, meta()).await.unwrap();
    let m = spool.load(&id).unwrap();
    (id, m)
}

fn corrupt_has(dir: &Path, id: &str) -> bool {
    dir.join("corrupt").join(format!("{id}.json")).exists()
        && dir.join("corrupt").join(format!("{id}.eml")).exists()
}

#[tokio::test]
async fn meta_records_length_and_crc_of_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let big: Vec<u8> = (0..=255u8).cycle().take(BUFFER * 2 + 5).collect();
    let (_, m) = commit_with(&spool, &big).await;
    assert_eq!(m.size, big.len() as u64);
    assert_eq!(m.crc32c, Some(crc32c::crc32c(&big)));
    assert!(matches!(
        spool.check_before_delivery(&m).await,
        Checked::Sound
    ));
}

#[tokio::test]
async fn a_body_holding_other_bytes_is_quarantined_and_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let (id, m) = commit_with(&spool, b"Subject: for alice\r\n\r\nsecret A\r\n").await;
    // Another message's bytes, same length: only the CRC can tell.
    std::fs::write(
        spool.body_path(&id),
        b"Subject: for bobby\r\n\r\nsecret B\r\n",
    )
    .unwrap();
    match spool.check_before_delivery(&m).await {
        Checked::Quarantined(Corruption::Checksum { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(corrupt_has(dir.path(), &id));
    assert_eq!(spool.locate(&id), None, "out of every area");
    assert_eq!(spool.len(), 0);
}

#[tokio::test]
async fn a_body_of_the_wrong_length_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let (id, m) = commit_with(&spool, b"Subject: x\r\n\r\nbody\r\n").await;
    std::fs::write(spool.body_path(&id), b"Subject: x\r\n\r\nbody\r\nmore").unwrap();
    match spool.check_before_delivery(&m).await {
        Checked::Quarantined(Corruption::Length {
            recorded: 20,
            found: 24,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(corrupt_has(dir.path(), &id));
}

/// After a power cut, queue/A.eml can hold B's bytes: recovery finds it and keeps it from
/// being delivered; B is untouched.
#[tokio::test]
async fn recovery_quarantines_bodies_that_fail_their_check() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let (a, _) = commit_with(&spool, b"Subject: A\r\n\r\nfor alice\r\n").await;
    let (b, _) = commit_with(&spool, b"Subject: B\r\n\r\nfor bobby\r\n").await;
    std::fs::copy(spool.body_path(&b), spool.body_path(&a)).unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
    let ids: Vec<&str> = rec.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [b.as_str()]);
    assert_eq!(rec.quarantined, 1);
    assert!(corrupt_has(dir.path(), &a));
    assert_eq!(spool.len(), 1);
}

/// A meta written before checksums existed still loads and delivers: not checkable.
#[tokio::test]
async fn metas_from_an_older_spool_still_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let (id, _) = commit_with(&spool, b"Subject: old\r\n\r\nx\r\n").await;
    let path = spool.dir(Area::Queue).join(format!("{id}.json"));
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("crc32c").unwrap();
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    drop(spool);
    let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
    let spool = Arc::new(spool);
    assert_eq!(rec.messages.len(), 1);
    assert_eq!(rec.messages[0].crc32c, None);
    assert!(matches!(
        spool.check_before_delivery(&rec.messages[0]).await,
        Checked::Sound
    ));
}

/// A large write's last piece is still in flight when `write` returns (tokio runs file writes
/// on a blocking thread): `abort` must wait for it before the file is reused, or it lands in
/// the next message's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_waits_for_the_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    for round in 0..20 {
        let mut big = spool.create().await.unwrap();
        big.write(&vec![b'b'; 2 * 1024 * 1024]).await.unwrap();
        big.abort().await;
        let (id, _) = commit_with(&spool, b"Subject: next\r\n\r\nx\r\n").await;
        let body = std::fs::read(spool.body_path(&id)).unwrap();
        assert_eq!(
            body,
            b"Subject: next\r\n\r\nx\r\n",
            "round {round}: the aborted write landed in the next message ({} bytes)",
            body.len()
        );
        spool.remove(&id).unwrap();
    }
}

/// A delivered message's files are handed out again only once their removal is durable.
#[tokio::test]
async fn removed_files_are_reused_only_after_their_removal_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let files_of = |id: &str| {
        [
            inode(&spool.body_path(id)),
            inode(&spool.dir(Area::Queue).join(format!("{id}.json"))),
        ]
    };
    let (id, _) = commit_with(&spool, b"Subject: A\r\n\r\nx\r\n").await;
    let a = files_of(&id);
    spool.remove(&id).unwrap();
    assert_eq!(
        spool.spares.free_len(),
        0,
        "not free before queue/ is fsynced"
    );
    assert_eq!(spool.spare_files(), 2, "kept for reuse all the same");
    // A writer finding no free spare settles them (one fsync of queue/), as does the
    // publisher's fsync of each commit batch; then they are reused.
    let (id2, _) = commit_with(&spool, b"Subject: B\r\n\r\ny\r\n").await;
    let (id3, _) = commit_with(&spool, b"Subject: C\r\n\r\nz\r\n").await;
    let reused = [files_of(&id2), files_of(&id3)].concat();
    assert!(a.iter().all(|i| reused.contains(i)), "A's files reused");
    assert_eq!(
        std::fs::read(spool.body_path(&id2)).unwrap(),
        b"Subject: B\r\n\r\ny\r\n"
    );
    assert_eq!(
        std::fs::read(spool.body_path(&id3)).unwrap(),
        b"Subject: C\r\n\r\nz\r\n"
    );
}

#[tokio::test]
async fn a_second_spool_on_the_same_folder_is_refused_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = Spool::open(dir.path(), 10).unwrap();
    match Spool::open(dir.path(), 10) {
        Err(OpenError::Locked(locked)) => {
            assert_eq!(locked.pid, Some(std::process::id()));
            let text = locked.to_string();
            assert!(
                text.contains(&format!("PID {}", std::process::id())),
                "{text}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second spool opened on the same folder"),
    }
    drop(first);
    assert!(
        Spool::open(dir.path(), 10).is_ok(),
        "free again once closed"
    );
}

/// Deleted messages are kept `keep_deleted` from their deletion, not from their arrival.
#[tokio::test]
async fn deleted_messages_are_kept_from_their_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
    // A message that arrived ten days ago (IDs carry their arrival time).
    let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
    let id = format!("{:013X}0000", ten_days_ago.timestamp_micros());
    let mut m = meta();
    m.id = id.clone();
    m.received_at = ten_days_ago;
    std::fs::write(spool.body_in(Area::Hold, &id), b"x").unwrap();
    std::fs::write(spool.dir(Area::Hold).join(format!("{id}.json")), m.encode()).unwrap();
    spool
        .move_message(&id, Area::Hold, Area::Deleted, None)
        .unwrap();
    let week = std::time::Duration::from_secs(7 * 86400);
    assert_eq!(
        spool.prune_deleted(week),
        0,
        "deleted just now: kept a week"
    );
    assert_eq!(spool.locate(&id), Some(Area::Deleted));
    let deleted_at = spool
        .load_in(Area::Deleted, &id)
        .unwrap()
        .deleted_at
        .unwrap();
    let later = |days| deleted_at + chrono::Duration::days(days);
    assert_eq!(spool.prune_deleted_at(week, later(6)), 0);
    assert_eq!(spool.prune_deleted_at(week, later(8)), 1);
    assert_eq!(spool.locate(&id), None);
    assert!(!spool.body_in(Area::Deleted, &id).exists());
}

/// A message deleted by a version that did not record the time is kept `keep` from the
/// first prune that sees it.
#[tokio::test]
async fn deleted_messages_without_a_deletion_time_are_kept_from_now() {
    let (_dir, spool, id) = spool_with_one_message().await;
    spool
        .move_message(&id, Area::Queue, Area::Deleted, None)
        .unwrap();
    let mut m = spool.load_in(Area::Deleted, &id).unwrap();
    m.deleted_at = None;
    std::fs::write(
        spool.dir(Area::Deleted).join(format!("{id}.json")),
        m.encode(),
    )
    .unwrap();
    let now = chrono::Utc::now() + chrono::Duration::days(30);
    let keep = std::time::Duration::from_secs(86400);
    assert_eq!(spool.prune_deleted_at(keep, now), 0, "stamped, not pruned");
    assert_eq!(
        spool.prune_deleted_at(keep, now + chrono::Duration::hours(25)),
        1
    );
}

#[tokio::test]
async fn a_message_brought_back_from_deleted_is_no_longer_marked_deleted() {
    let (_dir, spool, id) = spool_with_one_message().await;
    spool
        .move_message(&id, Area::Queue, Area::Deleted, None)
        .unwrap();
    let m = spool.load_in(Area::Deleted, &id).unwrap();
    assert!(m.deleted_at.is_some());
    spool
        .move_message(&id, Area::Deleted, Area::Queue, Some(&m))
        .unwrap();
    assert_eq!(spool.load(&id).unwrap().deleted_at, None);
    assert_eq!(spool.len(), 1);
}
