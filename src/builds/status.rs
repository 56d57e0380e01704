//! Pure: reads what a build pod's status (and its Job's) says happened —
//! still going, stuck, failed (and which of the failure classes), or built
//! with a digest that can be trusted — and formats `slipway builds`.
//!
//! Sources, in the order they are trusted:
//! - pod `status.reason` (`Evicted`) and the `DisruptionTarget` condition;
//! - a container's `terminated.reason` (`OOMKilled`);
//! - the git container's exit code and termination message
//!   (`slipway-git <kind>` then a detail line, see `job::GIT_SCRIPT`);
//! - the Kaniko container's exit code and termination message: on exit 0
//!   the digest Kaniko wrote and the image name the wrapper appended; on
//!   failure the log tail the kubelet put there (`FallbackToLogsOnError`);
//! - the Job's `Failed` condition with reason `DeadlineExceeded`.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;

use super::job::{
    ANNOTATION_GIT_URL, ANNOTATION_IMAGE, ANNOTATION_REVISION, GIT_CONTAINER, GIT_EXIT_AUTH,
    GIT_EXIT_DOCKERFILE, GIT_EXIT_REVISION, KANIKO_CONTAINER, LABEL_COMMIT, LABEL_REPO,
};
use super::log::{classify_error, ErrorClass, KanikoLog};
use super::BuildError;

/// One container's state, flattened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CState {
    #[default]
    Absent,
    Waiting {
        reason: String,
        message: String,
    },
    Running,
    Terminated {
        exit_code: i32,
        reason: String,
        message: String,
        finished_at: Option<Timestamp>,
    },
}

impl CState {
    /// Running or done: its log can be read.
    pub fn started(&self) -> bool {
        matches!(self, CState::Running | CState::Terminated { .. })
    }
    pub fn terminated(&self) -> bool {
        matches!(self, CState::Terminated { .. })
    }
}

fn cstate(statuses: Option<&Vec<ContainerStatus>>, name: &str) -> CState {
    let Some(st) = statuses
        .into_iter()
        .flatten()
        .find(|s| s.name == name)
        .and_then(|s| s.state.as_ref())
    else {
        return CState::Absent;
    };
    if let Some(t) = &st.terminated {
        return CState::Terminated {
            exit_code: t.exit_code,
            reason: t.reason.clone().unwrap_or_default(),
            message: t.message.clone().unwrap_or_default(),
            finished_at: t.finished_at.as_ref().map(|t| t.0),
        };
    }
    if st.running.is_some() {
        return CState::Running;
    }
    if let Some(w) = &st.waiting {
        return CState::Waiting {
            reason: w.reason.clone().unwrap_or_default(),
            message: w.message.clone().unwrap_or_default(),
        };
    }
    CState::Absent
}

/// The parts of a build pod slipway decides on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodView {
    pub name: String,
    pub phase: String,
    pub reason: String,
    pub message: String,
    pub deleting: bool,
    /// `DisruptionTarget` condition: (reason, message).
    pub disruption: Option<(String, String)>,
    /// `PodScheduled=False`: the scheduler's message.
    pub unschedulable: Option<String>,
    pub git: CState,
    pub kaniko: CState,
}

impl PodView {
    pub fn from_pod(pod: &Pod) -> Self {
        let st = pod.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            st.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t)
                .cloned()
        };
        let disruption = cond("DisruptionTarget")
            .filter(|c| c.status == "True")
            .map(|c| (c.reason.unwrap_or_default(), c.message.unwrap_or_default()));
        let unschedulable = cond("PodScheduled")
            .filter(|c| c.status == "False")
            .map(|c| c.message.unwrap_or_else(|| "unschedulable".into()));
        PodView {
            name: pod.metadata.name.clone().unwrap_or_default(),
            phase: st.phase.clone().unwrap_or_default(),
            reason: st.reason.clone().unwrap_or_default(),
            message: st.message.clone().unwrap_or_default(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            disruption,
            unschedulable,
            git: cstate(st.init_container_statuses.as_ref(), GIT_CONTAINER),
            kaniko: cstate(st.container_statuses.as_ref(), KANIKO_CONTAINER),
        }
    }
}

/// What the messages need to name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    pub job: String,
    pub git_url: String,
    pub revision: String,
    pub registry: String,
    /// `REG/NAME`.
    pub image: String,
    pub memory: String,
    pub timeout: String,
    pub git_image: String,
    pub executor_image: String,
}

