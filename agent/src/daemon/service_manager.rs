//! Telling systemd where the daemon is (the unit is `Type=notify`): ready once the program
//! enforces on every interface, reloading while a configuration is applied, stopping. So
//! `systemctl start moat` returns when moat protects, and fails when it cannot. Outside systemd
//! (no `NOTIFY_SOCKET`) each call does nothing.

use sd_notify::NotifyState;
use tracing::debug;

/// Ready, with the one-line status `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload has begun; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    // The service manager's bookkeeping, not the daemon's job: a failure is only worth a note.
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "telling systemd the daemon's state failed");
    }
}
