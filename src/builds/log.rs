//! Pure: reads Kaniko's log, line by line, into what the progress line and
//! the result show: the stage being built (by its Dockerfile name), `STEP
//! n/m`, cache hits and the steps rebuilt, cache layer uploads apart from the
//! image push, retries, cache upload failures, and Kaniko's final error,
//! classified ([`ErrorClass`]).
//!
//! The lines it understands are Kaniko's own (`pkg/executor/build.go`,
//! `push.go` and `cmd/executor/main.go` of the maintained fork, checked
//! against real v1.27.6 output in `integration/fixtures/kaniko-v1.27.6/`),
//! in its `color` format (`INFO[0001] message`, with ANSI colour codes,
//! which are stripped), its `text` format (`time=… level=info msg="…"`) and
//! `json` format:
//!
//! | message | meaning |
//! | --- | --- |
//! | `Building stage 'golang:1.22' [idx: '0', base-idx: '-1']` | a stage starts; Kaniko names it by its base image, the plan by `AS name` |
//! | `RUN go build ./...` (any Dockerfile instruction) | a step starts: n += 1 |
//! | `Using caching version of cmd: RUN …` | cache hit |
//! | `No cached layer found for cmd RUN …` | cache miss: logged for the first miss of a stage only (Kaniko stops looking), so the steps rebuilt are counted from the steps, see [`KanikoLog::rebuilt`] |
//! | `Found cached layer, extracting to filesystem` | the step just started came from the cache |
//! | `Pushing layer REG/cache/NAME:KEY to cache now` | a built layer is queued for the cache |
//! | `Pushing image to REG/cache/NAME:KEY` | that cache layer uploads (the same words as the image push) |
//! | `Retrying operation after 1s due to POST …: cause` (WARN) | `--push-retry` retries a registry request |
//! | `Error uploading layer to cache: …` (WARN) | a layer was built but not cached: the next build rebuilds it |
//! | `Pushing image to REG/NAME:TAG`, `Pushed REG/NAME@sha256:…` | the image push |
//! | `error building image: …`, `error checking push permissions: …` (no level) | the final error, Kaniko's last line |
//!
//! m, and the stage names, come from the build plan Kaniko prints before
//! building when `KANIKO_PRINT_PLAN=1` (unprefixed lines: `FROM … [AS
//! name]`, then one line per instruction it will run, `PUSH`, `CLEAN` …):
//! the number of instruction lines in it. Without a plan (another executor
//! version), the progress line shows `STEP n` and the base image names.

/// Dockerfile instructions as Kaniko prints them at the start of a step.
/// FROM is not among them: Kaniko announces a stage with "Building stage".
const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

/// One log line, split into its level (if it is one of Kaniko's own lines)
/// and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub level: Option<Level>,
    pub message: String,
    /// Seconds since Kaniko started, from the color format's `[0024]`.
    pub secs: Option<u32>,
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn level_of(s: &str) -> Option<Level> {
    Some(match s.to_ascii_lowercase().as_str() {
        "trac" | "trace" => Level::Trace,
        "debu" | "debug" => Level::Debug,
        "info" => Level::Info,
        "warn" | "warning" => Level::Warn,
        "erro" | "error" => Level::Error,
        "fata" | "fatal" | "pani" | "panic" => Level::Fatal,
        _ => return None,
    })
}

/// Splits a raw log line (colour codes and all).
pub fn parse_line(raw: &str) -> Line {
    let s = strip_ansi(raw.trim_end_matches(['\r', '\n']));
    // color format: INFO[0001] message
    if s.len() > 5 && s.as_bytes()[4] == b'[' {
        if let (Some(level), Some(close)) = (level_of(&s[..4]), s.find(']')) {
            return Line {
                level: Some(level),
                message: s[close + 1..].trim_start().to_string(),
                secs: s[5..close].parse().ok(),
            };
        }
    }
    // json format
    if s.starts_with('{') {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(&s) {
            if let (Some(l), Some(msg)) = (
                m.get("level").and_then(|v| v.as_str()),
                m.get("msg").and_then(|v| v.as_str()),
            ) {
                return Line {
                    level: level_of(l),
                    message: msg.to_string(),
                    secs: None,
                };
            }
        }
    }
    // text format: time="…" level=info msg="…"
    if let (Some(l), Some(m)) = (s.find("level="), s.find("msg=")) {
        let level = s[l + 6..].split_whitespace().next().and_then(level_of);
        if level.is_some() {
            return Line {
                level,
                message: logfmt_value(&s[m + 4..]),
                secs: None,
            };
        }
    }
    Line {
        level: None,
        message: s,
        secs: None,
    }
}