impl Context {
    pub fn from_spec(spec: &super::job::BuildSpec, timeout: &str) -> Self {
        Context {
            job: spec.job_name(),
            git_url: spec.git_url.clone(),
            revision: spec.revision.as_str().to_string(),
            registry: spec.registry.clone(),
            image: spec.image(),
            memory: spec.memory.clone(),
            timeout: timeout.to_string(),
            git_image: spec.git_image.clone(),
            executor_image: spec.executor_image.clone(),
        }
    }

    /// For `builds` and `logs`: from the Job's annotations and template.
    pub fn from_job(job: &Job) -> Self {
        let ann = |k: &str| {
            job.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .cloned()
                .unwrap_or_default()
        };
        let pod = job.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        let container = |name: &str| {
            pod.and_then(|p| {
                p.containers
                    .iter()
                    .chain(p.init_containers.iter().flatten())
                    .find(|c| c.name == name)
                    .cloned()
            })
        };
        let kaniko = container(KANIKO_CONTAINER);
        let image = ann(ANNOTATION_IMAGE);
        Context {
            job: job.metadata.name.clone().unwrap_or_default(),
            git_url: ann(ANNOTATION_GIT_URL),
            revision: ann(ANNOTATION_REVISION),
            registry: image.split('/').next().unwrap_or_default().to_string(),
            image,
            memory: kaniko
                .as_ref()
                .and_then(|c| c.resources.as_ref())
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .map(|q| q.0.clone())
                .unwrap_or_default(),
            timeout: job
                .spec
                .as_ref()
                .and_then(|s| s.active_deadline_seconds)
                .map(|s| format!("{s}s"))
                .unwrap_or_default(),
            git_image: container(GIT_CONTAINER)
                .and_then(|c| c.image)
                .unwrap_or_default(),
            executor_image: kaniko.and_then(|c| c.image).unwrap_or_default(),
        }
    }
}

/// The git container's report on success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitResult {
    pub commit: String,
    /// The ref the revision named, if it was a branch or tag.
    pub git_ref: Option<String>,
}

/// Reads `slipway-git ok` / `commit <sha>` / `ref <ref>`.
pub fn git_ok(message: &str) -> Option<GitResult> {
    let mut lines = message.lines();
    if lines.next()?.trim() != "slipway-git ok" {
        return None;
    }
    let mut commit = None;
    let mut git_ref = None;
    for l in lines {
        if let Some(c) = l.strip_prefix("commit ") {
            let c = c.trim();
            if (c.len() == 40 || c.len() == 64) && c.bytes().all(|b| b.is_ascii_hexdigit()) {
                commit = Some(c.to_ascii_lowercase());
            }
        } else if let Some(r) = l.strip_prefix("ref ") {
            let r = r.trim();
            if r != "-" && !r.is_empty() {
                git_ref = Some(r.to_string());
            }
        }
    }
    Some(GitResult {
        commit: commit?,
        git_ref,
    })
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// A failed git container: its termination message first, its exit code
/// if the message is missing (e.g. the script was killed).
pub fn git_failure(exit_code: i32, reason: &str, message: &str, ctx: &Context) -> BuildError {
    if reason == "OOMKilled" {
        return BuildError::OomKilled {
            job: ctx.job.clone(),
            container: GIT_CONTAINER.into(),
            limit: ctx.memory.clone(),
        };
    }
    let mut lines = message.lines();
    let head = lines.next().unwrap_or("").trim();
    let detail = lines
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let kind = head.strip_prefix("slipway-git ").unwrap_or("");
    let detail = if detail.is_empty() {
        first_line(message)
    } else {
        detail
    };
    match (kind, exit_code) {
        ("git-auth-failed", _) | ("", GIT_EXIT_AUTH) => BuildError::GitAuth {
            url: ctx.git_url.clone(),
            detail,
        },
        ("revision-not-found", _) | ("", GIT_EXIT_REVISION) => BuildError::RevisionNotFound {
            revision: ctx.revision.clone(),
            detail,
        },
        ("dockerfile-not-found", _) | ("", GIT_EXIT_DOCKERFILE) => {
            BuildError::DockerfileNotFound { detail }
        }
        _ => BuildError::Failed {
            job: ctx.job.clone(),
            detail: format!("git container exited {exit_code}: {detail}"),
        },
    }
}

fn contains_any(haystack: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| haystack.contains(n))
}

