//! What outlives a daemon: entries added at run time (CLI blocks and allows with their expiry
//! and comment) and the rate limiter's bans, saved in `state_dir` so that a restart, an upgrade
//! or a reboot keeps them. Writes go to a temporary file that is synced and then renamed over
//! the old one, so a crash leaves either the old state or the new, never half of one; each
//! change is also appended to a journal before the CLI hears of it (see `journal`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::BufWriter,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::journal::{Journal, replay_file};
use crate::{
    config::{Cidr, CidrMap, ListKind},
    fleet::{Change, FleetKey, FleetRecord, client::Outgoing},
    program::limiter::ActiveBan,
};

/// The state file's name inside `state_dir`.
const STATE_FILE: &str = "state.json";
/// Held (flock) by the running daemon, so that two daemons never share a state.
const LOCK_FILE: &str = "moat.lock";
/// Bumped when the file's layout changes incompatibly.
const STATE_VERSION: u32 = 1;
/// Write buffer: a state of a million entries is tens of megabytes.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a moat state file: {message}; fix or remove it")]
    Corrupt { path: PathBuf, message: String },
    #[error("another moat daemon holds {0}")]
    Locked(PathBuf),
}

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes the directory's entries (a rename, a new file) survive a crash.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// An entry added at run time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicEntry {
    /// `None`: until deleted.
    pub expires_at: Option<SystemTime>,
    /// Shared by the entries of one request: an import of a million entries keeps one copy.
    pub comment: Option<Arc<str>>,
    /// The node that published the entry to the fleet, when it is a fleet entry (this node's
    /// own name for what it shared): the bucket holds it, and its changes come from there.
    pub origin: Option<Arc<str>>,
}

/// Which terms (expiry and comment) an entry has: an index into `Dynamic::terms`. The entries
/// of one request share their terms, so an imported entry costs its CIDR and these four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TermsId(u32);

/// Terms that expire remember their entries while they have at most this many, so that a
/// small request expires without a walk over the lists; a larger one (an import with a TTL)
/// is found by one walk when it expires, and costs no index entry per CIDR until then.
const MEMBERS_KEPT: u32 = 1024;

/// Terms shared by `uses` entries (0: a free slot).
#[derive(Clone, Debug, Default)]
struct Terms {
    entry: DynamicEntry,
    uses: u32,
    /// The entries that use terms which expire, while they are at most [`MEMBERS_KEPT`];
    /// `None` once there were more.
    members: Option<Vec<(ListKind, Cidr)>>,
    /// The lists whose entries used the terms (bit `ListKind as u8`): an expiry walks only
    /// those.
    lists: u8,
}

type DynamicList = CidrMap<TermsId>;

/// The entries added at run time, per list, with an index of their expiries.
#[derive(Clone, Debug, Default)]
pub struct Dynamic {
    allowlist: DynamicList,
    blocklist: DynamicList,
    terms: Vec<Terms>,
    /// Slots of `terms` no entry uses.
    free: Vec<u32>,
    /// The terms given out last: the next entry of the same request shares them.
    recent: Option<TermsId>,
    /// The terms that expire, by expiry: the next expiry is the first. One key per request,
    /// not per entry (a key per entry cost about 80 bytes of memory each).
    expiries: BTreeSet<(SystemTime, TermsId)>,
    /// This node's changes not yet in the fleet's bucket, as of the last save: published first
    /// after a restart (a block made while the servers were away is not lost with the process).
    pub fleet_outbox: Vec<Outgoing>,
}

impl PartialEq for Dynamic {
    /// The same entries with the same terms, however the terms are stored.
    fn eq(&self, other: &Self) -> bool {
        ListKind::ALL
            .iter()
            .all(|&kind| self.entries(kind).eq(other.entries(kind)))
    }
}

impl Eq for Dynamic {}

impl Dynamic {
    fn list(&self, kind: ListKind) -> &DynamicList {
        match kind {
            ListKind::Allow => &self.allowlist,
            ListKind::Block => &self.blocklist,
        }
    }

    fn list_mut(&mut self, kind: ListKind) -> &mut DynamicList {
        match kind {
            ListKind::Allow => &mut self.allowlist,
            ListKind::Block => &mut self.blocklist,
        }
    }

    /// The entries of `kind`, in address order.
    pub fn entries(&self, kind: ListKind) -> impl Iterator<Item = (Cidr, &DynamicEntry)> {
        (self.list(kind).iter()).map(|(cidr, id)| (cidr, &self.terms[id.0 as usize].entry))
    }

