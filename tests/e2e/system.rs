//! Process-level and systemd-level behaviour: socket activation, the unit
//! files, and builds left behind by a killed daemon.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_inherited_listener() {
    let p = Project::python("", "");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // batond's own exec shim does what systemd does: the socket at fd 3,
    // LISTEN_FDS=1 and LISTEN_PID set to the daemon's pid.
    let mut child = spawn_on_listener(
        BATOND,
        &p.path("etc/baton.toml"),
        listener,
        &[("NO_COLOR", "1")],
        Stdio::null(),
    );
    let mut served = false;
    for _ in 0..600 {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        {
            drop(stream);
            let (code, _, _) = http_get(addr, "/healthz").await;
            if code == StatusCode::OK {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "batond did not serve on the inherited socket");
    let (g, _, _) = whoami(addr).await;
    assert_eq!(g, 1);
    // A reload that names another address is told the socket is
    // systemd's, not that the address changes at the next start.
    p.edit(
        "etc/baton.toml",
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
    );
    let config = p.path("etc/baton.toml");
    let out = batonctl([OsStr::new("--config"), config.as_os_str()], &["reload"]).await;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("comes from systemd"), "{said}");
    assert!(!said.contains("until batond restarts"), "{said}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A socket unit with two `ListenStream=`: batond serves one address, so
/// it refuses to start and names them, rather than leave a socket that
/// accepts connections nobody answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_with_two_sockets_is_refused() {
    let p = Project::python("", "");
    // What systemd does: the sockets at fds 3 and 4, LISTEN_PID the pid
    // that then execs batond.
    let launcher = r#"
import os, socket, sys
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    socks.append(os.dup(s.fileno()))
for fd, want in zip(socks, (3, 4)):
    os.dup2(fd, want)
os.environ.update(LISTEN_FDS="2", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web:web6")
os.execv(sys.argv[1], sys.argv[1:])
"#;
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new("python3")
            .args(["-c", launcher, BATOND, "--config"])
            .arg(p.path("etc/baton.toml"))
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("batond exits")
    .expect("python3 runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("socket activation passed 2 sockets"), "{err}");
    assert!(err.contains("web:web6"), "{err}");
    assert!(!p.path("state/gen-0001").exists(), "nothing was built");
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = env!("CARGO_MANIFEST_DIR");
    let service = std::fs::read_to_string(format!("{root}/units/batond.service"))
        .expect("service")
        .replace("/usr/local/bin/batond", BATOND);
    let socket = std::fs::read_to_string(format!("{root}/units/batond.socket")).expect("socket");
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RuntimeDirectory=baton",
        "WatchdogSec=",
        "RestartPreventExitStatus=78",
    ] {
        assert!(service.contains(needle), "unit lacks {needle}");
    }
    std::fs::write(dir.path().join("batond.service"), service).expect("write");
    std::fs::write(dir.path().join("batond.socket"), socket).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("batond.service"))
        .arg(dir.path().join("batond.socket"))
        .output()
        .expect("systemd-analyze runs (scripts/deps test installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let complaints: Vec<&str> = err.lines().filter(|l| l.contains("batond")).collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_kills_what_a_killed_build_left() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "if [ -e slow-build ]; then sleep 60 & echo $! > grandchild.pid; wait; fi"]"#,
    );
    let mut d = Daemon::start(&p).await;
    d.wait_active(1).await;
    p.write("slow-build", "");
    p.append("src/pyworker.py", "# v2\n");
    let pidfile = p.path("grandchild.pid");
    let mut grandchild = None;
    for _ in 0..600 {
        if let Ok(s) = std::fs::read_to_string(&pidfile)
            && let Ok(pid) = s.trim().parse::<u32>()
        {
            grandchild = Some(pid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grandchild = grandchild.expect("the build started its grandchild");
    let records = std::fs::read_dir(p.path("state/groups"))
        .expect("state/groups")
        .count();
    assert_eq!(
        records, 2,
        "the build's and the worker's groups are recorded"
    );
    d.child.start_kill().expect("kill -9");
    let _ = d.child.wait().await;
    // The shell died with the daemon (parent-death signal); the grandchild
    // lives on in the build's process group until a daemon cleans up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alive(grandchild), "grandchild should have outlived kill -9");
    std::fs::remove_file(p.path("slow-build")).expect("rm");
    let d = Daemon::start(&p).await;
    assert!(wait_gone(grandchild).await, "stale build group not killed");
    assert!(d.log_shows("killed what was left of a build").await);
    let s = d.wait_for("a worker", |s| s.active.is_some()).await;
    assert!(s.active.expect("active").id >= 3, "numbering continues");
}

/// An init that reaps at once (systemd, tini), for the test below: it
/// runs batond as its child with a parent-death signal and, as a child
/// subreaper, also reaps every process orphaned below it, for at most
/// 120 s.
const REAPER: &str = r#"
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
pid = os.fork()
if pid == 0:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    os.execv(sys.argv[1], sys.argv[1:])
end = time.monotonic() + 120
while time.monotonic() < end:
    try:
        if os.waitpid(-1, os.WNOHANG) == (0, 0):
            time.sleep(0.02)
    except ChildProcessError:
        time.sleep(0.02)
"#;

/// What a worker started in its process group outlives a `kill -9` of
/// batond (the worker itself dies with it), and the next batond kills it,
/// found by the group's number although the worker is long reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_kills_what_a_killed_worker_left() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["sh", "-c", "sleep 60 & echo $! > worker-child.pid; exec python3 \"$0\"", "{artifact}"]"#,
    );
    p.write("reaper.py", REAPER);
    let log = std::fs::File::create(p.path("batond-1.log")).expect("log");
    let reaper = p.path("reaper.py");
    let first = Daemon::start_wrapped(
        &p,
        &["python3", reaper.to_str().expect("utf8")],
        Stdio::from(log),
    )
    .await;
    let s = first.wait_active(1).await;
    let worker = s.active.and_then(|a| a.pid).expect("worker pid");
    let child: u32 = read(&p.path("worker-child.pid"))
        .trim()
        .parse()
        .expect("the worker's child pid");
    assert!(alive(child));
    sigkill(s.pid);
    // The worker died with batond and was reaped: its pid is no more.
    let mut reaped = false;
    for _ in 0..200 {
        if !std::path::Path::new(&format!("/proc/{worker}")).exists() {
            reaped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reaped, "the worker {worker} was not reaped");
    assert!(alive(child), "the worker's child should outlive kill -9");
    let second = Daemon::start(&p).await;
    assert!(
        wait_gone(child).await,
        "what the worker left was not killed"
    );
    assert!(
        second
            .log()
            .contains("killed what was left of a worker of generation 1"),
        "{}",
        second.log()
    );
    second.wait_active(2).await;
    // A stop leaves nothing of the worker's group either.
    assert!(second.stop().await.success());
    let child: u32 = read(&p.path("worker-child.pid"))
        .trim()
        .parse()
        .expect("the second worker's child pid");
    assert!(
        wait_gone(child).await,
        "the stopped worker's child lives on"
    );
    drop(first);
}

/// A second batond on the same state dir refuses to start, with the first
/// one's pid, before it touches anything: the first one's build goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_refuses_and_touches_nothing() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "if [ -e slow-build ]; then sleep 3; fi"]"#,
    );
    let first = Daemon::start(&p).await;
    first.wait_active(1).await;
    p.write("slow-build", "");
    p.append("src/pyworker.py", "# v2\n");
    first
        .wait_for("the build of generation 2", |s| {
            s.candidate
                .as_ref()
                .is_some_and(|c| c.state == baton::control::api::GenState::Building)
        })
        .await;
    let other = p.path("other.sock");
    let out = second_batond(&p, &other).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let pid = first.child.id().expect("pid");
    assert!(
        err.contains(&format!("is in use by another batond (pid {pid})")),
        "{err}"
    );
    assert!(!other.exists(), "the second batond made its control socket");
    // The build was not killed: generation 2 serves.
    first.wait_active(2).await;
    first.stop().await;
}

/// Daemons started at once on one control socket, over a stale one (a
/// killed daemon's): exactly one takes it and answers on it; the others
/// say another batond answers there (none removes what another has just
/// put in place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_racing_for_a_stale_control_socket_leave_one_in_charge() {
    let p = Project::python("", "");
    let socket = p.path("shared/control.sock");
    std::fs::create_dir_all(p.path("shared")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    for round in 0..4 {
        let mut racers: Vec<_> = (0..3)
            .map(|i| {
                tokio::process::Command::new(BATOND)
                    .arg("--config")
                    .arg(p.path("etc/baton.toml"))
                    .args(["--listen", "127.0.0.1:0", "--state-dir"])
                    .arg(p.path(&format!("state-{round}-{i}")))
                    .arg("--control-socket")
                    .arg(&socket)
                    .env("NO_COLOR", "1")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn batond")
            })
            .collect();
        // Two of the three end, each saying why.
        let mut ended = Vec::new();
        for _ in 0..600 {
            for (i, c) in racers.iter_mut().enumerate() {
                if !ended.contains(&i) && c.try_wait().expect("wait").is_some() {
                    ended.push(i);
                }
            }
            if ended.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ended.len(), 2, "round {round}: {ended:?} ended");
        for &i in &ended {
            let mut err = String::new();
            use tokio::io::AsyncReadExt;
            racers[i]
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .await
                .expect("read");
            assert!(
                err.contains("another batond is answering on it"),
                "round {round}: {err}"
            );
        }
        let winner = (0..3).find(|i| !ended.contains(i)).expect("a winner");
        // It answers (0: running, 3: its worker not serving yet).
        let out = batonctl([OsStr::new("--socket"), socket.as_os_str()], &["status"]).await;
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "round {round}: {out:?}"
        );
        // Killed: its socket stays behind, stale, for the next round.
        let pid = racers[winner].id().expect("pid");
        sigkill(pid);
        let _ = racers[winner].wait().await;
    }
}