/// A failed Kaniko container. `message` is the termination message (the log
/// tail, see the module docs); `log` is what slipway read from the log while
/// streaming: Kaniko's final error line, classified
/// ([`super::log::classify_error`]), decides the class when there is one.
pub fn kaniko_failure(
    exit_code: i32,
    reason: &str,
    message: &str,
    log: &KanikoLog,
    ctx: &Context,
) -> BuildError {
    if reason == "OOMKilled" {
        return BuildError::OomKilled {
            job: ctx.job.clone(),
            container: KANIKO_CONTAINER.into(),
            limit: ctx.memory.clone(),
        };
    }
    let mut text = super::log::strip_ansi(message);
    for e in &log.errors {
        text.push('\n');
        text.push_str(e);
    }
    let lower = text.to_ascii_lowercase();
    // Kaniko's final error: from the stream, else the last such line of the
    // termination message (the log tail, when slipway did not see the log).
    let final_error = log.final_error.clone().or_else(|| {
        text.lines()
            .map(super::log::parse_line)
            .filter(super::log::is_final_error)
            .map(|l| l.message)
            .next_back()
    });
    // The most specific line to show: Kaniko's final error, else the last
    // line that says error, else the last non-empty line.
    let detail = final_error
        .clone()
        .or_else(|| {
            text.lines()
                .map(|l| super::log::parse_line(l).message)
                .rfind(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("error") || l.contains("failed") || l.contains("denied")
                })
        })
        .or_else(|| {
            text.lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(String::from)
        })
        .unwrap_or_else(|| format!("kaniko exited {exit_code}"));
    if contains_any(
        &lower,
        &[
            "x509:",
            "certificate signed by unknown authority",
            "tls: failed to verify certificate",
            "certificate is not valid for",
            "certificate has expired",
        ],
    ) {
        return BuildError::Certificate {
            registry: ctx.registry.clone(),
            detail,
        };
    }
    if contains_any(
        &lower,
        &[
            "please provide a valid path to a dockerfile",
            "error resolving dockerfile path",
        ],
    ) {
        return BuildError::DockerfileNotFound { detail };
    }
    let class = final_error
        .as_deref()
        .map(|e| classify_error(e, log.command.as_deref()));
    match class {
        Some(ErrorClass::Push { denied: true }) => {
            return BuildError::PushDenied {
                registry: ctx.registry.clone(),
                detail,
            }
        }
        Some(ErrorClass::Push { denied: false }) => {
            return BuildError::PushFailed {
                registry: ctx.registry.clone(),
                detail,
            }
        }
        Some(ErrorClass::BaseImage { unauthorized }) => {
            return BuildError::BaseImage {
                unauthorized,
                detail,
            }
        }
        Some(ErrorClass::StepFailed { step, exit_code }) => {
            return BuildError::StepFailed {
                job: ctx.job.clone(),
                step,
                exit_code,
                detail,
            }
        }
        Some(ErrorClass::CacheUploadFailed | ErrorClass::Other) | None => {}
    }
    // Without a final error line, older wordings still tell a refused push.
    let pushing = contains_any(
        &lower,
        &[
            "checking push permission",
            "error checking push permissions",
            "failed to push to destination",
            "error pushing image",
        ],
    );
    if final_error.is_none() && pushing && super::log::denied_text(&lower) {
        return BuildError::PushDenied {
            registry: ctx.registry.clone(),
            detail,
        };
    }
    // Killed by a signal (128 + n) with no last words: SIGKILL from outside
    // the container, SIGTERM from a deleted pod. What it was doing is in the
    // log tail.
    if final_error.is_none() && matches!(exit_code, 137 | 143) {
        let tail: Vec<String> = if log.tail.is_empty() {
            text.lines()
                .map(|l| super::log::parse_line(l).message)
                .filter(|l| !l.trim().is_empty())
                .collect()
        } else {
            log.tail.iter().cloned().collect()
        };
        let keep = tail.len().saturating_sub(5);
        return BuildError::Killed {
            job: ctx.job.clone(),
            exit_code,
            tail: tail[keep..]
                .iter()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
        };
    }
    BuildError::Failed {
        job: ctx.job.clone(),
        detail: format!("kaniko exited {exit_code}: {detail}"),
    }
}