    pub fn cidrs(&self, kind: ListKind) -> impl Iterator<Item = Cidr> + '_ {
        self.list(kind).keys()
    }

    pub fn get(&self, kind: ListKind, cidr: &Cidr) -> Option<&DynamicEntry> {
        let id = self.list(kind).get(cidr)?;
        Some(&self.terms[id.0 as usize].entry)
    }

    pub fn contains(&self, kind: ListKind, cidr: &Cidr) -> bool {
        self.list(kind).contains_key(cidr)
    }

    /// Adds or replaces an entry; returns the one it replaced.
    pub fn insert(
        &mut self,
        kind: ListKind,
        cidr: Cidr,
        entry: DynamicEntry,
    ) -> Option<DynamicEntry> {
        let id = self.terms_for(entry);
        self.join(id, kind, std::slice::from_ref(&cidr));
        let old = self.list_mut(kind).insert(cidr, id)?;
        Some(self.release(old, kind, &cidr))
    }

    /// Adds or replaces the entries of `cidrs`, which must be strictly in order, all with the
    /// same terms; returns how many it replaced.
    pub fn insert_all(&mut self, kind: ListKind, cidrs: &[Cidr], entry: DynamicEntry) -> usize {
        let Some(count) = u32::try_from(cidrs.len()).ok().filter(|n| *n > 0) else {
            return 0;
        };
        debug_assert!(
            cidrs.is_sorted_by(|a, b| a < b),
            "insert_all takes CIDRs in order"
        );
        let id = self.terms_for(entry);
        self.terms[id.0 as usize].uses += count - 1;
        self.join(id, kind, cidrs);
        let mut replaced = Vec::new();
        let list = self.list_mut(kind);
        list.upsert_sorted(cidrs.iter().map(|cidr| (*cidr, id)), |cidr, old| {
            replaced.push((cidr, old));
        });
        for (cidr, old) in &replaced {
            self.release(*old, kind, cidr);
        }
        replaced.len()
    }

    pub fn remove(&mut self, kind: ListKind, cidr: &Cidr) -> Option<DynamicEntry> {
        let old = self.list_mut(kind).remove(cidr)?;
        Some(self.release(old, kind, cidr))
    }

    /// The terms `entry` has, shared with the entries added just before when they are the
    /// same (the entries of one request are added one after the other).
    fn terms_for(&mut self, entry: DynamicEntry) -> TermsId {
        if let Some(id) = self.recent
            && let Some(recent) = self.terms.get_mut(id.0 as usize)
            && recent.uses > 0
            && recent.entry == entry
        {
            recent.uses += 1;
            return id;
        }
        let expires_at = entry.expires_at;
        let terms = Terms {
            members: expires_at.map(|_| Vec::new()),
            entry,
            uses: 1,
            lists: 0,
        };
        let id = match self.free.pop() {
            Some(slot) => {
                self.terms[slot as usize] = terms;
                TermsId(slot)
            }
            None => {
                self.terms.push(terms);
                TermsId(self.terms.len() as u32 - 1)
            }
        };
        if let Some(at) = expires_at {
            self.expiries.insert((at, id));
        }
        self.recent = Some(id);
        id
    }

    /// `cidrs` of `kind` now use `id`'s terms (counted in `uses` already): its members, while
    /// they are few.
    fn join(&mut self, id: TermsId, kind: ListKind, cidrs: &[Cidr]) {
        let terms = &mut self.terms[id.0 as usize];
        terms.lists |= 1 << kind as u8;
        if terms.uses > MEMBERS_KEPT {
            terms.members = None;
        } else if let Some(members) = &mut terms.members {
            members.extend(cidrs.iter().map(|cidr| (kind, *cidr)));
            debug_assert_eq!(members.len(), terms.uses as usize, "a member per use");
        }
    }

    /// The entry `cidr` of `kind` no longer uses `id`'s terms; returns them.
    fn release(&mut self, id: TermsId, kind: ListKind, cidr: &Cidr) -> DynamicEntry {
        let terms = &mut self.terms[id.0 as usize];
        terms.uses -= 1;
        if terms.uses > 0 {
            if let Some(members) = &mut terms.members
                && let Some(at) = members.iter().position(|m| *m == (kind, *cidr))
            {
                members.swap_remove(at);
                debug_assert_eq!(members.len(), terms.uses as usize, "a member per use");
            }
            return terms.entry.clone();
        }
        if let Some(at) = terms.entry.expires_at {
            self.expiries.remove(&(at, id));
        }
        terms.members = None;
        self.free.push(id.0);
        std::mem::take(&mut terms.entry)
    }

    /// The entries of `kind` that have expired at `now`, in address order. The terms that
    /// forgot their members are looked for in one walk over the list.
    pub fn expired(&self, kind: ListKind, now: SystemTime) -> Vec<Cidr> {
        let mut expired = Vec::new();
        let mut walk_for = Vec::new();
        for (_, id) in self.expiries.iter().take_while(|(at, _)| *at <= now) {
            let terms = &self.terms[id.0 as usize];
            match &terms.members {
                Some(members) => expired.extend(
                    (members.iter())
                        .filter(|(k, _)| *k == kind)
                        .map(|(_, cidr)| *cidr),
                ),
                None if terms.lists & (1 << kind as u8) != 0 => walk_for.push(*id),
                None => {}
            }
        }
        if !walk_for.is_empty() {
            walk_for.sort_unstable();
            expired.extend(
                (self.list(kind).iter())
                    .filter(|(_, id)| walk_for.binary_search(id).is_ok())
                    .map(|(cidr, _)| cidr),
            );
        }
        expired.sort_unstable();
        expired
    }

    /// How many entries of either list come from the fleet.
    pub fn fleet_entries(&self) -> u64 {
        self.terms
            .iter()
            .filter(|t| t.entry.origin.is_some())
            .map(|t| u64::from(t.uses))
            .sum()
    }

    /// The earliest expiry of any entry.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _)| *at)
    }
}