/// A daemon whose control socket someone removed, and another took the
/// path of, leaves that one in place when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_leaves_a_control_socket_that_is_not_its_own() {
    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let socket = d.socket.clone();
    std::fs::remove_file(&socket).expect("remove the socket");
    let other = std::os::unix::net::UnixListener::bind(&socket).expect("another socket");
    assert!(d.stop().await.success());
    assert!(socket.exists(), "the other socket was removed");
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the other socket does not answer"
    );
    drop(other);
}

/// A daemon whose state dir was removed under it locks the folder again,
/// so a second daemon still cannot start there; and a daemon that finds a
/// running daemon's worker recorded in its own state dir leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_state_dir_is_locked_again_and_live_workers_are_left_alone() {
    let p = Project::python("", "");
    let first = Daemon::start(&p).await;
    let worker = first.active_pid(1).await;
    let pid = first.child.id().expect("pid");
    // The worker's record, as a daemon that shares a state dir would see it.
    let elsewhere = p.path("elsewhere");
    std::fs::create_dir_all(elsewhere.join("groups")).expect("mkdir");
    for e in std::fs::read_dir(p.path("state/groups"))
        .expect("groups")
        .flatten()
    {
        std::fs::copy(e.path(), elsewhere.join("groups").join(e.file_name())).expect("copy");
    }
    std::fs::remove_dir_all(p.path("state")).expect("rm state");
    // At once, before the first daemon locks the folder again: a second
    // one is refused all the same (the first holds the removed lock file).
    let out = second_batond(&p, &p.path("other.sock")).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("is in use by another batond (pid {pid})")),
        "{err}"
    );
    // The lock and the control socket are made again.
    let lock = p.path("state/batond.lock");
    let mut relocked = false;
    for _ in 0..100 {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string())
            && first.socket.exists()
        {
            relocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(relocked, "not locked again: {}", first.log());
    assert_eq!(
        first.status().await.active.and_then(|a| a.pid),
        Some(worker)
    );
    let out = second_batond(&p, &p.path("other.sock")).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("is in use by another batond (pid {pid})")),
        "{err}"
    );
    // A daemon on the folder with the copied record starts (its records
    // are dealt with before it listens), and the first daemon's worker
    // lives on.
    let third = Daemon::start_with(&p, &["--state-dir", elsewhere.to_str().expect("utf8")]).await;
    assert!(alive(worker), "the running daemon's worker was killed");
    assert!(
        third.log().contains("belongs to the running batond"),
        "{}",
        third.log()
    );
    assert_eq!(
        first.status().await.active.and_then(|a| a.pid),
        Some(worker)
    );
    third.stop().await;
    first.stop().await;
    // A process that has the lock file open but holds no lock on it (a
    // pager) does not keep a daemon from starting.
    let _open = std::fs::File::open(&lock).expect("open the lock file");
    let again = Daemon::start(&p).await;
    again.wait_active(1).await;
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_overrides_win_over_the_file() {
    let p = Project::python("", "");
    // A wrong command line is refused with what was wrong, exit 2.
    for (args, says) in [
        (&["--bogus"][..], "invalid option '--bogus'"),
        (
            &["--listen", "nowhere"],
            "--listen `nowhere` is not an IP address and port",
        ),
        (&["--config"], "missing argument"),
    ] {
        let out = std::process::Command::new(BATOND)
            .args(args)
            .output()
            .expect("batond runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let help = std::process::Command::new(BATOND)
        .arg("--help")
        .output()
        .expect("batond runs");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--control-socket"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let state = p.path("elsewhere/state");
    // 105 bytes, just under what a socket address holds: bound as it is.
    let dir = p.path("elsewhere");
    let fill = 105usize
        .saturating_sub(dir.as_os_str().len() + "/.sock".len())
        .max(1);
    let socket = dir.join(format!("{}.sock", "c".repeat(fill)));
    let d = Daemon::start_with(
        &p,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state.to_str().expect("utf8"),
            "--control-socket",
            socket.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_eq!(d.addr.port(), port);
    assert!(socket.exists(), "control socket at the override");
    // It answers there (0: running, 3: its worker not serving yet).
    let out = batonctl([OsStr::new("--socket"), socket.as_os_str()], &["status"]).await;
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..600 {
        if state.join("gen-0001/worker.log").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        state.join("gen-0001/worker.log").exists(),
        "state at the override"
    );
    assert!(
        !p.path("state").exists(),
        "the file's state_dir was not used"
    );
}

/// The nice value of a process, from `/proc/PID/stat` (field 19).
fn nice_of(pid: &str) -> i32 {
    let stat = read(std::path::Path::new(&format!("/proc/{pid}/stat")));
    let rest = stat.rsplit_once(')').expect("stat line").1;
    rest.split_whitespace()
        .nth(19 - 3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no nice value in {stat}"))
}

/// `build.nice`: the build and what it starts run that much nicer than
/// batond (a compiler yields the CPU to the calls in progress); the worker
/// runs at batond's own priority; a reload changes it for the next build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_nicer_than_batond_and_its_workers() {
    let p = Project::python("", "");
    // Each build writes the nice value of a process it starts.
    p.edit(
        "etc/baton.toml",
        "command = []\n",
        "command = [\"sh\", \"-c\", \"cut -d' ' -f19 /proc/self/stat > built-nice\"]\nnice = 7\n",
    );
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let mine = nice_of("self");
    let batond = nice_of(&d.child.id().expect("batond pid").to_string());
    assert_eq!(
        batond, mine,
        "batond runs at the nice value it was started with"
    );
    let built = |p: &Project| {
        read(&p.path("built-nice"))
            .trim()
            .parse::<i32>()
            .expect("a number")
    };
    assert_eq!(built(&p), (mine + 7).min(19), "{}", d.log());
    let worker = s.active.and_then(|a| a.pid).expect("worker pid");
    assert_eq!(
        nice_of(&worker.to_string()),
        batond,
        "the worker was reniced"
    );
    // Without the key, 10; the reload's deploy builds with it.
    p.edit("etc/baton.toml", "nice = 7\n", "");
    d.wait_active(2).await;
    assert_eq!(built(&p), (mine + 10).min(19), "{}", d.log());
    d.stop().await;
}

/// `daemon.realtime_priority`: batond's threads run at `SCHED_FIFO`, the
/// worker it starts does not inherit it, and a reload turns it off again.
/// Where real-time scheduling is not allowed, batond says why and serves
/// all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_priority_is_batonds_own_and_not_its_workers() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "[daemon]\n",
        // Two runtime threads: the main one and the runtime's own.
        "[daemon]\nrealtime_priority = 10\nthreads = 2\n",
    );
    let d = Daemon::start(&p).await;
    let s = d.wait_active(1).await;
    let batond = d.child.id().expect("batond pid");
    let worker = s.active.and_then(|a| a.pid).expect("worker pid");
    let main_thread = |pid: u32| {
        thread_policies(pid)
            .into_iter()
            .find(|(name, _, _)| name == "batond")
            .map(|(_, fifo, prio)| (fifo, prio))
    };
    // The worker (python3) and every thread it has: normal scheduling.
    let workers = thread_policies(worker);
    assert!(!workers.is_empty(), "no threads for worker {worker}");
    assert!(
        workers.iter().all(|(_, fifo, prio)| !fifo && *prio == 0),
        "the worker inherited real-time scheduling: {workers:?}"
    );
    if realtime_allowed() {
        assert_eq!(main_thread(batond), Some((true, 10)), "{}", d.log());
        assert!(
            d.log_shows("SCHED_FIFO priority 10 on").await,
            "{}",
            d.log()
        );
        // Edits realtime_priority and waits for the reload's deploy.
        async fn reload(p: &Project, d: &Daemon, from: u8, to: u8, generation: u64) {
            p.edit(
                "etc/baton.toml",
                &format!("realtime_priority = {from}\n"),
                &format!("realtime_priority = {to}\n"),
            );
            d.wait_for(&format!("the reload to {to}: its deploy"), |s| {
                s.active.as_ref().is_some_and(|a| a.id >= generation)
            })
            .await;
        }
        // A reload to 0 puts batond back to normal scheduling.
        reload(&p, &d, 10, 0, 2).await;
        assert_eq!(main_thread(batond), Some((false, 0)), "{}", d.log());
        // And back to 10: the runtime's threads again, not the threads
        // started since (the file watcher's, the log writer's).
        reload(&p, &d, 0, 10, 3).await;
        assert_eq!(main_thread(batond), Some((true, 10)), "{}", d.log());
        // The runtime's own threads move the traffic: they are set too.
        let runtime = thread_policies(batond);
        assert!(
            runtime
                .iter()
                .any(|(name, fifo, prio)| name == baton::sched::RUNTIME_THREAD
                    && *fifo
                    && *prio == 10),
            "{runtime:?}"
        );
        let others: Vec<_> = thread_policies(batond)
            .into_iter()
            .filter(|(name, _, _)| name != "batond" && name != baton::sched::RUNTIME_THREAD)
            .collect();
        assert!(!others.is_empty(), "batond has no other threads");
        assert!(
            others.iter().all(|(_, fifo, prio)| !fifo && *prio == 0),
            "{others:?}"
        );
    } else {
        let log = d.log();
        assert!(log.contains("realtime_priority not applied"), "{log}");
        assert!(log.contains("SCHED_FIFO priority 10"), "{log}");
        assert_eq!(main_thread(batond), Some((false, 0)));
    }
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
}

/// `daemon.spread_threads` (on by default): with two front threads and at
/// least two CPUs each front thread keeps to CPUs no other has, and
/// nothing else in batond does: its other threads (the main one, the log
/// writer's, the file watcher's, the blocking pool's), its workers and
/// their threads run on every CPU batond may use. A reload keeps the
/// setting (and says so); with `false` no thread is kept to a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_threads_keep_to_cpus_of_their_own_and_nothing_they_start_does() {
    let p = Project::python("", "");
    p.edit("etc/baton.toml", "[daemon]\n", "[daemon]\nthreads = 2\n");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    // A deploy: a build, a digest on the blocking pool and a worker.
    p.append("src/pyworker.py", "\n# an edit\n");
    let s = d.wait_active(2).await;
    let worker = s.active.and_then(|a| a.pid).expect("worker pid");
    let batond = d.child.id().expect("batond pid");
    let threads = thread_cpus(batond);
    let all = threads
        .first()
        .map(|(_, c)| c.clone())
        .expect("main thread");
    let rt = baton::sched::RUNTIME_THREAD;
    let kept: Vec<_> = threads.iter().filter(|(_, c)| c != &all).collect();
    let free: Vec<_> = threads.iter().filter(|(_, c)| c == &all).collect();
    if all.len() >= 2 {
        assert_eq!(kept.len(), 2, "{threads:?}");
        assert!(kept.iter().all(|(name, _)| name == rt), "{threads:?}");
        let (a, b) = (&kept[0].1, &kept[1].1);
        assert!(
            a.iter().all(|c| !b.contains(c)),
            "shares overlap: {threads:?}"
        );
        let mut union: Vec<usize> = a.iter().chain(b).copied().collect();
        union.sort_unstable();
        assert_eq!(union, all, "{threads:?}");
        assert!(
            d.log_shows("front threads kept to CPUs of their own").await,
            "{}",
            d.log()
        );
        // The blocking pool's threads (the digest's) bear the front
        // threads' name.
        assert!(
            free.iter().any(|(name, _)| name == rt),
            "no blocking-pool thread to look at: {threads:?}"
        );
    } else {
        assert!(kept.is_empty(), "{threads:?}");
        assert!(
            d.log_shows("fewer CPUs than front threads").await,
            "{}",
            d.log()
        );
    }
    for name in ["log-writer", "watch-folders"] {
        assert!(free.iter().any(|(n, _)| n == name), "{name}: {threads:?}");
    }
    let workers = thread_cpus(worker);
    assert!(!workers.is_empty(), "no threads for worker {worker}");
    assert!(
        workers.iter().all(|(_, c)| c == &all),
        "the worker kept to a share: {workers:?} (batond may use {all:?})"
    );
    // A reload keeps what the runtime started with.
    p.edit(
        "etc/baton.toml",
        "[daemon]\n",
        "[daemon]\nspread_threads = false\n",
    );
    assert!(
        d.log_shows("daemon.spread_threads stays true until batond restarts")
            .await,
        "{}",
        d.log()
    );
    let still: Vec<_> = thread_cpus(batond)
        .into_iter()
        .filter(|(_, c)| c != &all)
        .collect();
    assert_eq!(still.len(), kept.len(), "{still:?}");
    assert!(d.stop().await.success());
    // Off: every thread runs where the process may.
    let d = Daemon::start(&p).await;
    d.wait_for("a worker", |s| s.active.is_some()).await;
    let batond = d.child.id().expect("batond pid");
    let threads = thread_cpus(batond);
    assert!(
        threads.iter().all(|(_, c)| c == &all),
        "spread_threads = false kept a thread to a share: {threads:?}"
    );
    assert!(
        !d.log().contains("kept to CPUs of their own"),
        "{}",
        d.log()
    );
    let (code, _, _) = d.get("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    assert!(d.stop().await.success());
}

/// A priority Linux does not have is a config error with its position.
#[test]
fn realtime_priority_above_99_is_refused_with_its_position() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "[daemon]\n",
        "[daemon]\nrealtime_priority = 100\n",
    );
    let out = batond_check(&p);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon.realtime_priority"), "{err}");
    assert!(err.contains("baton.toml:2:1"), "{err}");
    assert!(err.contains("between 0"), "{err}");
}

