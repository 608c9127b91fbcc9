//! `batond` end to end with a worker in another language (Python, `env`
//! signature mode): cutover, rejection, restart, drain, reload, watch.

use std::ffi::OsStr;
use std::time::Duration;

use baton::control::api::GenState;
use http::{Method, StatusCode};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_on_source_change_in_env_mode() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let first = s.active.expect("active");
    let (g, pid1, who) = whoami(d.addr).await;
    assert_eq!(g, 1);
    assert_eq!(Some(pid1), first.pid);
    // The worker sees the forwarding headers.
    let h = &who["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], d.addr.to_string());
    assert_eq!(h["host"], d.addr.to_string());
    // batond names itself in `Via` (RFC 9110 §7.6.3).
    assert_eq!(h["via"], "1.1 batond");
    assert_eq!(who["target"], "/whoami");
    // An absolute-form target reaches the worker in origin form, its
    // authority as `Host` and `X-Forwarded-Host`.
    let raw = raw_request(
        d.addr,
        "GET http://voice.example.test/whoami?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let abs: serde_json::Value = serde_json::from_str(body).expect("whoami JSON");
    assert_eq!(abs["target"], "/whoami?x=1", "{raw}");
    assert_eq!(abs["headers"]["host"], "voice.example.test", "{raw}");
    assert_eq!(abs["headers"]["x-forwarded-host"], "voice.example.test");
    // Every response carries the signature the supervisor fixed.
    let (code, headers, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        headers["x-app-signature"].to_str().ok(),
        first.signature.as_deref()
    );

    p.append("src/pyworker.py", "\n# an edit\n");
    let s = d.wait_active(2).await;
    let second = s.active.expect("active");
    assert_ne!(second.signature, first.signature);
    assert!(
        second.trigger.contains("src/pyworker.py"),
        "{}",
        second.trigger
    );
    let (g, pid2, _) = whoami(d.addr).await;
    assert_eq!(g, 2);
    assert_ne!(pid1, pid2);
    d.wait_history(1, "stopped").await;
    assert!(wait_gone(pid1).await, "old worker still running");
    let gen2_dir = p.path("state/gen-0002");
    assert!(gen2_dir.join("pyworker.py").exists(), "snapshot kept");
    assert!(read(&gen2_dir.join("worker.log")).contains("listening on"));
    assert!(d.stop().await.success());
    assert!(wait_gone(pid2).await, "worker survived the daemon's stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_build_keeps_the_old_worker() {
    let p = Project::python("", "");
    // It fails as cargo does: each error with its place, then a summary.
    p.edit("etc/baton.toml", "command = []", r#"command = ["sh", "-c", "if grep -q BROKEN src/pyworker.py; then printf 'error: the source is broken\\n  --> src/pyworker.py:3:1\\nerror[E0425]: another\\nerror: could not compile `pyworker` due to 2 previous errors\\n' >&2; exit 2; fi"]"#);
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    p.append("src/pyworker.py", "\n# BROKEN\n");
    let g2 = d.wait_history(2, "failed").await;
    let reason = g2.reason.expect("reason");
    // The first error, where it is, and that there are more: not the
    // summary, which says only that there were some.
    assert_eq!(
        reason,
        "build failed: code 2: error: the source is broken at src/pyworker.py:3:1 (and 1 more error)"
    );
    // And where the rest is.
    assert!(
        d.log_shows("the build's output: batonctl logs -g 2 --build")
            .await,
        "{}",
        d.log()
    );
    let s = d.status().await;
    assert_eq!(s.active.as_ref().map(|a| a.id), Some(1));
    assert_eq!(whoami(d.addr).await.0, 1);
    assert!(read(&p.path("state/gen-0002/build.log")).contains("the source is broken"));
    // Without -g, `logs --build` is the build that just failed, and `logs`
    // the worker that serves.
    let out = d.ctl(&["logs", "--build"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the source is broken"),
        "{out:?}"
    );
    let out = d.ctl(&["logs"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("the source is broken"),
        "{out:?}"
    );
    // `batonctl deploy --wait` reports the failure with a non-zero exit.
    let out = d.ctl(&["deploy", "--wait"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("build failed"));
    // Fixing the source deploys again.
    p.write("src/pyworker.py", pyworker_source());
    let s = d
        .wait_for("a fixed generation active", |s| {
            s.active.as_ref().is_some_and(|a| a.id > 3)
        })
        .await;
    assert_eq!(
        whoami(d.addr).await.0,
        s.active.as_ref().expect("active").id
    );
    // The newest build is now the one that serves, not a failed one of
    // the history.
    let out = d.ctl(&["logs", "--build"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("the source is broken"),
        "{out:?}"
    );
    // Every deploy so far is counted once: the first and the fixed one
    // served, the broken edit and `deploy --wait` failed their build.
    let t = s.totals;
    assert_eq!(
        (t.deploys_active, t.deploys_failed, t.deploys_rejected),
        (2, 2, 0),
        "{t:?}"
    );
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("\nbaton_deploys_failed_total 2\n"), "{text}");
    assert!(text.contains("\nbaton_deploys_active_total 2\n"), "{text}");
}

/// An artifact that is no file fails its deploy with a reason that says
/// what it is, leaves nothing half-written, and holds up no later deploy
/// (a FIFO once blocked the snapshot, and every deploy after it, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_that_is_no_file_fails_its_deploy_only() {
    let p = Project::python("", "");
    p.write("src/kind", "file");
    p.edit(
        "etc/baton.toml",
        "command = []\nartifact = \"src/pyworker.py\"",
        r#"command = ["sh", "-c", "rm -rf build/odd; mkdir -p build; case $(cat src/kind) in fifo) mkfifo build/odd;; dir) mkdir build/odd;; *) cp src/pyworker.py build/odd;; esac"]
artifact = "build/odd""#,
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    for (g, kind, what) in [(2, "fifo", "a FIFO"), (3, "dir", "a folder")] {
        p.write("src/kind", kind);
        let info = d.wait_history(g, "failed").await;
        // The build ran: its time is in the history too.
        assert!(info.build_ms.is_some(), "{info:?}");
        let reason = info.reason.expect("reason");
        assert!(reason.contains(&format!("build/odd is {what}")), "{reason}");
        assert!(
            !p.path(&format!("state/gen-{g:04}/.snapshot.tmp")).exists(),
            "a half-made snapshot was left"
        );
        assert_eq!(d.status().await.active.map(|a| a.id), Some(1));
    }
    p.write("src/kind", "file");
    d.wait_active(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_404_is_rejected_and_traffic_stays() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "start_timeout_s = 10",
        "start_timeout_s = 5",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    p.append("src/pyworker.py", "\n# HEALTH=404\n");
    let g2 = d.wait_history(2, "rejected").await;
    assert_eq!(g2.reason.as_deref(), Some("healthz 404"));
    assert_eq!(whoami(d.addr).await.0, 1);
    let out = d.ctl(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Active: gen 1 active"), "{text}");
    let active_line = text
        .lines()
        .find(|l| l.contains("Active:"))
        .unwrap_or_default();
    assert!(active_line.contains(" cut over 20"), "{text}");
    assert!(text.contains("gen 2 rejected"), "{text}");
    assert!(text.contains("healthz 404"), "{text}");
    assert!(
        text.contains("Deploys: 1 active, 1 rejected, 0 failed; 0 restarts"),
        "{text}"
    );
    // A redirect is a final answer too: rejected at once, not after the
    // start timeout.
    p.edit("src/pyworker.py", "\n# HEALTH=404\n", "\n# HEALTH=301\n");
    let s = d
        .wait_for("a deploy rejected for its redirect", |s| {
            s.history
                .iter()
                .any(|h| h.reason.as_deref().is_some_and(|r| r.contains("301")))
        })
        .await;
    let reasons: Vec<_> = s.history.iter().filter_map(|h| h.reason.clone()).collect();
    assert!(reasons.iter().any(|r| r == "healthz 301"), "{reasons:?}");
    // A 503 may pass (a worker warming up): probed until the start
    // timeout, whose reason is that last answer.
    // (Answered 60 ms late: the last probe, at the deadline, must not
    // turn the reason into a probe that timed out.)
    p.edit(
        "src/pyworker.py",
        "\n# HEALTH=301\n",
        "\n# HEALTH=503\n# HEALTH_DELAY_MS=60\n",
    );
    let s = d
        .wait_for("a deploy that stayed 503", |s| {
            s.history.iter().any(|h| {
                h.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("start timeout"))
            })
        })
        .await;
    let reasons: Vec<_> = s.history.iter().filter_map(|h| h.reason.clone()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r == "start timeout after 5 s (healthz 503)"),
        "{reasons:?}"
    );
    assert_eq!(whoami(d.addr).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_signature_is_rejected_with_both_digests() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let old_sig = s.active.and_then(|a| a.signature).expect("sig");
    // The new build presents the old build's digest: a stale process.
    p.append("src/pyworker.py", &format!("\n# SIGNATURE={old_sig}\n"));
    let g2 = d.wait_history(2, "rejected").await;
    let reason = g2.reason.expect("reason");
    let want = g2.signature.expect("sig");
    assert!(reason.starts_with("signature mismatch: want "), "{reason}");
    assert!(reason.contains(&want[..12]), "{reason}");
    assert!(
        reason.contains(&format!("got {}", &old_sig[..12])),
        "{reason}"
    );
    assert_eq!(whoami(d.addr).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restarts_the_same_snapshot_and_holds_requests() {
    let p = Project::python("", "[restart]\nbackoff_initial_ms = 200\n");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let a = s.active.expect("active");
    let (code, _, _) = d.get("/crash").await;
    assert_eq!(code, StatusCode::OK);
    // Requests during the restart wait for the fresh process, not a 502/503.
    let (g, pid, _) = whoami(d.addr).await;
    assert_eq!(g, 1);
    assert_ne!(Some(pid), a.pid);
    let s = d
        .wait_for("restarted", |s| {
            s.active
                .as_ref()
                .is_some_and(|x| x.restarts == 1 && x.pid == Some(pid))
        })
        .await;
    let b = s.active.expect("active");
    assert_eq!(b.id, 1);
    assert_eq!(b.signature, a.signature, "same snapshot");
    assert_eq!(s.state, "running");
    assert!(d.log_shows("worker_exited").await);
    // Counted since start, in the status and in /metrics.
    assert_eq!(s.totals.restarts, 1, "{:?}", s.totals);
    assert_eq!(s.totals.deploys_active, 1, "{:?}", s.totals);
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("\nbaton_worker_restarts_total 1\n"), "{text}");
    let out = d.ctl(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Deploys: 1 active, 0 rejected, 0 failed; 1 restarts"),
        "{text}"
    );
    // An operator's restart starts the delay over: the next crash waits
    // the first delay again, not the doubled one.
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    let (code, _, _) = d.get("/crash").await;
    assert_eq!(code, StatusCode::OK);
    d.wait_for("restarted again", |s| {
        s.active.as_ref().is_some_and(|x| x.restarts == 3)
    })
    .await;
    let log = d.log();
    assert_eq!(
        log.matches("restarting the same snapshot in 200 ms")
            .count(),
        2,
        "{log}"
    );
    assert!(
        !log.contains("restarting the same snapshot in 400 ms"),
        "{log}"
    );
}

/// While a crash restart's process proves itself (here it takes a second
/// to listen), the status shows its pid and says it is starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restart_shows_its_process_while_it_proves_itself() {
    let p = Project::python("", "[restart]\nbackoff_initial_ms = 50\n");
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    p.write("delay", "1500");
    sigkill(pid1);
    let s = d
        .wait_for("the restart's process", |s| {
            s.state == "restarting" && s.active.as_ref().is_some_and(|a| a.pid.is_some())
        })
        .await;
    let g = s.active.expect("the generation restarting");
    let fresh = g.pid.expect("pid");
    assert_ne!(fresh, pid1);
    assert!(alive(fresh), "{g:?}");
    assert_eq!(
        g.reason.as_deref(),
        Some("exited with status signal SIGKILL; a fresh process of the same snapshot is starting"),
        "{g:?}"
    );
    let s = d.wait_for("running", |s| s.state == "running").await;
    let a = s.active.expect("active");
    assert_eq!((a.pid, a.reason), (Some(fresh), None));
}

/// A deploy that overtakes a crash restart still proving itself: that
/// start is stopped, and what comes after is the new generation's (a
/// `batonctl restart` restarts it; its crash is restarted at once). The
/// stale start used to run on until its start timeout, holding the new
/// generation's restarts back and taking their waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_overtakes_a_crash_restart_stops_it() {
    let p = Project::python(
        "start_timeout_s = 20",
        "[restart]\nbackoff_initial_ms = 100\nbackoff_max_ms = 100\nlimit_burst = 100\n",
    );
    p.edit("etc/baton.toml", "start_timeout_s = 10\n", "");
    p.append("src/pyworker.py", "\n# HEALTH_FILE=health\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let stale = crash_into_a_restart_that_never_proves(&p, &d, pid1).await;
    p.append("src/pyworker.py", "# v2\n");
    let pid2 = d.active_pid(2).await;
    // (Asked at once: the stale start would run for 20 s more.)
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("generation 2: active"),
        "{out:?}"
    );
    assert!(wait_gone(stale).await, "the overtaken start still runs");
    let fresh = d.active_pid(2).await;
    assert_ne!(fresh, pid2);
    // Its crash is restarted after its own backoff.
    sigkill(fresh);
    d.wait_for("generation 2 restarted again", |s| {
        s.state == "running"
            && s.active
                .as_ref()
                .is_some_and(|a| a.id == 2 && a.restarts >= 2)
    })
    .await;
}

/// Kills generation 1's worker `pid1` (the project's worker has the
/// `HEALTH_FILE=health` marker) and keeps the crash restart's process from
/// proving itself (its /healthz answers 503, the other workers' 200);
/// returns that process's pid, as the status shows it while it proves
/// itself.
async fn crash_into_a_restart_that_never_proves(p: &Project, d: &Daemon, pid1: u32) -> u32 {
    p.write("health", "503");
    sigkill(pid1);
    let s = d
        .wait_for("generation 1's restart proving itself", |s| {
            s.state == "restarting"
                && s.active
                    .as_ref()
                    .is_some_and(|a| a.id == 1 && a.pid.is_some())
        })
        .await;
    let stale = s.active.and_then(|a| a.pid).expect("pid");
    p.write("health", &format!("503 {stale}"));
    stale
}

/// batond stopping right after a deploy overtook a crash restart waits
/// for that start's process, which it was stopping: one that ignores
/// SIGTERM gets SIGKILL with its whole group, and nothing it started is
/// left (batond used to exit at once: the process died by the parent-death
/// signal alone, and its child lived on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batond_stopping_waits_for_a_start_a_deploy_overtook() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 100\nbackoff_max_ms = 100\nlimit_burst = 100\n",
    );
    // Generation 1's processes ignore SIGTERM and have a child of their
    // own (gen 2's will not: the marker goes).
    p.append(
        "src/pyworker.py",
        "\n# HEALTH_FILE=health\n# STUBBORN_CHILD=sleep 317\n",
    );
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let stale = crash_into_a_restart_that_never_proves(&p, &d, pid1).await;
    p.edit("src/pyworker.py", "# STUBBORN_CHILD=sleep 317\n", "# v2\n");
    d.active_pid(2).await;
    assert!(d.stop().await.success());
    assert!(!alive(stale), "the overtaken start outlived batond");
    let left = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 317$"])
        .output()
        .expect("pgrep");
    assert!(left.stdout.is_empty(), "left behind: {left:?}");
}

/// What a worker started in its process group gets the stop's grace too,
/// as systemd gives a unit's remaining processes: SIGTERM, then SIGKILL
/// only after `stop_timeout_s`. Here a helper that needs a second to
/// finish after SIGTERM finishes: when its worker drains after a deploy,
/// when its worker crashes, and when batond stops (it used to be killed
/// the moment its worker exited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_helpers_get_the_stop_grace_too() {
    let p = Project::python("", "");
    // The helper notes its SIGTERM, takes a second, then notes its end.
    p.append(
        "src/pyworker.py",
        "\n# HELPER=trap 'echo term >> helper.log; sleep 1; echo done >> helper.log; exit 0' TERM; while :; do sleep 0.1; done\n",
    );
    let d = Daemon::start(&p).await;
    d.active_pid(1).await;
    let log = p.path("helper.log");
    let finished = |n: usize| {
        let log = log.clone();
        async move {
            for _ in 0..100 {
                if read(&log).matches("done").count() >= n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    // A deploy: generation 1 drains (no calls) and stops.
    p.append("src/pyworker.py", "# v2\n");
    d.active_pid(2).await;
    assert!(finished(1).await, "{}", read(&p.path("helper.log")));
    // A crash: generation 2's worker exits by itself.
    let (_, pid2, _) = whoami(d.addr).await;
    sigkill(pid2);
    assert!(finished(2).await, "{}", read(&p.path("helper.log")));
    d.wait_for("the restart", |s| {
        s.state == "running" && s.active.as_ref().is_some_and(|a| a.restarts == 1)
    })
    .await;
    // batond stops.
    assert!(d.stop().await.success());
    assert!(finished(3).await, "{}", read(&p.path("helper.log")));
}

/// A worker's exit is seen at once even when what it left in its group
/// ignores SIGTERM and lives out the grace: a crash is restarted, and a
/// candidate that exits is rejected with its exit status, while that
/// helper is still there (they used to wait for the group to be empty:
/// 503s for `stop_timeout_s`, and "start timeout" for a candidate that
/// had exited). batond's stop still waits for the helper's SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_exit_is_seen_before_its_stubborn_helper_is_gone() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "stop_timeout_s = 2\n",
        "stop_timeout_s = 6\n",
    );
    p.append(
        "src/pyworker.py",
        "\n# HELPER=echo $$ > helper1.pid; trap '' TERM; while :; do sleep 0.1; done\n",
    );
    let pid_in = |name: &str| -> u32 { read(&p.path(name)).trim().parse().expect("a pid") };
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    for _ in 0..100 {
        if !read(&p.path("helper1.pid")).trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let helper1 = pid_in("helper1.pid");
    sigkill(pid1);
    d.wait_for("the crash restart", |s| {
        s.state == "running" && s.active.as_ref().is_some_and(|a| a.restarts == 1)
    })
    .await;
    assert!(alive(helper1), "the restart waited for the helper's end");
    assert!(wait_gone(helper1).await, "the helper outlived its grace");
    // A candidate that exits at once, leaving such a helper.
    deploy_sh(
        &p,
        "sh -c 'echo $$ > helper2.pid; trap \"\" TERM; while :; do sleep 0.1; done' &\nsleep 0.3\necho 'failing on purpose' >&2\nexit 1\n",
    );
    let g2 = d.wait_history(2, "rejected").await;
    let reason = g2.reason.expect("reason");
    assert!(reason.contains("exited with status code 1"), "{reason}");
    let helper2 = pid_in("helper2.pid");
    assert!(alive(helper2), "the rejection waited for the helper's end");
    // batond's stop waits for the helper's grace to end it.
    assert!(d.stop().await.success());
    assert!(wait_gone(helper2).await, "the helper outlived batond");
}

/// Makes the python project's worker command run `script` with `sh`
/// instead (the config's change deploys it).
fn deploy_sh(p: &Project, script: &str) {
    p.write("fail.sh", script);
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["sh", "fail.sh"]"#,
    );
}

/// One worker that floods its output does not take the lines another
/// copies into batond's log: a failing candidate's last words are there
/// whole while the active worker floods (each process has a budget of its
/// own; the flood's are counted, and all are in its worker.log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_worker_does_not_silence_a_failing_candidate() {
    let p = Project::python("", "");
    p.append(
        "src/pyworker.py",
        "\n# HELPER=while :; do echo flood-line; done\n",
    );
    let d = Daemon::start(&p).await;
    d.active_pid(1).await;
    // The flood has used its budget up.
    assert!(d.log_shows("lines not copied here").await, "{}", d.log());
    deploy_sh(
        &p,
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo \"last words $i\"; done\nexit 1\n",
    );
    d.wait_history(2, "rejected").await;
    for i in 1..=10 {
        assert!(
            d.log_shows(&format!("[gen 2] last words {i}")).await,
            "line {i} missing"
        );
    }
    assert!(d.stop().await.success());
}

/// batond starts its workers and builds through its own executable as it
/// runs, not through the file it was started from: replaced by another
/// program (an upgrade installed before the restart, a rebuild of batond),
/// deploys and restarts go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_batond_executable_does_not_break_its_workers() {
    let p = Project::python("", "");
    let copy = p.path("bin/batond");
    std::fs::create_dir_all(p.path("bin")).expect("bin");
    let script = format!(
        "cp \"$0\" '{}' && exec '{}' \"$@\"",
        copy.display(),
        copy.display()
    );
    let d = Daemon::start_wrapped(&p, &["sh", "-c", &script], std::process::Stdio::null()).await;
    d.active_pid(1).await;
    // The file is replaced by a program that is no batond.
    let other = p.path("bin/other");
    std::fs::write(&other, "#!/bin/sh\nexit 127\n").expect("write");
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::rename(&other, &copy).expect("replace");
    p.append("src/pyworker.py", "# v2\n");
    d.active_pid(2).await;
    assert_eq!(whoami(d.addr).await.0, 2);
    assert!(d.stop().await.success());
}

/// `batonctl restart --wait` of a worker that reads `START_DELAY_FILE=delay`:
/// the replacement takes 1.5 s to listen, and 300 ms into it the active
/// worker (`pid`) is killed, after which `then` runs. What `batonctl` said.
async fn restart_with_a_crash_meanwhile(
    p: &Project,
    d: &Daemon,
    pid: u32,
    then: impl std::future::Future<Output = ()>,
) -> std::process::Output {
    p.write("delay", "1500");
    let waiting = d.ctl(&["restart", "--wait"]);
    let crash = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sigkill(pid);
        then.await;
    };
    let (out, ()) = tokio::join!(waiting, crash);
    out
}

/// A crash while a replacement of the same generation proves itself (here
/// asked for with `batonctl restart`) starts no second process: the
/// replacement takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_replacement_starts_no_second_process() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 100\nbackoff_max_ms = 100\nlimit_burst = 100\n",
    );
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let out = restart_with_a_crash_meanwhile(&p, &d, pid1, async {}).await;
    assert!(out.status.success(), "{out:?}");
    let s = d.wait_for("running", |s| s.state == "running").await;
    let a = s.active.expect("active");
    assert_eq!((a.id, a.restarts), (1, 1), "{a:?}");
    // No cutover after the replacement's.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = d.status().await;
    assert_eq!(s.active.and_then(|a| a.pid), a.pid);
    assert_eq!(
        d.log().matches("event=\"cutover\"").count(),
        2,
        "{}",
        d.log()
    );
}

