//! The build follower on real Kaniko v1.27.6 output (#9): every fixture in
//! `integration/fixtures/kaniko-v1.27.6/` (see its README for how it was
//! captured) is fed to `builds::log::KanikoLog` line by line, as
//! `slipway build` streams it, and the failure classifier
//! (`builds::status`) is run on the result. Every expected value is counted
//! by hand from the fixture; the lines that justify it are quoted beside it.
//!
//! The Dockerfile of all the fixtures (README): stage `build` with
//! `ARG GREETING`, four `RUN`s and a `COPY`; stage `runner` with
//! `COPY --from=build`, one `RUN` and a `CMD`.

use slipway::builds::log::{ErrorClass, Event, KanikoLog};
use slipway::builds::status::{self, Context};
use slipway::builds::{exit, BuildError};

const COLD: &str = include_str!("fixtures/kaniko-v1.27.6/01-cold.kaniko.log");
const COLD_TERM: &str = include_str!("fixtures/kaniko-v1.27.6/01-cold.termination-log");
const WARM: &str = include_str!("fixtures/kaniko-v1.27.6/02-warm.kaniko.log");
const WARM_TERM: &str = include_str!("fixtures/kaniko-v1.27.6/02-warm.termination-log");
const CHANGE: &str = include_str!("fixtures/kaniko-v1.27.6/03-change.kaniko.log");
const CHANGE_TERM: &str = include_str!("fixtures/kaniko-v1.27.6/03-change.termination-log");
const CACHE_FAIL: &str = include_str!("fixtures/kaniko-v1.27.6/fail-cache-upload.kaniko.log");
const PUSH_FAIL: &str = include_str!("fixtures/kaniko-v1.27.6/fail-push.kaniko.log");
const RUN_FAIL: &str = include_str!("fixtures/kaniko-v1.27.6/fail-run-exit1.kaniko.log");

const REGISTRY: &str = "registry.shared-services:5000";

fn ctx() -> Context {
    Context {
        job: "build-app-fixture01".into(),
        registry: REGISTRY.into(),
        image: format!("{REGISTRY}/app"),
        memory: "2Gi".into(),
        ..Context::default()
    }
}

/// The log as `slipway build` reads it, and every event it produced.
fn follow(log: &str) -> (KanikoLog, Vec<Event>) {
    let mut k = KanikoLog::default();
    let events = log.lines().filter_map(|l| k.feed(l)).collect();
    (k, events)
}

fn stages(events: &[Event]) -> Vec<(String, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Stage { name, index } => Some((name.clone(), *index)),
            _ => None,
        })
        .collect()
}

fn cache_uploads(events: &[Event]) -> Vec<(u32, u32, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CacheUpload { n, m, target } => Some((*n, *m, target.clone())),
            _ => None,
        })
        .collect()
}