/// The value at the start of `s` in logfmt: a quoted string (with `\"` and
/// `\\` escapes) or a bare word.
fn logfmt_value(s: &str) -> String {
    let Some(rest) = s.strip_prefix('"') else {
        return s.split_whitespace().next().unwrap_or("").to_string();
    };
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    out
}

/// The instruction a message starts with, if any (`RUN go build` → `RUN`).
pub fn instruction(message: &str) -> Option<&'static str> {
    let word = message.split(' ').next()?;
    INSTRUCTIONS.iter().copied().find(|i| *i == word)
}

/// A `Retrying operation after Ns due to OP: CAUSE` warning (Kaniko's
/// `--push-retry`, `util.Retry` with a doubling wait from 1 s).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retry {
    /// The wait before the next attempt, as Kaniko prints it (`1s`).
    pub after: String,
    /// The request retried (`POST https://…/v2/cache/app/blobs/uploads/`).
    pub operation: String,
    /// What went wrong the last time.
    pub cause: String,
    /// Whether it is a cache layer upload (the cache repository's API), not
    /// the image push.
    pub cache: bool,
}

/// A cache layer Kaniko built but could not upload (`Error uploading layer
/// to cache`): the build goes on, the next build misses that layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheUploadFailure {
    /// `REG/cache/NAME:KEY`, when Kaniko names it.
    pub target: Option<String>,
    pub detail: String,
    /// `Retrying operation` lines for the cache repository since the
    /// previous cache upload ended.
    pub retries: u32,
    /// Seconds from `Pushing image to TARGET` to the failure, from Kaniko's
    /// `[secs]` stamps (color and text formats).
    pub seconds: Option<u32>,
}

/// What Kaniko's final error says went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// A step (RUN) of the Dockerfile failed.
    StepFailed {
        /// The instruction running when it failed (`RUN make`).
        step: Option<String>,
        /// `exit status N` of the step's process.
        exit_code: Option<i32>,
    },
    /// A base image (`FROM`) could not be pulled: absent or not allowed.
    BaseImage { unauthorized: bool },
    /// The image could not be pushed: the registry refused the credentials
    /// (`denied`), or failed or could not be reached.
    Push { denied: bool },
    /// A cache layer upload failed: a warning, never the build's failure.
    CacheUploadFailed,
    /// Anything else.
    Other,
}

pub fn denied_text(lower: &str) -> bool {
    [
        "unauthorized",
        "denied",
        "authentication required",
        "status code 401",
        "status code 403",
        "401 unauthorized",
        "403 forbidden",
    ]
    .iter()
    .any(|n| lower.contains(n))
}

/// Classifies Kaniko's final error line; `step` is the instruction that was
/// running. The texts are those of the maintained fork: `error checking push
/// permissions: …` (push.go, before the build), `failed to push to
/// destination …` (push.go), `error building stage: failed to execute
/// command: waiting for process to exit: exit status N` (build.go), and
/// go-containerregistry's `MANIFEST_UNKNOWN`/`NAME_UNKNOWN`/`UNAUTHORIZED`
/// for a base image.
pub fn classify_error(line: &str, step: Option<&str>) -> ErrorClass {
    let lower = line.to_ascii_lowercase();
    if lower.contains("error uploading layer to cache") {
        return ErrorClass::CacheUploadFailed;
    }
    if lower.contains("checking push permission")
        || lower.contains("failed to push to destination")
        || lower.contains("error pushing image")
    {
        return ErrorClass::Push {
            denied: denied_text(&lower),
        };
    }
    if lower.contains("failed to execute command") || lower.contains("waiting for process to exit")
    {
        let exit_code = lower
            .rsplit("exit status ")
            .next()
            .filter(|_| lower.contains("exit status "))
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok());
        return ErrorClass::StepFailed {
            step: step.map(String::from),
            exit_code,
        };
    }
    let pulling = [
        "retriev",
        "base image",
        "/manifests/",
        "getting image",
        "resolving base",
    ]
    .iter()
    .any(|n| lower.contains(n));
    let absent = ["manifest unknown", "name unknown", "not found"]
        .iter()
        .any(|n| lower.contains(n));
    if pulling && (absent || denied_text(&lower)) {
        return ErrorClass::BaseImage {
            unauthorized: denied_text(&lower) && !absent,
        };
    }
    ErrorClass::Other
}