/// A start limit hit while a replacement proves itself is reported once:
/// when that replacement then fails too, the unit is failed already, and
/// its failure is its own event, not a second `start_limit_hit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_failing_after_the_start_limit_is_not_a_second_limit_hit() {
    let p = Project::python("", "[restart]\nlimit_burst = 1\nlimit_interval_s = 60\n");
    p.append(
        "src/pyworker.py",
        "\n# START_DELAY_FILE=delay\n# HEALTH_FILE=health\n",
    );
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    // One start within the window is the limit: the crash fails the unit
    // at once, and the replacement, once it listens, is unhealthy.
    let then = async {
        d.wait_for("failed", |s| s.state == "failed").await;
        p.write("health", "503");
    };
    let out = restart_with_a_crash_meanwhile(&p, &d, pid1, then).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && said.contains("healthz 503"),
        "{said}"
    );
    let s = d.status().await;
    assert_eq!(s.state, "failed", "{s:?}");
    assert_eq!(
        d.log().matches("event=\"start_limit_hit\"").count(),
        1,
        "{}",
        d.log()
    );
    // A restart brings the failed unit back, as after any limit hit.
    std::fs::remove_file(p.path("health")).expect("rm health");
    p.write("delay", "0");
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.status().await.state, "running");
    assert!(d.stop().await.success());
}

/// While a fresh process of the active generation proves itself beside
/// the serving one, the status says so: which generation, which instance,
/// why and for how long; and no longer once it has taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_a_replacement_while_it_proves_itself() {
    let p = Project::python("", "");
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    assert!(d.status().await.replacing.is_none());
    p.write("delay", "2500");
    let out = d.ctl(&["restart"]).await;
    assert!(out.status.success(), "{out:?}");
    let s = d.wait_for("a replacement", |s| s.replacing.is_some()).await;
    let r = s.replacing.expect("replacing");
    assert_eq!(
        (r.generation, r.instance, r.reason.as_str()),
        (1, 2, "batonctl restart"),
        "{r:?}"
    );
    // The serving worker serves on meanwhile, and is shown as active.
    let a = s.active.expect("active");
    assert_eq!((a.id, a.pid), (1, Some(pid1)), "{a:?}");
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).await.stdout).to_string();
    assert!(
        text.contains("Replacing: gen 1 with a fresh process (instance 2)")
            && text.contains("[batonctl restart]"),
        "{text}"
    );
    // Once proven, it is the active worker, and nothing is replacing.
    let s = d
        .wait_for("the replacement to take over", |s| {
            s.active
                .as_ref()
                .and_then(|a| a.pid)
                .is_some_and(|pid| pid != pid1)
        })
        .await;
    assert!(s.replacing.is_none(), "{:?}", s.replacing);
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).await.stdout).to_string();
    assert!(!text.contains("Replacing:"), "{text}");
    assert!(d.stop().await.success());
}

/// A fresh start that fails is reported with what that process wrote,
/// not with a line an earlier process of the same generation left in the
/// generation's `worker.log`.
/// A worker log that cannot be opened costs its lines only: the crash
/// restart runs (its output goes to batond's own log), and the unit
/// stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_log_that_cannot_be_opened_does_not_stop_a_restart() {
    let p = Project::python("", "[restart]\nbackoff_initial_ms = 50\nlimit_burst = 3\n");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid = s.active.and_then(|a| a.pid).expect("pid");
    let log = p.path("state/gen-0001/worker.log");
    std::fs::remove_file(&log).expect("rm worker.log");
    std::fs::create_dir(&log).expect("a folder in its place");
    let (code, _, _) = d.get("/crash").await;
    assert_eq!(code, StatusCode::OK);
    // Held for the restart, then served by the fresh process.
    let (g, fresh, _) = whoami(d.addr).await;
    assert_eq!(g, 1);
    assert_ne!(fresh, pid);
    assert_eq!(d.status().await.state, "running");
    assert!(
        d.log().contains("cannot open the worker's log"),
        "{}",
        d.log()
    );
    assert!(d.stop().await.success());
}

/// How many descriptors over what it holds [`limit_descriptors`] leaves
/// batond.
const ROOM: usize = 4;

/// Limits `pid` to [`ROOM`] descriptors over what it holds (once: raising
/// a hard limit again takes a privilege); the limit.
fn limit_descriptors(pid: u32) -> usize {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let limit = open + ROOM;
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(out.status.success(), "{out:?}");
    limit
}

/// Clients enough to take every descriptor batond (`pid`, under
/// `limit`) has left, and waits until they have: the first of them are
/// accepted, those past it wait in the listen queue.
async fn take_descriptors(
    pid: u32,
    limit: usize,
    addr: std::net::SocketAddr,
) -> Vec<tokio::net::TcpStream> {
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(
            tokio::time::timeout(PATIENCE, tokio::net::TcpStream::connect(addr))
                .await
                .expect("connect in time")
                .expect("connect"),
        );
    }
    // A new descriptor takes the lowest free number: none is left below
    // the limit.
    wait_descriptors(pid, limit, |n| n == limit).await;
    clients
}

