//! `stacyvm dev` as a user runs it (README, first command): the whole local
//! cluster as child processes, then spawn → exec → copy a file in and out →
//! SIGKILL the leader → the same sandbox still answers → destroy → Ctrl-C
//! stops every child. Docker is made unreachable (`DOCKER_HOST` names no
//! socket) so `--runtime auto` must fall back to mock and say why, and a spawn
//! that names no runtime must get the one the workers offer.

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stacyvm")
}

/// The first of `n` consecutive loopback ports free for TCP and UDP now.
fn free_run(n: u16) -> u16 {
    'search: loop {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        if base > 65535 - n {
            continue;
        }
        let mut held = Vec::new();
        for p in base..base + n {
            match (
                TcpListener::bind(("127.0.0.1", p)),
                UdpSocket::bind(("127.0.0.1", p)),
            ) {
                (Ok(t), Ok(u)) => held.push((t, u)),
                _ => continue 'search,
            }
        }
        return base;
    }
}

/// The `stacyvm dev` process; on drop, Ctrl-C and then, if it hangs, SIGKILL
/// of every child it recorded and of itself.
struct Dev {
    child: Option<Child>,
    dir: PathBuf,
    out: PathBuf,
}

impl Dev {
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = format!("--- dev stdout\n{}", self.stdout());
        for name in ["node-1", "node-2", "node-3", "worker-1", "worker-2"] {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!(
                "\n--- {name}.log (tail)\n{}",
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        s
    }

    /// Children of this test's `stacyvm dev` still alive: their command
    /// line names this test's directory (a recycled PID does not).
    fn live_children(&self) -> Vec<i32> {
        let dir = self.dir.display().to_string();
        self.child_pids()
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir))
            })
            .collect()
    }

    fn child_pids(&self) -> Vec<i32> {
        ["node-1", "node-2", "node-3", "worker-1", "worker-2"]
            .iter()
            .filter_map(|n| std::fs::read_to_string(self.dir.join(format!("{n}.pid"))).ok())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }

    /// Ctrl-C; the exit status, or `None` if it did not stop in time.
    fn interrupt(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = i32::try_from(child.id()).ok()?;
        // A child this test started and has not reaped.
        stacyvm_runtimes::sys::kill(pid, libc::SIGINT);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.interrupt(Duration::from_secs(20));
        }
        // Whatever is still alive (dev hung, crashed, or a check failed):
        // processes `stacyvm dev` (our child) started.
        for pid in self.live_children() {
            stacyvm_runtimes::sys::kill(pid, libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(servers: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("STACYVM_SERVER", servers)
        .env_remove("STACYVM_API_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run stacyvm")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Retries a CLI call until it succeeds (elections answer NO_LEADER for a
/// moment), for at most `within`.
fn cli_until_ok(servers: &str, args: &[&str], within: Duration, dev: &Dev) -> Output {
    let deadline = Instant::now() + within;
    loop {
        let o = cli(servers, args);
        if o.status.success() {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "stacyvm {args:?} kept failing: {}\n{}",
            text(&o),
            dev.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for(dev: &Dev, what: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while dev.stdout().matches(what).count() < count {
        assert!(
            Instant::now() < deadline,
            "dev never printed {what:?} {count}×\n{}",
            dev.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn dev_runs_the_readme_flow_and_survives_losing_its_leader() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let out = tmp.path().join("dev.out");
    // One run of 8 ports, so the three ranges cannot overlap.
    let base = free_run(8);
    let (api, raft, workers) = (base, base + 3, base + 6);
    let child = Command::new(bin())
        .args(["dev", "--dir"])
        .arg(&dir)
        .args([
            "--api-port",
            &api.to_string(),
            "--raft-port",
            &raft.to_string(),
            "--worker-port",
            &workers.to_string(),
        ])
        .env(
            "DOCKER_HOST",
            "unix:///nonexistent/stacyvm-test/docker.sock",
        )
        // Replicas inherit this: a spawn naming no runtime works only if
        // `dev` tells them the runtime its workers offer.
        .env("STACYVM_DEFAULT_RUNTIME", "no-such-runtime")
        .env("STACYVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&out).expect("out")))
        .stderr(Stdio::from(
            std::fs::File::create(tmp.path().join("dev.err")).expect("err"),
        ))
        .spawn()
        .expect("start stacyvm dev");
    let mut dev = Dev {
        child: Some(child),
        dir: dir.clone(),
        out,
    };
    let servers = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", api + i))
        .collect::<Vec<_>>()
        .join(",");

    wait_for(&dev, "leader: replica", 1, Duration::from_secs(60));
    let banner = dev.stdout();
    assert!(
        banner.contains("runtime: mock (no Docker"),
        "auto must fall back to mock and say why:\n{banner}"
    );
    assert!(
        banner.contains(&format!("http://127.0.0.1:{api}")),
        "{banner}"
    );

    // Workers register shortly after the replicas are ready.
    let spawned = cli_until_ok(
        &servers,
        &["spawn", "--ttl", "30m"],
        Duration::from_secs(30),
        &dev,
    );
    let id = String::from_utf8_lossy(&spawned.stdout).trim().to_string();
    assert!(id.starts_with("sb-"), "spawn printed {}", text(&spawned));

    let o = cli(&servers, &["exec", &id, "echo hello from $SANDBOX_ID"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("hello from {id}")
    );
    let o = cli(&servers, &["exec", &id, "exit 7"]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "exec exits with the command's code"
    );

    let input = tmp.path().join("in.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&input, &data).expect("write input");
    let remote = format!("{id}:/workspace/in.bin");
    let o = cli(&servers, &["cp", input.to_str().expect("utf8"), &remote]);
    assert!(o.status.success(), "{}", text(&o));
    let back = tmp.path().join("out.bin");
    let o = cli(&servers, &["cp", &remote, back.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "file round trip"
    );

    // SIGKILL the leader, as the README does with leader.pid.
    let leader_pid: i32 = std::fs::read_to_string(dir.join("leader.pid"))
        .expect("leader.pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        dev.child_pids().contains(&leader_pid),
        "leader.pid names a replica"
    );
    // A replica our child `stacyvm dev` started.
    stacyvm_runtimes::sys::kill(leader_pid, libc::SIGKILL);
    wait_for(&dev, "leader: replica", 2, Duration::from_secs(30));
    let o = cli_until_ok(
        &servers,
        &["exec", &id, "wc -c < in.bin"],
        Duration::from_secs(30),
        &dev,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "200000");
    let second = cli_until_ok(&servers, &["spawn"], Duration::from_secs(30), &dev);
    let id2 = String::from_utf8_lossy(&second.stdout).trim().to_string();
    let o = cli(&servers, &["kill", &id, &id2]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(&servers, &["exec", &id, "true"]);
    assert!(!o.status.success(), "exec on a destroyed sandbox must fail");

    // Ctrl-C stops every child.
    let pids = dev.child_pids();
    assert_eq!(pids.len(), 5, "three replicas and two workers");
    let st = dev
        .interrupt(Duration::from_secs(40))
        .unwrap_or_else(|| panic!("dev did not stop on Ctrl-C\n{}", dev.logs()));
    assert!(st.success(), "dev exit {st:?}\n{}", dev.logs());
    for pid in pids {
        assert!(!alive(pid), "child {pid} outlived stacyvm dev");
    }
    assert!(dev.live_children().is_empty());
    let mut s = String::new();
    let _ = std::fs::File::open(&dev.out).and_then(|mut f| f.read_to_string(&mut s));
    assert!(s.contains("stopped"), "{s}");
}