/// The file, as JSON.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StateFile<C = String> {
    version: u32,
    #[serde(default)]
    allowlist: Vec<EntryGroup<C>>,
    #[serde(default)]
    blocklist: Vec<EntryGroup<C>>,
    #[serde(default)]
    bans: Vec<BanRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    fleet_outbox: Vec<OutboxRecord>,
}

/// A change not yet published to the fleet.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct OutboxRecord {
    /// The bucket's key.
    key: String,
    /// The record's JSON for a put; null for a delete.
    value: Option<String>,
    /// JetStream's message id (a repeat within its window is dropped).
    id: String,
}

/// Entries that share an expiry and a comment (an import is one group): the file stays about
/// as small as the list itself.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EntryGroup<C = String> {
    /// RFC 3339, or null for no expiry.
    expires_at: Option<String>,
    comment: Option<String>,
    /// The fleet node that published them; absent for this node's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    cidrs: Vec<C>,
}

/// A CIDR written straight into the file, without a string of its own.
struct CidrText(Cidr);

impl Serialize for CidrText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BanRecord {
    source: String,
    expires_at: String,
}

pub fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(text).map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

/// The state directory of one daemon, locked for as long as this value lives.
pub struct StateStore {
    dir: PathBuf,
    journal: Journal,
    _lock: File,
}

impl StateStore {
    /// Creates `dir` (mode 0700) if needed and takes its lock.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(StateError::Locked(lock_path));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            journal: Journal::open(dir)?,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state with the journal's changes applied, without what expired by `now`;
    /// empty when nothing was saved yet.
    pub fn load(&self, now: SystemTime) -> Result<(Dynamic, Vec<ActiveBan>), StateError> {
        let (mut dynamic, bans) = self.load_state_file(now)?;
        // The sealed records (a save that did not finish), then the journal; a damaged file
        // is kept aside and the next one is still read.
        for path in self.journal.files() {
            match replay_file(&path, &mut dynamic, now) {
                Ok(0) => {}
                Ok(records) => info!(
                    records,
                    path = %path.display(),
                    "applied the journal's changes to the saved state"
                ),
                Err(StateError::Corrupt { path, message }) => {
                    let aside = self.set_aside_copy(&path)?;
                    self.journal.discard(&path)?;
                    damaged(&path, &aside, &message, "the changes it held are lost");
                }
                Err(e) => return Err(e),
            }
        }
        Ok((dynamic, bans))
    }

    /// Records a change in the journal, as the line `Record::line` made of it, synced: once
    /// this returns, the change survives a crash.
    pub fn record_line(&self, line: serde_json::Result<Vec<u8>>) -> Result<(), StateError> {
        self.journal.append_line(line)
    }

    /// The state file's state. A state file that cannot be read as one (truncated, edited, from
    /// another version) is kept aside under a new name, never deleted, and the previous state is
    /// used instead, with an error in the log.
    fn load_state_file(&self, now: SystemTime) -> Result<(Dynamic, Vec<ActiveBan>), StateError> {
        let current = self.path();
        match self.read(&current, now) {
            Ok(Some(state)) => return Ok(state),
            Ok(None) => {}
            Err(StateError::Corrupt { path, message }) => {
                let aside = self.set_aside(&path)?;
                damaged(&path, &aside, &message, "the previous state is used");
            }
            Err(e) => return Err(e),
        }
        let previous = previous_path(&self.dir);
        match self.read(&previous, now) {
            Ok(Some(state)) => {
                error!(
                    path = %previous.display(),
                    "restored the state saved before the last save: the last change may be lost"
                );
                Ok(state)
            }
            Ok(None) => Ok(Default::default()),
            Err(StateError::Corrupt { path, message }) => {
                let aside = self.set_aside(&path)?;
                damaged(&path, &aside, &message, "starting without saved entries");
                Ok(Default::default())
            }
            Err(e) => Err(e),
        }
    }

