//! The push accounts: an htpasswd file with bcrypt entries, the format
//! distribution's `auth.htpasswd` and `htpasswd -B` use (`user:$2y$…`).
//!
//! Reads `gateway.push_htpasswd`. Parsing is pure ([`Htpasswd::parse`]),
//! and the one parser of the format: `pki ensure` checks the push Secret's
//! entry with it too. [`Verifier`] runs bcrypt on tokio's blocking pool,
//! one check at a time with a bounded queue, and remembers each result for
//! [`CACHE_TTL`]: a push of many layers sends one authenticated request per
//! chunk (#10), and a client guessing passwords must not be able to buy a
//! core's worth of bcrypt per request (#18 point 7). A full queue is
//! [`Check::Busy`], which the relay answers `503`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::guard::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("cannot read gateway.push_htpasswd file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway.push_htpasswd file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("gateway.push_htpasswd file {path}: no entries: every write would be refused")]
    Empty { path: PathBuf },
}

/// Parsed entries: user → bcrypt hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Htpasswd {
    entries: HashMap<String, String>,
}

impl Htpasswd {
    /// Parse the file's text. Blank lines and `#` comments are skipped;
    /// anything else must be `user:<bcrypt hash>` (`$2y$`, `$2b$`, `$2a$`:
    /// distribution accepts only bcrypt, so an MD5 or SHA entry would fail
    /// there too, and is refused here at start rather than at first push).
    pub fn parse(path: &Path, text: &str) -> Result<Htpasswd, HtpasswdError> {
        let mut entries = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| HtpasswdError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("not user:hash".into()))?;
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                return Err(bad(format!(
                    "user {user:?}: not a bcrypt hash (make one with htpasswd -B)"
                )));
            }
            bcrypt::HashParts::from_str(hash)
                .map_err(|e| bad(format!("user {user:?}: bad bcrypt hash: {e}")))?;
            if entries.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(bad(format!("user {user:?} is listed twice")));
            }
        }
        if entries.is_empty() {
            return Err(HtpasswdError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Htpasswd { entries })
    }

    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let bytes = super::read_input(path).map_err(|source| HtpasswdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Htpasswd::parse(path, &String::from_utf8_lossy(&bytes))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.entries.get(user).map(String::as_str)
    }

    /// The entry with the highest bcrypt cost (ties: the least user name,
    /// so the choice is stable): what an unknown user is checked against.
    fn costliest(&self) -> Option<&str> {
        self.entries
            .iter()
            .map(|(u, h)| (cost(h), std::cmp::Reverse(u), h))
            .max()
            .map(|(_, _, h)| h.as_str())
    }
}

/// The cost of a bcrypt hash already parsed by [`Htpasswd::parse`].
pub fn cost(hash: &str) -> u32 {
    bcrypt::HashParts::from_str(hash)
        .map(|p| p.get_cost())
        .unwrap_or(0)
}

/// How long a check's result is remembered. The result of bcrypt for one
/// password and one hash never changes, so the time only bounds memory; a
/// changed entry is a new key (the hash is part of it).
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Results remembered at most, successes and failures together. Past it a
/// new result is not remembered until old ones age out.
pub const REMEMBERED: usize = 16_384;
/// bcrypt checks that run at once (#18 point 7): 64 clients with a wrong
/// password had 64 checks on tokio's blocking pool, both cores at 100 % and
/// an honest push 14–20 times slower. One at a time bounds what any number
/// of clients can take to one core.
pub const CHECKS_AT_ONCE: usize = 1;
/// Checks that may wait for their turn; one more is answered "busy" at
/// once, so the queue is bounded.
pub const CHECKS_WAITING: usize = 256;
/// How long a check waits for its turn before it is answered "busy".
pub const CHECK_WAIT: Duration = Duration::from_secs(10);

/// What a credential check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The credentials match an entry.
    Verified,
    /// They match none (or name no user).
    Denied,
    /// Too many checks are waiting; nothing was decided.
    Busy,
}

