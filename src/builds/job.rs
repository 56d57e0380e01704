//! Pure: a validated build request ([`BuildSpec`]) becomes the Kaniko Job
//! (and, when the build namespace needs one, the registry CA ConfigMap); also
//! the revision classifier.
//!
//! Objects it describes (nothing here talks to the API):
//! - `Job <namespace>/build-<repo>-<build id>`: an init container `git`
//!   (alpine/git) that resolves the revision to a commit in the cluster and
//!   checks it out, and a container `kaniko` (the `:debug` image of the
//!   maintained Kaniko fork) that builds and pushes it;
//! - `ConfigMap <namespace>/registry-ca` (key `ca.crt`): the public registry
//!   CA, for `--render` into a namespace other than the CA's.
//!
//! Paths inside the pod:
//!
//! | path | what |
//! | --- | --- |
//! | `/slipway/context` | emptyDir: the checkout, Kaniko's `--context dir://` |
//! | `/slipway/out/commit` | the resolved commit, written by `git`, read by the Kaniko wrapper |
//! | `/slipway/out/image-name` | Kaniko's `--image-name-with-digest-file` |
//! | `/slipway/home` | `$HOME` of the git container (git config, SSH key copy, credential helper) |
//! | `/slipway/git-secret` | the `--git-secret` Secret, read-only files |
//! | `/slipway/ca/ca.crt` | the registry CA, for `--registry-certificate` |
//! | `/kaniko/.docker/config.json` | key `config.json` of the push Secret `registry-push` (or `--push-secret`/`--push-secret-key`), read-only |
//!
//! The push credential is only ever a mounted file, never an argument or an
//! environment variable: both are readable by anyone who can `get` the Job
//! or the pod (#10).
//!
//! None of these is under `/workspace`: Kaniko leaves mounted paths out of
//! every snapshot, so a Dockerfile that COPYs into `/workspace` (Kaniko's
//! default context, a common WORKDIR) would silently lose those files if the
//! context were mounted there. `/kaniko` is Kaniko's own directory.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_BUILD_ID: &str = "slipway.dev/build-id";
pub const LABEL_REPO: &str = "slipway.dev/repo";
pub const LABEL_REVISION: &str = "slipway.dev/revision";
pub const LABEL_COMMIT: &str = "slipway.dev/commit";
pub const ANNOTATION_GIT_URL: &str = "slipway.dev/git-url";
pub const ANNOTATION_REVISION: &str = "slipway.dev/revision";
pub const ANNOTATION_IMAGE: &str = "slipway.dev/image";
pub const ANNOTATION_TAG: &str = "slipway.dev/tag";
pub const ANNOTATION_COPIED_FROM: &str = "slipway.dev/copied-from";

/// Selects every build Job and pod slipway made.
pub const BUILD_SELECTOR: &str = "app.kubernetes.io/managed-by=slipway,slipway.dev/build-id";

pub const GIT_CONTAINER: &str = "git";
pub const KANIKO_CONTAINER: &str = "kaniko";

pub const CONTEXT_DIR: &str = "/slipway/context";
pub const OUT_DIR: &str = "/slipway/out";
pub const HOME_DIR: &str = "/slipway/home";
pub const GIT_SECRET_DIR: &str = "/slipway/git-secret";
pub const CA_DIR: &str = "/slipway/ca";
pub const CA_KEY: &str = "ca.crt";
pub const DOCKER_CONFIG_DIR: &str = "/kaniko/.docker";
/// The Secret `slipway pki ensure` makes with the push account (#10).
pub const DEFAULT_PUSH_SECRET: &str = crate::pki::push::DEFAULT_PUSH_SECRET;
/// Its key that holds the Docker `config.json`.
pub const DEFAULT_PUSH_SECRET_KEY: &str = crate::pki::push::KEY_DOCKER_CONFIG;

/// Where Kaniko's push credentials come from: one key of a Secret in the
/// build namespace, mounted as `/kaniko/.docker/config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSecret {
    pub name: String,
    pub key: String,
}

/// `nobody` in Alpine's /etc/passwd. The git container runs as a user that
/// exists there because OpenSSH refuses to run for a uid without a passwd
/// entry ("No user exists for uid …").
pub const GIT_UID: i64 = 65534;

/// Exit codes of the git init container (and the first word after
/// `slipway-git` in its termination message).
pub const GIT_EXIT_AUTH: i32 = 10;
pub const GIT_EXIT_REVISION: i32 = 11;
pub const GIT_EXIT_DOCKERFILE: i32 = 12;
pub const GIT_EXIT_FETCH: i32 = 13;