/// Kaniko's last words before it exits non-zero. The maintained fork prints
/// them without a level (`error building image: …`, `error checking push
/// permissions: …`, from `cmd/executor/main.go`), older releases as
/// `ERRO[…]`/`FATA[…]` lines.
pub fn is_final_error(line: &Line) -> bool {
    match line.level {
        Some(Level::Error | Level::Fatal) => true,
        Some(_) => false,
        None => {
            let m = line.message.trim_start();
            (m.starts_with("error ") || m.starts_with("Error: ")) && m.contains(": ")
        }
    }
}

/// What one line meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The plan is complete: m instructions in this many stages.
    Plan {
        steps: u32,
        stages: u32,
    },
    Stage {
        /// The Dockerfile's name for the stage (`FROM … AS name`), else its
        /// base image.
        name: String,
        index: u32,
    },
    Step {
        n: u32,
        command: String,
    },
    CacheHit(String),
    CacheMiss(String),
    /// `Pushing image to <cache repo>:<key>`: the n-th of the m cache
    /// layers queued so far starts uploading.
    CacheUpload {
        n: u32,
        m: u32,
        target: String,
    },
    /// `Error uploading layer to cache`: a warning to show.
    CacheUploadFailed(CacheUploadFailure),
    Retry(Retry),
    /// The final image push starts.
    Pushing(String),
    Pushed(String),
    Warning(String),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum PlanState {
    #[default]
    NotSeen,
    Reading,
    Done,
}

/// Lines kept for the failure summary when Kaniko is killed mid-build.
pub const TAIL_LINES: usize = 20;

/// Running state of one Kaniko log.
#[derive(Debug, Clone, Default)]
pub struct KanikoLog {
    plan: PlanState,
    plan_steps: u32,
    plan_stages: u32,
    /// Stage names in build order, from the plan's `FROM … [AS name]`.
    plan_stage_names: Vec<String>,
    stages_started: usize,
    pub total: Option<u32>,
    pub stage: Option<String>,
    pub step: u32,
    pub command: Option<String>,
    /// Cache lookups that found the layer.
    pub cache_hits: u32,
    /// Cache lookups that missed. Kaniko stops looking after the first
    /// miss of a stage, so this is at most one per stage; see `rebuilt`.
    pub cache_misses: u32,
    /// Steps known to have made their layer by running (RUN, COPY, ADD not
    /// served from the cache); see [`KanikoLog::rebuilt`].
    ran: u32,
    /// The current step makes a layer, and Kaniko has not said (yet) that
    /// it extracted a cached one: settled by the next step, stage or push.
    step_pending: bool,
    /// `Pushing layer <target> to cache now`, in order.
    cache_targets: Vec<String>,
    cache_uploads: u32,
    /// Cache uploads that ended (pushed or failed).
    cache_uploads_done: u32,
    /// When each cache upload started (`[secs]`).
    upload_started: Vec<(String, Option<u32>)>,
    /// A cache upload started and has not ended: a retry that names no
    /// repository (the registry ping) is one of its retries.
    cache_upload_in_flight: bool,
    cache_retries: u32,
    pub cache_upload_failures: Vec<CacheUploadFailure>,
    pub retries: Vec<Retry>,
    pub pushing: Option<String>,
    pub pushed: Option<String>,
    /// Error lines, the final one included.
    pub errors: Vec<String>,
    /// The last line Kaniko prints before it fails.
    pub final_error: Option<String>,
    /// The last [`TAIL_LINES`] non-empty lines, colour codes removed.
    pub tail: std::collections::VecDeque<String>,
    building: bool,
}

/// `REG/a/b:key` or `REG/a/b@sha256:…` → `REG/a/b`.
fn repo_of(target: &str) -> &str {
    let t = target.split('@').next().unwrap_or(target);
    match t.rfind(':') {
        Some(i) if !t[i..].contains('/') => &t[..i],
        _ => t,
    }
}

/// The registry API prefix of a repository: `REG/a/b` → `REG/v2/a/b/`.
fn api_prefix(repo: &str) -> Option<String> {
    let (host, path) = repo.split_once('/')?;
    Some(format!("{host}/v2/{path}/"))
}