/// Waits until the number of descriptors `pid` holds below `limit`
/// satisfies `done`.
async fn wait_descriptors(pid: u32, limit: usize, done: impl Fn(usize) -> bool) {
    let below = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
            .filter(|&n| n < limit)
            .count()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done(below()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "batond holds {} of {limit} descriptors",
            below()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` on `stream` and reads the whole answer (the request
/// asks for the connection to close).
async fn answer_on(mut stream: tokio::net::TcpStream, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(PATIENCE, async move {
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("an answer in time")
}

/// batond short of descriptors cannot connect to its worker, which is not
/// the worker's fault: a request waits for them as it would for a healthy
/// worker. One that waits out the hold time gets 503 naming the shortage
/// (and the worker is not taken for dead); one whose descriptors come
/// back in time is answered, through the lean path and hyper's alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_out_batonds_own_descriptor_shortage() {
    let p = Project::python("", "");
    // No probe takes a descriptor meanwhile.
    p.edit(
        "etc/baton.toml",
        "health_interval_ms = 300",
        "health_interval_ms = 600000",
    );
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 4000",
    );
    let d = Daemon::start(&p).await;
    let worker = d
        .wait_active(1)
        .await
        .active
        .and_then(|a| a.pid)
        .expect("pid");
    let me = d.child.id().expect("pid");
    let get = format!(
        "GET /whoami HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        d.addr
    );

    // The shortage lasts: 503 after the hold time, with Retry-After and
    // the reason.
    let limit = limit_descriptors(me);
    let mut clients = take_descriptors(me, limit, d.addr).await;
    let first = clients.remove(0);
    let started = std::time::Instant::now();
    let answer = answer_on(first, get.clone()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(3900),
        "held {:?}: {answer}",
        started.elapsed()
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(
        answer.contains("batond is short of resources: Too many open files"),
        "{answer}"
    );
    assert!(
        d.log_shows("batond is short of resources; requests wait for them")
            .await,
        "{}",
        d.log()
    );
    assert!(!d.log().contains("did not take the request"), "{}", d.log());
    drop(clients);
    // Every one of them closed (those left in the listen queue too): the
    // next clients are the ones accepted.
    wait_descriptors(me, limit, |n| n <= limit - ROOM).await;

    // The shortage passes while two requests wait: a plain GET (the lean
    // path) and a POST with a body (hyper's).
    let marks = d.log().matches("short of resources; requests wait").count();
    let mut clients = take_descriptors(me, limit, d.addr).await;
    let (a, b) = (clients.remove(0), clients.remove(0));
    let to = p.path("ingested");
    let post = format!(
        "POST /ingest?to={} HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        to.display(),
        d.addr
    );
    let got = tokio::spawn(answer_on(a, get.clone()));
    let posted = tokio::spawn(answer_on(b, post));
    // Once batond has said it waits (a second apart at most), the
    // descriptors come back: the clients that held them go.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while d.log().matches("short of resources; requests wait").count() == marks {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(clients);
    let got = got.await.expect("GET");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
    let who: serde_json::Value = serde_json::from_str(body).expect("whoami JSON");
    assert_eq!(who["pid"], worker, "{got}");
    let posted = posted.await.expect("POST");
    assert!(posted.starts_with("HTTP/1.1 202"), "{posted}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while read(&to) != "hello" {
        assert!(tokio::time::Instant::now() < deadline, "{}", read(&to));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The worker served throughout: no restart, no rejection.
    let s = d.status().await;
    assert_eq!(s.active.and_then(|a| a.pid), Some(worker));
    for event in ["event=\"restart", "event=\"worker_exited"] {
        assert!(!d.log().contains(event), "{}", d.log());
    }
    assert!(d.stop().await.success());
}

/// batond out of file descriptors cannot start a worker at all: those
/// starts count toward the start limit (as systemd counts a failed spawn),
/// the reason says they were batond's own failures, and once it has
/// descriptors again `batonctl restart` brings the unit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_batond_cannot_make_are_said_to_be_its_own() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_ms = 300\nlimit_burst = 3\n",
    );
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let worker = s.active.and_then(|a| a.pid).expect("pid");
    let me = d.child.id().expect("pid");
    // A few more than it has, then clients take them all.
    let limit = limit_descriptors(me);
    let clients = take_descriptors(me, limit, d.addr).await;
    sigkill(worker);
    // (The control socket needs a descriptor too: the log tells.)
    let mut failed = false;
    for _ in 0..200 {
        failed = d.log().contains("start limit hit");
        if failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "{}", d.log());
    assert!(
        d.log()
            .contains("batond could not start it: cannot bind a loopback port"),
        "{}",
        d.log()
    );
    // Such a start failed; the worker rejected nothing.
    assert!(d.log_shows("event=\"failed\"").await, "{}", d.log());
    assert!(!d.log().contains("event=\"rejected\""), "{}", d.log());
    drop(clients);
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    let (g, fresh, _) = whoami(d.addr).await;
    assert_eq!(g, 1);
    assert_ne!(fresh, worker);
    assert!(d.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_quotes_its_own_output_only() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_ms = 100\nlimit_burst = 100\n",
    );
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["sh", "-c", "if [ -f crash ]; then cat crash; exit 7; fi; (while [ -f noisy ]; do echo \"error: from the one serving\"; sleep 0.02; done) & exec python3 \"$0\"", "{artifact}"]"#,
    );
    let d = Daemon::start(&p).await;
    let pid = d
        .wait_active(1)
        .await
        .active
        .and_then(|a| a.pid)
        .expect("pid");
    p.write("crash", "error: disk full (from the first failed start)\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    let failed_starts = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("fresh start failed"))
            .map(str::to_string)
            .collect()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while failed_starts(&d.log()).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // From now on the failing starts write nothing.
    p.write("crash", "");
    let seen = failed_starts(&d.log()).len();
    while failed_starts(&d.log()).len() < seen + 2 {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let starts = failed_starts(&d.log());
    assert!(
        starts[0].contains("exited with status code 7 (last log line: error: disk full"),
        "{starts:?}"
    );
    // The one before may have raced the emptied file; the last did not.
    let last = starts.last().expect("a failed start");
    assert!(
        last.contains("exited with status code 7") && !last.contains("last log line"),
        "{starts:?}"
    );
    // The instance that takes over writes error lines all the time, into
    // the same worker.log.
    p.write("noisy", "");
    std::fs::remove_file(p.path("crash")).expect("rm crash");
    d.wait_for("running again", |s| {
        s.state == "running" && s.active.as_ref().is_some_and(|a| a.pid != Some(pid))
    })
    .await;
    // A restart beside it fails without a word: its reason quotes none of
    // the serving instance's lines.
    p.write("crash", "");
    let out = d.ctl(&["restart", "--wait"]).await;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("exited with status code 7"), "{said}");
    assert!(!said.contains("last log line"), "{said}");
    std::fs::remove_file(p.path("noisy")).expect("rm noisy");
    std::fs::remove_file(p.path("crash")).expect("rm crash");
}

/// `batonctl restart` starts the crash delay over also when it joins a
/// fresh start already under way (a crash restart's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_joining_a_crash_restart_starts_the_delay_over() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 100\nbackoff_max_ms = 10000\nlimit_burst = 100\n",
    );
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["sh", "-c", "if [ -f crash ]; then sleep 1; exit 7; fi; exec python3 \"$0\"", "{artifact}"]"#,
    );
    let d = Daemon::start(&p).await;
    let pid = d.active_pid(1).await;
    p.write("crash", "");
    sigkill(pid);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !d.log().contains("restarting the same snapshot in 200 ms") {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Inside the next start's second of sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = d.ctl(&["restart"]).await;
    assert!(out.status.success(), "{out:?}");
    let after = |log: &str| {
        log.split_once("restart requested")
            .and_then(|(_, rest)| rest.split_once("restarting the same snapshot in "))
            .map(|(_, rest)| rest.split(' ').next().unwrap_or("").to_string())
    };
    while after(&d.log()).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(after(&d.log()).as_deref(), Some("100"), "{}", d.log());
    std::fs::remove_file(p.path("crash")).expect("rm crash");
    d.wait_for("running again", |s| s.state == "running").await;
}

/// A request held for a worker that a crash restart will bring back gets
/// its 503 when batond is told to stop (nothing starts from then on), not
/// a connection closed at the end of the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_when_batond_stops_gets_its_503() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 20000\nbackoff_max_ms = 20000\n",
    );
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 600000",
    );
    let d = Daemon::start(&p).await;
    let pid = d.active_pid(1).await;
    sigkill(pid);
    d.wait_for("restarting", |s| s.state == "restarting").await;
    let addr = d.addr;
    let held = tokio::spawn(async move { http_get(addr, "/whoami").await });
    // Held: no answer while the restart is due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let (code, headers, _) = held.await.expect("held request");
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert!(d.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_limit_marks_the_unit_failed_until_the_next_deploy() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_ms = 100\nlimit_burst = 3\nlimit_interval_s = 60\n",
    );
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 600000",
    );
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 3000");
    p.append("src/pyworker.py", "\n# CRASH_AFTER_MS=400\n");
    let d = Daemon::start(&p).await;
    let s = d.wait_for("failed", |s| s.state == "failed").await;
    let g = s.active.expect("the failed generation is shown");
    assert_eq!(g.state, GenState::Failed);
    assert!(
        g.reason.as_deref().is_some_and(
            |r| r.contains("start limit") && r.contains("the last exited with status code 3")
        ),
        "{g:?}"
    );
    // batonctl status says so in its exit code too, as systemctl status
    // does (3: not running), with its text or its JSON.
    for args in [&["status"][..], &["status", "--json"]] {
        let out = d.ctl(args).await;
        assert_eq!(out.status.code(), Some(3), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("failed"),
            "{args:?}: {out:?}"
        );
    }
    // Nothing runs: no pid or port, and the generation is not also history.
    assert_eq!((g.pid, g.port), (None, None), "{g:?}");
    assert!(s.history.iter().all(|h| h.id != g.id), "{:?}", s.history);
    // Each instance proved itself before it crashed, and still the delay
    // grew: a worker that crashes soon after its restart is crash-looping.
    let log = d.log();
    assert!(
        log.contains("restarting the same snapshot in 50 ms"),
        "{log}"
    );
    assert!(
        log.contains("restarting the same snapshot in 100 ms"),
        "{log}"
    );
    // No worker is coming back by itself: the 503 comes at once, not
    // after the (here ten-minute) hold.
    let (code, headers, _) = d.get("/whoami").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    // A fixed source deploys and the unit runs again. The failed
    // generation stays in the history as failed, with no pid or port.
    // While that deploy waits out its debounce, a worker is on its way:
    // a request is held for it, not answered 503.
    p.write("src/pyworker.py", pyworker_source());
    d.wait_for("the fix pending", |s| s.deploy_pending).await;
    let (code, _, _) = d.get("/whoami").await;
    assert_eq!(code, StatusCode::OK);
    let s = d.wait_for("running again", |s| s.state == "running").await;
    assert_eq!(d.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(d.ctl(&["status"]).await.status.code(), Some(0));
    let old = s.history.iter().find(|h| h.id == g.id).expect("in history");
    assert_eq!(old.state, GenState::Failed, "{old:?}");
    assert_eq!((old.pid, old.port), (None, None), "{old:?}");
}

/// A generation whose worker crashed and is waiting for its restart is
/// over once a deploy cuts over: stopped in the history, with why, no pid,
/// and pruned like any other (it used to stay `active` for good, its
/// folder never removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_generation_replaced_before_its_restart_is_stopped_and_pruned() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 20000\nbackoff_max_ms = 20000\n",
    );
    p.edit(
        "etc/baton.toml",
        "shutdown_timeout_s = 5",
        "shutdown_timeout_s = 5\nhistory = 1",
    );
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    sigkill(pid1);
    let s = d.wait_for("restarting", |s| s.state == "restarting").await;
    let shown = s.active.expect("the generation being restarted");
    assert_eq!((shown.id, shown.pid), (1, None), "{shown:?}");
    // Why nothing serves, and when it will again.
    assert_eq!(
        shown.reason.as_deref(),
        Some("exited with status signal SIGKILL; restarting the same snapshot in 20000 ms"),
        "{shown:?}"
    );
    d.deploy().await;
    let g1 = d.wait_history(1, "stopped").await;
    assert_eq!(
        g1.reason.as_deref(),
        Some("replaced by generation 2 while its worker was down"),
        "{g1:?}"
    );
    assert_eq!((g1.pid, g1.port), (None, None), "{g1:?}");
    // The restart that was due does not happen.
    let s = d.status().await;
    assert_eq!(
        (s.state.as_str(), s.active.map(|a| a.id)),
        ("running", Some(2))
    );
    // With `history = 1`, the next deploy prunes it, folder and all.
    d.deploy().await;
    d.wait_for("generation 1 pruned", |s| {
        s.history.iter().all(|h| h.id != 1)
    })
    .await;
    assert!(!p.path("state/gen-0001").exists());
    assert!(
        d.log()
            .lines()
            .filter(|l| l.contains("worker_exited"))
            .count()
            == 1
    );
}

/// `batonctl restart` of a unit past its start limit brings the same
/// generation back, even when a failed deploy prunes the history while the
/// fresh process starts (the generation is in use again, not over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_a_failed_unit_survives_a_failed_deploy_meanwhile() {
    let p = Project::python("", "[restart]\nlimit_burst = 1\n");
    p.edit(
        "etc/baton.toml",
        "shutdown_timeout_s = 5",
        "shutdown_timeout_s = 5\nhistory = 1",
    );
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "! grep -q BROKEN src/pyworker.py"]"#,
    );
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid = d.active_pid(1).await;
    sigkill(pid);
    d.wait_for("failed", |s| s.state == "failed").await;
    // The fresh process takes 2 s to listen; a deploy fails meanwhile.
    p.write("delay", "2000");
    let out = d.ctl(&["restart"]).await;
    assert!(out.status.success(), "{out:?}");
    p.append("src/pyworker.py", "\n# BROKEN\n");
    d.wait_history(2, "failed").await;
    let s = d.wait_for("running again", |s| s.state == "running").await;
    let a = s.active.expect("active");
    assert_eq!((a.id, a.state), (1, GenState::Active), "{a:?}");
    assert_eq!(
        (a.ended_at.as_deref(), a.reason.as_deref()),
        (None, None),
        "{a:?}"
    );
    assert!(p.path("state/gen-0001").exists());
    assert_eq!(whoami(d.addr).await.0, 1);
}

/// A restart of an older generation that ends while the newer one is down
/// between its own crash restarts does not take traffic back: the older
/// one was over when the newer one cut over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_generations_restart_never_takes_traffic_back() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 100\nbackoff_max_ms = 200\nlimit_burst = 100\n",
    );
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    p.append("src/pyworker.py", "\n# v2\n");
    let pid2 = d.active_pid(2).await;
    // Generation 2's restart waits 2.5 s before it listens.
    p.write("delay", "2500");
    sigkill(pid2);
    d.wait_for("generation 2 restarting", |s| {
        s.state == "restarting"
            && s.active
                .as_ref()
                .is_some_and(|a| a.id == 2 && a.restarts >= 1)
    })
    .await;
    // Its fresh process has read the delay (100 ms backoff, then Python's
    // start) before the next generation's is cleared.
    tokio::time::sleep(Duration::from_millis(800)).await;
    p.write("delay", "0");
    // Generation 3 proves itself, then crashes 300 ms after every start.
    p.append("src/pyworker.py", "\n# CRASH_AFTER_MS=300\n");
    d.wait_history(2, "stopped").await;
    // Past the moment generation 2's restart is up (2.5 s after it began).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let s = d.status().await;
    assert_ne!(s.active.as_ref().map(|a| a.id), Some(2), "{s:?}");
    let g2 = s.history.iter().find(|h| h.id == 2).expect("generation 2");
    assert_eq!(g2.state, GenState::Stopped, "{g2:?}");
    let log = d.log();
    assert_eq!(
        log.matches("generation 2: proven; traffic moved").count(),
        1,
        "generation 2 took traffic again: {log}"
    );
}

/// A reload whose deploy is rejected (here: another health path) leaves
/// the generation serving as it was proven, probes included: its restart
/// is probed on the path it was proven on, not replaced over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_is_probed_as_it_was_proven_after_a_rejected_reload() {
    let p = Project::python("", "[restart]\nbackoff_initial_ms = 100\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    p.edit(
        "etc/baton.toml",
        "signature = \"env\"",
        "signature = \"env\"\nhealth_path = \"/nothere\"",
    );
    let g2 = d.wait_history(2, "rejected").await;
    assert!(
        g2.reason
            .as_deref()
            .is_some_and(|r| r.contains("healthz 404")),
        "{g2:?}"
    );
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    let pid = d
        .wait_for("restarted", |s| {
            s.active
                .as_ref()
                .is_some_and(|a| a.id == 1 && a.restarts == 1)
        })
        .await
        .active
        .and_then(|a| a.pid)
        .expect("pid");
    // Ten probe intervals (300 ms; 3 failures replace a worker).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let s = d.status().await;
    let a = s.active.expect("active");
    assert_eq!((a.id, a.restarts, a.pid), (1, 1, Some(pid)), "{}", d.log());
    assert!(!d.log().contains("health_failed"), "{}", d.log());
    assert_eq!(whoami(d.addr).await.1, pid);
}

/// A restart asked for while a crash restart is pending or starting
/// starts one process, not two: the backoff timer of the crash does not
/// start another, and a second restart waits for the one under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_crash_restart_starts_one_process() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 1000\nlimit_burst = 100\n",
    );
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    // Each fresh process takes 2.5 s to listen: longer than the backoff.
    p.write("delay", "2500");
    sigkill(pid1);
    d.wait_for("restarting", |s| s.state == "restarting").await;
    // Asked again while the first is starting: the second waits for it.
    let (first, second) = tokio::join!(d.ctl(&["restart", "--wait"]), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        d.ctl(&["restart", "--wait"]).await
    });
    assert!(first.status.success(), "{first:?}");
    assert!(second.status.success(), "{second:?}");
    let pid = d.active_pid(1).await;
    // Past the crash's backoff and another start's 2.5 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let s = d.status().await;
    let a = s.active.expect("active");
    assert_eq!((a.id, a.restarts, a.pid), (1, 1, Some(pid)), "{}", d.log());
    assert!(s.draining.is_empty(), "{:?}", s.draining);
    let log = d.log();
    assert_eq!(
        log.matches("generation 1: proven; traffic moved").count(),
        2,
        "{log}"
    );
    assert_eq!(s.totals.restarts, 1, "{:?}", s.totals);
}

/// A stop while a crash restart's fresh process is starting waits for it
/// to be stopped: nothing of its process group is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_crash_restart_leaves_nothing_of_the_fresh_worker() {
    let p = Project::python("", "[restart]\nbackoff_initial_ms = 100\n");
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        // Deaf to SIGTERM, the whole group: only the SIGKILL after
        // `stop_timeout_s` ends it.
        r#"command = ["sh", "-c", "trap '' TERM; sleep 60 & echo $! > worker-child.pid; exec python3 \"$0\"", "{artifact}"]"#,
    );
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let child1 = read(&p.path("worker-child.pid"));
    p.write("delay", "10000");
    sigkill(pid1);
    // The fresh process is up (its child written), not yet listening.
    let mut child = None;
    for _ in 0..200 {
        let now = read(&p.path("worker-child.pid"));
        if now != child1 && !now.trim().is_empty() {
            child = now.trim().parse::<u32>().ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child = child.expect("the fresh worker's child");
    assert!(alive(child));
    assert!(d.stop().await.success());
    assert!(wait_gone(child).await, "the fresh worker's child was left");
}

/// A candidate proven while batond stops (it waits for a request in
/// flight) is not cut over: it is stopped, its history entry says so, and
/// whoever waited for the deploy is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_proven_while_batond_stops_is_stopped_not_left_starting() {
    let p = Project::python("", "");
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A reader of the events hears how the candidate ended.
    let events = follow_events(&d);
    // Generation 2 takes a second to listen.
    p.write("delay", "1000");
    let waiting = d.ctl(&["deploy", "--wait"]);
    let slow = http_get(d.addr, "/slow?ms=4000");
    let stop = async {
        // While it proves itself, its pid and address are shown.
        let s = d
            .wait_for("generation 2 starting", |s| {
                s.candidate
                    .as_ref()
                    .is_some_and(|c| c.id == 2 && c.pid.is_some())
            })
            .await;
        let c = s.candidate.expect("candidate");
        assert_eq!(c.state, GenState::Starting, "{c:?}");
        assert!(alive(c.pid.expect("pid")), "{c:?}");
        assert!(c.port.is_some() || c.socket.is_some(), "{c:?}");
        // A request in flight keeps batond stopping for 4 s.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
        nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        d.wait_for("generation 2 over", |s| {
            s.history
                .iter()
                .any(|g| g.id == 2 && g.state == GenState::Stopped)
        })
        .await
    };
    let (out, (code, _, _), s) = tokio::join!(waiting, slow, stop);
    assert_eq!(code, StatusCode::OK);
    let g2 = s.history.iter().find(|g| g.id == 2).expect("generation 2");
    assert_eq!(g2.reason.as_deref(), Some("batond is stopping"), "{g2:?}");
    assert!(s.candidate.is_none(), "{s:?}");
    assert_eq!(s.active.map(|a| a.id), Some(1));
    // A deploy the stop cut short counts as failed (the metric says so).
    assert_eq!(s.totals.deploys_failed, 1, "{:?}", s.totals);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("batond is stopping")
            || String::from_utf8_lossy(&out.stdout).contains("batond is stopping"),
        "{out:?}"
    );
    assert!(
        !d.log().contains("generation 2: proven; traffic moved"),
        "{}",
        d.log()
    );
    let log = d.log();
    assert!(d.stop().await.success());
    let out = tokio::time::timeout(PATIENCE, events.wait_with_output())
        .await
        .expect("batonctl events ended")
        .expect("batonctl events");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generation 2: stopped (batond is stopping)"),
        "{text}\n{log}"
    );
    // Each line names its generation once; the end of the stream says
    // batond stopped.
    assert!(!text.contains("gen 2: generation 2"), "{text}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the event stream ended: batond stopped"),
        "{out:?}"
    );
}

/// `batonctl events` following `d`, its output piped.
fn follow_events(d: &Daemon) -> tokio::process::Child {
    tokio::process::Command::new(BATONCTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("batonctl events")
}

/// A first deploy that fails leaves the unit `failed` (nothing serves,
/// nothing is under way), not `starting`, until a deploy works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_deploy_leaves_the_unit_failed_until_one_works() {
    let p = Project::python("", "");
    p.append("src/pyworker.py", "\n# BROKEN\n");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "! grep -q BROKEN src/pyworker.py"]"#,
    );
    let d = Daemon::start(&p).await;
    let s = d.wait_for("failed", |s| s.state == "failed").await;
    assert!(s.active.is_none() && s.candidate.is_none(), "{s:?}");
    assert_eq!(s.history.first().map(|h| h.state), Some(GenState::Failed));
    p.write("src/pyworker.py", pyworker_source());
    d.wait_for("running", |s| s.state == "running").await;
}

/// SIGTERM: no new connections, the request in flight is answered by a
/// worker that would die at once on SIGTERM (the Python fixture does), and
/// only then do the workers stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_before_the_workers_stop() {
    let p = Project::python("", "");
    let mut d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid = s.active.and_then(|a| a.pid).expect("pid");
    let addr = d.addr;
    let slow = tokio::spawn(async move { http_get(addr, "/slow?ms=1500").await });
    d.wait_for("the request in flight", |s| {
        s.active.as_ref().is_some_and(|a| a.requests_in_flight == 1)
    })
    .await;
    let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // The listener closes at once.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "batond still accepts connections after SIGTERM");
    assert!(
        alive(pid),
        "the worker was stopped with a request in flight"
    );
    let (code, _, body) = slow.await.expect("slow");
    assert_eq!((code, body.as_str()), (StatusCode::OK, "slow 1"));
    let status = tokio::time::timeout(Duration::from_secs(20), d.child.wait())
        .await
        .expect("batond did not stop")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(pid).await, "worker {pid} outlived batond");
}

/// SIGTERM closes an idle keep-alive client connection at once, one that
/// has been served (its watcher has been woken by many requests since it
/// began to listen for the stop): `batond` neither waits for the header
/// timeout nor for `shutdown_timeout_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    use tokio::io::AsyncWriteExt;
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 5000\nheader_timeout_s = 600",
    );
    p.edit(
        "etc/baton.toml",
        "shutdown_timeout_s = 5",
        "shutdown_timeout_s = 600",
    );
    let mut d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let mut conn = sent(d.addr, b"").await;
    for _ in 0..20 {
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let resp = read_response(&mut conn).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(
        closed_within(&mut conn, Duration::from_secs(10)).await,
        "an idle keep-alive connection stayed open after SIGTERM"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), d.child.wait())
        .await
        .expect("batond did not stop")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

/// A build under way when batond is told to stop ends at once (its whole
/// process group), not after the drain, and no candidate starts from it:
/// it could never serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_under_way_at_sigterm_is_stopped_and_starts_nothing() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "if grep -q SLOW src/pyworker.py; then echo $$ > build.pid; sleep 2; touch built; fi"]"#,
    );
    let mut d = Daemon::start(&p).await;
    let pid = d.active_pid(1).await;
    // A request that keeps the shutdown waiting past the build's end.
    let addr = d.addr;
    let slow = tokio::spawn(async move { http_get(addr, "/slow?ms=4000").await });
    d.wait_for("the request in flight", |s| {
        s.active.as_ref().is_some_and(|a| a.requests_in_flight == 1)
    })
    .await;
    p.append("src/pyworker.py", "\n# SLOW\n");
    d.wait_for("building", |s| {
        s.candidate
            .as_ref()
            .is_some_and(|c| c.state == GenState::Building)
    })
    .await;
    let mut build = None;
    for _ in 0..200 {
        build = read(&p.path("build.pid")).trim().parse::<u32>().ok();
        if build.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let build = build.expect("the build's pid");
    let batond = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    nix::sys::signal::kill(batond, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // Gone well before its `sleep 2` would have ended.
    for _ in 0..20 {
        if !alive(build) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(build), "the build outlived the stop signal");
    let (code, _, body) = slow.await.expect("slow");
    assert_eq!((code, body.as_str()), (StatusCode::OK, "slow 1"));
    let status = tokio::time::timeout(Duration::from_secs(20), d.child.wait())
        .await
        .expect("batond did not stop")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(pid).await);
    assert!(!p.path("built").exists(), "the build ran to its end");
    let log = d.log();
    assert!(
        !log.contains("generation 2: starting"),
        "a candidate started while batond stopped: {log}"
    );
    assert!(!p.path("state/gen-0002/worker.log").exists(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_requests_then_times_out() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "drain_timeout_s = 10",
        "drain_timeout_s = 2",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let pid1 = whoami(d.addr).await.1;
    // One request that finishes during the drain, one that outlives it.
    let addr = d.addr;
    let short = tokio::spawn(async move { http_get(addr, "/slow?ms=1000").await });
    let long = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(20), http_get(addr, "/slow?ms=8000")).await
    });
    d.wait_for("two requests in flight", |s| {
        s.active.as_ref().is_some_and(|a| a.requests_in_flight == 2)
    })
    .await;
    p.append("src/pyworker.py", "\n# v2\n");
    d.wait_active(2).await;
    let (code, _, body) = short.await.expect("short");
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, "slow 1", "finished on the old worker");
    d.wait_history(1, "stopped").await;
    assert!(d.log_shows("drain timeout").await, "{}", d.log());
    assert!(wait_gone(pid1).await);
    // The long request was cut when the old worker stopped at the timeout.
    let cut = !matches!(long.await, Ok(Ok((StatusCode::OK, _, _))));
    assert!(cut, "a request outlived the drain timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_on_reload_keeps_the_running_one() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let good = read(&p.path("etc/baton.toml"));
    let bad = good.replace("debounce_ms = 100", "debounce_ms = 100\ndebounce_secs = 3");
    p.write("etc/baton.toml", &bad);
    let s = d
        .wait_for("config refused", |s| s.config_error.is_some())
        .await;
    let err = s.config_error.expect("error");
    assert!(err.contains("baton.toml:"), "{err}");
    assert!(err.contains("watch.debounce_secs"), "{err}");
    let line = bad
        .lines()
        .position(|l| l.starts_with("debounce_secs"))
        .expect("line")
        + 1;
    assert!(err.contains(&format!(":{line}:1")), "{err}");
    assert_eq!(s.active.as_ref().map(|a| a.id), Some(1));
    assert_eq!(whoami(d.addr).await.0, 1);
    // batonctl reload says why, with a non-zero exit.
    let out = d.ctl(&["reload"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("debounce_secs"));
    // batonctl finds the socket in the file despite its mistake, and the
    // status shows the mistake.
    let config = p.path("etc/baton.toml");
    let by_config = [OsStr::new("--config"), config.as_os_str()];
    let out = batonctl(by_config, &["status"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("debounce_secs"),
        "{out:?}"
    );
    // BATON_CONTROL_SOCKET wins over --config; set but empty, it counts as
    // unset (it used to be refused as an empty --socket).
    let env_ctl = |value: &OsStr, config: &OsStr| {
        tokio::process::Command::new(BATONCTL)
            .env("BATON_CONTROL_SOCKET", value)
            .args([OsStr::new("--config"), config, OsStr::new("status")])
            .output()
    };
    // BATON_CONFIG, as batond reads it, stands for --config.
    let out = tokio::process::Command::new(BATONCTL)
        .env("BATON_CONFIG", &config)
        .env_remove("BATON_CONTROL_SOCKET")
        .current_dir("/")
        .arg("status")
        .output();
    let out = tokio::time::timeout(PATIENCE, out)
        .await
        .expect("batonctl timed out")
        .expect("batonctl runs");
    assert!(out.status.success(), "{out:?}");
    for (value, config) in [
        (OsStr::new(""), config.as_os_str()),
        (d.socket.as_os_str(), OsStr::new("/nonexistent/baton.toml")),
    ] {
        let out = tokio::time::timeout(PATIENCE, env_ctl(value, config))
            .await
            .expect("batonctl timed out")
            .expect("batonctl runs");
        assert!(out.status.success(), "{value:?} {config:?}: {out:?}");
    }
    // Even a file that is not TOML at all: batonctl -c still reaches the
    // daemon, and `reload` says what is wrong.
    p.write(
        "etc/baton.toml",
        &good.replace("debounce_ms = 100", "debounce_ms = = 100"),
    );
    d.wait_for("the syntax error shown", |s| {
        s.config_error
            .as_deref()
            .is_some_and(|e| !e.contains("debounce_secs"))
    })
    .await;
    for args in [&["status"][..], &["reload"]] {
        let out = batonctl(by_config, args).await;
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("cannot reach batond"), "{args:?}: {text}");
        assert!(text.contains("debounce_ms"), "{args:?}: {text}");
    }
    // SIGHUP with a fixed config reloads and redeploys.
    p.write(
        "etc/baton.toml",
        &good.replace("health_interval_ms = 300", "health_interval_ms = 400"),
    );
    let s = d
        .wait_for("config accepted", |s| {
            s.config_error.is_none() && s.active.as_ref().is_some_and(|a| a.id >= 2)
        })
        .await;
    assert!(s.active.is_some());
}

/// A save is several file events (`cp` and most editors truncate, then
/// write): the daemon reloads once, when the file is quiet, so a
/// half-written file is never read and one save is one deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_config_save_is_one_reload_and_one_deploy() {
    use std::io::Write;
    let p = Project::python("", "");
    // Quiet time enough that the two writes below always fall within it.
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 500");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let new = read(&p.path("etc/baton.toml"))
        .replace("health_interval_ms = 300", "health_interval_ms = 400");
    let (head, tail) = new.split_at(new.find("[worker]").expect("[worker]"));
    // Truncate and write half, close; then append the rest, close.
    std::fs::write(p.path("etc/baton.toml"), head).expect("write");
    std::fs::OpenOptions::new()
        .append(true)
        .open(p.path("etc/baton.toml"))
        .and_then(|mut f| f.write_all(tail.as_bytes()))
        .expect("append");
    // Generation 2 becomes active with no further candidate behind it.
    d.wait_active(2).await;
    d.deploy().await;
    let s = d.wait_active(3).await;
    assert!(s.config_error.is_none(), "{:?}", s.config_error);
    let log = d.log();
    assert_eq!(
        log.matches("config reloaded; redeploying").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("config refused"), "{log}");
    // A save, then `batonctl reload` within the quiet time (edit, then
    // `systemctl reload`): the reload reads the save, and that is all (it
    // used to be two reloads and two deploys). The pause lets the save's
    // events arrive first, well within the 500 ms.
    p.edit(
        "etc/baton.toml",
        "health_interval_ms = 400",
        "health_interval_ms = 300",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = d.ctl(&["reload"]).await;
    assert!(out.status.success(), "{out:?}");
    d.wait_active(4).await;
    assert_eq!(settled(&d).await, 4);
    let log = d.log();
    assert_eq!(
        log.matches("config reloaded; redeploying").count(),
        2,
        "{log}"
    );
}

/// The folder of a file watched by name, or of the config file, replaced
/// whole (removed and made again, or another moved in): the change is seen,
/// and so are the next ones in the new folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_folder_of_a_watched_file_or_of_the_config_replaced_whole_is_watched_again() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "paths = [\"src\"]",
        "paths = [\"src/pyworker.py\"]",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let source = read(&p.path("src/pyworker.py"));
    std::fs::remove_dir_all(p.path("src")).expect("rm src");
    std::fs::create_dir(p.path("src")).expect("mkdir src");
    p.write("src/pyworker.py", &format!("{source}\n# v2\n"));
    d.wait_active(2).await;
    p.append("src/pyworker.py", "# v3\n");
    d.wait_active(3).await;
    // Made a link, then switched to another folder: what the old target
    // holds is no longer watched.
    for r in ["r1", "r2"] {
        std::fs::create_dir(p.path(r)).expect("mkdir");
        p.write(&format!("{r}/pyworker.py"), &format!("{source}\n# {r}\n"));
    }
    std::fs::remove_dir_all(p.path("src")).expect("rm src");
    std::os::unix::fs::symlink("r1", p.path("src")).expect("ln");
    d.wait_active(4).await;
    std::os::unix::fs::symlink("r2", p.path("src.new")).expect("ln");
    std::fs::rename(p.path("src.new"), p.path("src")).expect("switch");
    d.wait_active(5).await;
    p.append("r1/pyworker.py", "# old target\n");
    assert_eq!(settled(&d).await, 5, "{}", d.log());
    p.append("src/pyworker.py", "# r2 v2\n");
    d.wait_active(6).await;
    // The config's folder: a new one moved in over it (a release switch
    // done with `mv`).
    let cfg = read(&p.path("etc/baton.toml"));
    std::fs::create_dir(p.path("etc.new")).expect("mkdir");
    std::fs::write(
        p.path("etc.new/baton.toml"),
        cfg.replace("health_interval_ms = 300", "health_interval_ms = 400"),
    )
    .expect("write");
    std::fs::rename(p.path("etc"), p.path("etc.old")).expect("mv etc");
    std::fs::rename(p.path("etc.new"), p.path("etc")).expect("mv etc.new");
    d.wait_active(7).await;
    p.edit(
        "etc/baton.toml",
        "health_interval_ms = 400",
        "health_interval_ms = 500",
    );
    let s = d.wait_active(8).await;
    assert!(s.config_error.is_none(), "{:?}", s.config_error);
    assert_eq!(
        d.log().matches("config reloaded; redeploying").count(),
        2,
        "{}",
        d.log()
    );
}

