//! Pure inspection of CRI-O's `registries.conf.d/*.conf`
//! (containers-registries.conf(5), version 2).
//!
//! slipway writes only containerd configuration. On a CRI-O node it can
//! still say, per alias, which `[[registry]]` CRI-O would use and in which
//! order it would try its mirrors, so an operator can see what to add (a
//! `[[registry.mirror]]` and `/etc/containers/certs.d/H:P/ca.crt`; CRI-O
//! reloads on SIGHUP). Reads nothing itself.

use toml_edit::{DocumentMut, Item};

use crate::node::hostconfig::Alias;

/// CRI-O's drop-in directory (containers-registries.conf.d(5)), on the host.
pub const REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrioError {
    #[error("{path}: not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: registry[{index}] has no prefix or location")]
    NoPrefix { path: String, index: usize },
}

/// One `[[registry]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub prefix: String,
    pub location: String,
    pub insecure: bool,
    pub blocked: bool,
    /// `(location, insecure, pull-from-mirror)` in the order CRI-O tries them.
    pub mirrors: Vec<(String, bool, String)>,
}

pub fn parse(path: &str, text: &str) -> Result<Vec<Registry>, CrioError> {
    let doc: DocumentMut = text.parse().map_err(|e| CrioError::Parse {
        path: path.into(),
        message: crate::node::hostconfig::toml_error(text, &e),
    })?;
    let mut out = Vec::new();
    let Some(Item::ArrayOfTables(regs)) = doc.get("registry") else {
        return Ok(out);
    };
    for (index, r) in regs.iter().enumerate() {
        let location = r.get("location").and_then(Item::as_str).map(str::to_string);
        let prefix = r
            .get("prefix")
            .and_then(Item::as_str)
            .map(str::to_string)
            .or_else(|| location.clone())
            .ok_or(CrioError::NoPrefix {
                path: path.into(),
                index,
            })?;
        let flag =
            |t: &toml_edit::Table, k: &str| t.get(k).and_then(Item::as_bool).unwrap_or(false);
        let mirrors = match r.get("mirror") {
            Some(Item::ArrayOfTables(ms)) => ms
                .iter()
                .map(|m| {
                    (
                        m.get("location")
                            .and_then(Item::as_str)
                            .unwrap_or("")
                            .to_string(),
                        flag(m, "insecure"),
                        m.get("pull-from-mirror")
                            .and_then(Item::as_str)
                            .unwrap_or("all")
                            .to_string(),
                    )
                })
                .collect(),
            _ => vec![],
        };
        out.push(Registry {
            location: location.unwrap_or_else(|| prefix.clone()),
            prefix,
            insecure: flag(r, "insecure"),
            blocked: flag(r, "blocked"),
            mirrors,
        });
    }
    Ok(out)
}

/// The entry CRI-O uses for images under `alias`: the longest matching prefix.
pub fn entry_for<'a>(regs: &'a [Registry], alias: &Alias) -> Option<&'a Registry> {
    let name = alias.dir_name();
    regs.iter()
        .filter(|r| {
            name == r.prefix
                || name.starts_with(&format!("{}/", r.prefix))
                || r.prefix.starts_with(&format!("{name}/"))
        })
        .max_by_key(|r| r.prefix.len())
}

/// One line per alias describing what CRI-O would do.
pub fn report(regs: &[Registry], aliases: &[Alias]) -> String {
    let mut s = String::new();
    for a in aliases {
        match entry_for(regs, a) {
            None => s.push_str(&format!(
                "{a}: no [[registry]] entry; CRI-O pulls https://{a} directly (add a [[registry.mirror]] and /etc/containers/certs.d/{a}/ca.crt)\n"
            )),
            Some(r) => {
                let mut order: Vec<String> = r
                    .mirrors
                    .iter()
                    .map(|(l, insecure, mode)| {
                        format!("{l} ({}{})", if *insecure { "insecure" } else { "tls" }, if mode == "all" { String::new() } else { format!(", {mode}") })
                    })
                    .collect();
                order.push(format!("{} ({})", r.location, if r.insecure { "insecure" } else { "tls" }));
                s.push_str(&format!(
                    "{a}: prefix {:?}{}, tries {}\n",
                    r.prefix,
                    if r.blocked { " BLOCKED" } else { "" },
                    order.join(", then ")
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_and_mirror_order() {
        let t = "[[registry]]\nprefix = \"r:5000\"\nlocation = \"r:5000\"\n[[registry.mirror]]\nlocation = \"127.0.0.1:5050\"\ninsecure = true\n";
        let regs = parse("x", t).unwrap();
        let a = Alias::parse("r:5000").unwrap();
        assert_eq!(
            report(&regs, &[a]),
            "r:5000: prefix \"r:5000\", tries 127.0.0.1:5050 (insecure), then r:5000 (tls)\n"
        );
        assert!(parse("x", "[[registry]\n").is_err());
    }
}