/// stderr that nobody reads (a stalled journal) does not stop `batond`:
/// log lines past a bounded queue are dropped and counted, the worker's
/// output is still drained, deploys and traffic go on, and the count is
/// logged once stderr takes lines again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stalls_does_not_stop_the_daemon() {
    const NOISE: usize = 5000;
    let p = Project::python("", "");
    // Some 500 KB of output at the start of each worker, for its
    // worker.log and (in part) batond's stderr.
    p.append("src/pyworker.py", &format!("# NOISE_LINES={NOISE}\n"));
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // The smallest pipe the kernel makes (a page).
    nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).expect("pipe size");
    let d = Daemon::start_stderr(&p, Stdio::from(write_end)).await;
    d.wait_active(1).await;
    let (code, _, body) = d.get("/whoami").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // Deploys go through too. batond copies bursts of 1,000 lines of each
    // worker's output into its own log, then 50 a second: each new
    // generation's noise adds to what waits in the log queue (2,048 lines)
    // until lines are dropped.
    let mut body = String::new();
    let mut dropped = 0u64;
    for g in 2..=12 {
        d.deploy().await;
        assert_eq!(whoami(d.addr).await.0, g);
        let (code, text) =
            baton::control::client::call_text(&d.socket, http::Method::GET, "/metrics")
                .await
                .expect("metrics");
        assert_eq!(code, StatusCode::OK);
        body = text;
        dropped = body
            .lines()
            .find_map(|l| l.strip_prefix("baton_log_lines_dropped_total "))
            .and_then(|v| v.parse().ok())
            .expect("baton_log_lines_dropped_total in /metrics");
        if dropped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(dropped > 0, "{body}");
    // worker.log kept all the noise: a burst of 500 KB is far less than
    // its queue holds.
    let log = p.path("state/gen-0001/worker.log");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let kept = text.lines().filter(|l| l.contains(" noise ")).count();
        let notes: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("[batond: "))
            .collect();
        assert!(notes.is_empty(), "worker.log lost lines: {notes:?}");
        if kept >= NOISE {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker.log has {kept} noise lines of {NOISE}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once stderr is read again, batond says what it dropped.
    let said = pipe_shows(read_end, "log lines in time").await;
    let status = d.stop().await;
    assert!(said, "batond did not report the dropped lines");
    assert!(status.success(), "{status:?}");
}