/// `sed -i` on the config, with the whole project watched, also leaves a
/// temporary file beside it (a source change): the two are one deploy,
/// built with the new config. A refused config does not swallow a source
/// change saved with it: that one deploys with the running config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_change_saved_with_the_config_waits_for_its_reload() {
    let p = Project::python("", "");
    p.edit("etc/baton.toml", "paths = [\"src\"]", "paths = [\".\"]");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert_eq!(settled(&d).await, 1);
    let sed = std::process::Command::new("sed")
        .args(["-i", "s/health_interval_ms = 300/health_interval_ms = 400/"])
        .arg(p.path("etc/baton.toml"))
        .status()
        .expect("sed");
    assert!(sed.success());
    assert_eq!(settled(&d).await, 2, "one deploy; log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 2).await, "config reload");
    // A source edit and a refused config, saved together.
    p.append("src/pyworker.py", "\n# edited\n");
    p.edit(
        "etc/baton.toml",
        "debounce_ms = 100",
        "debounce_ms = \"soon\"",
    );
    let s = d
        .wait_for("config refused", |s| s.config_error.is_some())
        .await;
    assert!(
        s.config_error
            .as_deref()
            .unwrap_or("")
            .contains("debounce_ms"),
        "{:?}",
        s.config_error
    );
    assert_eq!(settled(&d).await, 3, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 3).await, "watch: src/pyworker.py");
}