/// Resolves the revision to a commit and checks it out, in the cluster.
///
/// Shallow fetch of exactly the revision; a short sha (which cannot be
/// fetched by itself), or a full sha that the server refuses to send alone
/// (`uploadpack.allowReachableSHA1InWant`/`allowAnySHA1InWant` off: "not our
/// ref"), falls back to fetching every branch and tag. `.git` is removed
/// afterwards, as BuildKit does for a git context, so that `COPY . .` does
/// not put the history and remote URL into the image.
pub const GIT_SCRIPT: &str = r#"# slipway build: check one revision of a git repository out into /slipway/context.
# In: SLIPWAY_GIT_URL, SLIPWAY_REVISION, SLIPWAY_REVISION_KIND (ref, commit or
# short-commit), SLIPWAY_CONTEXT_DIR and SLIPWAY_DOCKERFILE (relative to the
# repository root); credentials only as files in /slipway/git-secret.
# Out: /slipway/out/commit and the termination message, "slipway-git ok" with
# "commit <sha>" and "ref <ref>" lines, or "slipway-git <error>" and a detail
# line, with exit code 10 git-auth-failed, 11 revision-not-found,
# 12 dockerfile-not-found or 13 fetch-failed.
set -u
ctx=/slipway/context
out=/slipway/out
sec=/slipway/git-secret
err="$HOME/git-stderr"
auth_re='authentication failed|could not read (username|password)|terminal prompts disabled|permission denied \(publickey|http basic: access denied|returned error: 40[13]|repository .* not found|repository not found|host key verification failed|invalid username or password|access denied'

finish() {
  printf 'slipway-git %s\n%s\n' "$2" "$3" >/dev/termination-log
  printf 'slipway: %s: %s\n' "$2" "$3" >&2
  exit "$1"
}

# A git command that talks to the remote: an authentication failure ends the
# script with 10, anything else is left to the caller.
remote() {
  git "$@" 2>"$err"
  rc=$?
  cat "$err" >&2
  if [ "$rc" -ne 0 ] && grep -qiE "$auth_re" "$err"; then
    finish 10 git-auth-failed "$(grep -iE "$auth_re" "$err" | head -n 1)"
  fi
  return "$rc"
}

