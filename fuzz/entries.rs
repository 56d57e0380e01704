//! The fuzz entry points (#13), one per target. Shared, through `#[path]`,
//! by the cargo-fuzz targets in `fuzz_targets/` and by the corpus replay
//! test in the main suite (`integration/fuzz_corpus.rs`), so a crash the
//! fuzzer finds and saves under `corpus/<target>/` fails the normal tests.
//!
//! Each function takes arbitrary bytes, must never panic, and checks the
//! invariants the agent relies on.

#![allow(dead_code)]

use std::path::Path;

use slipway::node::config::{AgentConfig, Overrides};
use slipway::node::{containerd, hostconfig};
use slipway::proxy::route::{self, Digest};

/// One fuzz entry point: arbitrary bytes in, a panic on a broken invariant.
pub type Entry = fn(&[u8]);

pub const TARGETS: [(&str, Entry); 4] = [
    ("route", route),
    ("hosts_merge", hosts_merge),
    ("containerd", containerd),
    ("agent_config", agent_config),
];

/// `METHOD\nPATH\nNS` (the `?ns=` value optional), through the proxy's
/// route classification. What is forwarded must be rebuilt from validated
/// parts: its upstream path classifies to the same route and holds nothing
/// a path could be steered with.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let ns = parts.next();
    let aliases = vec!["registry.shared-services:5000".to_string()];
    match route::classify(method, path, ns, &aliases) {
        Ok(r) => {
            assert!(method == "GET" || method == "HEAD", "{method:?} routed");
            let up = r.upstream_path();
            // A tag may hold "..", as in `v1..2`; a dot-segment may not.
            assert!(
                !up.split('/').any(|seg| seg == "." || seg == ".."),
                "upstream path {up:?} has a dot-segment"
            );
            for bad in ["//", "?", "#", "%", "\\", " "] {
                assert!(!up.contains(bad), "upstream path {up:?} contains {bad:?}");
            }
            let again = route::classify("GET", &up, None, &aliases)
                .unwrap_or_else(|e| panic!("upstream path {up:?} refused: {e:?}"));
            assert_eq!(again, r, "{up:?}");
            let _ = r.class().as_str();
        }
        Err(refusal) => {
            assert!((400..=499).contains(&refusal.status), "{refusal:?}");
            let body: serde_json::Value =
                serde_json::from_str(&refusal.body()).expect("refusal body is JSON");
            assert!(body["errors"][0]["code"].is_string());
        }
    }
    if let Some(d) = Digest::parse(&text) {
        assert_eq!(d.to_string(), text, "a digest prints as parsed");
    }
}

/// An administrator's hosts.toml, merged with our entries. A merge that
/// succeeds gives TOML that parses and still holds our proxy entry.
pub fn hosts_merge(data: &[u8]) {
    let Ok(original) = std::str::from_utf8(data) else {
        return;
    };
    let hosts = [
        hostconfig::HostEntry::proxy("http://127.0.0.1:5050"),
        hostconfig::HostEntry::upstream("https://registry.shared-services:5000"),
    ];
    match hostconfig::merge("hosts.toml", original, &hosts) {
        Ok(merged) => {
            hostconfig::parse_doc("hosts.toml", &merged)
                .unwrap_or_else(|e| panic!("merged text does not parse: {e}\n{merged}"));
            assert!(merged.contains("http://127.0.0.1:5050"), "{merged}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// containerd's config.toml, inspected as the agent does; a fix that is
/// planned must inspect as covered.
pub fn containerd(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let main = Path::new("/etc/containerd/config.toml");
    let certs = Path::new("/etc/containerd/certs.d");
    if let Ok(doc) = containerd::parse(main, text) {
        let _ = containerd::import_patterns(main, &doc);
    }
    let Ok(insp) = containerd::inspect((main, text), &[], certs) else {
        return;
    };
    let _ = insp.advice();
    if let Ok(Some(fixed)) = containerd::plan_fix(&insp, text) {
        let again = containerd::inspect((main, &fixed), &[], certs)
            .unwrap_or_else(|e| panic!("the fix does not inspect: {e}\n{fixed}"));
        assert!(again.covered, "the fix does not cover certs_dir:\n{fixed}");
    }
}

/// The agent's config file, with no overrides.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AgentConfig::from_str(
        Path::new("/etc/slipway/agent.toml"),
        text,
        &Overrides::default(),
    ) {
        Ok(c) => {
            assert!(!c.aliases.is_empty());
            assert!(c.cache_max_bytes > 0);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