fn pushes(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Pushing(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn cache(key: &str) -> String {
    format!("{REGISTRY}/cache/app:{key}")
}

fn both_stages() -> Vec<(String, u32)> {
    // Plan: `FROM registry.shared-services:5000/base/busybox:1 AS build`,
    // `FROM registry.shared-services:5000/base/busybox:1 AS runner`; Kaniko
    // itself says `Building stage 'registry.shared-services:5000/base/
    // busybox:1' [idx: '0', …]` and `[idx: '1', …]`.
    vec![("build".into(), 0), ("runner".into(), 1)]
}

#[test]
fn cold_build_rebuilds_seven_steps_and_caches_five_layers() {
    let (k, ev) = follow(COLD);
    assert_eq!(stages(&ev), both_stages());
    // Plan instructions: ARG, RUN ×3, COPY, RUN (build); COPY, RUN, CMD
    // (runner) = 9; UNPACK/SAVE FILES/CLEAN/PUSH are not steps.
    assert_eq!(k.step_text(), "STEP 9/9");
    // No `Using caching version of cmd`; two `No cached layer found for cmd`
    // (RUN mkdir in build, RUN ls in runner) — Kaniko stops looking after
    // the first miss of a stage, but all seven layer steps ran: RUN mkdir,
    // RUN dd, RUN echo, COPY src/hello.txt, RUN cat, COPY --from, RUN ls.
    assert_eq!((k.cache_hits, k.cache_misses, k.rebuilt()), (0, 2, 7));
    // `Pushing layer …:cf56ef… to cache now`, then c95c10…, e8c62b…,
    // 9aecfd…, ec5636…, each followed (before the next is queued) by
    // `Pushing image to` the same name: upload n of the n queued so far.
    let keys = [
        "cf56ef3ffa71d94d72e5575ebded4bf2e69cb12ba5347b8dee55135a8cc13a17",
        "c95c102f4af0877270cb3c9665cdc3b63aafa28922b1f3abb46c81934b4a53f3",
        "e8c62bd3ffa4c266085237b99096a501412ee9e6018ef4f6aafc1cad7f6137c3",
        "9aecfde34ff65c02d4b8585012ede303e413b09a67ea0f8fffa74ce54768d703",
        "ec5636691cf61ed55819daeec52da67bbeb911c6046d5eddbdb4d389fdcccf80",
    ];
    let want: Vec<(u32, u32, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| (i as u32 + 1, i as u32 + 1, cache(key)))
        .collect();
    assert_eq!(cache_uploads(&ev), want);
    // Only `Pushing image to registry.shared-services:5000/app:59a5f77` is
    // the image; it is the progress line's "pushing" and nothing before it.
    assert_eq!(pushes(&ev), [format!("{REGISTRY}/app:59a5f77")]);
    assert_eq!(
        k.pushed.as_deref(),
        Some("registry.shared-services:5000/app@sha256:82f8c53c2f37627fc6b4cc5d7ba946ec1480c235971b3e6ac57dd5e10ee2c34d")
    );
    assert!(k.cache_upload_failures.is_empty() && k.retries.is_empty());
    assert_eq!(k.failure(), None);
    // The termination message: `sha256:82f8c5…` then `…/app@sha256:82f8c5…`.
    let built = status::kaniko_success(0, COLD_TERM, &ctx()).unwrap();
    assert_eq!(
        built.digest,
        "sha256:82f8c53c2f37627fc6b4cc5d7ba946ec1480c235971b3e6ac57dd5e10ee2c34d"
    );
}

#[test]
fn progress_never_sticks_on_a_cache_push() {
    // The issue: from STEP 3/9 of a cold build the line showed "pushing
    // …/cache/app:…" to the end. Status after each of these lines, in order:
    let at = |needle: &str| {
        let mut k = KanikoLog::default();
        for l in COLD.lines() {
            k.feed(l);
            if l.contains(needle) {
                break;
            }
        }
        k.status()
    };
    // `INFO[0000] Pushing image to …/cache/app:cf56…` while `RUN dd …`
    // (STEP 3: ARG, RUN mkdir, RUN dd) runs; RUN mkdir ran (its layer is the
    // one uploading), RUN dd is still running. The command is cut at 60
    // characters.
    assert_eq!(
        at("Pushing image to registry.shared-services:5000/cache/app:cf56"),
        "stage build STEP 3/9 RUN dd if=/dev/urandom of=/out/blob bs=1M count=32 2>/dev/nu… | caching layer 1/1 | cache: 0 hit, 1 rebuilt"
    );
    // `Pushed …/cache/app@sha256:9b307b…`: that upload is done.
    assert_eq!(
        at("Pushed registry.shared-services:5000/cache/app@sha256:9b307b"),
        "stage build STEP 3/9 RUN dd if=/dev/urandom of=/out/blob bs=1M count=32 2>/dev/nu… | cache: 0 hit, 1 rebuilt"
    );
    // `CMD ["cat", "/app/greeting.txt"]` in stage runner, STEP 9: the seven
    // layer steps have run; no upload in flight (`Pushing layer …ec5636…`
    // comes after this line).
    assert_eq!(
        at("CMD [\"cat\", \"/app/greeting.txt\"]  "),
        "stage runner STEP 9/9 CMD [\"cat\", \"/app/greeting.txt\"] | cache: 0 hit, 7 rebuilt"
    );
    // Only the image itself is "pushing".
    assert_eq!(
        at("Pushing image to registry.shared-services:5000/app:59a5f77"),
        "pushing registry.shared-services:5000/app:59a5f77 | cache: 0 hit, 7 rebuilt"
    );
}

#[test]
fn warm_build_takes_five_layers_from_the_cache() {
    let (k, ev) = follow(WARM);
    assert_eq!(stages(&ev), both_stages());
    // `Using caching version of cmd:` for RUN mkdir, RUN dd, RUN echo,
    // RUN cat (build) and RUN ls (runner) = 5; every RUN is followed by
    // `Found cached layer, extracting to filesystem`; what ran: `COPY
    // src/hello.txt /out/hello.txt` and `COPY --from=build /out /app` = 2.
    assert_eq!((k.cache_hits, k.cache_misses, k.rebuilt()), (5, 0, 2));
    // No `Pushing layer … to cache now`: nothing new to cache.
    assert!(cache_uploads(&ev).is_empty());
    assert_eq!(pushes(&ev), [format!("{REGISTRY}/app:59a5f77")]);
    assert_eq!(k.failure(), None);
    status::kaniko_success(0, WARM_TERM, &ctx()).unwrap();
}

#[test]
fn changed_source_rebuilds_from_the_copy_on() {
    let (k, ev) = follow(CHANGE);
    assert_eq!(stages(&ev), both_stages());
    // Hits: RUN mkdir, RUN dd, RUN echo; `No cached layer found for cmd RUN
    // cat …` (build) and `… RUN ls …` (runner); ran: COPY src/hello.txt,
    // RUN cat, COPY --from, RUN ls.
    assert_eq!((k.cache_hits, k.cache_misses, k.rebuilt()), (3, 2, 4));
    // `Pushing layer …:594c95… to cache now`, `Pushing layer …:1d0827…`.
    assert_eq!(
        cache_uploads(&ev),
        [
            (
                1,
                1,
                cache("594c95b19afe2b0d6f4a6f7c0acfd3e5ef9cf364c111af16a9e8d0fbd6cdd95a")
            ),
            (
                2,
                2,
                cache("1d08272c56ce76c75f372f07a41c50622141eaed4c214ab56cee8af83a03a118")
            ),
        ]
    );
    assert_eq!(pushes(&ev), [format!("{REGISTRY}/app:5923064")]);
    assert!(k.cache_upload_failures.is_empty());
    status::kaniko_success(0, CHANGE_TERM, &ctx()).unwrap();
}

#[test]
fn failed_cache_uploads_are_warnings_with_their_retries_and_cost() {
    let (k, ev) = follow(CACHE_FAIL);
    assert_eq!(stages(&ev), both_stages());
    // As 03-change: hits RUN mkdir, RUN dd, RUN echo; ran COPY, RUN cat,
    // COPY --from, RUN ls.
    assert_eq!((k.cache_hits, k.rebuilt()), (3, 4));
    // Two `WARN[0024]`/`WARN[0049] Error uploading layer to cache: failed to
    // push to destination …/cache/app:b89f62…` and `…:e0e4e0…`.
    let targets: Vec<Option<String>> = k
        .cache_upload_failures
        .iter()
        .map(|f| f.target.clone())
        .collect();
    assert_eq!(
        targets,
        [
            Some(cache(
                "b89f62a2ce4c66a2d8d1620700782bd4fb2617d82caa8823dfc4bb17326f3356"
            )),
            Some(cache(
                "e0e4e050e7aef24ddf63b962fd78acb2941d9fc559c532da61874fe92c2e04df"
            )),
        ]
    );
    // Each: `Retrying operation after 1s`, `2s`, `4s` (--push-retry=3), and
    // from `INFO[0000] Pushing image to …:b89f…` to `WARN[0024] Error
    // uploading…` = 24 s, from `INFO[0025] Pushing image to …:e0e4…` to
    // `WARN[0049]` = 24 s: 48 s of the 50 s build (`INFO[0050] Pushed
    // …/app@sha256:b08ffb…`) went to cache uploads that could not succeed.
    let cost: Vec<(u32, Option<u32>)> = k
        .cache_upload_failures
        .iter()
        .map(|f| (f.retries, f.seconds))
        .collect();
    assert_eq!(cost, [(3, Some(24)), (3, Some(24))]);
    let waits: Vec<(&str, bool)> = k
        .retries
        .iter()
        .map(|r| (r.after.as_str(), r.cache))
        .collect();
    assert_eq!(
        waits,
        [
            ("1s", true),
            ("2s", true),
            ("4s", true),
            ("1s", true),
            ("2s", true),
            ("4s", true)
        ]
    );
    assert_eq!(
        k.retries[0].operation,
        "POST https://registry.shared-services:5000/v2/cache/app/blobs/uploads/"
    );
    assert!(k.retries[0].cause.starts_with("UNKNOWN: unknown error"));
    // A warning, not a failure: the image was pushed
    // (`Pushing image to registry.shared-services:5000/app:8a28a50`).
    assert_eq!(pushes(&ev), [format!("{REGISTRY}/app:8a28a50")]);
    assert!(k.pushed.is_some());
    assert_eq!(k.failure(), None);
    assert!(k
        .status()
        .ends_with("| cache: 3 hit, 4 rebuilt, 2 upload failed"));
    assert_eq!(
        slipway::builds::log::classify_error(
            &format!(
                "Error uploading layer to cache: {}",
                k.cache_upload_failures[0].detail
            ),
            None
        ),
        ErrorClass::CacheUploadFailed
    );
}

#[test]
fn a_failing_run_step_is_classed_with_its_step_and_exit_code() {
    let (k, ev) = follow(RUN_FAIL);
    // Plan: `FROM … AS build`, `RUN echo "about to fail" && exit 1`,
    // `FROM … AS runner`, `COPY --from=build /etc/passwd /x`: 2 steps; only
    // the first stage started.
    assert_eq!(stages(&ev), [("build".to_string(), 0)]);
    assert_eq!(k.step_text(), "STEP 1/2");
    // `No cached layer found for cmd RUN echo …`; the RUN ran (and failed).
    assert_eq!((k.cache_hits, k.cache_misses, k.rebuilt()), (0, 1, 1));
    // The last line, without a level: `error building image: error building
    // stage: failed to execute command: waiting for process to exit: exit
    // status 1`; the RUN's own output `about to fail` is not an error.
    assert_eq!(
        k.final_error.as_deref(),
        Some("error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1")
    );
    assert_eq!(
        k.failure(),
        Some(ErrorClass::StepFailed {
            step: Some("RUN echo \"about to fail\" && exit 1".into()),
            exit_code: Some(1)
        })
    );
    // The wrapper empties the termination message on failure; the kubelet
    // puts the log tail there (FallbackToLogsOnError): here, the whole log.
    let e = status::kaniko_failure(1, "Error", RUN_FAIL, &k, &ctx());
    assert!(matches!(e, BuildError::StepFailed { .. }), "{e:?}");
    assert_eq!(e.exit_code(), exit::FAILED);
    assert_eq!(
        e.to_string(),
        "build build-app-fixture01 failed at step RUN echo \"about to fail\" && exit 1 (exit code 1): error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1"
    );
    // The same class from the termination message alone (slipway saw no log).
    let e = status::kaniko_failure(1, "Error", RUN_FAIL, &KanikoLog::default(), &ctx());
    assert_eq!(e.kind(), "step-failed");
}

#[test]
fn a_failed_push_permission_check_is_a_push_failure() {
    let (k, ev) = follow(PUSH_FAIL);
    // Kaniko checks the push permission before anything else: no plan, no
    // stage, no step.
    assert!(stages(&ev).is_empty());
    assert_eq!((k.step, k.rebuilt()), (0, 0));
    // `error checking push permissions: checking push permission for
    // "registry.shared-services:5000/app:8a28a50": POST https://…/v2/app/
    // blobs/uploads/: UNKNOWN: unknown error; …`: no 401/403 or denied, so
    // the registry failed, not the credentials.
    assert_eq!(k.failure(), Some(ErrorClass::Push { denied: false }));
    let e = status::kaniko_failure(1, "Error", PUSH_FAIL, &k, &ctx());
    assert!(matches!(e, BuildError::PushFailed { .. }), "{e:?}");
    assert_eq!(e.exit_code(), exit::PUSH_FAILED);
    assert!(
        e.to_string().starts_with(
            "push to registry.shared-services:5000 failed: error checking push permissions: checking push permission for \"registry.shared-services:5000/app:8a28a50\""
        ),
        "{e}"
    );
}

/// Prints what the user sees for each fixture's class (README, "Build an
/// image"): `cargo test --test kaniko_logs -- --nocapture show`.
#[test]
fn show_what_the_user_sees() {
    for (name, log, code) in [("fail-run-exit1", RUN_FAIL, 1), ("fail-push", PUSH_FAIL, 1)] {
        let (k, _) = follow(log);
        let e = status::kaniko_failure(code, "Error", log, &k, &ctx());
        println!("{name}: exit {} ({}): error: {e}", e.exit_code(), e.kind());
    }
    let (k, _) = follow(CACHE_FAIL);
    for f in &k.cache_upload_failures {
        println!(
            "fail-cache-upload: retries {} seconds {:?}: {}",
            f.retries, f.seconds, f.detail
        );
    }
    println!("fail-cache-upload status: {}", k.status());
}

// ---- real Kaniko v1.27.5 in the test cluster (#19) ----------------------------
//
// `integration/fixtures/kaniko-v1.27.5/` (see its README): the executor
// built from source, run by a real kubelet from the Job `slipway build`
// created, with the push Secret mounted, and what slipway printed while it
// followed each build (`*.slipway.stderr`). Every count below is checked
// against the line the runner printed in that run.

mod cluster_run {
    use super::*;

    const COLD: &str = include_str!("fixtures/kaniko-v1.27.5/01-cold.kaniko.log");
    const COLD_TERM: &str = include_str!("fixtures/kaniko-v1.27.5/01-cold.termination-log");
    const COLD_ERR: &str = include_str!("fixtures/kaniko-v1.27.5/01-cold.slipway.stderr");
    const WARM: &str = include_str!("fixtures/kaniko-v1.27.5/02-warm.kaniko.log");
    const WARM_TERM: &str = include_str!("fixtures/kaniko-v1.27.5/02-warm.termination-log");
    const WARM_ERR: &str = include_str!("fixtures/kaniko-v1.27.5/02-warm.slipway.stderr");
    const CHANGE: &str = include_str!("fixtures/kaniko-v1.27.5/03-change.kaniko.log");
    const CHANGE_TERM: &str = include_str!("fixtures/kaniko-v1.27.5/03-change.termination-log");
    const CHANGE_ERR: &str = include_str!("fixtures/kaniko-v1.27.5/03-change.slipway.stderr");
    const RUN_FAIL: &str = include_str!("fixtures/kaniko-v1.27.5/fail-run-exit1.kaniko.log");
    const RUN_FAIL_TERM: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-run-exit1.termination-log");
    const RUN_FAIL_ERR: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-run-exit1.slipway.stderr");
    const DENIED: &str = include_str!("fixtures/kaniko-v1.27.5/fail-push-denied.kaniko.log");
    const DENIED_TERM: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-push-denied.termination-log");
    const DENIED_ERR: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-push-denied.slipway.stderr");
    const DOWN: &str = include_str!("fixtures/kaniko-v1.27.5/fail-registry-down.kaniko.log");
    const DOWN_TERM: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-registry-down.termination-log");
    const DOWN_ERR: &str =
        include_str!("fixtures/kaniko-v1.27.5/fail-registry-down.slipway.stderr");

    /// The Context of the run: the Job's name from the runner's first line,
    /// `slipway: created job shared-services/NAME: …`.
    fn run_ctx(stderr: &str) -> Context {
        let first = stderr.lines().next().unwrap();
        let job = first
            .strip_prefix("slipway: created job shared-services/")
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("first line: {first}"));
        Context {
            job: job.into(),
            ..ctx()
        }
    }

    /// `cache: H hit, R rebuilt` from the runner's `built …` line.
    fn printed_cache(stderr: &str) -> (u32, u32) {
        let built = stderr
            .lines()
            .find(|l| l.starts_with("slipway: built "))
            .expect("a built line");
        let c = built.split("(cache: ").nth(1).unwrap();
        let mut n = c
            .split(|ch: char| !ch.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().unwrap());
        (n.next().unwrap(), n.next().unwrap())
    }

    #[test]
    fn cold_warm_and_one_change_count_only_the_steps_that_make_layers() {
        // Dockerfile (README): WORKDIR /app, COPY greeting.txt, RUN echo,
        // COPY check.sh, RUN sh check.sh, CMD.
        for (name, log, term, err, want, workdir) in [
            // Cold: `No cached layer found for cmd WORKDIR /app` (the
            // fresh cluster's cache/app is empty; WORKDIR makes no layer
            // of files, so it is not rebuilt either); ran: both COPYs and
            // both RUNs.
            (
                "cold",
                COLD,
                COLD_TERM,
                COLD_ERR,
                (0, 4),
                "No cached layer found for cmd WORKDIR /app",
            ),
            // Warm: `Using caching version of cmd: RUN echo …` and `… RUN sh
            // check.sh …`, and of `WORKDIR /app`, which is not a hit; ran:
            // the two COPYs.
            (
                "warm",
                WARM,
                WARM_TERM,
                WARM_ERR,
                (2, 2),
                "Using caching version of cmd: WORKDIR /app",
            ),
            // check.sh changed: RUN echo from the cache; `No cached layer
            // found for cmd RUN sh check.sh`; ran: two COPYs and that RUN.
            (
                "change",
                CHANGE,
                CHANGE_TERM,
                CHANGE_ERR,
                (1, 3),
                "Using caching version of cmd: WORKDIR /app",
            ),
        ] {
            assert!(log.contains(workdir), "{name}: {workdir}");
            let (k, _) = follow(log);
            assert_eq!((k.cache_hits, k.rebuilt()), want, "{name}");
            assert_eq!(printed_cache(err), want, "{name}: what the runner printed");
            // Same Dockerfile, same number of counted steps.
            assert_eq!(k.cache_hits + k.rebuilt(), 4, "{name}");
            let built = status::kaniko_success(0, term, &run_ctx(err)).unwrap();
            assert!(
                err.contains(&format!("slipway: built {} from commit", built.image_ref)),
                "{name}: {}",
                built.image_ref
            );
        }
    }

    #[test]
    fn the_mounted_push_secret_is_not_a_warning() {
        // Every log names the mounted config.json first.
        for log in [COLD, WARM, CHANGE, RUN_FAIL, DENIED, DOWN] {
            assert!(log.contains(
                "credential providers by priority: [file:/kaniko/.docker/config.json, env,"
            ));
            let (_, ev) = follow(log);
            assert!(
                !ev.iter()
                    .any(|e| matches!(e, Event::Warning(w) if w.contains("credential"))),
                "{ev:?}"
            );
        }
    }

    #[test]
    fn failures_are_classed_as_the_runner_printed_them() {
        for (name, log, term, err, code) in [
            (
                "RUN exits 1",
                RUN_FAIL,
                RUN_FAIL_TERM,
                RUN_FAIL_ERR,
                exit::FAILED,
            ),
            ("wrong push Secret", DENIED, DENIED_TERM, DENIED_ERR, 13),
            (
                "registry down",
                DOWN,
                DOWN_TERM,
                DOWN_ERR,
                exit::PUSH_FAILED,
            ),
        ] {
            let (k, _) = follow(log);
            let e = status::kaniko_failure(1, "Error", term, &k, &run_ctx(err));
            assert_eq!(e.exit_code(), code, "{name}: {e}");
            let last = err.lines().last().unwrap();
            assert_eq!(last, format!("slipway: {e}"), "{name}");
        }
        // The step is named from the log; the termination message (the
        // kubelet's log tail) alone names the class.
        let (k, _) = follow(RUN_FAIL);
        assert_eq!(
            k.failure(),
            Some(ErrorClass::StepFailed {
                step: Some("RUN echo about to fail && exit 1".into()),
                exit_code: Some(1)
            })
        );
    }

    #[test]
    fn with_the_registry_down_the_ping_retries_belong_to_the_push_under_way() {
        let (k, _) = follow(DOWN);
        // `Pushing image to …/cache/app:e7304e…`, then three `Retrying
        // operation after 1s/2s/4s due to Get "https://…:5000/v2/"` and
        // `Error uploading layer to cache`; then `Pushing image to
        // …/app:59ee71a` and three more retries of the same ping.
        let cache: Vec<bool> = k.retries.iter().map(|r| r.cache).collect();
        assert_eq!(cache, [true, true, true, false, false, false]);
        assert_eq!(k.cache_upload_failures.len(), 1);
        assert_eq!(k.cache_upload_failures[0].retries, 3);
        // [0045] … [0052].
        assert_eq!(k.cache_upload_failures[0].seconds, Some(7));
    }
}