impl KanikoLog {
    /// Reads one raw line; returns what it meant, if anything.
    pub fn feed(&mut self, raw: &str) -> Option<Event> {
        let line = parse_line(raw);
        let msg = line.message.trim_end().to_string();
        if !msg.trim().is_empty() {
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(msg.clone());
        }
        if is_final_error(&line) {
            self.errors.push(msg.clone());
            self.final_error = Some(msg.clone());
            return Some(Event::Error(msg));
        }
        let Some(level) = line.level else {
            return self.plan_line(&msg);
        };
        if self.plan == PlanState::Reading {
            // The first log line after the plan ends it.
            self.plan = PlanState::Done;
            self.total = Some(self.plan_steps);
        }
        match level {
            Level::Warn => return Some(self.warning(&msg, line.secs)),
            Level::Info => {}
            Level::Error | Level::Fatal | Level::Debug | Level::Trace => return None,
        }
        if let Some(rest) = msg.strip_prefix("Building stage '") {
            let base = rest.split('\'').next().unwrap_or("").to_string();
            let index = rest
                .split("[idx: '")
                .nth(1)
                .and_then(|r| r.split('\'').next())
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            // Kaniko names a stage by its base image; the plan, printed in
            // build order, has the Dockerfile's names (`FROM … AS build`).
            let name = self
                .plan_stage_names
                .get(self.stages_started)
                .cloned()
                .unwrap_or(base);
            self.stages_started += 1;
            self.building = true;
            self.settle();
            self.stage = Some(name.clone());
            return Some(Event::Stage { name, index });
        }
        // Before the first stage Kaniko only resolves images; with
        // FF_KANIKO_CACHE_LOOKAHEAD it also looks the cache up once ahead
        // (and again per stage), which must not count twice.
        if !self.building {
            return None;
        }
        if let Some(cmd) = msg.strip_prefix("Using caching version of cmd:") {
            let cmd = cmd.trim();
            // Kaniko v1.27 caches WORKDIR too (`Using caching version of
            // cmd: WORKDIR /src`), but a cold build never counts it as
            // rebuilt, so hits + rebuilt would differ between a cold and a
            // warm build of one Dockerfile. Only the steps that make a layer
            // of files count, as the README says (#19).
            if !matches!(instruction(cmd), Some("RUN" | "COPY" | "ADD")) {
                return None;
            }
            self.cache_hits += 1;
            return Some(Event::CacheHit(cmd.to_string()));
        }
        if let Some(cmd) = msg.strip_prefix("No cached layer found for cmd") {
            self.cache_misses += 1;
            return Some(Event::CacheMiss(cmd.trim().to_string()));
        }
        if msg.starts_with("Found cached layer, extracting to filesystem") {
            // The step that just started was served from the cache.
            self.step_pending = false;
            return None;
        }
        if let Some(rest) = msg.strip_prefix("Pushing layer ") {
            // A layer to cache: the step that made it ran.
            self.settle();
            if let Some(target) = rest.strip_suffix(" to cache now") {
                self.cache_targets.push(target.trim().to_string());
            }
            return None;
        }
        if let Some(dest) = msg.strip_prefix("Pushing image to ") {
            let dest = dest.trim().to_string();
            // Kaniko pushes each cache layer as an image of its own, with the
            // same message as the final push.
            if self.cache_targets.contains(&dest) {
                self.cache_uploads += 1;
                self.upload_started.push((dest.clone(), line.secs));
                self.cache_upload_in_flight = true;
                return Some(Event::CacheUpload {
                    n: self.cache_uploads,
                    m: self.cache_targets.len() as u32,
                    target: dest,
                });
            }
            self.settle();
            self.cache_upload_in_flight = false;
            self.pushing = Some(dest.clone());
            return Some(Event::Pushing(dest));
        }
        if let Some(r) = msg.strip_prefix("Pushed ") {
            let r = r.trim().to_string();
            if self.is_cache_repo(repo_of(&r)) {
                self.cache_retries = 0;
                self.cache_upload_in_flight = false;
                self.cache_uploads_done += 1;
                return None;
            }
            self.pushed = Some(r.clone());
            return Some(Event::Pushed(r));
        }
        if let Some(i) = instruction(&msg) {
            self.settle();
            self.step += 1;
            self.command = Some(msg.clone());
            self.step_pending = matches!(i, "RUN" | "COPY" | "ADD");
            return Some(Event::Step {
                n: self.step,
                command: msg,
            });
        }
        None
    }

