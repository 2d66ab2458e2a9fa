//! Tests that load the machine (floods at the generator's full speed, very large requests) take
//! this lock, so that two of them never run beside each other in one test binary: their
//! measurements would be of each other.

use std::sync::{Mutex, MutexGuard, PoisonError};

static HEAVY: Mutex<()> = Mutex::new(());

/// Held for as long as the calling test loads the machine.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}