    /// The state in `path`; `None` when there is no such file.
    fn read(
        &self,
        path: &Path,
        now: SystemTime,
    ) -> Result<Option<(Dynamic, Vec<ActiveBan>)>, StateError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(StateError::Corrupt {
                    path: path.to_path_buf(),
                    message: "not UTF-8".into(),
                });
            }
            Err(e) => return Err(io(path)(e)),
        };
        decode(&text, now)
            .map(Some)
            .map_err(|message| StateError::Corrupt {
                path: path.to_path_buf(),
                message,
            })
    }

    /// Copies a damaged file that stays open (the journal) beside it; returns the copy's name.
    fn set_aside_copy(&self, path: &Path) -> Result<PathBuf, StateError> {
        let aside = self.aside_name(path);
        fs::copy(path, &aside).map_err(io(path))?;
        Ok(aside)
    }

    /// Renames a damaged file to `<name>.damaged-<unix seconds>` beside it; returns the new name.
    fn set_aside(&self, path: &Path) -> Result<PathBuf, StateError> {
        let aside = self.aside_name(path);
        fs::rename(path, &aside).map_err(io(path))?;
        Ok(aside)
    }

    /// A free name `<name>.damaged-<unix seconds>[.n]` beside `path`.
    fn aside_name(&self, path: &Path) -> PathBuf {
        let seconds = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = path
            .file_name()
            .map_or_else(|| STATE_FILE.into(), |n| n.to_string_lossy().into_owned());
        (0..)
            .map(|n| {
                let suffix = if n == 0 {
                    String::new()
                } else {
                    format!(".{n}")
                };
                self.dir.join(format!("{name}.damaged-{seconds}{suffix}"))
            })
            .find(|candidate| !candidate.exists())
            .unwrap_or_else(|| unreachable!("an unbounded range yields a free name"))
    }

    /// Replaces the saved state now (see [`StateWriter::write`]), and empties the journal.
    pub fn save(&self, dynamic: &Dynamic, bans: &[ActiveBan]) -> Result<(), StateError> {
        self.writer().write_file(dynamic, bans)?;
        // Everything the journal held is in the state file now.
        self.journal.clear()
    }

    /// Starts a save that runs away from the control thread: seals the journal's records,
    /// which the state about to be snapshot holds, and returns the writer. Until the writer
    /// is done, no other save may start.
    pub fn begin_save(&mut self) -> Result<StateWriter, StateError> {
        self.journal.seal()?;
        Ok(self.writer())
    }

    fn writer(&self) -> StateWriter {
        StateWriter {
            dir: self.dir.clone(),
        }
    }
}

/// Writes the state file of one state directory (see [`StateStore::begin_save`]).
pub struct StateWriter {
    dir: PathBuf,
}

impl StateWriter {
    /// A failure of this writer that no system call reported.
    pub fn failed(&self, why: &str) -> StateError {
        io(&self.dir.join(STATE_FILE))(std::io::Error::other(why))
    }

    /// Replaces the saved state, then drops the sealed journal records it now holds.
    pub fn write(&self, dynamic: &Dynamic, bans: &[ActiveBan]) -> Result<(), StateError> {
        self.write_file(dynamic, bans)?;
        Journal::release_sealed(&self.dir)
    }

    /// Replaces the state file: temporary file, fsync, rename, fsync of the directory.
    fn write_file(&self, dynamic: &Dynamic, bans: &[ActiveBan]) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let previous = previous_path(&self.dir);
        let temporary = self.dir.join(format!("{STATE_FILE}.tmp"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io(&temporary))?;
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
        serde_json::to_writer(&mut writer, &encode(dynamic, bans))
            .map_err(std::io::Error::from)
            .and_then(|()| writer.write_all(b"\n"))
            .map_err(io(&temporary))?;
        let file = writer
            .into_inner()
            .map_err(|e| io(&temporary)(e.into_error()))?;
        file.sync_all().map_err(io(&temporary))?;
        drop(file);
        // The state being replaced becomes the previous one (a crash between the two renames
        // leaves it there, and `load` finds it).
        match fs::rename(&path, previous) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        fs::rename(&temporary, &path).map_err(io(&path))?;
        sync_dir(&self.dir)
    }
}

/// The state saved before the last save, kept so that a damaged state file costs only the last
/// change.
fn previous_path(dir: &Path) -> PathBuf {
    dir.join(format!("{STATE_FILE}.prev"))
}

/// Logs a damaged file, where it was kept, and what follows from it.
fn damaged(path: &Path, aside: &Path, problem: &str, consequence: &str) {
    error!(
        path = %path.display(),
        kept_as = %aside.display(),
        problem,
        "{} is damaged; it is kept aside and {consequence}",
        path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
    );
}

fn encode<'a>(dynamic: &'a Dynamic, bans: &[ActiveBan]) -> StateFile<CidrText> {
    let groups = |kind: ListKind| {
        type Terms<'t> = (Option<SystemTime>, Option<&'t str>, Option<&'t str>);
        let mut groups: BTreeMap<Terms<'a>, Vec<CidrText>> = BTreeMap::new();
        for (cidr, entry) in dynamic.entries(kind) {
            groups
                .entry((
                    entry.expires_at,
                    entry.comment.as_deref(),
                    entry.origin.as_deref(),
                ))
                .or_default()
                .push(CidrText(cidr));
        }
        groups
            .into_iter()
            .map(|((expires_at, comment, origin), cidrs)| EntryGroup {
                expires_at: expires_at.map(format_time),
                comment: comment.map(str::to_string),
                origin: origin.map(str::to_string),
                cidrs,
            })
            .collect()
    };
    StateFile {
        version: STATE_VERSION,
        allowlist: groups(ListKind::Allow),
        blocklist: groups(ListKind::Block),
        bans: bans
            .iter()
            .map(|ban| BanRecord {
                source: ban.source.to_string(),
                expires_at: format_time(ban.expires_at),
            })
            .collect(),
        fleet_outbox: dynamic
            .fleet_outbox
            .iter()
            .map(|outgoing| {
                let key = outgoing.change.key();
                OutboxRecord {
                    key: key.encode(),
                    value: match &outgoing.change {
                        Change::Put(_, record) => {
                            Some(String::from_utf8_lossy(&record.encode(&key)).into_owned())
                        }
                        Change::Delete(_) => None,
                    },
                    id: outgoing.id.clone(),
                }
            })
            .collect(),
    }
}