/// Neither side of the control socket waits without end: batonctl gives
/// up on a socket that takes the connection and never answers, and the
/// daemon closes a control connection that sends half a request.
/// batonctl against a batond that stopped answering (SIGSTOP): a deploy
/// it reports unanswered is not carried out when batond goes on (a retry
/// must not make two), and `deploy --wait` gives up instead of waiting
/// for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_batonctl_gave_up_on_are_dropped_and_waits_end() {
    use nix::sys::signal::{Signal, kill};
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["sh", "-c", "until [ ! -e gate ]; do sleep 0.05; done"]"#,
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let pid = nix::unistd::Pid::from_raw(d.child.id().expect("pid") as i32);
    let ctl = |args: &'static [&'static str]| {
        tokio::process::Command::new(BATONCTL)
            .arg("--socket")
            .arg(&d.socket)
            .args(["--timeout", "1"])
            .args(args)
            .output()
    };
    kill(pid, Signal::SIGSTOP).expect("stop");
    let out = tokio::time::timeout(PATIENCE, ctl(&["deploy"]))
        .await
        .expect("batonctl did not give up")
        .expect("batonctl runs");
    // A wait that could not even check first: nothing was asked (69).
    let wait = tokio::time::timeout(PATIENCE, ctl(&["deploy", "--wait"]))
        .await
        .expect("batonctl did not give up")
        .expect("batonctl runs");
    kill(pid, Signal::SIGCONT).expect("cont");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("dropped, not carried out"), "{err}");
    let said = String::from_utf8_lossy(&wait.stderr);
    assert_eq!(wait.status.code(), Some(69), "{said}");
    assert!(said.contains("the deploy was not asked for"), "{said}");
    assert!(
        d.log_shows("read after its sender had given up waiting")
            .await,
        "{}",
        d.log()
    );
    let s = d.status().await;
    assert_eq!(s.active.as_ref().map(|a| a.id), Some(1));
    assert!(s.candidate.is_none() && s.history.is_empty(), "{s:?}");
    // A wait on a build that holds (the gate), with batond stopped meanwhile.
    p.write("gate", "");
    let waiting = tokio::spawn(ctl(&["deploy", "--wait"]));
    d.wait_for("the build under way", |s| s.candidate.is_some())
        .await;
    kill(pid, Signal::SIGSTOP).expect("stop");
    let out = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("deploy --wait did not give up")
        .expect("join")
        .expect("batonctl runs");
    kill(pid, Signal::SIGCONT).expect("cont");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("stopped waiting"), "{err}");
    std::fs::remove_file(p.path("gate")).expect("open the gate");
    d.wait_active(2).await;
    // batond killed under a wait: the outcome is unknown, and said so.
    p.write("gate", "");
    let waiting = tokio::spawn(ctl(&["deploy", "--wait"]));
    d.wait_for("the build under way", |s| s.candidate.is_some())
        .await;
    kill(pid, Signal::SIGKILL).expect("kill");
    let out = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("deploy --wait did not end")
        .expect("join")
        .expect("batonctl runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("closed the connection before it answered") && err.contains("unknown"),
        "{err}"
    );
}