    fn settle(&mut self) {
        if std::mem::take(&mut self.step_pending) {
            self.ran += 1;
        }
    }

    /// Steps that made their layer by running (RUN, COPY, ADD not served
    /// from the cache): what the cache did not save. Counted per step, not
    /// from Kaniko's "No cached layer found", which it logs only for the
    /// first miss of each stage. A step still running counts.
    pub fn rebuilt(&self) -> u32 {
        self.ran + u32::from(self.step_pending)
    }

    fn is_cache_repo(&self, repo: &str) -> bool {
        self.cache_targets.iter().any(|t| repo_of(t) == repo)
    }

    fn warning(&mut self, msg: &str, secs: Option<u32>) -> Event {
        if let Some(rest) = msg.strip_prefix("Retrying operation after ") {
            let (after, rest) = rest.split_once(" due to ").unwrap_or((rest, ""));
            let (operation, cause) = rest.split_once(": ").unwrap_or((rest, ""));
            // Before each push go-containerregistry pings the registry
            // (`Get "https://HOST/v2/"`), which names no repository: with the
            // registry down, every retry is of that ping (#19, the test
            // cluster's `fail-registry-down`). It belongs to the push under way.
            let ping = operation.trim().trim_matches('"').ends_with("/v2/");
            let cache = if ping {
                self.cache_upload_in_flight
            } else {
                self.cache_targets
                    .iter()
                    .filter_map(|t| api_prefix(repo_of(t)))
                    .any(|p| operation.contains(&p))
            };
            if cache {
                self.cache_retries += 1;
            }
            let r = Retry {
                after: after.trim().to_string(),
                operation: operation.trim().to_string(),
                cause: cause.trim().to_string(),
                cache,
            };
            self.retries.push(r.clone());
            return Event::Retry(r);
        }
        if let Some(rest) = msg.strip_prefix("Error uploading layer to cache:") {
            let detail = rest.trim().to_string();
            let target = detail
                .strip_prefix("failed to push to destination ")
                .and_then(|r| r.split(": ").next())
                .map(String::from);
            let started = target.as_ref().and_then(|t| {
                self.upload_started
                    .iter()
                    .rev()
                    .find(|(d, _)| d == t)
                    .and_then(|(_, s)| *s)
            });
            let f = CacheUploadFailure {
                target,
                detail,
                retries: std::mem::take(&mut self.cache_retries),
                seconds: match (started, secs) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                    _ => None,
                },
            };
            self.cache_uploads_done += 1;
            self.cache_upload_in_flight = false;
            self.cache_upload_failures.push(f.clone());
            return Event::CacheUploadFailed(f);
        }
        Event::Warning(msg.to_string())
    }

    fn plan_line(&mut self, msg: &str) -> Option<Event> {
        match self.plan {
            PlanState::NotSeen if !self.building && msg.starts_with("FROM ") => {
                self.plan = PlanState::Reading;
                self.plan_stages = 1;
                self.plan_stage_names.push(stage_name(msg));
                None
            }
            PlanState::Reading => {
                if msg.starts_with("FROM ") {
                    self.plan_stages += 1;
                    self.plan_stage_names.push(stage_name(msg));
                } else if instruction(msg).is_some() {
                    self.plan_steps += 1;
                } else if msg.starts_with("PUSH") && self.plan_stages > 0 {
                    // PUSH follows the last instruction of the final stage.
                    self.plan = PlanState::Done;
                    self.total = Some(self.plan_steps);
                    return Some(Event::Plan {
                        steps: self.plan_steps,
                        stages: self.plan_stages,
                    });
                }
                None
            }
            _ => None,
        }
    }

    /// The class of Kaniko's final error, if it printed one.
    pub fn failure(&self) -> Option<ErrorClass> {
        let e = self.final_error.as_deref()?;
        Some(classify_error(e, self.command.as_deref()))
    }

    /// `STEP n/m` (or `STEP n` without a plan).
    pub fn step_text(&self) -> String {
        match self.total {
            Some(m) => format!("STEP {}/{m}", self.step),
            None => format!("STEP {}", self.step),
        }
    }

    /// The progress line: stage, step, current command, cache uploads and
    /// cache counts; `pushing IMAGE` once the final push has started.
    pub fn status(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.pushing {
            s.push_str(&format!("pushing {p}"));
        } else {
            if let Some(stage) = &self.stage {
                s.push_str(&format!("stage {stage} "));
            }
            s.push_str(&self.step_text());
            if let Some(c) = &self.command {
                s.push(' ');
                s.push_str(&truncate(c, 60));
            }
            // While a cache layer uploads; Kaniko does it beside the next
            // steps, so the step stays the main information.
            if self.cache_uploads > self.cache_uploads_done {
                s.push_str(&format!(
                    " | caching layer {}/{}",
                    self.cache_uploads,
                    self.cache_targets.len()
                ));
            }
        }
        s.push_str(&format!(
            " | cache: {} hit, {} rebuilt",
            self.cache_hits, self.ran
        ));
        if !self.cache_upload_failures.is_empty() {
            s.push_str(&format!(
                ", {} upload failed",
                self.cache_upload_failures.len()
            ));
        }
        s
    }
}