# Sets found_ref to the ref NAME names on the remote; a tag wins over a
# branch of the same name, as in git rev-parse.
lookup_ref() {
  found_ref=
  case "$1" in
    refs/*) set -- "$1" ;;
    *) set -- "refs/tags/$1" "refs/heads/$1" ;;
  esac
  remote ls-remote origin "$@" >"$HOME/refs" ||
    finish 13 fetch-failed "git ls-remote $SLIPWAY_GIT_URL failed"
  for r in "$@"; do
    if awk -v r="$r" '$2 == r { found = 1 } END { exit !found }' "$HOME/refs"; then
      found_ref=$r
      return 0
    fi
  done
  return 1
}

fetch_all() {
  echo "slipway: fetching all branches and tags of $SLIPWAY_GIT_URL" >&2
  remote fetch --no-tags origin '+refs/heads/*:refs/remotes/origin/*' '+refs/tags/*:refs/tags/*' ||
    finish 13 fetch-failed "git fetch $SLIPWAY_GIT_URL failed"
}

if [ -f "$sec/ssh-privatekey" ]; then
  mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
  # ssh refuses a key that others can read; the Secret's files are 0440.
  cp "$sec/ssh-privatekey" "$HOME/.ssh/id" && chmod 600 "$HOME/.ssh/id"
  if [ -f "$sec/known_hosts" ]; then
    hostkeys="-o UserKnownHostsFile=$sec/known_hosts -o StrictHostKeyChecking=yes"
  else
    echo "slipway: warning: the git secret has no known_hosts key; the server's SSH host key is not verified" >&2
    hostkeys="-o UserKnownHostsFile=$HOME/.ssh/known_hosts -o StrictHostKeyChecking=accept-new"
  fi
  export GIT_SSH_COMMAND="ssh -i $HOME/.ssh/id -o IdentitiesOnly=yes -o BatchMode=yes $hostkeys"
fi
if [ -f "$sec/token" ] || [ -f "$sec/password" ]; then
  cat >"$HOME/credential-helper" <<'EOF'
#!/bin/sh
# git credential helper: answers "get" from the Secret's files.
[ "$1" = get ] || exit 0
s=/slipway/git-secret
if [ -f "$s/token" ]; then
  user=x-access-token
  [ -f "$s/username" ] && user=$(cat "$s/username")
  pass=$(cat "$s/token")
else
  user=$(cat "$s/username" 2>/dev/null)
  pass=$(cat "$s/password")
fi
printf 'username=%s\npassword=%s\n' "$user" "$pass"
EOF
  chmod 700 "$HOME/credential-helper"
  git config --global credential.helper "$HOME/credential-helper"
fi
git config --global advice.detachedHead false
git config --global init.defaultBranch main

git init -q "$ctx" && cd "$ctx" && git remote add origin "$SLIPWAY_GIT_URL" ||
  finish 13 fetch-failed "cannot set up a repository in $ctx"

ref=-
case "$SLIPWAY_REVISION_KIND" in
  ref)
    lookup_ref "$SLIPWAY_REVISION" ||
      finish 11 revision-not-found "no branch or tag named $SLIPWAY_REVISION in $SLIPWAY_GIT_URL"
    ref=$found_ref
    ;;
  short-commit)
    # A branch or tag with that name wins, as in git.
    if lookup_ref "$SLIPWAY_REVISION"; then ref=$found_ref; fi
    ;;
esac

if [ "$ref" != - ]; then
  remote fetch --depth 1 --no-tags origin "+$ref:refs/slipway/revision" ||
    finish 13 fetch-failed "git fetch $ref from $SLIPWAY_GIT_URL failed"
  commit=$(git rev-parse --verify -q 'refs/slipway/revision^{commit}') ||
    finish 11 revision-not-found "$ref in $SLIPWAY_GIT_URL is not a commit"
else
  if [ "$SLIPWAY_REVISION_KIND" = commit ]; then
    remote fetch --depth 1 --no-tags origin "$SLIPWAY_REVISION" || {
      echo "slipway: the server would not send $SLIPWAY_REVISION by itself" >&2
      fetch_all
    }
  else
    fetch_all
  fi
  if ! commit=$(git rev-parse --verify "$SLIPWAY_REVISION^{commit}" 2>"$err"); then
    if grep -qi ambiguous "$err"; then
      finish 11 revision-not-found "short sha $SLIPWAY_REVISION is ambiguous in $SLIPWAY_GIT_URL: give more characters"
    fi
    finish 11 revision-not-found "no commit $SLIPWAY_REVISION in any branch or tag of $SLIPWAY_GIT_URL"
  fi
fi

git checkout -q --detach "$commit" || finish 13 fetch-failed "git checkout $commit failed"
if [ -f .gitmodules ]; then
  echo "slipway: updating submodules" >&2
  remote submodule update --init --recursive --depth 1 ||
    remote submodule update --init --recursive ||
    finish 13 fetch-failed "git submodule update failed at $commit"
fi

[ -d "$ctx/${SLIPWAY_CONTEXT_DIR:-.}" ] ||
  finish 12 dockerfile-not-found "context directory $SLIPWAY_CONTEXT_DIR does not exist at commit $commit"
[ -f "$ctx/$SLIPWAY_DOCKERFILE" ] ||
  finish 12 dockerfile-not-found "$SLIPWAY_DOCKERFILE does not exist at commit $commit"

find "$ctx" -depth -name .git -exec rm -rf {} \;
printf '%s\n' "$commit" >"$out/commit"
printf 'slipway-git ok\ncommit %s\nref %s\n' "$commit" "$ref" >/dev/termination-log
echo "slipway: $SLIPWAY_REVISION is commit $commit"
"#;

/// The Kaniko container's command: `/busybox/sh -c KANIKO_WRAPPER
/// slipway-kaniko <args>`.
///
/// The commit is only known once the git init container has run, and a
/// container's args cannot refer to a file, so the static flags stay in the
/// Job's `args` (visible in `--render`) and this wrapper adds the three that
/// depend on the commit. That needs a shell: the default Kaniko image has
/// none, the `:debug` variant has busybox (`/busybox/sh`), hence the pinned
/// `-debug` tag.
///
/// Kaniko writes `--digest-file` before it pushes (and again for each cache
/// layer), so after a failed push the file names an image that was never
/// pushed. On failure the wrapper empties the termination message, and the
/// kubelet reports the tail of the log instead (`FallbackToLogsOnError`);
/// on success it appends the image name Kaniko wrote, which slipway checks
/// against the digest. Both fit the 4 KiB termination message limit.
///
/// After the executor returns, the wrapper uses only shell built-ins (`read`,
/// `printf`, `[`): Kaniko's multi-stage cleanup deletes `/busybox` unless it
/// is a volume, which containerd makes of the image's `VOLUME` but a runtime
/// that ignores image volumes (CRI-O `image_volumes=ignore`) does not, and
/// an external `cat` would then fail and lose the image name (#19).
pub const KANIKO_WRAPPER: &str = r#"# slipway build: run the Kaniko executor with the Job's args plus the commit.
set -u
commit=$(cat /slipway/out/commit) || exit 70
set -- "$@" "--label=org.opencontainers.image.revision=$commit" "--label=org.opencontainers.image.source=$SLIPWAY_SOURCE_URL#$commit"
if [ -n "${SLIPWAY_IMAGE_BY_COMMIT:-}" ]; then
  set -- "$@" "--destination=$SLIPWAY_IMAGE_BY_COMMIT:$(printf %s "$commit" | cut -c1-7)"
fi
/kaniko/executor "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then
  wait "$pid"
  rc=$?
fi
if [ "$rc" -eq 0 ]; then
  name=
  IFS= read -r name </slipway/out/image-name || :
  printf '\n%s\n' "$name" >>/dev/termination-log
else
  : >/dev/termination-log
fi
exit "$rc"
"#;

/// A revision as the user typed it, classified. Which of a branch and a tag
/// it names is only known to the remote, so both are [`Revision::Ref`] and
/// the git container asks the remote (`git ls-remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revision {
    /// A branch or tag name (or a full `refs/...` name).
    Ref(String),
    /// A full commit id: 40 (SHA-1) or 64 (SHA-256) hex digits, lowercased.
    Commit(String),
    /// 7 to 39 hex digits, lowercased: resolved after a full fetch, unless
    /// a branch or tag has that name.
    ShortCommit(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid revision {value:?}: {reason}")]
pub struct RevisionError {
    pub value: String,
    pub reason: &'static str,
}

impl Revision {
    pub fn parse(s: &str) -> Result<Self, RevisionError> {
        let bad = |reason| {
            Err(RevisionError {
                value: s.to_string(),
                reason,
            })
        };
        if s.is_empty() {
            return bad("empty");
        }
        if s.chars().all(|c| c.is_ascii_hexdigit()) {
            return match s.len() {
                40 | 64 => Ok(Revision::Commit(s.to_ascii_lowercase())),
                7..=39 => Ok(Revision::ShortCommit(s.to_ascii_lowercase())),
                // Shorter hex strings are names (e.g. a branch "cafe"); git
                // itself does not expand abbreviations under 4, and a
                // 41..63-digit string is no object name at all.
                n if n > 64 || (41..64).contains(&n) => bad("too long for a commit id"),
                _ => Ok(Revision::Ref(s.to_string())),
            };
        }
        // The rules of `git check-ref-format`, so that a bad name fails here
        // and not as "revision not found" in the cluster.
        if s.starts_with('-') {
            return bad("starts with '-'");
        }
        if s.chars()
            .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
        {
            return bad("contains a space, a control character or one of ~^:?*[\\");
        }
        if s.contains("..") || s.contains("@{") || s == "@" || s.contains("//") {
            return bad("contains '..', '@{' or '//', or is '@'");
        }
        if s.starts_with('/') || s.ends_with('/') || s.ends_with('.') || s.ends_with(".lock") {
            return bad("starts or ends with '/', or ends with '.' or '.lock'");
        }
        if s.split('/').any(|c| c.starts_with('.')) {
            return bad("a path component starts with '.'");
        }
        Ok(Revision::Ref(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Revision::Ref(s) | Revision::Commit(s) | Revision::ShortCommit(s) => s,
        }
    }

    /// `SLIPWAY_REVISION_KIND` for the git container.
    pub fn kind(&self) -> &'static str {
        match self {
            Revision::Ref(_) => "ref",
            Revision::Commit(_) => "commit",
            Revision::ShortCommit(_) => "short-commit",
        }
    }
}

/// Everything the Job is made from, validated (see `build::BuildSettings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// Random part of the names, injectable so renders are stable.
    pub build_id: String,
    pub git_url: String,
    pub revision: Revision,
    /// Image repository name under the registry, e.g. `team/app`.
    pub repo: String,
    /// Relative to `context_dir`.
    pub dockerfile: String,
    /// Relative to the repository root; `None` is the root.
    pub context_dir: Option<String>,
    pub target: Option<String>,
    pub build_args: Vec<(String, String)>,
    /// `None`: the short commit.
    pub tag: Option<String>,
    pub namespace: String,
    /// `host:port`.
    pub registry: String,
    pub executor_image: String,
    pub git_image: String,
    pub service_account: String,
    pub ca_configmap: String,
    pub cache: bool,
    pub push_retry: u32,
    pub timeout_secs: i64,
    pub ttl_secs: i32,
    pub cpu: String,
    pub memory: String,
    pub git_secret: Option<String>,
    /// `None`: `--no-push-secret`.
    pub push_secret: Option<PushSecret>,
    /// Kaniko `--registry-map` values (#20): each mirrored upstream to its
    /// repositories in the in-cluster registry, so that `FROM docker.io/…`
    /// is pulled through the mirror.
    pub registry_map: Vec<String>,
}

impl BuildSpec {
    /// `build-<repo>-<build id>`: unique per build, at most 52 characters so
    /// that the pod name (`<job>-<5 chars>`) and the `job-name` label value
    /// stay within 63.
    pub fn job_name(&self) -> String {
        let mut repo: String = self
            .repo
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let room = 52usize.saturating_sub("build--".len() + self.build_id.len());
        repo.truncate(room);
        let repo = repo.trim_matches('-');
        if repo.is_empty() {
            format!("build-{}", self.build_id)
        } else {
            format!("build-{repo}-{}", self.build_id)
        }
    }

    /// `REG/NAME`, the name `kubectl run` pulls by digest.
    pub fn image(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }

    pub fn cache_repo(&self) -> String {
        format!("{}/cache/{}", self.registry, self.repo)
    }

    /// The Dockerfile's path from the repository root (validated not to
    /// leave it).
    pub fn dockerfile_in_repo(&self) -> String {
        match &self.context_dir {
            Some(d) => normalize_rel(&format!("{d}/{}", self.dockerfile))
                .unwrap_or_else(|| self.dockerfile.clone()),
            None => normalize_rel(&self.dockerfile).unwrap_or_else(|| self.dockerfile.clone()),
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert(LABEL_MANAGED_BY.into(), "slipway".into());
        l.insert(LABEL_NAME.into(), "slipway-build".into());
        l.insert(LABEL_COMPONENT.into(), "build".into());
        l.insert(LABEL_BUILD_ID.into(), self.build_id.clone());
        if let Some(v) = label_value(&self.repo) {
            l.insert(LABEL_REPO.into(), v);
        }
        if let Some(v) = label_value(self.revision.as_str()) {
            l.insert(LABEL_REVISION.into(), v);
        }
        // Known before the build only for a full sha; otherwise `slipway
        // build` adds it once the git container has resolved the revision.
        if let Revision::Commit(c) = &self.revision {
            l.insert(LABEL_COMMIT.into(), c.clone());
        }
        l
    }

    fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(ANNOTATION_GIT_URL.into(), self.git_url.clone());
        a.insert(ANNOTATION_REVISION.into(), self.revision.as_str().into());
        a.insert(ANNOTATION_IMAGE.into(), self.image());
        if let Some(t) = &self.tag {
            a.insert(ANNOTATION_TAG.into(), t.clone());
        }
        a
    }
}

/// A label value (at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both
/// ends) standing for `s`; `None` if nothing is left.
pub fn label_value(s: &str) -> Option<String> {
    let mut v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    v.truncate(63);
    let v = v.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!v.is_empty()).then(|| v.to_string())
}

/// Lexically normalises a relative path (`a/./b/../c` → `a/c`); `None` if
/// it is absolute or climbs above its start. `""` and `.` give `""`.
pub fn normalize_rel(p: &str) -> Option<String> {
    if p.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn empty_dir(name: &str, size: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(size.into())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// The Kaniko flags that do not depend on the commit, in a stable order.
pub fn kaniko_args(spec: &BuildSpec) -> Vec<String> {
    let mut a = vec![format!("--context=dir://{CONTEXT_DIR}")];
    if let Some(d) = &spec.context_dir {
        a.push(format!("--context-sub-path={d}"));
    }
    // Absolute: Kaniko first tries a relative --dockerfile against its
    // working directory, where a same-named file would win over the one in
    // the context.
    a.push(format!(
        "--dockerfile={CONTEXT_DIR}/{}",
        spec.dockerfile_in_repo()
    ));
    if let Some(t) = &spec.target {
        a.push(format!("--target={t}"));
    }
    for (k, v) in &spec.build_args {
        a.push(format!("--build-arg={k}={v}"));
    }
    if let Some(t) = &spec.tag {
        a.push(format!("--destination={}:{t}", spec.image()));
    }
    // Kaniko tries each mapped registry first and the original one after
    // (no --skip-default-registry-fallback): a mirror that is down costs a
    // failed attempt, not the build.
    for m in &spec.registry_map {
        a.push(format!("--registry-map={m}"));
    }
    if spec.cache {
        a.push("--cache=true".into());
        a.push(format!("--cache-repo={}", spec.cache_repo()));
    } else {
        a.push("--cache=false".into());
    }
    // Always host:port: Kaniko matches the registry exactly, and without a
    // port it tries :443.
    a.push(format!(
        "--registry-certificate={}={CA_DIR}/{CA_KEY}",
        spec.registry
    ));
    a.push("--digest-file=/dev/termination-log".into());
    a.push(format!(
        "--image-name-with-digest-file={OUT_DIR}/image-name"
    ));
    a.push("--snapshot-mode=redo".into());
    // Uncompressed cache layers: much less memory for large layers.
    a.push("--compressed-caching=false".into());
    a.push(format!("--push-retry={}", spec.push_retry));
    // The `LEVEL[secs] message` form the log parser reads (it strips the
    // colour codes).
    a.push("--log-format=color".into());
    a
}

/// The build Job.
pub fn job(spec: &BuildSpec) -> Job {
    let labels = spec.labels();
    let mut git_env = vec![
        env("HOME", HOME_DIR),
        // The root filesystem is read-only: temporary files go to $HOME too.
        env("TMPDIR", HOME_DIR),
        // Never wait for a password on a terminal that is not there.
        env("GIT_TERMINAL_PROMPT", "0"),
        // A kubelet creates the context emptyDir owned by root (fsGroup sets
        // only its group and mode 2777), and git >= 2.35.2 refuses a
        // repository whose top directory another uid owns ("detected dubious
        // ownership"), so every git call in /slipway/context failed as uid
        // 65534 (#9). Trust exactly that path, never `*`. safe.directory is
        // only read from protected config (system, global, command line);
        // GIT_CONFIG_COUNT is command-line scope, and unlike --global it
        // needs no writable $HOME before the first git call. Everything else
        // git touches (.git, $HOME, submodule checkouts) the script creates,
        // so uid 65534 owns it.
        env("GIT_CONFIG_COUNT", "1"),
        env("GIT_CONFIG_KEY_0", "safe.directory"),
        env("GIT_CONFIG_VALUE_0", CONTEXT_DIR),
        env("SLIPWAY_GIT_URL", &spec.git_url),
        env("SLIPWAY_REVISION", spec.revision.as_str()),
        env("SLIPWAY_REVISION_KIND", spec.revision.kind()),
        env("SLIPWAY_DOCKERFILE", &spec.dockerfile_in_repo()),
    ];
    if let Some(d) = &spec.context_dir {
        git_env.push(env("SLIPWAY_CONTEXT_DIR", d));
    }
    let mut git_mounts = vec![
        mount("context", CONTEXT_DIR, false),
        mount("out", OUT_DIR, false),
        mount("home", HOME_DIR, false),
    ];
    if spec.git_secret.is_some() {
        git_mounts.push(mount("git-secret", GIT_SECRET_DIR, true));
    }
    let git = Container {
        name: GIT_CONTAINER.into(),
        image: Some(spec.git_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), GIT_SCRIPT.into()]),
        env: Some(git_env),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
            limits: Some(quantities(&[("memory", &spec.memory)])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(GIT_UID),
            run_as_group: Some(GIT_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(git_mounts),
        ..Default::default()
    };

    let mut kaniko_env = vec![
        env("SLIPWAY_SOURCE_URL", &spec.git_url),
        // Prints Kaniko's build plan before the build; its commands give the
        // m of the progress line's STEP n/m (absent: STEP n).
        env("KANIKO_PRINT_PLAN", "1"),
    ];
    if spec.tag.is_none() {
        kaniko_env.push(env("SLIPWAY_IMAGE_BY_COMMIT", &spec.image()));
    }
    let mut kaniko_mounts = vec![
        mount("context", CONTEXT_DIR, false),
        mount("out", OUT_DIR, false),
        mount("registry-ca", CA_DIR, true),
    ];
    if spec.push_secret.is_some() {
        kaniko_mounts.push(mount("docker-config", DOCKER_CONFIG_DIR, true));
    }
    let kaniko = Container {
        name: KANIKO_CONTAINER.into(),
        image: Some(spec.executor_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            "/busybox/sh".into(),
            "-c".into(),
            KANIKO_WRAPPER.into(),
            "slipway-kaniko".into(),
        ]),
        args: Some(kaniko_args(spec)),
        env: Some(kaniko_env),
        // CPU is requested, not limited: a build is bursty and a CPU limit
        // only throttles it. Memory is limited so that an OOM ends the build
        // (reported as OOMKilled) instead of the node's other pods.
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", &spec.cpu), ("memory", &spec.memory)])),
            limits: Some(quantities(&[("memory", &spec.memory)])),
            ..Default::default()
        }),
        // Kaniko runs as root with the default capabilities: it unpacks the
        // base image over its own root filesystem and runs RUN steps as the
        // Dockerfile's users, which needs chown/setuid.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(kaniko_mounts),
        ..Default::default()
    };

    let mut volumes = vec![
        Volume {
            name: "context".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        empty_dir("out", "1Mi"),
        empty_dir("home", "16Mi"),
        Volume {
            name: "registry-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: spec.ca_configmap.clone(),
                items: Some(vec![KeyToPath {
                    key: CA_KEY.into(),
                    path: CA_KEY.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(s) = &spec.git_secret {
        volumes.push(Volume {
            name: "git-secret".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.clone()),
                // Group-readable: the git container's group is the pod's
                // fsGroup.
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(s) = &spec.push_secret {
        volumes.push(Volume {
            name: "docker-config".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.name.clone()),
                // Only the config.json: the push Secret also holds the
                // password and its htpasswd entry, which Kaniko never needs.
                items: Some(vec![KeyToPath {
                    key: s.key.clone(),
                    path: "config.json".into(),
                    ..Default::default()
                }]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    Job {
        metadata: ObjectMeta {
            name: Some(spec.job_name()),
            namespace: Some(spec.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(spec.annotations()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // The default (6) would run a broken build seven times.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(spec.timeout_secs),
            ttl_seconds_after_finished: Some(spec.ttl_secs),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(spec.service_account.clone()),
                    // Build pods need no API access.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(GIT_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    init_containers: Some(vec![git]),
                    containers: vec![kaniko],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The registry CA ConfigMap for the build namespace: the object the PKI
/// planner creates there ([`crate::pki::plan::ca_configmap`]), so that
/// `--render` prints what `slipway build` would write.
pub fn ca_config_map(
    namespace: &str,
    name: &str,
    ca_pem: &str,
    copied_from: Option<&str>,
) -> ConfigMap {
    crate::pki::plan::ca_configmap(
        namespace,
        name,
        ca_pem,
        &copied_from_annotation(copied_from),
    )
}

/// `slipway.dev/copied-from: NS/NAME` when the CA was copied from the
/// ConfigMap `slipway pki` publishes.
pub fn copied_from_annotation(copied_from: Option<&str>) -> BTreeMap<String, String> {
    copied_from
        .map(|from| BTreeMap::from([(ANNOTATION_COPIED_FROM.to_string(), from.to_string())]))
        .unwrap_or_default()
}

/// What `--render` knows about the registry CA without asking the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderCa<'a> {
    /// The build runs in the CA's own namespace: the ConfigMap is there.
    InPlace,
    /// `--registry-ca-file`: render the ConfigMap with this PEM.
    Pem(&'a str),
    /// Another namespace and no file: say how to copy it.
    CopyNeeded { from_namespace: &'a str },
}

/// `--render`: the complete multi-document YAML for `kubectl create -f -`
/// (a ConfigMap first if the build needs one, then the Job), preceded by
/// comments naming what must already exist.
pub fn render(spec: &BuildSpec, ca: RenderCa<'_>) -> Result<String, serde_yaml::Error> {
    let mut s = String::new();
    s.push_str(&format!(
        "# slipway build {} ({} at {}): kubectl create -f -\n",
        spec.job_name(),
        spec.git_url,
        spec.revision.as_str()
    ));
    s.push_str(&format!(
        "# Needs in namespace {}: ServiceAccount {}",
        spec.namespace, spec.service_account
    ));
    if let Some(secret) = &spec.git_secret {
        s.push_str(&format!(", Secret {secret}"));
    }
    if let Some(p) = &spec.push_secret {
        s.push_str(&format!(", Secret {} (key {})", p.name, p.key));
    }
    if matches!(ca, RenderCa::InPlace | RenderCa::CopyNeeded { .. }) {
        s.push_str(&format!(", ConfigMap {} (key {CA_KEY})", spec.ca_configmap));
    }
    s.push_str(".\n");
    if let RenderCa::CopyNeeded { from_namespace } = ca {
        s.push_str(&format!(
            "# Copy the CA first: kubectl -n {from_namespace} get configmap {cm} -o jsonpath='{{.data.ca\\.crt}}' > ca.crt && kubectl -n {ns} create configmap {cm} --from-file=ca.crt=ca.crt\n",
            cm = spec.ca_configmap,
            ns = spec.namespace
        ));
    }
    if let RenderCa::Pem(pem) = ca {
        s.push_str("---\n");
        s.push_str(&serde_yaml::to_string(&ca_config_map(
            &spec.namespace,
            &spec.ca_configmap,
            pem,
            None,
        ))?);
    }
    s.push_str("---\n");
    s.push_str(&serde_yaml::to_string(&job(spec))?);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(s: &str) -> Revision {
        Revision::parse(s).unwrap()
    }

    #[test]
    fn classifies_branches_tags_and_commits() {
        assert_eq!(rev("main"), Revision::Ref("main".into()));
        assert_eq!(rev("feature/login"), Revision::Ref("feature/login".into()));
        assert_eq!(rev("v1.2.3"), Revision::Ref("v1.2.3".into()));
        assert_eq!(rev("refs/tags/v1"), Revision::Ref("refs/tags/v1".into()));
        assert_eq!(rev("release-2024"), Revision::Ref("release-2024".into()));
        let full = "3f786850e387550fdab836ed7e6dc881de23001b";
        assert_eq!(rev(full), Revision::Commit(full.into()));
        assert_eq!(
            rev(&full.to_uppercase()),
            Revision::Commit(full.into()),
            "hex is case-insensitive and lowercased"
        );
        let sha256 = "a".repeat(64);
        assert_eq!(rev(&sha256), Revision::Commit(sha256.clone()));
        assert_eq!(rev("abc1234"), Revision::ShortCommit("abc1234".into()));
        assert_eq!(rev(&full[..12]), Revision::ShortCommit(full[..12].into()));
        assert_eq!(rev(&full[..39]), Revision::ShortCommit(full[..39].into()));
        // Under 7 hex digits is a name (a short sha must have 7 or more).
        assert_eq!(rev("cafe"), Revision::Ref("cafe".into()));
        assert_eq!(rev("abc123"), Revision::Ref("abc123".into()));
        assert_eq!(rev("1234"), Revision::Ref("1234".into()));
    }

    #[test]
    fn revision_kinds_are_what_the_script_expects() {
        assert_eq!(rev("main").kind(), "ref");
        assert_eq!(rev(&"b".repeat(40)).kind(), "commit");
        assert_eq!(rev("deadbee").kind(), "short-commit");
    }

    #[test]
    fn rejects_names_git_would_reject() {
        for bad in [
            "",
            "-x",
            "a b",
            "a..b",
            "a~1",
            "HEAD^",
            "a:b",
            "x?",
            "x*",
            "x[",
            "a\\b",
            "@",
            "a@{1}",
            "/a",
            "a/",
            "a.",
            "a.lock",
            "a//b",
            ".hidden",
            "a/.b",
            "tab\there",
            &"a".repeat(50),
        ] {
            let r = Revision::parse(bad);
            // 50 non-hex 'a's is fine as a name; 50 hex digits is not.
            if bad == "a".repeat(50) {
                assert!(r.is_err(), "{bad:?} is 50 hex digits");
                continue;
            }
            assert!(r.is_err(), "{bad:?} must be rejected, got {r:?}");
        }
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(
            label_value("feature/login").as_deref(),
            Some("feature-login")
        );
        assert_eq!(label_value("team/app").as_deref(), Some("team-app"));
        assert_eq!(label_value("v1.2.3").as_deref(), Some("v1.2.3"));
        assert_eq!(label_value("/x/").as_deref(), Some("x"));
        assert_eq!(label_value("///"), None);
        assert_eq!(label_value(&"x".repeat(80)).unwrap().len(), 63);
    }

    #[test]
    fn normalizes_relative_paths() {
        assert_eq!(normalize_rel("a/./b/../c").as_deref(), Some("a/c"));
        assert_eq!(
            normalize_rel("sub/../Dockerfile").as_deref(),
            Some("Dockerfile")
        );
        assert_eq!(normalize_rel(".").as_deref(), Some(""));
        assert_eq!(normalize_rel("../x"), None);
        assert_eq!(normalize_rel("/etc/passwd"), None);
    }
}