/// An error answer to a change (another batond's 404, a 408) is said as
/// such, not as an answer batonctl could not read; `--version` names the
/// tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batonctl_says_an_error_answer_as_it_came() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let body = r#"{"error": "no such route"}"#;
            let _ = c
                .write_all(
                    format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    for cmd in [&["deploy"][..], &["restart"]] {
        let out = batonctl([OsStr::new("--socket"), path.as_os_str()], cmd).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        assert!(
            err.contains("404 Not Found: no such route"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("missing field"), "{cmd:?}: {err}");
    }
    server.abort();
    let out = batonctl([], &["--version"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("batonctl "),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_calls_that_never_complete_are_given_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let silent = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&silent).expect("bind");
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    for cmd in [&["status"][..], &["deploy", "--wait"], &["events"]] {
        let out = tokio::time::timeout(
            PATIENCE,
            tokio::process::Command::new(BATONCTL)
                .arg("--socket")
                .arg(&silent)
                .args(["--timeout", "1"])
                .args(cmd)
                .output(),
        )
        .await
        .expect("batonctl did not give up")
        .expect("batonctl runs");
        // 75: asked, but no answer came (the outcome is unknown); 69 for
        // a --wait, whose status check first got none: nothing was asked.
        let want = if cmd.contains(&"--wait") { 69 } else { 75 };
        assert_eq!(out.status.code(), Some(want), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("did not answer within 1 s"), "{cmd:?}: {err}");
    }
    held.abort();

    let p = Project::python("", "");
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let mut half = tokio::net::UnixStream::connect(&d.socket)
        .await
        .expect("connect");
    half.write_all(b"GET /v1/status HTTP/1.1\r\nHost: batond\r\n")
        .await
        .expect("write");
    // Closed (EOF, or a 408 first) within the 10 s a head has.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, half.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the half request is still held");
    // The daemon serves on.
    assert!(d.ctl(&["status"]).await.status.success());
    assert!(d.stop().await.success());
}

/// A build that prints without end does not fill the disk: `build.log`
/// is rotated at 16 MiB, keeping the end of the output (where a build's
/// errors are), and the deploy goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_prints_without_end_keeps_a_bounded_build_log() {
    const LINES: u64 = 250_000;
    let p = Project::python("", "");
    // Lines on stdout and stderr by turns, some 25 MB on stdout, then its
    // last line.
    let script = format!(
        "import sys\nfor i in range(3):\n    for f in (sys.stdout, sys.stderr):\n        f.write('%s %d\\n' % ('out' if f is sys.stdout else 'err', i))\n        f.flush()\nfor i in range({LINES}):\n    sys.stdout.write('build output line %07d %s\\n' % (i, 'x' * 70))\nsys.stdout.write('the last words\\n')\n"
    );
    p.write("build.py", &script);
    p.edit(
        "etc/baton.toml",
        "command = []",
        r#"command = ["python3", "build.py"]"#,
    );
    let d = Daemon::start(&p).await;
    d.wait_active(1).await;
    let log = std::fs::metadata(p.path("state/gen-0001/build.log")).expect("build.log");
    let older = std::fs::metadata(p.path("state/gen-0001/build.log.1")).expect("build.log.1");
    assert!(log.len() <= 16 << 20, "build.log is {} bytes", log.len());
    assert!(
        older.len() <= 16 << 20,
        "build.log.1 is {} bytes",
        older.len()
    );
    let text = read(&p.path("state/gen-0001/build.log"));
    assert!(
        text.ends_with("the last words\n"),
        "{}",
        &text[text.len() - 200..]
    );
    assert!(!text.contains("[batond: "), "lines were dropped");
    let last = format!("build output line {:07}", LINES - 1);
    assert!(text.contains(&last), "no {last}");
    // In the order the build wrote them, stdout and stderr alike.
    let older = read(&p.path("state/gen-0001/build.log.1"));
    assert!(
        older.starts_with("out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\n"),
        "{}",
        &older[..older.len().min(200)]
    );
    assert!(d.stop().await.success());
}

/// A worker starts with the signal state of a fresh process, as systemd
/// gives a service: SIGPIPE not ignored (batond, a Rust program, ignores it
/// itself), no signal blocked, and none of the signals batond was started
/// with ignored (a shell's `&` ignores SIGQUIT and SIGINT, `nohup` SIGHUP)
/// ignored in the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starts_with_default_signal_handling() {
    let p = Project::python("", "");
    p.edit(
        "etc/baton.toml",
        r#"command = ["python3", "{artifact}"]"#,
        r#"command = ["sh", "-c", "grep '^SigIgn' /proc/$$/status > sigs.txt; exec python3 {artifact}"]"#,
    );
    let d = Daemon::start_wrapped(
        &p,
        &["sh", "-c", "trap '' QUIT USR1 TERM; exec \"$@\"", "sh"],
        Stdio::null(),
    )
    .await;
    let s = d.wait_active(1).await;
    let mask = |sigs: &str, name: &str| {
        sigs.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {name} in {sigs:?}"))
    };
    // What the shell started with (Python ignores SIGPIPE itself).
    let sigs = read(&p.path("sigs.txt"));
    // Signals 32 and 33 are glibc's own (below SIGRTMIN, which is 34, and
    // no program can name them): its posix_spawn leaves them ignored in
    // the child, and glibc sets them up again where it uses them.
    let glibc = (1u64 << 31) | (1u64 << 32);
    assert_eq!(
        mask(&sigs, "SigIgn:") & !glibc,
        0,
        "signals ignored: {sigs}"
    );
    // The mask of the worker (the shell blocks signals of its own while it
    // runs a command, so its file says nothing about that).
    let pid = s.active.and_then(|a| a.pid).expect("worker pid");
    let status = read(std::path::Path::new(&format!("/proc/{pid}/status")));
    assert_eq!(mask(&status, "SigBlk:"), 0, "signals blocked: {status}");
    assert!(d.stop().await.success());
}