/// `FROM image AS name` → `name`; `FROM image` → `image`.
fn stage_name(from: &str) -> String {
    let words: Vec<&str> = from.split_whitespace().collect();
    match words.as_slice() {
        [_, .., as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
        [_, image, ..] => image.to_string(),
        _ => String::new(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or("");
    if first.chars().count() <= max && first.len() == s.len() {
        return first.to_string();
    }
    let mut t: String = first.chars().take(max).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_formats() {
        let l = parse_line("INFO[0000] Resolved base name golang:1.22 to builder");
        assert_eq!(l.level, Some(Level::Info));
        assert_eq!(l.message, "Resolved base name golang:1.22 to builder");
        // Kaniko's default `color` format, as it reaches the pod log.
        let l = parse_line("\u{1b}[36mINFO\u{1b}[0m[0002] RUN go build");
        assert_eq!(l.level, Some(Level::Info));
        assert_eq!(l.message, "RUN go build");
        let l = parse_line("\u{1b}[33mWARN\u{1b}[0m[0010] Error uploading layer to cache: x");
        assert_eq!(l.level, Some(Level::Warn));
        let l = parse_line(
            r#"time="2025-06-01T10:00:00Z" level=info msg="Using caching version of cmd: RUN echo \"hi\"""#,
        );
        assert_eq!(l.level, Some(Level::Info));
        assert_eq!(l.message, r#"Using caching version of cmd: RUN echo "hi""#);
        let l = parse_line(r#"{"level":"error","msg":"error building image: boom","time":"x"}"#);
        assert_eq!(l.level, Some(Level::Error));
        assert_eq!(l.message, "error building image: boom");
        // RUN output and the plan are not Kaniko log lines.
        let l = parse_line("go: downloading golang.org/x/sync v0.7.0");
        assert_eq!(l.level, None);
        let l = parse_line("INFORMATION[x] not a level");
        assert_eq!(l.level, None);
    }

    #[test]
    fn recognises_instructions() {
        assert_eq!(instruction("RUN go build ./..."), Some("RUN"));
        assert_eq!(instruction("COPY --from=builder /app /app"), Some("COPY"));
        assert_eq!(instruction("WORKDIR /src"), Some("WORKDIR"));
        assert_eq!(instruction("CMD [\"/app\"]"), Some("CMD"));
        assert_eq!(instruction("Cmd: /bin/sh"), None);
        assert_eq!(instruction("Running: [/bin/sh -c go build]"), None);
        assert_eq!(instruction("RUNNING"), None);
        assert_eq!(instruction("FROM golang:1.22"), None);
    }

    /// A two-stage build as Kaniko logs it with KANIKO_PRINT_PLAN=1: the
    /// plan, then the build with one cache hit, one miss, and a failed cache
    /// upload.
    const LOG: &str = "\
INFO[0000] Resolved base name golang:1.22 to builder
INFO[0000] Retrieving image manifest golang:1.22
INFO[0000] Retrieving image golang:1.22 from registry index.docker.io
INFO[0001] Retrieving image manifest alpine:3.20
INFO[0001] Built cross stage deps: map[0:[/out/app]]
FROM golang:1.22 AS builder
STREAM golang:1.22
WORKDIR /src
COPY . .
RUN go build -o /out/app ./...
SAVE FILES [/out/app] /kaniko/deps/0
CLEAN

FROM alpine:3.20
STREAM alpine:3.20
RUN apk add --no-cache ca-certificates
COPY --from=builder /out/app /app
ENTRYPOINT [\"/app\"]
PUSH [registry.shared-services:5000/app:abc1234]
INFO[0001] Retrieving image manifest golang:1.22
INFO[0001] Building stage 'golang:1.22' [idx: '0', base-idx: '-1']
INFO[0001] Using caching version of cmd: RUN go build -o /out/app ./...
INFO[0001] Unpacking rootfs as cmd COPY . . requires it.
INFO[0009] WORKDIR /src
INFO[0009] Cmd: workdir
INFO[0009] Changed working directory to /src
INFO[0009] COPY . .
INFO[0010] RUN go build -o /out/app ./...
INFO[0010] Found cached layer, extracting to filesystem
INFO[0012] Saving file out/app for later use
INFO[0012] Deleting filesystem...
INFO[0012] Retrieving image manifest alpine:3.20
INFO[0012] Building stage 'alpine:3.20' [idx: '1', base-idx: '-1']
INFO[0012] No cached layer found for cmd RUN apk add --no-cache ca-certificates
INFO[0012] Unpacking rootfs as cmd RUN apk add --no-cache ca-certificates requires it.
INFO[0013] RUN apk add --no-cache ca-certificates
INFO[0013] Initializing snapshotter ...
INFO[0013] Taking snapshot of full filesystem...
INFO[0013] Cmd: /bin/sh
INFO[0013] Args: [-c apk add --no-cache ca-certificates]
INFO[0013] Running: [/bin/sh -c apk add --no-cache ca-certificates]
fetch https://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz
OK: 8 MiB in 15 packages
INFO[0015] Taking snapshot of full filesystem...
INFO[0015] Pushing layer registry.shared-services:5000/cache/app:5c7e1d to cache now
INFO[0016] COPY --from=builder /out/app /app
INFO[0016] Taking snapshot of files...
INFO[0016] ENTRYPOINT [\"/app\"]
WARN[0017] Error uploading layer to cache: failed to push to destination registry.shared-services:5000/cache/app:5c7e1d: PUT https://registry.shared-services:5000/v2/cache/app/manifests/5c7e1d: MANIFEST_INVALID
INFO[0017] Pushing image to registry.shared-services:5000/app:abc1234
INFO[0018] Pushed registry.shared-services:5000/app@sha256:6f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9
";

    #[test]
    fn follows_a_real_build() {
        let mut k = KanikoLog::default();
        let events: Vec<Event> = LOG.lines().filter_map(|l| k.feed(l)).collect();
        assert!(events.contains(&Event::Plan {
            steps: 6,
            stages: 2
        }));
        assert_eq!(k.total, Some(6));
        assert_eq!(k.step, 6);
        assert_eq!(k.step_text(), "STEP 6/6");
        assert_eq!(k.cache_hits, 1);
        assert_eq!(k.cache_misses, 1);
        assert_eq!(k.cache_upload_failures.len(), 1);
        assert!(k.cache_upload_failures[0]
            .detail
            .contains("MANIFEST_INVALID"));
        assert_eq!(
            k.pushed.as_deref(),
            Some("registry.shared-services:5000/app@sha256:6f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9")
        );
        let steps: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::Step { n, command } => Some(format!("{n} {command}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            steps,
            [
                "1 WORKDIR /src",
                "2 COPY . .",
                "3 RUN go build -o /out/app ./...",
                "4 RUN apk add --no-cache ca-certificates",
                "5 COPY --from=builder /out/app /app",
                "6 ENTRYPOINT [\"/app\"]"
            ]
        );
        assert!(events.contains(&Event::Stage {
            name: "alpine:3.20".into(),
            index: 1
        }));
        assert!(k.errors.is_empty());
    }

    #[test]
    fn progress_line_mid_build() {
        let mut k = KanikoLog::default();
        for l in LOG
            .lines()
            .take_while(|l| !l.contains("Found cached layer"))
        {
            k.feed(l);
        }
        assert_eq!(
            k.status(),
            // The stage's name from the plan (`FROM golang:1.22 AS builder`);
            // COPY . . ran; RUN go build has not said yet whether it is cached.
            "stage builder STEP 3/6 RUN go build -o /out/app ./... | cache: 1 hit, 1 rebuilt"
        );
    }

    #[test]
    fn without_a_plan_there_is_no_total() {
        let mut k = KanikoLog::default();
        for l in [
            "INFO[0000] Resolved base name golang:1.22 to builder",
            "INFO[0001] Building stage 'golang:1.22' [idx: '0', base-idx: '-1']",
            "INFO[0001] No cached layer found for cmd RUN apk add git",
            "INFO[0002] RUN apk add git",
        ] {
            k.feed(l);
        }
        assert_eq!(k.total, None);
        assert_eq!(k.step_text(), "STEP 1");
        assert_eq!(k.cache_misses, 1);
    }

    #[test]
    fn run_output_that_looks_like_an_instruction_is_not_a_step() {
        let mut k = KanikoLog::default();
        k.feed("INFO[0001] Building stage 'alpine' [idx: '0', base-idx: '-1']");
        k.feed("INFO[0002] RUN ./print-dockerfile.sh");
        k.feed("RUN echo this is output of the RUN step");
        assert_eq!(k.step, 1);
    }

    #[test]
    fn lookahead_cache_lines_before_the_first_stage_are_not_counted() {
        let mut k = KanikoLog::default();
        k.feed("INFO[0000] No cached layer found for cmd RUN apk add git");
        k.feed("INFO[0001] Building stage 'alpine' [idx: '0', base-idx: '-1']");
        k.feed("INFO[0001] No cached layer found for cmd RUN apk add git");
        assert_eq!(k.cache_misses, 1);
    }

    #[test]
    fn errors_are_collected() {
        let mut k = KanikoLog::default();
        let e = k.feed("ERRO[0003] error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1");
        assert!(matches!(e, Some(Event::Error(_))));
        assert_eq!(k.errors.len(), 1);
    }

    /// The classes without a real fixture, on lines in go-containerregistry's
    /// and Kaniko's wording (the fixtures' classes are in
    /// integration/kaniko_logs.rs).
    #[test]
    fn classifies_final_errors() {
        let c = |l: &str| classify_error(l, Some("RUN make"));
        assert_eq!(
            c("error building image: error building stage: failed to execute command: waiting for process to exit: exit status 2"),
            ErrorClass::StepFailed { step: Some("RUN make".into()), exit_code: Some(2) }
        );
        assert_eq!(
            c("error building image: unable to complete operation after 0 attempts, last error: GET https://r:5000/v2/base/x/manifests/1: MANIFEST_UNKNOWN: manifest unknown"),
            ErrorClass::BaseImage { unauthorized: false }
        );
        assert_eq!(
            c("error building image: retrieving image r:5000/base/x:1: GET https://r:5000/v2/base/x/manifests/1: UNAUTHORIZED: authentication required"),
            ErrorClass::BaseImage { unauthorized: true }
        );
        assert_eq!(
            c("error checking push permissions: checking push permission for \"r:5000/app:1\": POST https://r:5000/v2/app/blobs/uploads/: DENIED: requested access to the resource is denied"),
            ErrorClass::Push { denied: true }
        );
        assert_eq!(
            c("error pushing image: failed to push to destination r:5000/app:1: Put \"https://r:5000/v2/\": dial tcp 10.0.0.1:5000: connect: connection refused"),
            ErrorClass::Push { denied: false }
        );
        assert_eq!(c("error building image: something new"), ErrorClass::Other);
        // Only unprefixed lines that read like Kaniko's last words are final.
        assert!(is_final_error(&parse_line("error building image: x: y")));
        assert!(!is_final_error(&parse_line("about to fail")));
        assert!(!is_final_error(&parse_line(
            "INFO[0000] error in a message: x"
        )));
    }

    #[test]
    fn the_issue_examples() {
        let mut k = KanikoLog::default();
        for l in [
            "INFO[0000] Resolved base name golang:1.22 to builder",
            "INFO[0000] Retrieving image manifest golang:1.22",
            "INFO[0000] Building stage 'golang:1.22' [idx: '0', base-idx: '-1']",
            "INFO[0001] Using caching version of cmd: RUN go build ./...",
            "INFO[0001] No cached layer found for cmd RUN apk add git",
            "INFO[0002] Pushing image to registry.shared-services:5000/app:abc1234",
            "INFO[0003] Pushed registry.shared-services:5000/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            k.feed(l);
        }
        assert_eq!((k.cache_hits, k.cache_misses), (1, 1));
        assert_eq!(
            k.pushing.as_deref(),
            Some("registry.shared-services:5000/app:abc1234")
        );
        assert!(k
            .status()
            .starts_with("pushing registry.shared-services:5000/app:abc1234"));
    }
}