/// A saved outbox record as the change it was.
fn outbox_change(record: OutboxRecord, now: SystemTime) -> Result<Outgoing, String> {
    let key = FleetKey::decode(&record.key).map_err(|e| format!("fleet outbox: {e}"))?;
    let change = match record.value {
        None => Change::Delete(key),
        Some(value) => Change::Put(
            key,
            FleetRecord::decode(&key, value.as_bytes(), now)
                .map_err(|e| format!("fleet outbox: {}: {e}", record.key))?,
        ),
    };
    Ok(Outgoing {
        change,
        id: record.id,
    })
}

fn decode(text: &str, now: SystemTime) -> Result<(Dynamic, Vec<ActiveBan>), String> {
    let file: StateFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if file.version != STATE_VERSION {
        return Err(format!(
            "version {} (this moat reads version {STATE_VERSION})",
            file.version
        ));
    }
    let mut dynamic = Dynamic::default();
    for (kind, groups) in [
        (ListKind::Allow, file.allowlist),
        (ListKind::Block, file.blocklist),
    ] {
        for group in groups {
            let expires_at = group.expires_at.as_deref().map(parse_time).transpose()?;
            if expires_at.is_some_and(|t| t <= now) {
                continue;
            }
            let comment: Option<Arc<str>> = group.comment.map(Arc::from);
            let origin: Option<Arc<str>> = group.origin.map(Arc::from);
            for cidr in group.cidrs {
                let entry = DynamicEntry {
                    expires_at,
                    comment: comment.clone(),
                    origin: origin.clone(),
                };
                dynamic.insert(kind, cidr.parse()?, entry);
            }
        }
    }
    let mut bans = Vec::new();
    for record in file.bans {
        let source = record
            .source
            .parse()
            .map_err(|_| format!("ban source {:?} is not an address", record.source))?;
        let expires_at = parse_time(&record.expires_at)?;
        if expires_at > now {
            bans.push(ActiveBan { source, expires_at });
        }
    }
    // A record that no longer reads (a clock stepped back past a far expiry) is not shared,
    // and costs nothing else.
    dynamic.fleet_outbox = file
        .fleet_outbox
        .into_iter()
        .filter_map(|record| {
            outbox_change(record, now)
                .inspect_err(|e| warn!(error = %e, "a saved fleet change is not published"))
                .ok()
        })
        .collect();
    Ok((dynamic, bans))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::daemon::journal::Record;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_survives_a_round_trip_and_expired_entries_are_dropped() {
        let dir = temp_dir("round-trip");
        let store = StateStore::open(&dir).expect("open");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut dynamic = Dynamic::default();
        dynamic.insert(
            ListKind::Block,
            "198.51.100.0/24".parse().expect("cidr"),
            DynamicEntry {
                expires_at: Some(now + Duration::from_secs(600)),
                comment: Some("scanner".into()),
                origin: Some("edge-b".into()),
            },
        );
        dynamic.insert(
            ListKind::Block,
            "203.0.113.9".parse().expect("cidr"),
            DynamicEntry {
                expires_at: Some(now - Duration::from_secs(1)),
                comment: None,
                origin: None,
            },
        );
        dynamic.insert(
            ListKind::Allow,
            "2001:db8::/32".parse().expect("cidr"),
            DynamicEntry::default(),
        );
        let bans = [
            ActiveBan {
                source: "192.0.2.1".parse().expect("addr"),
                expires_at: now + Duration::from_secs(60),
            },
            ActiveBan {
                source: "192.0.2.2".parse().expect("addr"),
                expires_at: now - Duration::from_secs(60),
            },
        ];
        store.save(&dynamic, &bans).expect("save");
        let (loaded, loaded_bans) = store.load(now).expect("load");
        assert_eq!(
            loaded.cidrs(ListKind::Block).count(),
            1,
            "the expired block is dropped"
        );
        assert!(
            loaded
                .entries(ListKind::Allow)
                .eq(dynamic.entries(ListKind::Allow))
        );
        assert_eq!(loaded.next_expiry(), Some(now + Duration::from_secs(600)));
        assert_eq!(
            loaded
                .entries(ListKind::Block)
                .next()
                .and_then(|(_, e)| e.comment.as_deref().map(str::to_string)),
            Some("scanner".to_string())
        );
        assert_eq!(loaded_bans, bans[..1]);
        assert!(!dir.join("state.json.tmp").exists());
        drop(store);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_entries_of_one_request_share_their_terms_and_free_them_when_gone() {
        let mut dynamic = Dynamic::default();
        let cidr = |i: u32| -> Cidr { format!("192.0.2.{i}/32").parse().expect("CIDR") };
        let imported = DynamicEntry {
            expires_at: None,
            comment: Some("feed".into()),
            origin: None,
        };
        for i in 0..100 {
            dynamic.insert(ListKind::Block, cidr(i), imported.clone());
        }
        assert_eq!(dynamic.terms.len(), 1, "one request, one set of terms");
        let later = DynamicEntry {
            expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 32)),
            comment: None,
            origin: None,
        };
        let replaced = dynamic.insert(ListKind::Block, cidr(5), later.clone());
        assert_eq!(replaced, Some(imported.clone()));
        assert_eq!(dynamic.get(ListKind::Block, &cidr(5)), Some(&later));
        assert_eq!(dynamic.get(ListKind::Block, &cidr(6)), Some(&imported));
        assert_eq!(dynamic.next_expiry(), later.expires_at);
        for i in 0..100 {
            dynamic.remove(ListKind::Block, &cidr(i));
        }
        assert_eq!(dynamic.free.len(), 2, "both sets of terms are free again");
        assert_eq!(dynamic.next_expiry(), None);
        for i in 0..10 {
            dynamic.insert(ListKind::Allow, cidr(i), later.clone());
        }
        assert_eq!(dynamic.terms.len(), 2, "a free slot is reused");
        assert_eq!(dynamic.free.len(), 1, "by all ten entries");
        assert!(dynamic.contains(ListKind::Allow, &cidr(1)));
        assert_eq!(dynamic, dynamic.clone());
    }

    #[test]
    fn expiries_are_indexed_per_request_and_found_when_due() {
        let mut dynamic = Dynamic::default();
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs);
        let expiring = |secs: u64| DynamicEntry {
            expires_at: Some(at(secs)),
            comment: None,
            origin: None,
        };
        let host = |i: u32| -> Cidr {
            std::net::Ipv4Addr::from(0x0a00_0000 + i)
                .to_string()
                .parse()
                .expect("CIDR")
        };
        // An import with a TTL: too many entries to remember, found by a walk.
        let imported: Vec<Cidr> = (0..2000).map(host).collect();
        assert_eq!(
            dynamic.insert_all(ListKind::Block, &imported, expiring(600)),
            0
        );
        // Small requests, one of them in both lists, and one inserted one by one.
        let single: Cidr = "192.0.2.1/32".parse().expect("CIDR");
        dynamic.insert(ListKind::Block, single, expiring(60));
        dynamic.insert(ListKind::Allow, single, expiring(60));
        for i in 5000..5010 {
            dynamic.insert(ListKind::Block, host(i), expiring(120));
        }
        // An imported entry made permanent, one taken by a small request, one deleted.
        dynamic.insert(ListKind::Block, host(5), DynamicEntry::default());
        dynamic.insert(ListKind::Block, host(6), expiring(60));
        dynamic.remove(ListKind::Block, &host(7));
        assert_eq!(
            dynamic.expiries.len(),
            4,
            "one key per request that expires"
        );
        let bulk = *dynamic.list(ListKind::Block).get(&host(0)).expect("held");
        assert!(dynamic.terms[bulk.0 as usize].members.is_none());

        assert_eq!(dynamic.next_expiry(), Some(at(60)));
        assert!(dynamic.expired(ListKind::Block, at(59)).is_empty());
        assert_eq!(
            dynamic.expired(ListKind::Block, at(60)),
            vec![host(6), single]
        );
        assert_eq!(dynamic.expired(ListKind::Allow, at(60)), vec![single]);
        let mut due: Vec<Cidr> = (0..2000)
            .chain(5000..5010)
            .filter(|i| ![5, 7].contains(i))
            .map(host)
            .collect();
        due.push(single);
        assert_eq!(dynamic.expired(ListKind::Block, at(600)), due);

        for cidr in dynamic.expired(ListKind::Block, at(120)) {
            dynamic.remove(ListKind::Block, &cidr);
        }
        let walked: Vec<Cidr> = (0..2000)
            .filter(|i| ![5, 6, 7].contains(i))
            .map(host)
            .collect();
        assert_eq!(
            dynamic.expired(ListKind::Block, at(600)),
            walked,
            "nothing removed is found again"
        );
        assert_eq!(dynamic.expired(ListKind::Allow, at(600)), vec![single]);
        assert_eq!(
            dynamic.next_expiry(),
            Some(at(60)),
            "the allowlist's entry is left"
        );
        dynamic.remove(ListKind::Allow, &single);
        assert_eq!(dynamic.next_expiry(), Some(at(600)));
        for cidr in dynamic.expired(ListKind::Block, at(600)) {
            dynamic.remove(ListKind::Block, &cidr);
        }
        assert_eq!(dynamic.next_expiry(), None);
        assert!(dynamic.expiries.is_empty());
        assert_eq!(
            dynamic.cidrs(ListKind::Block).collect::<Vec<_>>(),
            vec![host(5)],
            "only the permanent entry is left"
        );

        // The same entry twice in one request; then more entries of that request, one at a
        // time (as a load from the state file adds them), than it remembers.
        dynamic.insert(ListKind::Block, host(9000), expiring(300));
        dynamic.insert(ListKind::Block, host(9000), expiring(300));
        assert_eq!(dynamic.expired(ListKind::Block, at(300)), vec![host(9000)]);
        let loaded = 10_000..10_000 + MEMBERS_KEPT + 10;
        for i in loaded.clone() {
            dynamic.insert(ListKind::Block, host(i), expiring(300));
        }
        let id = *dynamic
            .list(ListKind::Block)
            .get(&host(9000))
            .expect("held");
        assert!(dynamic.terms[id.0 as usize].members.is_none());
        let due: Vec<Cidr> = std::iter::once(9000).chain(loaded).map(host).collect();
        assert_eq!(dynamic.expired(ListKind::Block, at(300)), due);
        assert!(dynamic.expired(ListKind::Allow, at(300)).is_empty());
        for cidr in &due {
            dynamic.remove(ListKind::Block, cidr);
        }
        assert!(dynamic.expiries.is_empty());
    }

    #[test]
    fn a_second_daemon_cannot_take_the_lock() {
        let dir = temp_dir("lock");
        let first = StateStore::open(&dir).expect("open");
        assert!(matches!(StateStore::open(&dir), Err(StateError::Locked(_))));
        drop(first);
        StateStore::open(&dir).expect("free again");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_damaged_file_is_kept_aside_and_the_previous_state_is_used() {
        let dir = temp_dir("damaged");
        let store = StateStore::open(&dir).expect("open");
        // Whole seconds: the file keeps RFC 3339 seconds.
        let later = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs()
                    + 3600,
            );
        let mut first = Dynamic::default();
        let entry = DynamicEntry {
            expires_at: Some(later),
            comment: None,
            origin: None,
        };
        first.insert(
            ListKind::Block,
            "192.0.2.1".parse().expect("cidr"),
            entry.clone(),
        );
        let mut second = first.clone();
        second.insert(ListKind::Block, "192.0.2.2".parse().expect("cidr"), entry);
        for text in [
            "{",
            "{\"version\": 9}",
            "{\"version\": 1, \"blocklist\": [{\"cidrs\": [\"10.0.0.1/8\"], \"expires_at\": null, \"comment\": null}]}",
            "{\"version\": 1, \"blocklist\": [{\"cidrs\": [], \"expires_at\": \"tomorrow\", \"comment\": null}]}",
            "{\"version\": 1, \"surprise\": 1}",
        ] {
            store.save(&first, &[]).expect("save");
            store.save(&second, &[]).expect("save");
            // Damaged: truncated mid-way, or anything that is not a state file.
            fs::write(store.path(), text).expect("write");
            let (loaded, _) = store.load(SystemTime::now()).expect(text);
            assert_eq!(loaded, first, "the previous state, for {text}");
            let aside: Vec<_> = fs::read_dir(&dir)
                .expect("list")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
                .collect();
            assert_eq!(aside.len(), 1, "{text}");
            assert_eq!(
                fs::read_to_string(aside[0].path()).expect("read"),
                text,
                "kept as it was"
            );
            fs::remove_file(aside[0].path()).expect("remove");
        }
        // A crash between the two renames of a save leaves only the previous state.
        store.save(&first, &[]).expect("save");
        store.save(&second, &[]).expect("save");
        fs::remove_file(store.path()).expect("remove");
        let (loaded, _) = store.load(SystemTime::now()).expect("load");
        assert_eq!(loaded, first);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn journalled_changes_survive_without_a_save_and_a_save_empties_the_journal() {
        let dir = temp_dir("journal");
        let store = StateStore::open(&dir).expect("open");
        let cidrs: Vec<Cidr> = ["192.0.2.1", "192.0.2.2"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        store
            .record_line(
                Record::add(ListKind::Block, &cidrs, None, Some("scan"), Some("edge-a")).line(),
            )
            .expect("journal");
        store
            .record_line(Record::del(ListKind::Block, &cidrs[..1]).line())
            .expect("journal");
        drop(store);
        // A crash: no save; the journal alone brings the changes back.
        let store = StateStore::open(&dir).expect("open");
        let (loaded, _) = store.load(SystemTime::now()).expect("load");
        let blocked: Vec<String> = loaded
            .cidrs(ListKind::Block)
            .map(|cidr| cidr.to_string())
            .collect();
        assert_eq!(blocked, ["192.0.2.2/32"]);
        let shared = loaded.get(ListKind::Block, &cidrs[1]).expect("entry");
        assert_eq!(
            shared.origin.as_deref(),
            Some("edge-a"),
            "the fleet origin is kept"
        );
        assert_eq!(loaded.fleet_entries(), 1);
        // What the journal held may not have reached the fleet: it goes out again.
        let replayed: Vec<&Change> = loaded.fleet_outbox.iter().map(|o| &o.change).collect();
        assert!(
            matches!(replayed[..], [Change::Put(..), Change::Put(..), Change::Delete(key)] if key.cidr == cidrs[0]),
            "{replayed:?}"
        );

        // A crash mid-append leaves a torn last line: skipped, the rest applied.
        let journal = dir.join("state.journal");
        let mut text = fs::read_to_string(&journal).expect("journal");
        text.push_str("{\"add\": {\"list\": \"blockl");
        fs::write(&journal, &text).expect("write");
        let (loaded, _) = store.load(SystemTime::now()).expect("load");
        assert_eq!(loaded.cidrs(ListKind::Block).count(), 1);
        assert!(
            fs::read_to_string(&journal)
                .expect("journal")
                .ends_with('\n')
        );

        store.save(&loaded, &[]).expect("save");
        assert_eq!(fs::metadata(&journal).expect("journal").len(), 0);
        let (reloaded, _) = store.load(SystemTime::now()).expect("load");
        assert_eq!(reloaded, loaded);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// Journals the blocking of `text`, as a `block add` does.
    fn add(store: &StateStore, text: &str) {
        let cidr: Cidr = text.parse().expect("cidr");
        store
            .record_line(Record::add(ListKind::Block, &[cidr], None, None, None).line())
            .expect("journal");
    }

    /// What a start would block, from the state and the journal.
    fn blocked(store: &StateStore) -> Vec<String> {
        let (loaded, _) = store.load(SystemTime::now()).expect("load");
        loaded
            .cidrs(ListKind::Block)
            .map(|cidr| cidr.to_string())
            .collect()
    }

    #[test]
    fn a_save_in_the_background_seals_the_journal_and_nothing_recorded_meanwhile_is_lost() {
        let dir = temp_dir("sealed");
        let mut store = StateStore::open(&dir).expect("open");
        let cidr = |text: &str| -> Cidr { text.parse().expect("cidr") };
        add(&store, "192.0.2.1");
        add(&store, "192.0.2.2");
        let mut snapshot = Dynamic::default();
        for text in ["192.0.2.1", "192.0.2.2"] {
            snapshot.insert(ListKind::Block, cidr(text), DynamicEntry::default());
        }

        // The save starts; changes keep coming while it is written.
        let writer = store.begin_save().expect("seal");
        add(&store, "192.0.2.3");
        store
            .record_line(Record::del(ListKind::Block, &[cidr("192.0.2.1")]).line())
            .expect("journal");
        // A crash before the state file is written: the sealed records, then the new ones.
        assert_eq!(blocked(&store), ["192.0.2.2/32", "192.0.2.3/32"]);

        // That save failed; the next one seals what came since after what it sealed.
        let _failed = writer;
        let writer = store.begin_save().expect("seal again");
        add(&store, "192.0.2.4");
        assert_eq!(
            blocked(&store),
            ["192.0.2.2/32", "192.0.2.3/32", "192.0.2.4/32"]
        );
        snapshot.insert(ListKind::Block, cidr("192.0.2.3"), DynamicEntry::default());
        snapshot.remove(ListKind::Block, &cidr("192.0.2.1"));

        // Written: the sealed records go, the journal keeps the change made meanwhile.
        writer.write(&snapshot, &[]).expect("write");
        assert!(!dir.join(super::super::journal::SEALED_FILE).exists());
        assert_eq!(
            blocked(&store),
            ["192.0.2.2/32", "192.0.2.3/32", "192.0.2.4/32"]
        );
        let journal = fs::read_to_string(dir.join("state.journal")).expect("journal");
        assert_eq!(journal.lines().count(), 1, "{journal}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_damaged_sealed_file_is_kept_aside_and_the_records_after_it_still_count() {
        let dir = temp_dir("sealed-damaged");
        let mut store = StateStore::open(&dir).expect("open");
        let sealed = dir.join(super::super::journal::SEALED_FILE);

        // A torn last line in the sealed records (a crash while appending, before the seal):
        // a second seal keeps the whole lines only, with the journal's after them.
        add(&store, "192.0.2.1");
        let _failed = store.begin_save().expect("seal");
        let mut text = fs::read_to_string(&sealed).expect("sealed");
        text.push_str("{\"add\": {\"li");
        fs::write(&sealed, &text).expect("write");
        add(&store, "192.0.2.2");
        let _failed = store.begin_save().expect("seal again");
        assert!(
            fs::read_to_string(&sealed)
                .expect("sealed")
                .ends_with("}}\n")
        );
        add(&store, "192.0.2.3");
        assert_eq!(
            blocked(&store),
            ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"]
        );

        // A damaged line, even a whole one, is not a torn tail: the file is kept aside (what
        // came before the damage was applied), and the journal after it still counts.
        let mut text = fs::read_to_string(&sealed).expect("sealed");
        text.insert_str(
            0,
            "{\"add\": {\"list\": \"blocklist\", \"cidrs\": [\"192.0.2.300\"]}}\n",
        );
        fs::write(&sealed, &text).expect("write");
        assert_eq!(blocked(&store), ["192.0.2.3/32"]);
        assert!(!sealed.exists());
        let kept: Vec<_> = fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("state.journal.sealed.damaged-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
