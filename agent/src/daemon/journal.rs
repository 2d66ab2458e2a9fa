//! The journal: every change made at run time, appended and synced before the CLI is answered,
//! so that a change reported as saved survives a crash, and one that could not be saved is
//! reported as such. The state file is rewritten later, batched, away from the control thread:
//! as a save starts, the journal's records so far are sealed (moved to [`SEALED_FILE`]) while
//! new ones go to a fresh journal, and the sealed records are dropped once the state file holds
//! them. A start replays the sealed records, then the journal.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::state::{Dynamic, DynamicEntry, StateError, format_time, io, parse_time, sync_dir};
use crate::{
    config::{Cidr, ListKind},
    control::protocol::Cidrs,
    fleet::{Change, FleetKey, FleetRecord, client::Outgoing},
};

/// The journal's name inside `state_dir`.
pub const JOURNAL_FILE: &str = "state.journal";
/// The records a save in progress (or one that failed) covers, inside `state_dir`.
pub const SEALED_FILE: &str = "state.journal.sealed";

/// One change, as a line of JSON.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// Entries added (or updated) at run time.
    Add {
        list: ListKind,
        cidrs: Cidrs,
        /// RFC 3339, or null for no expiry.
        expires_at: Option<String>,
        comment: Option<String>,
        /// The fleet node the entries are shared as; absent for local ones.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// Entries deleted at run time.
    Del { list: ListKind, cidrs: Cidrs },
}

impl Record {
    /// The record as a journal line: encoding a million entries takes tens of milliseconds,
    /// which a caller may spend while it applies the change.
    pub fn line(&self) -> serde_json::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }

    pub fn add(
        list: ListKind,
        cidrs: &[Cidr],
        expires_at: Option<SystemTime>,
        comment: Option<&str>,
        origin: Option<&str>,
    ) -> Self {
        Self::Add {
            list,
            cidrs: Cidrs(cidrs.to_vec()),
            expires_at: expires_at.map(format_time),
            comment: comment.map(str::to_string),
            origin: origin.map(str::to_string),
        }
    }

    pub fn del(list: ListKind, cidrs: &[Cidr]) -> Self {
        Self::Del {
            list,
            cidrs: Cidrs(cidrs.to_vec()),
        }
    }

    /// Applies the record to `dynamic`, leaving out what expired by `now`. A change to the
    /// fleet's entries goes into the fleet's outbox too: the journal holds only what came after
    /// the last save, which may not have reached the bucket (published again, it lands the same).
    fn apply(self, dynamic: &mut Dynamic, now: SystemTime) -> Result<(), String> {
        match self {
            Self::Add {
                list,
                cidrs,
                expires_at,
                comment,
                origin,
            } => {
                let expires_at = expires_at.as_deref().map(parse_time).transpose()?;
                if expires_at.is_some_and(|at| at <= now) {
                    return Ok(());
                }
                // One copy of the terms for the record's entries, however many they are.
                let shared_comment: Option<Arc<str>> = comment.as_deref().map(Arc::from);
                let shared_origin: Option<Arc<str>> = origin.as_deref().map(Arc::from);
                for cidr in cidrs.0 {
                    if let Some(origin) = &origin {
                        let record = FleetRecord {
                            expires_at,
                            comment: comment.clone(),
                            origin: origin.clone(),
                        };
                        replayed(dynamic, Change::Put(FleetKey { list, cidr }, record), now);
                    }
                    let entry = DynamicEntry {
                        expires_at,
                        comment: shared_comment.clone(),
                        origin: shared_origin.clone(),
                    };
                    dynamic.insert(list, cidr, entry);
                }
            }
            Self::Del { list, cidrs } => {
                for cidr in cidrs.0 {
                    if dynamic
                        .remove(list, &cidr)
                        .is_some_and(|e| e.origin.is_some())
                    {
                        replayed(dynamic, Change::Delete(FleetKey { list, cidr }), now);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Adds a replayed fleet change to the outbox, with an id of its own.
fn replayed(dynamic: &mut Dynamic, change: Change, now: SystemTime) {
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("replay-{nanos:x}-{}", dynamic.fleet_outbox.len());
    dynamic.fleet_outbox.push(Outgoing { change, id });
}

/// The journal file, open for appending.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    sealed: PathBuf,
    file: File,
}

impl Journal {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(JOURNAL_FILE);
        Ok(Self {
            file: open_append(&path)?,
            sealed: dir.join(SEALED_FILE),
            dir: dir.to_path_buf(),
            path,
        })
    }

    /// Appends a record's line ([`Record::line`]) and syncs it to disk: once this returns, the
    /// change survives a crash.
    pub fn append_line(&self, line: serde_json::Result<Vec<u8>>) -> Result<(), StateError> {
        let line = line.map_err(|e| io(&self.path)(e.into()))?;
        (&self.file)
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                // A partial line is the torn tail `replay` skips; cut it now if possible.
                let _ = truncate_to_whole_lines(&self.file, &self.path);
                io(&self.path)(e)
            })
    }

    /// Seals the records so far, for a save that is about to snapshot what they changed; later
    /// records go to a fresh journal. Records sealed before (by a save that failed) stay
    /// sealed, these after them: both are written whole to a new file that replaces the sealed
    /// one (never appended in place, where a failure would leave half a line in its middle).
    /// A crash before the journal is emptied leaves its records in both files, replayed twice
    /// in a row, which changes nothing.
    pub fn seal(&mut self) -> Result<(), StateError> {
        if self.sealed.exists() {
            let mut records = whole_lines(read_or_empty(&self.sealed)?);
            records.extend(whole_lines(read_or_empty(&self.path)?));
            let temporary = self.dir.join(format!("{SEALED_FILE}.tmp"));
            write_synced(&temporary, &records)?;
            std::fs::rename(&temporary, &self.sealed).map_err(io(&self.sealed))?;
        } else {
            std::fs::rename(&self.path, &self.sealed).map_err(io(&self.path))?;
        }
        sync_dir(&self.dir)?;
        // Reopened by name whichever way it went: the records written so far are sealed.
        self.file = open_append(&self.path)?;
        self.truncate()?;
        sync_dir(&self.dir)
    }

    /// Drops the sealed records: the state file now holds everything they changed.
    pub fn release_sealed(dir: &Path) -> Result<(), StateError> {
        remove_if_present(&dir.join(SEALED_FILE))
    }

    /// Empties the journal, sealed records included: the state file now holds everything.
    pub fn clear(&self) -> Result<(), StateError> {
        remove_if_present(&self.sealed)?;
        self.truncate()
    }

    /// Drops the records of `path`, one of [`Self::files`] (found damaged and kept aside).
    pub fn discard(&self, path: &Path) -> Result<(), StateError> {
        if path == self.sealed {
            remove_if_present(&self.sealed)
        } else {
            self.truncate()
        }
    }

    fn truncate(&self) -> Result<(), StateError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path))
    }

    /// The files to replay, in order: the sealed records (when a save did not finish), then
    /// the journal.
    pub fn files(&self) -> Vec<PathBuf> {
        let sealed = self.sealed.exists().then(|| self.sealed.clone());
        sealed.into_iter().chain([self.path.clone()]).collect()
    }
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>, StateError> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        read => read.map_err(io(path)),
    }
}