/// A successful build's result, from the Kaniko container's termination
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// `sha256:…`.
    pub digest: String,
    /// `REG/NAME@sha256:…`.
    pub image_ref: String,
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Trusts the digest only with exit code 0, and only if the image name
/// Kaniko wrote carries the same digest for this build's repository (Kaniko
/// also writes both files for each cache layer it pushes, under
/// `REG/cache/NAME`).
pub fn kaniko_success(exit_code: i32, message: &str, ctx: &Context) -> Result<Built, BuildError> {
    let fail = |detail: String| BuildError::Failed {
        job: ctx.job.clone(),
        detail,
    };
    if exit_code != 0 {
        return Err(fail(format!("kaniko exited {exit_code}")));
    }
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let digest = lines.next().unwrap_or("");
    if !is_digest(digest) {
        return Err(fail(format!(
            "kaniko exited 0 but its termination message holds no digest: {:?}",
            first_line(message)
        )));
    }
    let want = format!("{}@{digest}", ctx.image);
    let names: Vec<&str> = lines.collect();
    if names.contains(&want.as_str()) {
        return Ok(Built {
            digest: digest.to_string(),
            image_ref: want,
        });
    }
    Err(fail(format!(
        "the digest file ({digest}) and the image-name file ({}) disagree; not trusting either",
        if names.is_empty() {
            "missing".to_string()
        } else {
            names.join(", ")
        }
    )))
}

/// What to do about a pod.
#[derive(Debug)]
pub enum Verdict {
    /// Still going; a status line for the user.
    Going(String),
    /// Will not get better by itself (an image that cannot be pulled, a
    /// missing Secret key): the Job must be deleted.
    Stuck(BuildError),
    /// Over, failed.
    Failed(BuildError),
    /// Over, built.
    Built(Built),
}

/// Pod-level failures that make container exit codes meaningless.
fn pod_failure(p: &PodView, ctx: &Context) -> Option<BuildError> {
    if p.reason == "Evicted" {
        return Some(BuildError::Evicted {
            job: ctx.job.clone(),
            message: if p.message.is_empty() {
                "evicted by the kubelet".into()
            } else {
                p.message.clone()
            },
        });
    }
    if let Some((reason, message)) = &p.disruption {
        // Eviction API (drain), kubelet pressure, preemption, taint manager.
        let over = p.phase == "Failed" || p.git.terminated() || p.kaniko.terminated() || p.deleting;
        if over && reason != "DeletionByPodGC" {
            return Some(BuildError::Evicted {
                job: ctx.job.clone(),
                message: format!("{reason}: {message}"),
            });
        }
    }
    None
}

fn stuck(c: &CState, container: &str, image: &str, ctx: &Context) -> Option<BuildError> {
    let CState::Waiting { reason, message } = c else {
        return None;
    };
    match reason.as_str() {
        // ErrImagePull is retried by the kubelet and becomes
        // ImagePullBackOff if it keeps failing; wait for that.
        "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
            Some(BuildError::ImagePull {
                container: container.into(),
                image: image.into(),
                reason: reason.clone(),
                message: message.clone(),
            })
        }
        "CreateContainerConfigError" => Some(BuildError::Missing {
            what: format!("container {container} of job {} cannot start", ctx.job),
            hint: message.clone(),
        }),
        _ => None,
    }
}

/// Decides about a pod; `log` is the Kaniko log read so far.
pub fn assess(p: &PodView, log: &KanikoLog, ctx: &Context) -> Verdict {
    if let Some(e) = pod_failure(p, ctx) {
        return Verdict::Failed(e);
    }
    if let CState::Terminated {
        exit_code,
        reason,
        message,
        ..
    } = &p.git
    {
        if *exit_code != 0 {
            return Verdict::Failed(git_failure(*exit_code, reason, message, ctx));
        }
    }
    if let CState::Terminated {
        exit_code,
        reason,
        message,
        ..
    } = &p.kaniko
    {
        if *exit_code == 0 {
            return match kaniko_success(*exit_code, message, ctx) {
                Ok(b) => Verdict::Built(b),
                Err(e) => Verdict::Failed(e),
            };
        }
        return Verdict::Failed(kaniko_failure(*exit_code, reason, message, log, ctx));
    }
    if let Some(e) = stuck(&p.git, GIT_CONTAINER, &ctx.git_image, ctx)
        .or_else(|| stuck(&p.kaniko, KANIKO_CONTAINER, &ctx.executor_image, ctx))
    {
        return Verdict::Stuck(e);
    }
    if p.phase == "Failed" {
        return Verdict::Failed(BuildError::Failed {
            job: ctx.job.clone(),
            detail: format!("pod {} failed: {} {}", p.name, p.reason, p.message)
                .trim_end()
                .to_string(),
        });
    }
    Verdict::Going(going_text(p))
}