/// batond started by a program that left descriptors open (fd 3, which a
/// worker's socket needs, and fd 7) and its stop signals blocked, as a
/// shell script or a test harness may: the worker still gets its socket
/// on fd 3 and none of those descriptors, and SIGTERM still stops batond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batond_passes_on_no_inherited_descriptor_and_unblocks_its_signals() {
    let p = Project::python("", "");
    let marker = p.path("inherited.txt");
    let wrapper = format!(
        "import os, signal, sys\n\
         fd = os.open({:?}, os.O_WRONLY | os.O_CREAT, 0o600)\n\
         os.dup2(fd, 9)\n\
         os.close(fd)\n\
         for n in (3, 7):\n    os.dup2(9, n, inheritable=True)\n\
         os.close(9)\n\
         signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM, signal.SIGHUP, signal.SIGINT}})\n\
         os.execv(sys.argv[1], sys.argv[1:])\n",
        marker.to_str().expect("utf8")
    );
    let d = Daemon::start_wrapped(&p, &["python3", "-c", &wrapper], Stdio::null()).await;
    let s = d.wait_active(1).await;
    let pid = s.active.and_then(|a| a.pid).expect("worker pid");
    let held: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    assert!(!held.contains(&marker), "the worker holds {held:?}");
    let batond = d.child.id().expect("pid");
    let status = read(std::path::Path::new(&format!("/proc/{batond}/status")));
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(str::trim)
        .expect("SigBlk");
    assert_eq!(u64::from_str_radix(blocked, 16), Ok(0), "{status}");
    assert!(d.stop().await.success());
}