/// A build that writes its artifact inside the watched tree does not start
/// the next build: a change to the artifact alone, leaving it as the newest
/// generation's snapshot, is the build's own. Sources beside it still
/// deploy, and so does the artifact changed otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_artifact_a_build_writes_in_a_watched_folder_is_no_change() {
    let p = Project::python("", "");
    p.edit("etc/baton.toml", "paths = [\"src\"]", "paths = [\".\"]");
    // Each build is counted in target/ (ignored); it fails, after writing
    // the artifact, when the source says BROKEN.
    std::fs::create_dir(p.path("target")).expect("mkdir target");
    p.edit(
        "etc/baton.toml",
        "command = []\nartifact = \"src/pyworker.py\"",
        "command = [\"sh\", \"-c\", \"echo b >> target/builds.txt && mkdir -p out && \
         cp src/pyworker.py out/worker.py && ! grep -q BROKEN out/worker.py\"]\n\
         artifact = \"out/worker.py\"",
    );
    let builds = || read(&p.path("target/builds.txt")).lines().count();
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert_eq!(settled(&d).await, 1, "log:\n{}", d.log());
    assert_eq!(builds(), 1);
    p.append("src/pyworker.py", "\n# edited\n");
    assert_eq!(settled(&d).await, 2, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 2).await, "watch: src/pyworker.py");
    assert_eq!(builds(), 2);
    // The artifact changed by something else than the build is a change
    // (and so is each edit of an artifact that is a source, with a build
    // that only checks it: see `failed_build_keeps_the_old_worker`).
    p.append("out/worker.py", "\n# by hand\n");
    assert_eq!(settled(&d).await, 3, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 3).await, "watch: out/worker.py");
    assert_eq!(builds(), 3);
    // A build that fails after writing the artifact does not start again.
    p.append("src/pyworker.py", "\n# BROKEN\n");
    d.wait_history(4, "failed").await;
    assert_eq!(settled(&d).await, 3, "log:\n{}", d.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(builds(), 4, "log:\n{}", d.log());
    // A build that removes the artifact's folder, writes the artifact
    // beside it and moves it over, and makes and removes a scratch folder:
    // files that came and went, and an artifact as the build left it.
    let cfg = read(&p.path("etc/baton.toml"));
    let from = cfg.find("mkdir -p out").expect("build command");
    let to = cfg[from..].find('"').expect("end of command") + from;
    let mut new = cfg.clone();
    new.replace_range(
        from..to,
        "rm -rf out && mkdir out && t=$(mktemp -p out) && cp src/pyworker.py $t && \
         mv -f $t out/worker.py && d=$(mktemp -d -p .) && rmdir $d",
    );
    p.write("etc/baton.toml", &new);
    assert_eq!(trigger_of(&d, 5).await, "config reload");
    assert_eq!(settled(&d).await, 5, "log:\n{}", d.log());
    p.append("src/pyworker.py", "\n# fixed\n");
    assert_eq!(settled(&d).await, 6, "log:\n{}", d.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(builds(), 6, "log:\n{}", d.log());
}

/// The artifact check reads a large file while it is written again (the
/// same bytes, twice): the check does not take the half-written file for a
/// change, it looks again once the writes are quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_written_while_it_is_checked_is_looked_at_again() {
    let p = Project::python("", "");
    p.edit("etc/baton.toml", "paths = [\"src\"]", "paths = [\".\"]");
    p.edit(
        "etc/baton.toml",
        "command = []\nartifact = \"src/pyworker.py\"",
        "command = [\"sh\", \"-c\", \"mkdir -p out && cp src/pyworker.py out/worker.py\"]\n\
         artifact = \"out/worker.py\"",
    );
    // About 30 MB, so that hashing it takes a while.
    p.append(
        "src/pyworker.py",
        &format!("#{}\n", "x".repeat(99)).repeat(300_000),
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert_eq!(settled(&d).await, 1, "log:\n{}", d.log());
    let bytes = std::fs::read(p.path("out/worker.py")).expect("artifact");
    for gap in [100, 150, 200, 300] {
        std::fs::write(p.path("out/worker.py"), &bytes).expect("rewrite");
        tokio::time::sleep(Duration::from_millis(gap)).await;
        std::fs::write(p.path("out/worker.py"), &bytes).expect("rewrite");
        assert_eq!(settled(&d).await, 1, "gap {gap} ms; log:\n{}", d.log());
    }
}

/// Files that came and went between two deploys changed nothing; files
/// that stay, or that existed before and are gone, did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_came_and_went_change_nothing() {
    let p = Project::python("", "");
    // Quiet time enough that each step below falls within one.
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 400");
    p.write("src/keep.py", "# kept\n");
    std::fs::create_dir(p.path("away")).expect("mkdir away");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert_eq!(settled(&d).await, 1);
    let sh = |script: &str| {
        let ok = std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(p.path(""))
            .status()
            .expect("sh")
            .success();
        assert!(ok, "{script}");
    };
    // A temporary file; a folder of files moved in and removed; a copied
    // tree removed; a folder made with a file and moved out of the tree.
    sh("echo x > src/tmp.1 && rm src/tmp.1");
    sh(
        "mkdir away/pkg && touch away/pkg/a.py away/pkg/b.py && mv away/pkg src/pkg && rm -rf src/pkg",
    );
    sh("mkdir -p away/tree/sub && touch away/tree/x.py away/tree/sub/y.py");
    sh("cp -r away/tree src/copy && rm -rf src/copy");
    sh("mkdir src/d && echo x > src/d/f.py && mv src/d away/d");
    assert_eq!(settled(&d).await, 1, "log:\n{}", d.log());
    // A file that existed, saved through a file moved over it, then
    // removed: a change.
    sh("echo y > src/keep.new && mv src/keep.new src/keep.py && rm src/keep.py");
    assert_eq!(settled(&d).await, 2, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 2).await, "watch: src/keep.py");
    // A folder moved in that stays: a change.
    sh("mv away/d src/d");
    assert_eq!(settled(&d).await, 3, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 3).await, "watch: src/d/f.py");
    // Removed and made again, empty: its files' removal is the change.
    sh("rm -rf src/d && mkdir src/d");
    assert_eq!(settled(&d).await, 4, "log:\n{}", d.log());
    assert_eq!(trigger_of(&d, 4).await, "watch: src/d/f.py");
}

/// A config file that is no regular file (a named pipe here, which an
/// open would wait on until something wrote to it) is refused at once,
/// with the reason, and holds up nothing: requests and the control socket
/// are answered, and the next good save is read and deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_is_a_named_pipe_is_refused_and_holds_up_nothing() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let cfg = p.path("etc/baton.toml");
    let text = read(&cfg).replace("health_interval_ms = 300", "health_interval_ms = 400");
    let fifo = p.path("etc/baton.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::fs::rename(&fifo, &cfg).expect("fifo in place");
    let s = d
        .wait_for("the pipe refused", |s| s.config_error.is_some())
        .await;
    let err = s.config_error.expect("error");
    assert!(err.contains("not a regular file"), "{err}");
    for _ in 0..3 {
        assert_eq!(whoami(d.addr).await.0, 1);
        assert_eq!(d.status().await.active.map(|a| a.id), Some(1));
    }
    let out = d.ctl(&["reload"]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{out:?}"
    );
    // A plain file in its place, as an editor saves it.
    std::fs::write(p.path("etc/baton.plain"), &text).expect("plain config");
    std::fs::rename(p.path("etc/baton.plain"), &cfg).expect("plain config in place");
    d.wait_for("the reload's deploy", |s| {
        s.active.as_ref().is_some_and(|a| a.id >= 2) && s.config_error.is_none()
    })
    .await;
    assert!(d.stop().await.success());
}