/// Checks credentials against the current entries; the entries can be
/// replaced (the Secret volume updated) while requests are checked.
///
/// Against a guessing client (#18 point 7): a result is remembered, failure
/// or success, under sha256(user, password, hash), so repeating a wrong
/// password costs no bcrypt; at most [`CHECKS_AT_ONCE`] checks run, with
/// at most [`CHECKS_WAITING`] waiting; and a user name that is not in the
/// file is checked against an entry's hash anyway (then refused), so the
/// time of an answer does not tell which names exist.
pub struct Verifier {
    entries: RwLock<Arc<Htpasswd>>,
    remembered: Mutex<HashMap<[u8; 32], (bool, Instant)>>,
    /// Admission: [`CHECKS_AT_ONCE`] + [`CHECKS_WAITING`] permits.
    admitted: Arc<Semaphore>,
    /// The checks running: [`CHECKS_AT_ONCE`] permits, held by the blocking
    /// task itself, so a client that leaves mid-check frees no slot early.
    running: Arc<Semaphore>,
}

fn cache_key(c: &Credentials, hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [c.user.as_bytes(), c.password.as_bytes(), hash.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl Verifier {
    pub fn new(entries: Htpasswd) -> Verifier {
        Verifier {
            entries: RwLock::new(Arc::new(entries)),
            remembered: Mutex::new(HashMap::new()),
            admitted: Arc::new(Semaphore::new(CHECKS_AT_ONCE + CHECKS_WAITING)),
            running: Arc::new(Semaphore::new(CHECKS_AT_ONCE)),
        }
    }

    /// Replace the entries; returns whether they changed.
    pub fn replace(&self, entries: Htpasswd) -> bool {
        let mut cur = self.entries.write().expect("htpasswd lock");
        if **cur == entries {
            return false;
        }
        *cur = Arc::new(entries);
        self.remembered.lock().expect("cache lock").clear();
        true
    }

    /// Whether the credentials match an entry. bcrypt runs on the blocking
    /// pool, so checks never stall the relay's workers.
    pub async fn verify(&self, c: &Credentials) -> Check {
        let (hash, known) = {
            let entries = self.entries.read().expect("htpasswd lock");
            match entries.hash_of(&c.user) {
                Some(h) => (h.to_string(), true),
                // Parsing refuses an empty file, so there is an entry to
                // spend the same time on.
                None => match entries.costliest() {
                    Some(h) => (h.to_string(), false),
                    None => return Check::Denied,
                },
            }
        };
        let key = cache_key(c, &hash);
        if let Some(verified) = self.remembered(&key, Instant::now()) {
            return verdict(verified);
        }
        let Ok(admitted) = self.admitted.clone().try_acquire_owned() else {
            return Check::Busy;
        };
        let running =
            match tokio::time::timeout(CHECK_WAIT, self.running.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Check::Busy,
            };
        let password = c.password.clone();
        let matched = tokio::task::spawn_blocking(move || {
            let _permits = (admitted, running);
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        // Another user's password is not this user's.
        let verified = matched && known;
        self.remember(key, verified, Instant::now());
        verdict(verified)
    }

    fn remembered(&self, key: &[u8; 32], now: Instant) -> Option<bool> {
        let mut m = self.remembered.lock().expect("cache lock");
        match m.get(key) {
            Some((v, t)) if now.duration_since(*t) < CACHE_TTL => Some(*v),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], verified: bool, now: Instant) {
        let mut m = self.remembered.lock().expect("cache lock");
        if m.len() >= REMEMBERED {
            m.retain(|_, (_, t)| now.duration_since(*t) < CACHE_TTL);
            if m.len() >= REMEMBERED {
                return;
            }
        }
        m.insert(key, (verified, now));
    }
}

fn verdict(verified: bool) -> Check {
    if verified {
        Check::Verified
    } else {
        Check::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/slipway/push/htpasswd")
    }

    fn creds(user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn parses_bcrypt_entries_and_names_bad_lines() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let y = h.replacen("$2b$", "$2y$", 1);
        let text = format!("# push accounts\n\npush:{h}\nkaniko:{y}\n");
        assert_eq!(Htpasswd::parse(p(), &text).unwrap().len(), 2);
        for (text, why) in [
            ("push\n".to_string(), "line 1: not user:hash"),
            (
                "push:$apr1$abc$def\n".to_string(),
                "line 1: user \"push\": not a bcrypt hash",
            ),
            (format!("a:{h}\n:{h}\n"), "line 2: empty user name"),
            (
                format!("a:{h}\na:{h}\n"),
                "line 2: user \"a\" is listed twice",
            ),
            ("push:$2y$10$short\n".to_string(), "bad bcrypt hash"),
            ("# nothing\n".to_string(), "no entries"),
        ] {
            let e = Htpasswd::parse(p(), &text).unwrap_err().to_string();
            assert!(
                e.starts_with("gateway.push_htpasswd file /etc/slipway/push/htpasswd"),
                "{e}"
            );
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[tokio::test]
    async fn verifies_caches_and_forgets_a_replaced_entry() {
        let h = bcrypt::hash("right", 4).unwrap();
        let v = Verifier::new(Htpasswd::parse(p(), &format!("push:{h}\n")).unwrap());
        assert_eq!(v.verify(&creds("push", "right")).await, Check::Verified);
        assert_eq!(v.verify(&creds("push", "wrong")).await, Check::Denied);
        assert_eq!(v.verify(&creds("other", "right")).await, Check::Denied);
        assert_eq!(
            v.remembered.lock().unwrap().len(),
            3,
            "failures are remembered as successes are (#18 point 7)"
        );
        assert_eq!(v.verify(&creds("push", "right")).await, Check::Verified);
        let h2 = bcrypt::hash("new", 4).unwrap();
        assert!(v.replace(Htpasswd::parse(p(), &format!("push:{h2}\n")).unwrap()));
        assert_eq!(
            v.verify(&creds("push", "right")).await,
            Check::Denied,
            "old password is gone"
        );
        assert_eq!(v.verify(&creds("push", "new")).await, Check::Verified);
    }

    /// #18 point 7: a repeated wrong password costs no second bcrypt, and
    /// an unknown user costs one, as a known user does.
    #[tokio::test]
    async fn a_repeated_guess_is_answered_from_memory_and_an_unknown_user_costs_a_check() {
        let h = bcrypt::hash("right", 8).unwrap();
        let v = Verifier::new(Htpasswd::parse(p(), &format!("push:{h}\n")).unwrap());
        let timed = |c: Credentials| {
            let v = &v;
            async move {
                let t0 = Instant::now();
                let r = v.verify(&c).await;
                (r, t0.elapsed())
            }
        };
        let (r, first) = timed(creds("push", "wrong")).await;
        assert_eq!(r, Check::Denied);
        let (r, again) = timed(creds("push", "wrong")).await;
        assert_eq!(r, Check::Denied);
        assert!(again * 10 < first, "repeat {again:?} against {first:?}");
        let (r, unknown) = timed(creds("nobody", "right")).await;
        assert_eq!(r, Check::Denied, "another user's password is not theirs");
        assert!(
            unknown * 2 > first && unknown < first * 2,
            "unknown user {unknown:?} against known {first:?}"
        );
    }

    /// #18 point 7: with the one check slot and every waiting slot taken,
    /// a new check is answered busy at once instead of queueing without
    /// bound.
    #[tokio::test]
    async fn a_full_queue_answers_busy() {
        let h = bcrypt::hash("right", 4).unwrap();
        let v = Verifier::new(Htpasswd::parse(p(), &format!("push:{h}\n")).unwrap());
        let held = v
            .admitted
            .clone()
            .try_acquire_many_owned((CHECKS_AT_ONCE + CHECKS_WAITING) as u32)
            .unwrap();
        assert_eq!(v.verify(&creds("push", "right")).await, Check::Busy);
        drop(held);
        assert_eq!(v.verify(&creds("push", "right")).await, Check::Verified);
    }

    #[test]
    fn the_costliest_entry_is_the_stand_in_for_an_unknown_user() {
        let cheap = bcrypt::hash("a", 4).unwrap();
        let dear = bcrypt::hash("b", 6).unwrap();
        let h = Htpasswd::parse(p(), &format!("a:{cheap}\nb:{dear}\n")).unwrap();
        assert_eq!(h.costliest(), Some(dear.as_str()));
        assert_eq!(cost(&dear), 6);
    }
}