/// batond raises its soft limit on open files to the hard one (each call
/// holds two descriptors; systemd's default soft limit is 1,024), and its
/// worker inherits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batond_raises_its_open_files_limit_for_many_calls() {
    let p = Project::python("", "");
    let d = Daemon::start_wrapped(&p, &["prlimit", "--nofile=256:4096", "--"], Stdio::null()).await;
    let s = d.wait_active(1).await;
    let soft_hard = |pid: u32| {
        let limits = read(std::path::Path::new(&format!("/proc/{pid}/limits")));
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| panic!("no open files line in {limits}"))
    };
    assert_eq!(soft_hard(d.child.id().expect("pid")), "4096 4096");
    assert_eq!(
        soft_hard(s.active.and_then(|a| a.pid).expect("worker pid")),
        "4096 4096"
    );
    assert!(d.stop().await.success());
}

/// batonctl pointed at something that is no socket says what it found,
/// not "connection refused" (which sends the reader looking for a daemon
/// that is not running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batonctl_says_when_its_socket_path_is_no_socket() {
    let p = Project::new();
    p.write("file.sock", "");
    std::fs::create_dir_all(p.path("folder.sock")).expect("mkdir");
    // A socket file nobody listens on, as a killed batond leaves it.
    drop(std::os::unix::net::UnixListener::bind(p.path("stale.sock")).expect("bind"));
    for (name, want) in [
        ("stale.sock", "no batond is running on this socket"),
        (
            "file.sock",
            "the path is a regular file, not batond's control socket",
        ),
        (
            "folder.sock",
            "the path is a folder, not batond's control socket",
        ),
        ("missing.sock", "No such file or directory"),
    ] {
        let path = p.path(name);
        let out = batonctl([OsStr::new("--socket"), path.as_os_str()], &["status"]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        // 69: batond could not be reached, nothing was asked.
        assert_eq!(out.status.code(), Some(69), "{name}: {err}");
        assert!(err.contains("cannot reach batond at "), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
}