/// A worker command that runs the tree, not the snapshot, is advised
/// against: in the log at start, and as a note of each reload (not among
/// the settings kept until a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_without_the_snapshot_is_advised_against() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["python3", "src/pyworker.py"]"#,
    );
    // The check says it too (`batond --check`, run before a restart).
    let out = batond_check(&p);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("note: worker.command does not name {artifact}"),
        "{out:?}"
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert!(d.log_shows("does not name {artifact}").await, "{}", d.log());
    let out = d.ctl(&["reload"]).await;
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("note: worker.command does not name {artifact}"),
        "{said}"
    );
    let (_, body) = baton::control::client::call_text(&d.socket, http::Method::POST, "/v1/reload")
        .await
        .expect("reload");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["kept"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["advice"].as_array().map(Vec::len), Some(1), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_mode_reports_errors_with_position_and_exit_78() {
    let p = Project::python("", "");
    let out = batond_check(&p);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.edit(
        "etc/baton.toml",
        "stop_timeout_s = 2",
        "stop_timeout_s = \"two\"",
    );
    let out = batond_check(&p);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("baton.toml:"), "{err}");
    assert!(err.contains("worker.stop_timeout_s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_storm_builds_at_most_twice() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "echo build >> builds.txt; sleep 0.3"]"#,
    );
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 200");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // 50 saves in about one second.
    for i in 0..50 {
        p.append("src/pyworker.py", &format!("# save {i}\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.wait_for("storm settled", |s| {
        s.candidate.is_none() && !s.deploy_pending && s.active.as_ref().is_some_and(|a| a.id >= 2)
    })
    .await;
    // Let a straggling debounce fire, if any, then count.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = d
        .wait_for("idle", |s| s.candidate.is_none() && !s.deploy_pending)
        .await;
    let builds = read(&p.path("builds.txt")).lines().count();
    assert!(
        (2..=3).contains(&builds),
        "{builds} builds (1 at start-up + at most 2)"
    );
    // The last build saw the last save.
    let active = s.active.expect("active");
    let snap = read(&p.path(&format!("state/gen-{:04}/pyworker.py", active.id)));
    assert!(snap.contains("# save 49"), "latest wins");
}

/// A file written without pause in a watched folder (a log, an autosave)
/// does not hold deploys back for good: the change deploys at
/// `watch.max_wait_ms` after the first of them, quiet or not, and the log
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_never_pause_deploy_at_the_longest_wait() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "debounce_ms = 100",
        "debounce_ms = 400\nmax_wait_ms = 1200",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, log) = (stop.clone(), p.path("src/app.log"));
        tokio::spawn(async move {
            // Every 30 ms, for at most PATIENCE (bounded in count too).
            let until = tokio::time::Instant::now() + PATIENCE;
            for i in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst)
                    || tokio::time::Instant::now() >= until
                {
                    break;
                }
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("open log");
                writeln!(f, "line {i}").expect("write");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    p.append("src/pyworker.py", "\n# RELEASE=edited\n");
    d.wait_active(2).await;
    // Still writing: the deploy did not wait for quiet.
    assert!(!writer.is_finished(), "the writer stopped first");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.expect("writer");
    assert!(
        d.log_shows("without waiting for quiet").await,
        "{}",
        d.log()
    );
    let snap = read(&p.path("state/gen-0002/pyworker.py"));
    assert!(
        snap.contains("# RELEASE=edited"),
        "the edit is in the deploy"
    );
}

/// A connection to `addr` on which `bytes` have been sent, left open.
async fn sent(addr: std::net::SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s
}

/// The inotify watches `pid` holds.
fn inotify_watches(pid: u32) -> usize {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let is_inotify =
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"));
        if is_inotify {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            n += info
                .lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count();
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_folders_are_not_watched_and_new_folders_are() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        r#"paths = ["src"]"#,
        r#"paths = ["."]
ignore = ["**/target/**", "**/node_modules/**", "**/*.swp"]"#,
    );
    // A build tree and a package tree: 400 folders no watch should cover.
    for i in 0..200 {
        std::fs::create_dir_all(p.path(&format!("target/debug/deps/d{i}/x"))).expect("mkdir");
    }
    for i in 0..200 {
        p.write(&format!("node_modules/pkg{i}/index.js"), "//\n");
    }
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let pid = d.child.id().expect("pid");
    // The project folder, etc/ and src/; not the state folder either.
    let watches = inotify_watches(pid);
    assert!(watches <= 4, "{watches} inotify watches for 3 folders");

    // Writes in ignored folders, and in the state folder, start no build.
    p.write("target/debug/deps/d7/x/app.o", "obj");
    p.write("node_modules/pkg3/index.js", "// changed\n");
    std::fs::create_dir_all(p.path("target/release/new")).expect("mkdir");
    p.write("state/notes.txt", "x");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = d.status().await;
    assert_eq!(s.active.as_ref().map(|a| a.id), Some(1));
    assert!(s.candidate.is_none() && !s.deploy_pending, "{s:?}");
    assert_eq!(
        inotify_watches(pid),
        watches,
        "no watch for ignored folders"
    );

    // A folder made after start is watched, down to its new subfolders.
    p.write("src/a/b/c/extra.py", "# 1\n");
    d.wait_active(2).await;
    assert_eq!(
        inotify_watches(pid),
        watches + 3,
        "src/a, src/a/b, src/a/b/c"
    );
    p.append("src/a/b/c/extra.py", "# 2\n");
    d.wait_active(3).await;
    // Removed and made again (a branch switch): watched again.
    std::fs::remove_dir_all(p.path("src/a")).expect("rm -r");
    d.wait_active(4).await;
    assert_eq!(
        inotify_watches(pid),
        watches,
        "watches of removed folders gone"
    );
    p.write("src/a/b/again.py", "# 1\n");
    d.wait_active(5).await;
    p.append("src/a/b/again.py", "# 2\n");
    d.wait_active(6).await;
    assert_eq!(inotify_watches(pid), watches + 2, "src/a, src/a/b");
}

/// Waits until no deploy is running or due, twice 400 ms apart (four
/// debounce periods) with the same active generation; returns its id.
async fn settled(d: &Daemon) -> u64 {
    let idle = |s: &baton::control::api::Status| s.candidate.is_none() && !s.deploy_pending;
    let mut last = None;
    for _ in 0..50 {
        let s = d.wait_for("no deploy under way", idle).await;
        let id = s.active.map(|a| a.id);
        if id.is_some() && id == last {
            return id.unwrap_or_default();
        }
        last = id;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    panic!("deploys never settled; log:\n{}", d.log());
}

/// The trigger of the active generation, once it is `g`.
async fn trigger_of(d: &Daemon, g: u64) -> String {
    d.wait_active(g)
        .await
        .active
        .map(|a| a.trigger)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_folders_replaced_whole_keep_the_watches_right() {
    let p = Project::python("", "");
    p.write("src/sub/x.py", "# 1\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let pid = d.child.id().expect("pid");
    // The project folder (src's), etc/ (the config's), src, src/sub.
    assert_eq!(inotify_watches(pid), 4);

    // A link to a folder of the tree, made and removed: the folder stays
    // watched under its own path (it used to be renamed to the link's,
    // and removing the link ended it).
    std::os::unix::fs::symlink("sub", p.path("src/link")).expect("ln -s");
    let g = settled(&d).await;
    std::fs::remove_file(p.path("src/link")).expect("rm link");
    let g = settled(&d).await.max(g);
    p.append("src/sub/x.py", "# 2\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/sub/x.py");
    // A link loop (a link to the tree's own parent) is not followed, and
    // folders made after it are still watched.
    std::os::unix::fs::symlink("..", p.path("src/sub/up")).expect("ln -s");
    let g = settled(&d).await;
    p.write("src/later/f.py", "# 1\n");
    let g = settled(&d).await.max(g);
    p.append("src/later/f.py", "# 2\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/later/f.py");
    assert_eq!(inotify_watches(pid), 5, "src/later too, nothing twice");

    // The watched folder itself replaced by another (moved away, a copy
    // moved in): the new one is watched, the old one no longer is.
    let copy = std::process::Command::new("cp")
        .args(["-r", "src", "src.new"])
        .current_dir(p.path(""))
        .status()
        .expect("cp");
    assert!(copy.success());
    std::fs::rename(p.path("src"), p.path("src.old")).expect("mv src src.old");
    std::fs::rename(p.path("src.new"), p.path("src")).expect("mv src.new src");
    let g = settled(&d).await;
    p.append("src.old/sub/x.py", "# old\n");
    assert_eq!(settled(&d).await, g, "an edit in the folder moved away");
    p.append("src/sub/x.py", "# 3\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/sub/x.py");
    // Removed and made again.
    std::fs::remove_dir_all(p.path("src")).expect("rm -r src");
    p.write("src/pyworker.py", pyworker_source());
    let g = settled(&d).await;
    p.write("src/y.py", "# 1\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/y.py");
    assert_eq!(inotify_watches(pid), 3, "the project folder, etc/, src");

    // A link to a folder outside, switched to another by a rename (as
    // `ln -sfn` and `mv -T` do): the one it led to is no longer watched.
    for v in ["vA", "vB"] {
        p.write(&format!("outside/{v}/inner/i.py"), "# 1\n");
    }
    let outside = p.path("outside");
    std::os::unix::fs::symlink(outside.join("vA"), p.path("src/vendor")).expect("ln -s");
    let g = settled(&d).await;
    std::os::unix::fs::symlink(outside.join("vB"), p.path("src/vendor.new")).expect("ln -s");
    std::fs::rename(p.path("src/vendor.new"), p.path("src/vendor")).expect("mv -T");
    let g = settled(&d).await.max(g);
    assert_eq!(
        inotify_watches(pid),
        5,
        "src/vendor and its inner folder once"
    );
    p.append("outside/vA/inner/i.py", "# old\n");
    assert_eq!(
        settled(&d).await,
        g,
        "an edit in the folder no longer linked"
    );
    p.append("outside/vB/inner/i.py", "# 2\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/vendor/inner/i.py");
}

/// The layout of a release switch: the config is reached through links
/// (`etc -> current/etc`, `current -> r1`). Switching `current` to `r2` is
/// seen, reloads, deploys r2's worker, and r2's source is watched from then
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_switch_under_the_config_link_reloads_and_deploys_it() {
    let p = Project::python("", "");
    let state = p.path("state");
    // A file watched by name beside the config (the worker's own config,
    // as etc/baton.toml has it).
    let config = read(&p.path("etc/baton.toml"))
        .replace(
            r#"state_dir = "state""#,
            &format!("state_dir = {:?}", state.to_str().expect("utf8")),
        )
        .replace(r#"paths = ["src"]"#, r#"paths = ["src", "etc/extra.conf"]"#);
    assert!(config.contains("etc/extra.conf"), "{config}");
    for r in ["r1", "r2"] {
        p.write(&format!("{r}/etc/baton.toml"), &config);
        p.write(&format!("{r}/etc/extra.conf"), "# 1\n");
        p.write(
            &format!("{r}/src/pyworker.py"),
            &format!("{}# RELEASE={r}\n", pyworker_source()),
        );
    }
    std::fs::remove_dir_all(p.path("etc")).expect("rm etc");
    std::os::unix::fs::symlink("r1", p.path("current")).expect("ln -s");
    std::os::unix::fs::symlink("current/etc", p.path("etc")).expect("ln -s");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    assert_eq!(whoami(d.addr).await.2["release"], "r1");
    // The switch, as deploy tools make it: a new link renamed over the old.
    std::os::unix::fs::symlink("r2", p.path("current.new")).expect("ln -s");
    std::fs::rename(p.path("current.new"), p.path("current")).expect("mv -T");
    assert_eq!(trigger_of(&d, 2).await, "config reload");
    assert_eq!(whoami(d.addr).await.2["release"], "r2");
    // r2's source is what is watched now.
    let g = settled(&d).await;
    p.append("r2/src/pyworker.py", "# edited\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/pyworker.py");
    // And the file beside the config, which its folder is watched for
    // under the link's spelling (etc/ sorts before r2/).
    let g = settled(&d).await;
    p.append("r2/etc/extra.conf", "# edited\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: etc/extra.conf");
    assert!(d.stop().await.success());
}

/// The config's folder watched under another name (a link to it, named
/// in `watch.paths`, sorts first): the config's events come under that
/// name, and are still the config's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_folder_watched_under_another_name_is_still_the_configs() {
    let p = Project::python("", "");
    std::os::unix::fs::symlink("etc", p.path("a")).expect("ln -s");
    p.write("etc/extra.conf", "# 1\n");
    let extra = p.path("a/extra.conf");
    p.edit(
        "etc/baton.toml",
        r#"paths = ["src"]"#,
        &format!("paths = [\"src\", {:?}]", extra.to_str().expect("utf8")),
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let g = settled(&d).await;
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 101");
    assert_eq!(trigger_of(&d, g + 1).await, "config reload");
    let g = settled(&d).await;
    p.append("etc/extra.conf", "# 2\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: a/extra.conf");
}

/// The config's folder watched whole under another name (`paths =
/// ["a"]`, `a -> etc`): an edit of the config is a reload, not a deploy of
/// a source change that nobody read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_in_a_watched_folder_of_another_name_is_reloaded() {
    let p = Project::python("", "");
    std::os::unix::fs::symlink("etc", p.path("a")).expect("ln -s");
    p.edit(
        "etc/baton.toml",
        r#"paths = ["src"]"#,
        r#"paths = ["src", "a"]"#,
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let g = settled(&d).await;
    p.edit("etc/baton.toml", "debounce_ms = 100", "debounce_ms = 101");
    assert_eq!(trigger_of(&d, g + 1).await, "config reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_rescan_and_state_and_config_folders_are_found_through_links() {
    let p = Project::python("", "");
    // The state folder spelled through a link to the project, the whole
    // project watched, and the config in an ignored folder that batond is
    // given through a link (etc -> conf).
    std::os::unix::fs::symlink(".", p.path("here")).expect("ln -s");
    p.edit(
        "etc/baton.toml",
        r#"state_dir = "state""#,
        r#"state_dir = "here/state""#,
    );
    p.edit(
        "etc/baton.toml",
        r#"paths = ["src"]"#,
        r#"paths = ["."]
ignore = ["conf/"]"#,
    );
    std::fs::rename(p.path("etc"), p.path("conf")).expect("mv etc conf");
    std::os::unix::fs::symlink("conf", p.path("etc")).expect("ln -s");
    p.write("src/sub/x.py", "# 1\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // Deploys write logs into the state folder: no build from them (with
    // the link, every deploy used to start another).
    assert_eq!(settled(&d).await, 1);
    d.deploy().await;
    assert_eq!(settled(&d).await, 2);
    // The config is watched although its folder is ignored, and its
    // events name it by its real path.
    p.edit("conf/baton.toml", "debounce_ms = 100", "debounce_ms = 101");
    assert_eq!(trigger_of(&d, 3).await, "config reload");
    let g = settled(&d).await;

    // Overflow the kernel's event queue while batond is stopped, and make
    // a folder meanwhile: the overflow is noticed, every tree walked
    // again, and the worker rebuilt.
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16_384);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(d.child.id().expect("pid")).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    // Each touch of a folder is two events, on the folder and on its
    // parent, so consecutive ones are never merged.
    let sub = std::fs::File::open(p.path("src/sub")).expect("open src/sub");
    let t0 = std::time::SystemTime::UNIX_EPOCH;
    for i in 0..max.min(4_000_000) + 1000 {
        let t = t0 + Duration::from_secs(1_000_000 + (i as u64 % 2));
        sub.set_modified(t).expect("touch src/sub");
    }
    std::fs::create_dir(p.path("src/made")).expect("mkdir");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let s = d
        .wait_for("a deploy for the lost events", |s| {
            s.history
                .iter()
                .chain(s.active.iter())
                .any(|h| h.id > g && h.trigger.contains("file events were lost"))
        })
        .await;
    assert!(d.log_shows("file events were lost").await, "{s:?}");
    let g = settled(&d).await;
    p.write("src/made/f.py", "# 1\n");
    assert_eq!(trigger_of(&d, g + 1).await, "watch: src/made/f.py");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_leaves_no_worker() {
    let p = Project::python("", "");
    let mut d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid = s.active.and_then(|a| a.pid).expect("pid");
    assert!(alive(pid));
    // A `batonctl events` following the daemon says its stream broke off.
    use tokio::io::AsyncBufReadExt;
    let mut events = follow_events(&d);
    let mut lines = tokio::io::BufReader::new(events.stdout.take().expect("stdout")).lines();
    // Following: it prints the deploy's events.
    d.deploy().await;
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("an event")
        .expect("read");
    assert!(first.is_some(), "batonctl events printed nothing");
    d.child.start_kill().expect("kill -9");
    let _ = d.child.wait().await;
    assert!(
        wait_gone(pid).await,
        "worker {pid} outlived kill -9 of batond"
    );
    let out = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(_)) = lines.next_line().await {}
        events.wait_with_output().await
    })
    .await
    .expect("batonctl events ended")
    .expect("batonctl events");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("event stream broke off"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_metrics_logs_and_restart() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid1 = s.active.and_then(|a| a.pid).expect("pid");
    let _ = whoami(d.addr).await;
    let (code, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, StatusCode::OK);
    assert!(text.contains("baton_active_generation 1"), "{text}");
    assert!(text.contains("baton_requests_total "), "{text}");
    let out = d.ctl(&["logs", "-n", "50"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("listening on"));
    // Exactly the file's last lines, streamed from where they start.
    let file = read(&p.path("state/gen-0001/worker.log"));
    let last2: Vec<&str> = file.lines().rev().take(2).collect();
    let out = d.ctl(&["logs", "-n", "2"]).await;
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(got, format!("{}\n{}\n", last2[1], last2[0]));
    // Right after a rotation: the lines asked for that the new log does
    // not have yet come from the one before it, oldest first. (The
    // worker's log grows with each health check meanwhile: what was read
    // here is a prefix of what comes.)
    let old: String = (1..=30).map(|i| format!("rotated line {i}\n")).collect();
    std::fs::write(p.path("state/gen-0001/worker.log.1"), &old).expect("write");
    let current = read(&p.path("state/gen-0001/worker.log"));
    assert!(current.lines().count() < 1000, "{current}");
    let out = d.ctl(&["logs", "-n", "1000"]).await;
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(got.starts_with(&format!("{old}{current}")), "{got}");
    // Fewer asked for than the rotated log has: its last ones.
    let have = got.lines().count() - 30;
    let out = d.ctl(&["logs", "-n", &(have + 2).to_string()]).await;
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!got.contains("rotated line 28\n"), "{got}");
    // A generation that is not kept is said to be so.
    let out = d.ctl(&["logs", "-g", "99"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no generation 99 is kept"),
        "{out:?}"
    );
    let out = d.ctl(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["active"]["id"], 1);
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = d.status().await;
    let a = s.active.expect("active");
    assert_eq!(a.id, 1);
    assert_ne!(a.pid, Some(pid1));
    assert!(wait_gone(pid1).await);
    d.deploy().await;
    assert_eq!(d.status().await.active.map(|a| a.id), Some(2));
    // Unknown routes get a JSON 404; malformed HTTP on the public port, a 400.
    let (code, _) = baton::control::client::call_text(&d.socket, http::Method::GET, "/nope")
        .await
        .expect("call");
    assert_eq!(code, StatusCode::NOT_FOUND);
    // A route asked with the wrong method: 405 naming the right one; HEAD
    // where GET goes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let control = async |head: &str| {
        let mut s = tokio::net::UnixStream::connect(&d.socket)
            .await
            .expect("connect");
        s.write_all(format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
            .await
            .expect("answered")
            .expect("read");
        String::from_utf8_lossy(&got).to_lowercase()
    };
    for (head, allow) in [
        ("GET /v1/deploy HTTP/1.1", "post"),
        ("DELETE /v1/restart HTTP/1.1", "post"),
        ("PUT /v1/status HTTP/1.1", "get, head"),
    ] {
        let text = control(head).await;
        assert!(text.starts_with("http/1.1 405"), "{head}: {text}");
        assert!(
            text.contains(&format!("\r\nallow: {allow}\r\n")),
            "{head}: {text}"
        );
    }
    // A deadline that is no time is refused, naming the header.
    let text = control("POST /v1/deploy HTTP/1.1\r\nBaton-Deadline-Ms: soon").await;
    assert!(text.starts_with("http/1.1 400"), "{text}");
    assert!(text.contains("baton-deadline-ms"), "{text}");
    // Query parameters are percent-decoded as any HTTP client may send
    // them; one that is wrong is named with its value.
    let text = control("GET /v1/logs?kind=%62uild&lines=%35 HTTP/1.1").await;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let text = control("GET /v1/logs?lines=ten HTTP/1.1").await;
    assert!(text.starts_with("http/1.1 400"), "{text}");
    assert!(text.contains("`ten`"), "{text}");
    let text = control("HEAD /v1/status HTTP/1.1").await;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body after the head: {text}");
    // batonctl's output that cannot be written: a closed pipe is no error
    // (`batonctl logs | head -1`), a full disk is one, said as such.
    // (tokio's `output()` would put its own pipes in place of these.)
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = tokio::process::Command::new(BATONCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["logs", "-n", "50"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("batonctl runs")
        .wait_with_output()
        .await
        .expect("batonctl ends");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = tokio::process::Command::new(BATONCTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .stdout(std::process::Stdio::from(full))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("batonctl runs")
        .wait_with_output()
        .await
        .expect("batonctl ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing to stdout"), "{err}");
    let text = raw_request(d.addr, "GARBAGE\x01 / HTTP/9\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // A head of 30 KB goes through; one of 300 KB (ten 30 KB headers,
    // each one the worker would take) gets 431 from the proxy.
    let head = |n: usize| {
        let mut h = String::from("GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
        for i in 0..n {
            h.push_str(&format!("X-Big-{i}: {}\r\n", "v".repeat(30_000)));
        }
        h + "\r\n"
    };
    for (n, status) in [(1, "HTTP/1.1 200"), (10, "HTTP/1.1 431")] {
        let text = raw_request(d.addr, &head(n)).await;
        assert!(
            text.starts_with(status),
            "{n} headers: {}",
            &text[..text.len().min(200)]
        );
    }
    // Both refusals are counted, and the log names the client and what
    // was wrong (the first one at least: a second one within the same
    // second is told with the next line; see `proxy::LogLimit`).
    let first = d.log_line("refused a malformed request").await;
    assert!(first.contains("peer=127.0.0.1:"), "{first}");
    assert!(
        first.contains("error=invalid HTTP") || first.contains("error=message head is too large"),
        "{first}"
    );
    // Counted as each connection's task ends, a moment after the client
    // has read its answer.
    let mut text = String::new();
    for _ in 0..100 {
        text = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
            .await
            .expect("metrics")
            .1;
        if text.contains("\nbaton_malformed_requests_total 2\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        text.contains("\nbaton_malformed_requests_total 2\n"),
        "{text}"
    );
    // A TLS handshake sent to the plain-HTTP listener (an `https://` URL
    // for it) is said to be one. (A second after the first line, so this
    // one is said at once.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = raw_request(d.addr, "\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let tls = d.log_line("hint=\"it began as a TLS handshake").await;
    assert!(tls.contains("point it at http://, not https://"), "{tls}");
    // Only that one: a request of plain bad HTTP gets no such hint.
    let said = d.log();
    assert_eq!(said.matches("TLS handshake").count(), 1, "{said}");
    assert_eq!(
        d.get("/healthz").await.0,
        StatusCode::OK,
        "listener survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_active_worker_is_replaced_without_failed_requests() {
    let p = Project::python("", "");
    p.append("src/pyworker.py", "\n# UNHEALTHY_AFTER_MS=1500\n");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid1 = s.active.and_then(|a| a.pid).expect("pid");
    // Requests keep succeeding while the sick worker is replaced.
    let mut replaced = None;
    for _ in 0..400 {
        let (code, _, _) = d.get("/whoami").await;
        assert_eq!(code, StatusCode::OK);
        let s = d.status().await;
        if let Some(a) = s.active.filter(|a| a.pid != Some(pid1)) {
            replaced = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let a = replaced.expect("the unhealthy worker was never replaced");
    assert_eq!(a.id, 1, "same generation");
    assert!(a.restarts >= 1);
    assert!(d.log_shows("health_failed").await, "{}", d.log());
    assert!(wait_gone(pid1).await);
}

/// A replacement for a sick active worker that fails does not end the
/// health checks: the active keeps serving, is probed on, and a later
/// replacement (after the backoff) takes over once one proves itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replacement_of_a_sick_worker_is_tried_again() {
    let p = Project::python(
        "",
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_ms = 100\nlimit_burst = 2\nlimit_interval_s = 60\n",
    );
    p.append("src/pyworker.py", "\n# HEALTH_FILE=health\n");
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let pid1 = s.active.and_then(|a| a.pid).expect("pid");
    // Every worker is sick: each fresh process is rejected at once, and
    // replacements go on being tried, more of them than the start limit
    // allows crash restarts (they are not a crash loop: a worker serves).
    p.write("health", "404");
    let mut tries = 0;
    for _ in 0..400 {
        tries = d.log().matches("event=\"health_retry\"").count();
        if tries >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tries >= 3,
        "{tries} retries after failed replacements: {}",
        d.log()
    );
    assert_eq!(d.status().await.state, "running");
    let s = d.status().await;
    assert_eq!(
        s.active.and_then(|a| a.pid),
        Some(pid1),
        "the old one stays"
    );
    // Only the old one is sick now: the next try takes over.
    p.write("health", &format!("404 {pid1}"));
    let mut replaced = None;
    for _ in 0..200 {
        let s = d.status().await;
        if let Some(a) = s.active.filter(|a| a.pid != Some(pid1)) {
            replaced = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = replaced.expect("the sick worker was never replaced after a failed try");
    assert_eq!(a.id, 1, "same generation");
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    assert!(wait_gone(pid1).await);
    // The failed replacements used none of the start limit: a crash now
    // is restarted.
    std::fs::remove_file(p.path("health")).expect("rm health");
    let pid2 = a.pid.expect("pid");
    sigkill(pid2);
    let s = d
        .wait_for("a restart after the crash", |s| {
            s.state == "running"
                && s.active
                    .as_ref()
                    .is_some_and(|a| a.pid.is_some() && a.pid != Some(pid2))
        })
        .await;
    assert_eq!(s.active.map(|a| a.id), Some(1), "{}", d.log());
}

/// A request that waits for a worker to be swapped in (a crash restart
/// whose worker is slow to start) waits up to `hold_timeout_ms`, even past
/// `idle_timeout_s`: the idle clock is for a worker that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_for_a_restart_is_not_cut_by_the_idle_timeout() {
    let p = Project::python("", "");
    p.append("src/pyworker.py", "\n# START_DELAY_FILE=delay\n");
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 15000\nheader_timeout_s = 1\nidle_timeout_s = 2",
    );
    let d = Daemon::start(&p).await;
    let pid = d.active_pid(1).await;
    p.write("delay", "4500");
    sigkill(pid);
    d.wait_for("no active worker", |s| {
        s.active.as_ref().is_none_or(|a| a.pid != Some(pid))
    })
    .await;
    // The hold does not count toward the worker's idle time: an answer
    // that takes less than the idle timeout once the worker has the
    // request comes through.
    let (code, _, body) = d.get("/slow?ms=1200").await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "slow 1"));
}

/// RFC 9112's rules for a request's host and framing, and who gets the
/// blame: a body the client botched is a 400, not a 502 that counts
/// against the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_and_the_worker_is_not_blamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let addr = d.addr;
    let status = |r: &str| r.lines().next().unwrap_or("").to_string();
    for (what, req) in [
        (
            "bad chunk size",
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        ("no Host", "GET /whoami HTTP/1.1\r\n\r\n"),
        (
            "two Host lines",
            "GET /whoami HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        ),
        (
            "a Host that is no host",
            "GET /whoami HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
        ),
        // RFC 9112 §3.2.3-4: a bare host:port is CONNECT's target, `*`
        // OPTIONS'; taken for any method, the first would reach the worker
        // as `GET /` for that host.
        (
            "a bare host:port target",
            "GET admin.internal:8080 HTTP/1.1\r\nHost: public.example\r\n\r\n",
        ),
        ("a bare name target", "GET echo HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("a * target on GET", "GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
    ] {
        let r = raw_request(addr, req).await;
        assert!(status(&r).starts_with("HTTP/1.1 400"), "{what}: {r}");
    }
    let r = raw_request(
        addr,
        "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 501"), "{r}");
    // `OPTIONS *` is for the server as a whole: it goes on (the worker
    // answers it as it likes).
    let r = raw_request(
        addr,
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!status(&r).contains(" 400"), "{r}");
    assert!(r.contains("BaseHTTP"), "the worker's own answer: {r}");
    // A GET or HEAD may carry a chunked body (RFC 9110 §9.3.1 gives it no
    // meaning, but a worker may use it): it is passed on chunked, not
    // dropped, and the connection stays in step for the next request.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await
    .expect("write");
    let mut r = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut r))
        .await
        .expect("answers in time")
        .expect("read");
    let answers: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "{r}");
    let lower = answers[0].to_ascii_lowercase();
    assert!(lower.starts_with("200"), "{r}");
    assert!(lower.contains("x-framing: chunked\r\n"), "{r}");
    assert!(answers[0].ends_with("\r\n\r\nhello world"), "{r}");
    assert!(
        answers[1]
            .to_ascii_lowercase()
            .contains("x-framing: length 3"),
        "{r}"
    );
    assert!(answers[1].ends_with("abc"), "{r}");
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("baton_bad_gateway_total 0"), "{text}");
    // An absolute-form target's authority wins over Host; every
    // X-Forwarded-For line is kept, the nearest hop last.
    let r = raw_request(
        addr,
        "GET http://a.example/whoami HTTP/1.1\r\nHost: b.example\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.9\r\nVia: 1.1 edge\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    let who: serde_json::Value = serde_json::from_str(body).expect("whoami json");
    let h = &who["headers"];
    assert_eq!(h["host"], "a.example", "{who}");
    assert_eq!(h["x-forwarded-host"], "a.example", "{who}");
    assert_eq!(
        h["x-forwarded-for"], "198.51.100.1, 203.0.113.9, 127.0.0.1",
        "{who}"
    );
    assert_eq!(h["via"], "1.1 edge, 1.1 batond", "{who}");
    // HTTP/1.0 needs no Host; `Via` says the client spoke 1.0.
    let r = raw_request(addr, "GET /whoami HTTP/1.0\r\n\r\n").await;
    assert!(status(&r).contains(" 200"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    let who: serde_json::Value = serde_json::from_str(body).expect("whoami json");
    assert_eq!(who["headers"]["via"], "1.0 batond", "{who}");
    // It goes on as HTTP/1.1, so with a Host line: an empty one.
    assert_eq!(who["headers"]["host"], "", "{who}");
    // A worker that breaks off its answer: the client gets the head and
    // what came before the break, then the close (a cut response it can
    // tell from a whole one), not a close without a word.
    let r = raw_request(addr, "GET /truncated HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status(&r).starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(
        r.to_ascii_lowercase().contains("content-length: 100"),
        "{r}"
    );
    assert!(r.ends_with("0123456789"), "{r:?}");
    // And the operator sees it: a counter and a warning.
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("baton_cut_responses_total 1"), "{text}");
    assert!(
        d.log_shows("the worker broke off a response after its head")
            .await
    );
    // A 101 to one of the protocols offered passes, with that protocol;
    // one to a protocol not offered is a 502.
    let switch = |to: &str| {
        format!(
            "GET /switch?to={to} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n"
        )
    };
    let r = raw_request(addr, &switch("h2c")).await;
    assert!(status(&r).starts_with("HTTP/1.1 101"), "{r}");
    assert!(r.to_ascii_lowercase().contains("upgrade: h2c\r\n"), "{r}");
    assert!(r.ends_with("switched\n"), "{r:?}");
    let r = raw_request(addr, &switch("h2")).await;
    assert!(status(&r).starts_with("HTTP/1.1 502"), "{r}");
    // A 101 to a request that asked for no upgrade is a 502 too (RFC 9110
    // §7.8), also for HTTP/1.0, whose Upgrade is ignored (§15.2).
    for req in [
        "GET /switch?to=h2c HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /switch?to=h2c HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    ] {
        let r = raw_request(addr, req).await;
        assert!(status(&r).ends_with(" 502 Bad Gateway"), "{req}: {r}");
    }
    // A worker's answer with both Transfer-Encoding and Content-Length is
    // framed by the chunks, and its Content-Length goes (RFC 9112 §6.3).
    let r = raw_request(
        addr,
        "GET /cl_te HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("content-length: 5"), "{r}");
    assert!(r.contains("0123456789abcdef"), "{r:?}");
    // A transfer coding besides chunked stays named on the answer (hyper
    // frames it in chunks again); an HTTP/1.0 client, which knows no
    // transfer coding, gets a 502 instead of a body it cannot tell is
    // coded. A request so coded is refused with 501 (RFC 9112 §6.1).
    let r = raw_request(
        addr,
        "GET /coded HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.to_ascii_lowercase()
            .contains("\r\ntransfer-encoding: gzip, chunked\r\n"),
        "{r}"
    );
    assert!(r.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{r:?}");
    let r = raw_request(addr, "GET /coded HTTP/1.0\r\n\r\n").await;
    assert!(status(&r).ends_with(" 502 Bad Gateway"), "{r}");
    assert!(r.contains("transfer coding gzip"), "{r}");
    let r = raw_request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(status(&r).ends_with(" 501 Not Implemented"), "{r}");
    assert!(r.contains("transfer coding gzip"), "{r}");
    // `Connection` cannot take `Host` away: the worker still gets it.
    let r = raw_request(
        addr,
        "GET /whoami HTTP/1.1\r\nHost: h.example\r\nConnection: host, close\r\n\r\n",
    )
    .await;
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    let who: serde_json::Value = serde_json::from_str(body).expect("whoami json");
    assert_eq!(who["headers"]["host"], "h.example", "{who}");
    // The listener lives on.
    assert_eq!(d.get("/healthz").await.0, StatusCode::OK);
    // Past 100 header lines (hyper's limit and HAProxy's): a request gets
    // 431, a worker's answer 502 that says which limit.
    let lines: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw_request(
        addr,
        &format!("GET /whoami HTTP/1.1\r\nHost: x\r\n{lines}\r\n"),
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 431"), "{r}");
    let r = raw_request(
        addr,
        "GET /many_headers?n=120 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 502"), "{r}");
    assert!(r.contains("over 100 header lines"), "{r}");
    let r = raw_request(
        addr,
        "GET /many_headers?n=90 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status(&r).starts_with("HTTP/1.1 200"), "{r}");
}

/// Requests without a body take batond's lean path, the others hyper's
/// server, which takes the connection over at the first of them: on one
/// connection, requests sent all at once are answered in order, whichever
/// way each goes, and each is rewritten the same way; so are the worker's
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_and_the_rest_share_one_connection_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let mut s = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    s.write_all(
        concat!(
            "GET /whoami HTTP/1.1\r\nHost: crm.example\r\nConnection: keep-alive, X-Secret\r\n",
            "X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n",
            "X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: https\r\n\r\n",
            "HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "GET /whoami HTTP/1.1\r\nHost: crm.example\r\nConnection: close, X-Secret\r\n",
            "X-Secret: 1\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: https\r\n\r\n",
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut r = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut r))
        .await
        .expect("answers in time, then the close asked for")
        .expect("read");
    let answers: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 5, "{r}");
    let statuses: Vec<&str> = answers.iter().map(|a| &a[..3]).collect();
    assert_eq!(statuses, ["200", "501", "200", "200", "200"], "{r}");
    // The two whoami answers (the lean path's and hyper's) saw the same
    // request: hop-by-hop headers gone, forwarding headers in.
    let seen = |a: &str| -> serde_json::Value {
        let body = a.split("\r\n\r\n").nth(1).unwrap_or("");
        let who: serde_json::Value = serde_json::from_str(body).expect("whoami json");
        who["headers"].clone()
    };
    let (lean, hyper) = (seen(answers[0]), seen(answers[4]));
    assert_eq!(lean, hyper, "the same rewrite on both paths");
    assert_eq!(lean["x-forwarded-for"], "198.51.100.1, 127.0.0.1", "{lean}");
    assert_eq!(lean["x-forwarded-proto"], "https", "{lean}");
    assert_eq!(lean["x-forwarded-host"], "crm.example", "{lean}");
    assert_eq!(lean["via"], "1.1 batond", "{lean}");
    for gone in ["x-secret", "keep-alive", "te", "connection"] {
        assert!(lean.get(gone).is_none(), "{gone}: {lean}");
    }
    // HEAD: the length of the body it would have, and no body.
    let head = answers[1].to_ascii_lowercase();
    assert!(head.contains("\r\ncontent-length: "), "{r}");
    assert!(head.ends_with("\r\n\r\n"), "{r}");
    assert!(
        answers[2]
            .to_ascii_lowercase()
            .contains("x-framing: length 0"),
        "{r}"
    );
    assert!(
        answers[3]
            .to_ascii_lowercase()
            .contains("x-framing: length 3"),
        "{r}"
    );
    assert!(answers[3].ends_with("\r\n\r\nabc"), "{r}");
    assert!(
        answers[4]
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{r}"
    );
    // The lean path's answers keep the connection open; only the last,
    // which asked for it, closes it.
    for a in &answers[..4] {
        assert!(!a.to_ascii_lowercase().contains("connection: close"), "{r}");
    }
    // A worker's trailers are not passed on by either path (hyper's
    // server sends only those a `Trailer` line declares, and that line is
    // hop-by-hop): the body in chunks, then the last chunk alone.
    for (path, way) in [
        (
            "GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
            "lean",
        ),
        // An absolute-form target goes through hyper's server.
        (
            "GET http://x/trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
            "hyper",
        ),
    ] {
        let r = raw_request(d.addr, path).await;
        let lower = r.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200"), "{way}: {r}");
        assert!(
            lower.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{way}: {r}"
        );
        assert!(r.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{way}: {r}");
        assert!(
            !lower.contains("x-checksum") && !lower.contains("\r\ntrailer:"),
            "{way}: {r}"
        );
    }
    // The worker's hop-by-hop lines (those its `Connection` names too)
    // reach the client by neither path, which write the same lines.
    let mut heads = Vec::new();
    for (path, way) in [
        (
            "GET /hops HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "lean",
        ),
        (
            "GET http://x/hops HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "hyper",
        ),
    ] {
        let r = raw_request(d.addr, path).await;
        let (head, body) = r.split_once("\r\n\r\n").expect("a head");
        assert_eq!(body, "ok", "{way}: {r}");
        let mut lines: Vec<String> = head.lines().skip(1).map(str::to_ascii_lowercase).collect();
        lines.sort();
        for gone in ["x-worker-secret", "keep-alive", "proxy-authenticate"] {
            assert!(
                !lines.iter().any(|l| l.contains(gone)),
                "{way}: {gone}: {r}"
            );
        }
        assert!(lines.contains(&"x-kept: 1".to_string()), "{way}: {r}");
        assert!(
            lines.contains(&"content-length: 2".to_string()),
            "{way}: {r}"
        );
        assert!(
            lines.contains(&"connection: close".to_string()),
            "{way}: {r}"
        );
        heads.push(lines);
    }
    assert_eq!(heads[0], heads[1], "the same lines by both paths");
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("baton_bad_gateway_total 0"), "{text}");
}

/// Nothing in progress holds a worker connection for ever: a worker that
/// sends no answer gets the client a 504, one that stops in the middle of
/// its answer loses the client connection, and an upgraded connection
/// whose worker side has ended is closed when the client sends nothing
/// more, all after `idle_timeout_s` without a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_tunnels_that_move_nothing_end_at_the_idle_timeout() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 5000\nheader_timeout_s = 1\nidle_timeout_s = 2",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // The worker upgrades, says one line and closes its side; the client
    // stays, silent.
    let mut tunnel = sent(
        d.addr,
        b"GET /switch?to=h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let mut hung = sent(d.addr, b"GET /slow?ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let gate = p.path("never");
    let mut cut = sent(
        d.addr,
        format!(
            "GET /stream?gate={} HTTP/1.1\r\nHost: x\r\n\r\n",
            gate.display()
        )
        .as_bytes(),
    )
    .await;
    let r = until_closed(&mut hung).await;
    assert!(r.starts_with("HTTP/1.1 504"), "{r}");
    assert!(r.contains("sent no answer within 2 s"), "{r}");
    let r = until_closed(&mut cut).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("first"), "{r}");
    assert!(!r.contains("second"), "{r}");
    let r = until_closed(&mut tunnel).await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    // An answer whose head and body each come a little under the idle
    // timeout apart (the head counts as movement) arrives whole.
    let (code, _, body) = d.get("/late?head=1600&gap=1600").await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "late\n"));
    d.wait_for("the tunnel to be let go", |s| {
        s.active
            .as_ref()
            .is_some_and(|a| a.connections == 0 && a.requests_in_flight == 0)
    })
    .await;
    let (_, text) = baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert!(text.contains("baton_gateway_timeout_total 1"), "{text}");
}

/// A keep-alive connection to the worker is used again while it is fresh,
/// and not once it has been idle for `worker.keepalive_timeout_ms`: a
/// worker that closes idle connections itself may be closing it just then,
/// and a POST that meets that close is a 502 (it cannot be sent again).
/// (The requests come on one client connection: each front thread keeps
/// idle worker connections of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_connections_are_not_used_past_the_keepalive_timeout() {
    let p = Project::python("keepalive_timeout_ms = 300", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // The port of batond's end of the connection each request came on.
    let port = |who: serde_json::Value| who["peer_port"].as_u64().expect("peer_port");
    let mut client = KeepAlive::connect(d.addr).await;
    let first = port(client.whoami().await);
    let again = port(client.whoami().await);
    assert_eq!(first, again, "a fresh idle connection is used again");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = port(client.whoami().await);
    assert_ne!(later, again, "a connection idle past the timeout was used");
}

/// A bodiless request goes through batond's lean client, one with a body
/// through hyper's; one worker connection serves both in turn (the lean
/// client hands an idle connection over), and each answer arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_connection_serves_bodiless_requests_and_uploads_in_turn() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let port = |who: serde_json::Value| who["peer_port"].as_u64().expect("peer_port");
    // One client connection: one front thread, whose idle worker
    // connections these requests share.
    let mut client = KeepAlive::connect(d.addr).await;
    let first = port(client.whoami().await);
    for round in 0..2 {
        let (code, headers, body) = client.request(Method::POST, "/echo", b"hello").await;
        assert_eq!((code, body.as_str()), (StatusCode::OK, "hello"));
        assert_eq!(
            headers.get("x-peer-port").and_then(|v| v.to_str().ok()),
            Some(first.to_string().as_str()),
            "round {round}: the upload came on another connection than {first}"
        );
        assert_eq!(port(client.whoami().await), first, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_and_upstream_failures_are_502() {
    use http_body_util::BodyExt;
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A response is passed on chunk by chunk: the first chunk arrives while
    // the worker is still waiting for the gate.
    let gate = p.path("gate");
    let stream = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("/stream?gate={}", gate.display()))
        .header("host", "x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("req");
    let resp = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .expect("timeout")
        .expect("resp");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first chunk was held back")
        .expect("frame")
        .expect("ok");
    assert_eq!(first.data_ref().map(|b| &b[..]), Some(&b"first\n"[..]));
    std::fs::write(&gate, "").expect("gate");
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("timeout")
        .expect("rest")
        .to_bytes();
    assert_eq!(&rest[..], b"second\n");
    // A 1 MiB request body goes through and back intact.
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let stream = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::post("/echo")
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            payload.clone(),
        )))
        .expect("req");
    let resp = send.send_request(req).await.expect("resp");
    assert_eq!(resp.status(), StatusCode::OK);
    let echoed = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(echoed[..] == payload[..], "echoed body differs");
    // The worker dies mid-request: a 502 with a short reason.
    let (code, _, body) = d.get("/die").await;
    assert_eq!(code, StatusCode::BAD_GATEWAY);
    assert!(
        body.starts_with("bad gateway: worker of generation 1"),
        "{body}"
    );
}

/// A request a live worker drops without an answer (a handler that
/// failed) is sent again once, not more (RFC 9110 §9.2.2); one answered
/// with something that is not HTTP is never sent again. Either is a 502,
/// and the worker lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_sent_again_at_most_once_and_never_after_a_broken_answer() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    let pid = d.wait_active(1).await.active.and_then(|a| a.pid);
    for (route, times) in [("drop", 2), ("garbage", 1)] {
        let log = p.path(&format!("{route}.log"));
        let (code, _, body) = d.get(&format!("/{route}?log={}", log.display())).await;
        assert_eq!(code, StatusCode::BAD_GATEWAY, "{route}: {body}");
        assert_eq!(
            read(&log).lines().count(),
            times,
            "{route}: times the worker got it"
        );
    }
    let s = d.status().await;
    assert_eq!(s.active.and_then(|a| a.pid), pid, "the worker lives on");
}

/// A GET in flight when its worker dies is sent to the replacement (the
/// dying worker's socket may still take the first resend's connection
/// for a moment: that must not use up the one resend), on a TCP and on a
/// Unix worker socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_in_flight_when_its_worker_dies_is_answered_by_the_replacement() {
    for socket in ["tcp", "unix"] {
        let p = Project::python(&format!("socket = \"{socket}\""), "");
        let d = Daemon::start(&p).await;
        for round in 0..3 {
            let s = d
                .wait_for("an active worker", |s| {
                    s.active
                        .as_ref()
                        .is_some_and(|a| a.pid.is_some() && s.state == "running")
                })
                .await;
            let pid = s.active.and_then(|a| a.pid).expect("pid");
            let addr = d.addr;
            let slow = tokio::spawn(async move { http_get(addr, "/slow?ms=1500").await });
            // The request has reached the worker when it is in flight.
            d.wait_for("the slow request in flight", |s| {
                s.active.as_ref().is_some_and(|a| a.requests_in_flight > 0)
            })
            .await;
            sigkill(pid);
            let (code, _, body) = slow.await.expect("join");
            assert_eq!(code, StatusCode::OK, "{socket} round {round}: {body}");
            assert_eq!(body, "slow 1", "{socket} round {round}");
        }
        d.stop().await;
    }
}

/// systemd not reading its notify socket (PID 1 busy) does not stop the
/// daemon: a datagram socket whose reader is slow blocks its senders after
/// ten messages, and batond sends status and watchdog pings all the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_does_not_stop_the_daemon() {
    let p = Project::python("", "");
    let sock_path = p.path("notify.sock");
    // Bound, never read.
    let _sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let d = Daemon::start_env(
        &p,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf8")),
            // A watchdog ping every 10 ms: the socket is full at once.
            ("WATCHDOG_USEC", "20000"),
        ],
    )
    .await;
    d.wait_active(1).await;
    for g in 2..=4 {
        d.deploy().await;
        d.wait_active(g).await;
        assert_eq!(whoami(d.addr).await.0, g);
    }
    assert!(d.stop().await.success());
}

/// batond on `p` with a notify socket of the test's own, as systemd
/// gives a `Type=notify` service.
async fn start_with_notify_socket(p: &Project) -> (tokio::net::UnixDatagram, Daemon) {
    let sock_path = p.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let d = Daemon::start_env(
        p,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().expect("utf8"))],
    )
    .await;
    (sock, d)
}

/// Reads notify messages into `seen` (one per line) until one holds
/// `needle`; every wait bounded.
async fn recv_notify_until(sock: &tokio::net::UnixDatagram, needle: &str, seen: &mut String) {
    let mut buf = vec![0u8; 4096];
    for _ in 0..200 {
        if seen.contains(needle) {
            return;
        }
        match tokio::time::timeout(PATIENCE, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
            _ => break,
        }
    }
    assert!(seen.contains(needle), "never got {needle}; got:\n{seen}");
}

/// `NOTIFY_SOCKET=@name` is a socket in the abstract namespace
/// (sd_notify(3)), as a service manager in a container may hand out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_on_an_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let p = Project::python("", "");
    let name = format!(
        "baton-test-notify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).expect("abstract name");
    let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
    std_sock.set_nonblocking(true).expect("nonblocking");
    let sock = tokio::net::UnixDatagram::from_std(std_sock).expect("tokio socket");
    let d = Daemon::start_env(&p, &[], &[("NOTIFY_SOCKET", &format!("@{name}"))]).await;
    let mut seen = String::new();
    recv_notify_until(&sock, "READY=1", &mut seen).await;
    assert!(seen.contains("STATUS=generation 1 active"), "{seen}");
    // A replacement proving itself beside the active worker is named in
    // the status line until it takes over.
    let out = d.ctl(&["restart", "--wait"]).await;
    assert!(out.status.success(), "{out:?}");
    recv_notify_until(
        &sock,
        "a fresh process replacing it (batonctl restart)",
        &mut seen,
    )
    .await;
    let pid = d.status().await.active.and_then(|a| a.pid).expect("pid");
    recv_notify_until(
        &sock,
        &format!("STATUS=generation 1 active (pid {pid})"),
        &mut seen,
    )
    .await;
    assert!(d.stop().await.success());
    recv_notify_until(&sock, "STOPPING=1", &mut seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_status_reloading_and_stopping() {
    let p = Project::python("", "");
    // The first build waits for a gate, so that a reload falls inside the
    // start: READY=1 must still wait for the first active worker.
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["timeout", "30", "sh", "-c", "until [ -e gate ]; do sleep 0.05; done"]"#,
    );
    let (sock, d) = start_with_notify_socket(&p).await;
    let mut seen = String::new();
    let recv_until = async |needle: &str, seen: &mut String| {
        recv_notify_until(&sock, needle, seen).await;
    };
    recv_until("STATUS=no active worker; generation 1 building", &mut seen).await;
    assert!(!seen.contains("READY=1"), "{seen}");
    // The reload has ended when batonctl returns: what systemd heard of it
    // is waiting in the socket, and it is a status only.
    let mut during = String::new();
    let out = d.ctl(&["reload"]).await;
    assert!(out.status.success(), "{out:?}");
    recv_until("STATUS=", &mut during).await;
    assert!(
        !during.contains("READY=1"),
        "READY=1 before any worker:\n{during}"
    );
    assert!(!during.contains("RELOADING=1"), "{during}");
    seen.push_str(&during);
    p.write("gate", "");
    recv_until("READY=1", &mut seen).await;
    assert!(
        seen.contains("READY=1\nSTATUS=generation 1 active"),
        "{seen}"
    );
    let pid = d.child.id().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("hup");
    recv_until("RELOADING=1", &mut seen).await;
    assert!(seen.contains("MONOTONIC_USEC="), "{seen}");
    let exit = d.stop().await;
    assert!(exit.success());
    recv_until("STOPPING=1", &mut seen).await;
}

/// A first deploy that fails still ends the start for systemd: batond is
/// up (it answers 503 and waits for the fix), so `READY=1` goes out with
/// a status that says what failed, and the fixed source deploys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_when_the_first_build_fails() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "test ! -e src/broken"]"#,
    );
    p.write("src/broken", "");
    let (sock, d) = start_with_notify_socket(&p).await;
    let mut seen = String::new();
    recv_notify_until(&sock, "READY=1", &mut seen).await;
    assert!(
        seen.contains("READY=1\nSTATUS=no active worker (failed"),
        "{seen}"
    );
    assert_eq!(d.get("/healthz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    std::fs::remove_file(p.path("src/broken")).expect("fix");
    d.wait_active(2).await;
    assert!(d.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_timeout_start_timeout_and_early_exit_are_rejected_with_reasons() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let base = read(&p.path("etc/baton.toml"));
    // A build that hangs is killed at its timeout.
    p.write(
        "etc/baton.toml",
        &base
            .replace("command = []", r#"command = ["sleep", "60"]"#)
            .replace("[build]\n", "[build]\ntimeout_s = 1\n"),
    );
    let g = d.wait_history(2, "failed").await;
    assert_eq!(g.reason.as_deref(), Some("build timed out after 1 s"));
    // build.log says so too.
    assert!(
        read(&p.path("state/gen-0002/build.log"))
            .ends_with("[batond: build timed out after 1 s]\n"),
        "{}",
        read(&p.path("state/gen-0002/build.log"))
    );
    // A worker that never answers.
    p.write(
        "etc/baton.toml",
        &base
            .replace(
                r#"command = ["python3", "{artifact}"]"#,
                r#"command = ["sleep", "60"]"#,
            )
            .replace("start_timeout_s = 10", "start_timeout_s = 1"),
    );
    let g = d.wait_history(3, "rejected").await;
    let reason = g.reason.expect("reason");
    assert!(
        reason.starts_with("start timeout after 1 s (no answer"),
        "{reason}"
    );
    // A worker that exits at once, with its last words.
    p.write(
        "etc/baton.toml",
        &base.replace(
            r#"command = ["python3", "{artifact}"]"#,
            r#"command = ["sh", "-c", "echo cannot open the model >&2; exit 3"]"#,
        ),
    );
    let g = d.wait_history(4, "rejected").await;
    assert_eq!(
        g.reason.as_deref(),
        Some("exited with status code 3 (last log line: cannot open the model)")
    );
    // Through all of it, generation 1 kept serving.
    assert_eq!(whoami(d.addr).await.0, 1);
    assert_eq!(d.status().await.active.map(|a| a.id), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_generation_folders_stay_bounded() {
    let p = Project::python("", "");
    p.edit("etc/baton.toml", "[daemon]\n", "[daemon]\nhistory = 2\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    for _ in 0..5 {
        d.deploy().await;
    }
    let s = d
        .wait_for("old generations stopped", |s| {
            s.draining.is_empty() && s.active.as_ref().is_some_and(|a| a.id == 6)
        })
        .await;
    assert!(s.history.len() <= 2, "{:?}", s.history);
    let dirs = || {
        std::fs::read_dir(p.path("state"))
            .expect("state dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
            .count()
    };
    assert!(dirs() <= 3, "{} generation folders", dirs());
    assert!(p.path("state/gen-0006").exists());
    // A new daemon on the same state dir continues the numbering and keeps
    // only the newest folders.
    assert!(d.stop().await.success());
    let d = Daemon::start(&p).await;
    d.wait_active(7).await;
    assert!(dirs() <= 3, "{} generation folders", dirs());
    // A removal that could not finish (out of descriptors, an I/O error)
    // left a folder behind: the next removal takes it too.
    std::fs::create_dir_all(p.path("state/.trash-gen-0002/sub")).expect("mkdir");
    std::fs::write(p.path("state/.trash-gen-0002/sub/snapshot"), "x").expect("write");
    // The folders it found count against `history` with its own: the
    // oldest go first as generations finish.
    for _ in 0..3 {
        d.deploy().await;
    }
    d.wait_for("old generations stopped", |s| {
        s.draining.is_empty() && s.active.as_ref().is_some_and(|a| a.id == 10)
    })
    .await;
    assert!(dirs() <= 3, "{} generation folders", dirs());
    assert!(!p.path("state/gen-0006").exists());
    let mut gone = false;
    for _ in 0..100 {
        gone = !p.path("state/.trash-gen-0002").exists();
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "a leftover of an earlier removal stayed");
}

/// Reads one `Content-Length` response off a raw connection.
/// Everything `s` gets until its connection closes (or resets).
async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break String::from_utf8_lossy(&got).to_string(),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("still open: {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("response timed out")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                return text;
            }
        }
    }
}

/// Waits (bounded) until the peer closes the connection; false if it
/// stays open for `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 256];
    match tokio::time::timeout(within, s.read(&mut chunk)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(n)) => panic!(
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&chunk[..n])
        ),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_but_requests_in_progress_are_not() {
    use tokio::io::AsyncWriteExt;
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "hold_timeout_ms = 5000",
        "hold_timeout_ms = 5000\nheader_timeout_s = 1",
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A client that never finishes its request head is closed.
    let mut slowloris = sent(d.addr, b"GET /whoami HTTP/1.1\r\nHost: x\r\n").await;
    // A request that takes longer than twice the timeout is answered.
    let mut slow = sent(d.addr, b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // A client that stops in the middle of its body is closed.
    let mut stalled = sent(
        d.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nnine byte",
    )
    .await;
    // An upload that goes on slowly but steadily is answered.
    let mut trickle = sent(
        d.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n",
    )
    .await;
    // A keep-alive client that keeps asking keeps its connection.
    let mut busy = sent(d.addr, b"").await;
    for i in 0..8 {
        busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write on the busy connection");
        let resp = read_response(&mut busy).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        trickle
            .write_all(&[b'a' + i])
            .await
            .expect("write on the trickling upload");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // 3.2 s have passed: the slow clients were cut, the slow request and
    // the slow upload not.
    assert!(
        closed_within(&mut slowloris, Duration::from_secs(5)).await,
        "a client with a half-sent head kept its connection"
    );
    assert!(
        closed_within(&mut stalled, Duration::from_secs(5)).await,
        "a client with a half-sent body kept its connection"
    );
    let resp = read_response(&mut trickle).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("abcdefgh"), "{resp}");
    let resp = read_response(&mut slow).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("slow 1"), "{resp}");
    // No request is left in flight on the worker.
    d.wait_for("no request in flight", |s| {
        s.active.as_ref().is_some_and(|a| a.requests_in_flight == 0)
    })
    .await;
    // Once idle, both keep-alive connections are closed too.
    for (name, conn) in [("slow", &mut slow), ("busy", &mut busy)] {
        assert!(
            closed_within(conn, Duration::from_secs(10)).await,
            "the idle {name} connection stayed open"
        );
    }
    // The listener serves on.
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
}

/// Begins a pyworker `/ingest` of `payload` into `out`: the head and the
/// first 64 KiB, and the worker's early 202 read. The rest is the caller's
/// to send.
async fn begin_ingest(
    addr: std::net::SocketAddr,
    out: &std::path::Path,
    payload: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /ingest?to={} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        out.display(),
        payload.len()
    );
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(&payload[..65536])
        .await
        .expect("first chunk");
    let resp = read_response(&mut conn).await;
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_does_not_cut_the_rest_of_the_upload() {
    use tokio::io::AsyncWriteExt;
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // The worker answers 202 as soon as it has the head, then reads the
    // body: the rest of the upload must still reach it, and the client's
    // connection must stay usable.
    let out = p.path("ingested");
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 253) as u8).collect();
    let mut conn = begin_ingest(d.addr, &out, &payload).await;
    for chunk in payload[65536..].chunks(65536) {
        conn.write_all(chunk).await.expect("rest of the body");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got = None;
    for _ in 0..300 {
        if let Ok(b) = std::fs::read(&out) {
            got = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = got.expect("the worker never got the whole body");
    assert!(got == payload, "the body the worker got differs");
    // The same client connection carries on.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("next request");
    let resp = read_response(&mut conn).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// A deploy while the old worker still reads an upload it answered early:
/// the request is in flight until the worker has read it all, so the old
/// worker is drained, not stopped under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_waits_for_an_upload_the_old_worker_answered_early() {
    use tokio::io::AsyncWriteExt;
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    let pid1 = d.active_pid(1).await;
    let out = p.path("ingested");
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let mut conn = begin_ingest(d.addr, &out, &payload).await;
    // Generation 2 takes over while most of the body is still to come.
    p.append("src/pyworker.py", "\n# v2\n");
    d.wait_active(2).await;
    // The rest over a second and a half: the old worker (which dies at
    // SIGTERM) stays up until it has had the whole body.
    let (rest, last) = payload[65536..].split_at(payload.len() - 65536 - 4096);
    for chunk in rest.chunks(65536) {
        conn.write_all(chunk).await.expect("rest of the body");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alive(pid1), "the old worker was stopped under the upload");
    conn.write_all(last).await.expect("end of the body");
    // Then it is drained, and stops.
    let g1 = d.wait_history(1, "stopped").await;
    assert_eq!(g1.reason, None, "{g1:?}");
    assert!(wait_gone(pid1).await);
    assert!(
        d.log().contains("generation 1 (pid") && d.log().contains("draining 1 request(s)"),
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    use tokio::io::AsyncWriteExt;
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A client that shuts down its sending side once the request is out
    // (`nc -N` does) still waits for the answer: the FIN is no hang-up,
    // the worker's answer comes after it, and the connection closes once
    // it has been sent.
    let mut conn = sent(d.addr, b"GET /slow?ms=700 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    conn.shutdown().await.expect("half-close");
    let got = until_closed(&mut conn).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.contains("\r\n\r\nslow "), "{got:?}");
}

/// batond's side of a client connection has TCP keepalive on, at 60 s:
/// a client that vanished without a word is found out, not kept (with
/// its WebSocket, its generation) until `drain_timeout_s`. The kernel's
/// table shows the connection's keepalive timer running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_have_tcp_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let mut c = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(PATIENCE, c.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let mine = c.local_addr().expect("local").port();
    // /proc/net/tcp: "sl local rem st queues tr:when ...", ports in hex.
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let row = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
            port(f[1]) == Some(d.addr.port()) && port(f[2]) == Some(mine)
        })
        .expect("batond's side of the connection");
    let (timer, when) = row[5].split_once(':').expect("tr:when");
    assert_eq!(timer, "02", "keepalive timer: {row:?}");
    // Clock ticks (USER_HZ, 100 a second) until the first probe: at most
    // 60 s (the kernel's default is two hours).
    let when = u64::from_str_radix(when, 16).expect("hex");
    assert!(when > 0 && when <= 6000, "{row:?}");
}