fn going_text(p: &PodView) -> String {
    if let Some(m) = &p.unschedulable {
        return format!("pending: {m}");
    }
    let waiting = |c: &CState, name: &str| match c {
        CState::Waiting { reason, .. } if !reason.is_empty() => Some(format!("{name}: {reason}")),
        _ => None,
    };
    if p.kaniko.started() {
        return "kaniko: building".into();
    }
    if let Some(w) = waiting(&p.kaniko, KANIKO_CONTAINER).filter(|_| p.git.terminated()) {
        return w;
    }
    if p.git.started() {
        return "git: fetching".into();
    }
    if let Some(w) = waiting(&p.git, GIT_CONTAINER) {
        return w;
    }
    format!(
        "pod {}",
        if p.phase.is_empty() {
            "Pending"
        } else {
            &p.phase
        }
    )
}

/// True if the Job failed because it ran past `activeDeadlineSeconds`.
/// Since Kubernetes 1.31 the Job controller first sets `FailureTarget`,
/// kills the pod, and only then `Failed`, so either counts.
pub fn job_deadline_exceeded(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            (c.type_ == "Failed" || c.type_ == "FailureTarget")
                && c.status == "True"
                && c.reason.as_deref() == Some("DeadlineExceeded")
        })
}

fn job_condition(job: &Job, t: &str) -> Option<String> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == t && c.status == "True")
        .map(|c| c.reason.clone().unwrap_or_default())
}

/// One line of `slipway builds`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuildRow {
    pub name: String,
    pub status: String,
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub digest: String,
    pub image: String,
    pub created: String,
    pub age: String,
}

/// `5s`, `12m`, `3h`, `2d`.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn build_row(job: &Job, pod: Option<&Pod>, now: Timestamp) -> BuildRow {
    let ctx = Context::from_job(job);
    let label = |k: &str| {
        job.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let view = pod.map(PodView::from_pod);
    let mut commit = label(LABEL_COMMIT);
    let mut digest = String::new();
    let mut status = match &view {
        Some(v) => match assess(v, &KanikoLog::default(), &ctx) {
            Verdict::Going(s) => format!("Running ({s})"),
            Verdict::Stuck(e) | Verdict::Failed(e) => format!("Failed ({})", e.kind()),
            Verdict::Built(b) => {
                digest = b.digest;
                "Succeeded".into()
            }
        },
        None => "Pending".into(),
    };
    if let Some(CState::Terminated { message, .. }) = view.as_ref().map(|v| &v.git) {
        if let Some(g) = git_ok(message) {
            commit = g.commit;
        }
    }
    if job_deadline_exceeded(job) {
        status = "Failed (deadline-exceeded)".into();
    } else if let Some(reason) = job_condition(job, "Failed") {
        if !status.starts_with("Failed") {
            status = format!("Failed ({reason})");
        }
    } else if job_condition(job, "Complete").is_some() && digest.is_empty() {
        status = "Succeeded".into();
    }
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    BuildRow {
        name: ctx.job.clone(),
        status,
        repo: ctx
            .image
            .split_once('/')
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| label(LABEL_REPO)),
        revision: ctx.revision.clone(),
        commit,
        image: if digest.is_empty() {
            String::new()
        } else {
            format!("{}@{digest}", ctx.image)
        },
        digest,
        created: created.map(|t| t.to_string()).unwrap_or_default(),
        age: created
            .map(|t| age(now.as_second() - t.as_second()))
            .unwrap_or_default(),
    }
}