/// `records` without a torn last line.
fn whole_lines(mut records: Vec<u8>) -> Vec<u8> {
    let whole = records
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    records.truncate(whole);
    records
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    (&file)
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(path))
}

fn remove_if_present(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

fn open_append(path: &Path) -> Result<File, StateError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

fn truncate_to_whole_lines(file: &File, path: &Path) -> std::io::Result<()> {
    let text = std::fs::read(path)?;
    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    file.set_len(whole as u64)
}

/// Applies the records of one of the journal's files; returns how many. A last line cut short
/// (a crash while appending: that change was never reported as saved) is skipped with a
/// warning; any other unreadable line, a whole one included, makes the file damaged.
pub fn replay_file(
    path: &Path,
    dynamic: &mut Dynamic,
    now: SystemTime,
) -> Result<usize, StateError> {
    let file = open_append(path)?;
    let reader = BufReader::new(&file);
    let lines: Vec<String> = reader.lines().collect::<Result<_, _>>().map_err(io(path))?;
    let mut applied = 0;
    for (number, line) in lines.iter().enumerate() {
        let last = number + 1 == lines.len();
        let record = match serde_json::from_str::<Record>(line) {
            Ok(record) => record,
            Err(e) if last && serde_json::from_str::<serde::de::IgnoredAny>(line).is_err() => {
                warn!(
                    path = %path.display(),
                    line = number + 1,
                    error = %e,
                    "skipping the journal's last line: cut short (it was never reported saved)"
                );
                // So that the next record starts a line of its own.
                truncate_to_whole_lines(&file, path).map_err(io(path))?;
                break;
            }
            Err(e) => {
                return Err(StateError::Corrupt {
                    path: path.to_path_buf(),
                    message: format!("line {}: {e}", number + 1),
                });
            }
        };
        record
            .apply(dynamic, now)
            .map_err(|message| StateError::Corrupt {
                path: path.to_path_buf(),
                message: format!("line {}: {message}", number + 1),
            })?;
        applied += 1;
    }
    Ok(applied)
}
