//! The push accounts: an htpasswd file with bcrypt entries, the format
//! distribution's `auth.htpasswd` and `htpasswd -B` use (`user:$2y$…`).
//!
//! Reads `gateway.push_htpasswd`. Parsing is pure ([`Htpasswd::parse`]);
//! [`Verifier`] runs bcrypt on tokio's blocking pool and remembers a
//! successful check for [`CACHE_TTL`], because a push of many layers sends
//! one authenticated request per chunk and bcrypt at cost 10 takes ~70 ms
//! of a core each time (#10).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

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

    fn hash_of(&self, user: &str) -> Option<&str> {
        self.entries.get(user).map(String::as_str)
    }
}

/// How long a successful verification is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// Checks credentials against the current entries; the entries can be
/// replaced (the Secret volume updated) while requests are checked.
pub struct Verifier {
    entries: RwLock<Arc<Htpasswd>>,
    /// sha256(user, password, hash) → when it verified. The hash is in the
    /// key so that a changed entry invalidates the old password at once.
    ok: Mutex<HashMap<[u8; 32], Instant>>,
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
            ok: Mutex::new(HashMap::new()),
        }
    }

    /// Replace the entries; returns whether they changed.
    pub fn replace(&self, entries: Htpasswd) -> bool {
        let mut cur = self.entries.write().expect("htpasswd lock");
        if **cur == entries {
            return false;
        }
        *cur = Arc::new(entries);
        self.ok.lock().expect("cache lock").clear();
        true
    }

    /// Whether the credentials match an entry. bcrypt runs on the blocking
    /// pool, so a burst of pushes never stalls the relay's workers.
    pub async fn verify(&self, c: &Credentials) -> bool {
        let Some(hash) = self
            .entries
            .read()
            .expect("htpasswd lock")
            .hash_of(&c.user)
            .map(str::to_string)
        else {
            return false;
        };
        let key = cache_key(c, &hash);
        let now = Instant::now();
        {
            let mut ok = self.ok.lock().expect("cache lock");
            match ok.get(&key) {
                Some(t) if now.duration_since(*t) < CACHE_TTL => return true,
                Some(_) => {
                    ok.remove(&key);
                }
                None => {}
            }
        }
        let password = c.password.clone();
        let verified =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if verified {
            let mut ok = self.ok.lock().expect("cache lock");
            // Bounded: entries older than the TTL go whenever one is added.
            ok.retain(|_, t| now.duration_since(*t) < CACHE_TTL);
            ok.insert(key, now);
        }
        verified
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
        assert!(v.verify(&creds("push", "right")).await);
        assert!(!v.verify(&creds("push", "wrong")).await);
        assert!(!v.verify(&creds("other", "right")).await);
        assert_eq!(v.ok.lock().unwrap().len(), 1, "only a success is cached");
        assert!(v.verify(&creds("push", "right")).await, "from the cache");
        let h2 = bcrypt::hash("new", 4).unwrap();
        assert!(v.replace(Htpasswd::parse(p(), &format!("push:{h2}\n")).unwrap()));
        assert!(
            !v.verify(&creds("push", "right")).await,
            "old password is gone"
        );
        assert!(v.verify(&creds("push", "new")).await);
    }
}