/// The `slipway builds` table (commit and digest shortened).
pub fn format_table(rows: &[BuildRow]) -> String {
    let short = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let cells: Vec<[String; 7]> = std::iter::once(
        [
            "NAME", "STATUS", "REPO", "REVISION", "COMMIT", "DIGEST", "AGE",
        ]
        .map(String::from),
    )
    .chain(rows.iter().map(|r| {
        [
            r.name.clone(),
            r.status.clone(),
            r.repo.clone(),
            r.revision.clone(),
            short(&r.commit, 12),
            short(&r.digest, 19),
            r.age.clone(),
        ]
    }))
    .collect();
    let mut widths = [0usize; 7];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}   "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            job: "build-app-x1".into(),
            git_url: "https://git.example.com/app.git".into(),
            revision: "main".into(),
            registry: "registry.shared-services:5000".into(),
            image: "registry.shared-services:5000/app".into(),
            memory: "2Gi".into(),
            timeout: "1h".into(),
            git_image: "docker.io/alpine/git:2.47.2".into(),
            executor_image: "ghcr.io/osscontainertools/kaniko:v1.27.6-debug".into(),
        }
    }

    const D: &str = "sha256:6f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    #[test]
    fn reads_the_git_report() {
        let c = "3f786850e387550fdab836ed7e6dc881de23001b";
        let g = git_ok(&format!(
            "slipway-git ok\ncommit {c}\nref refs/heads/main\n"
        ))
        .unwrap();
        assert_eq!(g.commit, c);
        assert_eq!(g.git_ref.as_deref(), Some("refs/heads/main"));
        let g = git_ok(&format!("slipway-git ok\ncommit {c}\nref -\n")).unwrap();
        assert_eq!(g.git_ref, None);
        assert_eq!(git_ok("slipway-git ok\ncommit nothex\n"), None);
        assert_eq!(git_ok("something else"), None);
    }

    #[test]
    fn git_failures_map_to_their_classes() {
        let e = git_failure(
            10,
            "Error",
            "slipway-git git-auth-failed\nfatal: Authentication failed for 'https://git.example.com/app.git/'\n",
            &ctx(),
        );
        assert_eq!(e.exit_code(), 10);
        assert!(e.to_string().contains("Authentication failed"), "{e}");
        let e = git_failure(
            11,
            "Error",
            "slipway-git revision-not-found\nno branch or tag named nope in x\n",
            &ctx(),
        );
        assert_eq!(e.exit_code(), 11);
        assert!(
            e.to_string()
                .starts_with("revision not found: no branch or tag named nope"),
            "{e}"
        );
        let e = git_failure(
            12,
            "Error",
            "slipway-git dockerfile-not-found\nDockerfile does not exist at commit abc\n",
            &ctx(),
        );
        assert_eq!(e.exit_code(), 12);
        // Without a message, the exit code decides.
        assert_eq!(git_failure(11, "Error", "", &ctx()).exit_code(), 11);
        assert_eq!(
            git_failure(13, "Error", "slipway-git fetch-failed\nnetwork\n", &ctx()).exit_code(),
            1
        );
        assert_eq!(git_failure(137, "OOMKilled", "", &ctx()).exit_code(), 15);
    }

    #[test]
    fn kaniko_failures_map_to_their_classes() {
        let none = KanikoLog::default();
        let push = "\u{1b}[31mERRO\u{1b}[0m[0000] Error: error checking push permissions -- make sure you entered the correct tag name, and that you are authenticated correctly, and try again: checking push permission for \"registry.shared-services:5000/app:abc1234\": POST https://registry.shared-services:5000/v2/app/blobs/uploads/: UNAUTHORIZED: authentication required";
        let e = kaniko_failure(1, "Error", push, &none, &ctx());
        assert_eq!(e.exit_code(), 13, "{e}");
        let cert = "error building image: getting stage builder for stage 0: Get \"https://registry.shared-services:5000/v2/\": tls: failed to verify certificate: x509: certificate signed by unknown authority";
        let e = kaniko_failure(1, "Error", cert, &none, &ctx());
        assert_eq!(e.exit_code(), 14, "{e}");
        let df = "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile within the build context with --dockerfile";
        assert_eq!(
            kaniko_failure(1, "Error", df, &none, &ctx()).exit_code(),
            12
        );
        assert_eq!(
            kaniko_failure(137, "OOMKilled", "", &none, &ctx()).exit_code(),
            15
        );
        let run = "INFO[0003] Running: [/bin/sh -c make]\nmake: *** No rule to make target 'all'.  Stop.\nerror building image: error building stage: failed to execute command: waiting for process to exit: exit status 2";
        let e = kaniko_failure(1, "Error", run, &none, &ctx());
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("exit status 2"), "{e}");
        // An empty message: the streamed error lines decide.
        let mut streamed = KanikoLog::default();
        streamed.feed(push);
        let e = kaniko_failure(1, "Error", "", &streamed, &ctx());
        assert_eq!(e.exit_code(), 13);
        // A base image that needs auth is not a push denial: its own class.
        let pull = "error building image: unable to complete operation after 0 attempts, last error: GET https://index.docker.io/v2/private/base/manifests/1: UNAUTHORIZED: authentication required";
        let e = kaniko_failure(1, "Error", pull, &none, &ctx());
        assert_eq!(e.exit_code(), crate::builds::exit::BASE_IMAGE, "{e}");
        assert!(
            e.to_string()
                .starts_with("base image not allowed (unauthorized): "),
            "{e}"
        );
        // Killed without last words: the class says so, the tail says where.
        let mut killed = KanikoLog::default();
        for l in [
            "INFO[0001] Building stage 'alpine' [idx: '0', base-idx: '-1']",
            "INFO[0002] RUN sleep 600",
            "INFO[0002] Running: [/bin/sh -c sleep 600]",
        ] {
            killed.feed(l);
        }
        let e = kaniko_failure(137, "Error", "", &killed, &ctx());
        assert_eq!(e.exit_code(), crate::builds::exit::KILLED, "{e}");
        assert!(
            e.to_string()
                .contains("was killed (exit code 137, signal 9)")
                && e.to_string().ends_with("  Running: [/bin/sh -c sleep 600]"),
            "{e}"
        );
    }

    #[test]
    fn trusts_a_digest_only_with_exit_0_and_a_matching_name() {
        let good = format!("{D}\nregistry.shared-services:5000/app@{D}\n");
        let b = kaniko_success(0, &good, &ctx()).unwrap();
        assert_eq!(
            b.image_ref,
            format!("registry.shared-services:5000/app@{D}")
        );
        assert_eq!(b.digest, D);
        assert!(kaniko_success(1, &good, &ctx()).is_err());
        // The name of a cache layer push, not the image.
        let cache = format!("{D}\nregistry.shared-services:5000/cache/app@{D}\n");
        assert!(kaniko_success(0, &cache, &ctx()).is_err());
        let other = "sha256:".to_string() + &"0".repeat(64);
        let mismatch = format!("{D}\nregistry.shared-services:5000/app@{other}\n");
        assert!(kaniko_success(0, &mismatch, &ctx()).is_err());
        assert!(kaniko_success(0, &format!("{D}\n"), &ctx()).is_err());
        assert!(kaniko_success(0, "", &ctx()).is_err());
        assert!(kaniko_success(0, "sha256:XYZ\n", &ctx()).is_err());
    }

    #[test]
    fn pod_level_failures_win() {
        let mut p = PodView {
            phase: "Failed".into(),
            reason: "Evicted".into(),
            message: "The node was low on resource: ephemeral-storage.".into(),
            kaniko: CState::Terminated {
                exit_code: 137,
                reason: "Error".into(),
                message: String::new(),
                finished_at: None,
            },
            ..Default::default()
        };
        match assess(&p, &KanikoLog::default(), &ctx()) {
            Verdict::Failed(e) => assert_eq!(e.exit_code(), 17, "{e}"),
            v => panic!("{v:?}"),
        }
        p.reason.clear();
        p.disruption = Some((
            "EvictionByEvictionAPI".into(),
            "Eviction API: evicting".into(),
        ));
        match assess(&p, &KanikoLog::default(), &ctx()) {
            Verdict::Failed(e) => assert_eq!(e.exit_code(), 17, "{e}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn image_pull_backoff_is_stuck() {
        let p = PodView {
            phase: "Pending".into(),
            git: CState::Waiting {
                reason: "ImagePullBackOff".into(),
                message: "Back-off pulling image \"docker.io/alpine/git:2.47.2\"".into(),
            },
            ..Default::default()
        };
        match assess(&p, &KanikoLog::default(), &ctx()) {
            Verdict::Stuck(e) => assert_eq!(e.exit_code(), 18, "{e}"),
            v => panic!("{v:?}"),
        }
        let p = PodView {
            phase: "Pending".into(),
            git: CState::Waiting {
                reason: "ErrImagePull".into(),
                message: "x".into(),
            },
            ..Default::default()
        };
        assert!(matches!(
            assess(&p, &KanikoLog::default(), &ctx()),
            Verdict::Going(_)
        ));
    }

    #[test]
    fn ages() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(3 * 86400), "3d");
    }
}
