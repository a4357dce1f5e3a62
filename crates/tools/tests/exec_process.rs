//! `exec` inside bubblewrap + seccomp (needs `apt-get install -y bubblewrap` and user
//! namespaces), and `process_list`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use referee_tools::config::{CommandSpec, ExecConfig, Limits};
use referee_tools::exec::ExecTool;
use referee_tools::{CallScope, Tool, ToolError, ToolOutput};
use serde_json::{Value, json};

struct Sandbox {
    _dir: tempfile::TempDir,
    work: PathBuf,
    outside: PathBuf,
    tool: ExecTool,
}

/// Whether these tests run as root, where `exec` runs its commands as `nobody`.
fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// As root, commands run as `nobody` (65534): the work root must be theirs, and the temporary
/// directory above it (0700) searchable.
fn hand_to_nobody(base: &Path, work: &Path) {
    if root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711)).unwrap();
        for dir in [work.to_path_buf(), work.join("sub")] {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        }
    }
}

fn sandbox(timeout_ms: u64, max_output_bytes: usize) -> Sandbox {
    sandbox_with(timeout_ms, max_output_bytes, ExecConfig::default().ro_binds)
}

fn sandbox_with(timeout_ms: u64, max_output_bytes: usize, ro_binds: Vec<PathBuf>) -> Sandbox {
    sandbox_config(|config| {
        config.timeout_ms = timeout_ms;
        config.max_output_bytes = max_output_bytes;
        config.ro_binds = ro_binds;
    })
}

fn sandbox_config(adjust: impl FnOnce(&mut ExecConfig)) -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let (work, outside) = (base.join("work"), base.join("outside"));
    std::fs::create_dir_all(work.join("sub")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "TOP SECRET").unwrap();
    hand_to_nobody(&base, &work);
    let sh = |args: &[&str]| CommandSpec {
        program: PathBuf::from("/bin/sh"),
        args: args.iter().map(|s| s.to_string()).collect(),
    };
    let commands: BTreeMap<String, CommandSpec> = [
        ("sh".to_owned(), sh(&["-c"])),
        ("echo".to_owned(), CommandSpec { program: PathBuf::from("/bin/echo"), args: vec!["fixed".into()] }),
    ]
    .into();
    let mut config = ExecConfig { work_root: Some(work.clone()), commands, ..ExecConfig::default() };
    adjust(&mut config);
    let tool = ExecTool::new(&config, &Limits::default()).unwrap();
    if let Err(why) = tool.availability() {
        panic!("bubblewrap cannot sandbox here, so exec cannot be tested: {why}");
    }
    Sandbox { _dir: dir, work, outside, tool }
}

impl Sandbox {
    fn sh(&self, script: &str) -> Result<ToolOutput, ToolError> {
        self.tool.call(json!({ "command": "sh", "args": [script] }), &CallScope::default())
    }
}

fn text(out: &ToolOutput, key: &str) -> String {
    out.data[key].as_str().unwrap().to_owned()
}

#[test]
fn allowed_command_runs_with_fixed_and_caller_arguments() {
    let sb = sandbox(10_000, 4096);
    let out = sb.tool.call(json!({ "command": "echo", "args": ["hello", "world"] }), &CallScope::default()).unwrap();
    assert_eq!(text(&out, "stdout"), "fixed hello world\n");
    assert_eq!(out.data["exit_code"], 0);
    assert_eq!(out.torsion, 0.1);
    let failing = sb.sh("echo oops >&2; exit 3").unwrap();
    assert_eq!(failing.data["exit_code"], 3);
    assert_eq!(text(&failing, "stderr"), "oops\n");
    let cwd = sb.tool.call(json!({ "command": "sh", "args": ["pwd"], "cwd": "sub" }), &CallScope::default()).unwrap();
    assert_eq!(text(&cwd, "stdout").trim(), sb.work.join("sub").display().to_string());
    let escape = sb.tool.call(json!({ "command": "sh", "args": ["pwd"], "cwd": "../outside" }), &CallScope::default());
    assert!(matches!(escape, Err(ToolError::RealityViolation(_))), "{escape:?}");
}

#[test]
fn commands_not_allow_listed_are_refused() {
    let sb = sandbox(10_000, 4096);
    for command in ["bash", "/bin/sh", "../sh", ""] {
        let result = sb.tool.call(json!({ "command": command }), &CallScope::default());
        assert!(matches!(result, Err(ToolError::Forbidden(_))), "{command}: {result:?}");
    }
    // A caller scoped to other paths may not run anything in the work root.
    let scoped = CallScope { path_prefixes: Some(vec![sb.outside.clone()]), ..CallScope::default() };
    let result = sb.tool.call(json!({ "command": "echo" }), &scoped);
    assert!(matches!(result, Err(ToolError::Forbidden(_))), "{result:?}");
    let covering = CallScope { path_prefixes: Some(vec![sb.work.clone()]), ..CallScope::default() };
    assert!(sb.tool.call(json!({ "command": "echo" }), &covering).is_ok());
}

#[test]
fn network_is_unavailable_inside() {
    let sb = sandbox(10_000, 4096);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // /bin/sh may be dash (no /dev/tcp): use bash when present, else python3; both try a TCP
    // connection to a listener on the host's loopback.
    let script = format!(
        "if [ -x /bin/bash ]; then exec /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected'; \
         else exec python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2); print(\"connected\")'; fi"
    );
    let out = sb.sh(&script).unwrap();
    assert_ne!(out.data["exit_code"], 0, "stdout: {}", text(&out, "stdout"));
    // EPERM comes from the seccomp filter refusing an AF_INET socket (without it: ENETUNREACH).
    assert!(text(&out, "stderr").contains("Operation not permitted"), "stderr: {}", text(&out, "stderr"));
    assert!(!text(&out, "stdout").contains("connected"));
    assert_eq!(listener.accept().map(|_| ()).map_err(|e| e.kind()), Err(ErrorKind::WouldBlock));
    let links = sb.sh("cat /proc/net/dev").unwrap();
    let owned = text(&links, "stdout");
    let names: Vec<&str> = owned.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(names, ["lo"], "only a loopback interface");
}

#[test]
fn writes_land_only_inside_the_work_root() {
    let sb = sandbox(10_000, 4096);
    let target = sb.outside.join("escaped");
    let out = sb
        .sh(&format!(
            "echo in > {work}/made; echo out > {target}; echo sys > /usr/escaped; echo etc > /etc/escaped; true",
            work = sb.work.display(),
            target = target.display()
        ))
        .unwrap();
    assert_eq!(std::fs::read_to_string(sb.work.join("made")).unwrap(), "in\n");
    assert!(!target.exists());
    assert!(!Path::new("/usr/escaped").exists() && !Path::new("/etc/escaped").exists());
    // `/etc` inside is the sandbox's own, on its private root, which is read-only too.
    let stderr = text(&out, "stderr");
    assert_eq!(stderr.lines().count(), 3, "three refused writes: {stderr}");
}

#[test]
fn the_deadline_kills_the_sandbox() {
    let sb = sandbox(500, 4096);
    let start = Instant::now();
    let result = sb.sh("sleep 30");
    assert!(matches!(result, Err(ToolError::Timeout(_))), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn output_is_cut_at_the_limit() {
    let sb = sandbox(10_000, 1000);
    let out = sb.sh("i=0; while [ $i -lt 500 ]; do echo 0123456789; i=$((i+1)); done").unwrap();
    assert_eq!(text(&out, "stdout").len(), 1000);
    assert_eq!(out.data["stdout_truncated"], true);
    assert_eq!(out.data["stderr_truncated"], false);
}

#[test]
fn seccomp_refuses_namespaces_and_non_unix_sockets() {
    let sb = sandbox(10_000, 4096);
    let out = sb.sh("unshare --user true; echo rc=$?").unwrap();
    assert!(text(&out, "stdout").contains("rc=") && !text(&out, "stdout").contains("rc=0"), "{out:?}");
}

#[test]
fn a_missing_bwrap_makes_exec_unavailable_not_unsandboxed() {
    let dir = tempfile::tempdir().unwrap();
    let config = ExecConfig {
        bwrap: dir.path().join("no-bwrap"),
        work_root: Some(dir.path().to_path_buf()),
        ..ExecConfig::default()
    };
    let tool = ExecTool::new(&config, &Limits::default()).unwrap();
    let result = tool.call(json!({ "command": "sh" }), &CallScope::default());
    assert!(matches!(result, Err(ToolError::Unavailable(_))), "{result:?}");
}

#[test]
fn process_list_includes_this_process() {
    let tools = referee_tools::process::tools(&Limits::default());
    let out = tools[0].call(json!({}), &CallScope::default()).unwrap();
    let me = std::process::id() as i64;
    let processes = out.data["processes"].as_array().unwrap();
    let mine: Vec<&Value> = processes.iter().filter(|p| p["pid"] == me).collect();
    assert_eq!(mine.len(), 1);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).unwrap().trim().parse::<i64>().unwrap();
    assert_eq!(mine[0]["ppid"], ppid);
    let one = tools[0].call(json!({ "max": 1 }), &CallScope::default()).unwrap();
    assert_eq!(one.data["processes"].as_array().unwrap().len(), 1);
    assert_eq!(one.data["truncated"], true);
}

#[test]
fn the_sandboxed_process_has_no_capabilities_and_a_clean_environment() {
    let sb = sandbox(10_000, 4096);
    let out = sb.sh("grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status; env | sort").unwrap();
    let stdout = text(&out, "stdout");
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        let line = stdout.lines().find(|l| l.starts_with(cap)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    let vars: Vec<&str> =
        stdout.lines().filter(|l| !l.starts_with("Cap")).filter_map(|l| l.split('=').next()).collect();
    assert!(vars.iter().all(|v| ["HOME", "LANG", "PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(v)), "{vars:?}");
}

/// Security finding 6: with the server as root, an allow-listed `sh` read the host's
/// `/etc/shadow` (uid 0 kept, `/etc` bound whole).
#[test]
fn the_sandbox_reads_no_host_account_or_file_it_was_not_given() {
    let sb = sandbox(10_000, 4096);
    let out = sb
        .sh(&format!(
            "id -u; id -g; id -G; cat /etc/shadow; cat /etc/passwd; cat {}/secret.txt; ls /etc",
            sb.outside.display()
        ))
        .unwrap();
    let (stdout, stderr) = (text(&out, "stdout"), text(&out, "stderr"));
    let mut lines = stdout.lines();
    let expected = if root() { "65534".to_owned() } else { rustix::process::geteuid().as_raw().to_string() };
    assert_eq!(lines.next(), Some(expected.as_str()), "uid: {stdout}");
    assert!(!stdout.contains("root:") && !stdout.contains("TOP SECRET"), "{stdout}");
    assert!(stdout.contains("sandbox:x:"), "only the sandbox's own account: {stdout}");
    assert!(stderr.contains("/etc/shadow") && stderr.contains("secret.txt"), "{stderr}");
    // Only the loader cache, the alternatives and the synthetic accounts are in /etc.
    let etc: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("sandbox:x:")).skip(1).collect();
    for name in &etc {
        assert!(["alternatives", "group", "ld.so.cache", "passwd"].contains(name), "/etc holds {name}: {etc:?}");
    }

    // Even with /etc bound whole (an operator's choice), the shadow file stays unreadable: the
    // command is not root on the host.
    let wide = sandbox_with(10_000, 4096, [ExecConfig::default().ro_binds, vec![PathBuf::from("/etc")]].concat());
    let out = wide.sh("cat /etc/shadow; echo rc=$?").unwrap();
    assert!(text(&out, "stdout").contains("rc=1"), "{out:?}");
    assert!(text(&out, "stderr").contains("Permission denied"), "{out:?}");
}

#[test]
fn exec_never_runs_as_root() {
    let dir = tempfile::tempdir().unwrap();
    let config = ExecConfig { work_root: Some(dir.path().to_path_buf()), run_as_uid: Some(0), ..ExecConfig::default() };
    let err = ExecTool::new(&config, &Limits::default()).err().expect("uid 0 refused");
    assert!(err.to_string().contains("never runs commands as root"), "{err}");
}

/// Found attacking the release build: a descriptor the server inherited without close-on-exec
/// (`referee serve 7<secret`) was readable inside the sandbox.
#[test]
fn descriptors_the_server_inherited_do_not_reach_the_sandbox() {
    let sb = sandbox(10_000, 4096);
    let secret = sb.outside.join("secret.txt");
    let file = std::fs::File::open(&secret).unwrap();
    rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty()).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let out = sb.sh(&format!("cat <&{fd}; echo rc=$?; ls /proc/self/fd")).unwrap();
    let stdout = text(&out, "stdout");
    assert!(!stdout.contains("TOP SECRET") && !stdout.contains("rc=0"), "{stdout}");
    // stdin, stdout, stderr, and the descriptor `ls` opened to list them.
    let fds: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{stdout}");
    drop(file);
}

/// Found attacking the release build: `clone(CLONE_NEWUSER)` (not `unshare`) made a nested
/// user namespace holding every capability. Threads, which the C library makes with `clone3`
/// and then `clone`, must still work.
#[test]
fn clone_cannot_make_a_namespace_but_threads_still_run() {
    if !Path::new("/usr/bin/python3").exists() {
        eprintln!("skipped: no python3 to issue raw clone calls");
        return;
    }
    let sb = sandbox(10_000, 4096);
    let script = r#"python3 -c '
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
for flag in (0x10000000, 0x20000000, 0x40000000, 0x00020000):
    r = libc.syscall(56, flag | 17, 0, 0, 0, 0)
    if r == 0:
        os._exit(0)
    print("clone", hex(flag), r, ctypes.get_errno())
print("clone3", libc.syscall(435, 0, 0), ctypes.get_errno())
t = threading.Thread(target=print, args=("thread ok",))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitpid(pid, 0)[1] >> 8)
'"#;
    let out = sb.sh(script).unwrap();
    let stdout = text(&out, "stdout");
    for flag in ["0x10000000", "0x20000000", "0x40000000", "0x20000"] {
        assert!(
            stdout.contains(&format!("clone {flag} -1 1\n")),
            "CLONE flag {flag} refused with EPERM: {stdout} {out:?}"
        );
    }
    assert!(stdout.contains("clone3 -1 38\n"), "clone3 answers ENOSYS: {stdout}");
    assert!(stdout.contains("thread ok\n") && stdout.contains("fork 7\n"), "{stdout} {out:?}");
}

/// Found attacking the release build: one call filled a 12 GB `/tmp` (half the RAM) and
/// another forked ~10,800 host processes in 8 s.
#[test]
fn resource_limits_bound_what_one_command_can_take() {
    let sb = sandbox_config(|config| {
        config.tmp_bytes = 8 << 20;
        config.max_file_bytes = 1 << 20;
        config.max_memory_bytes = 512 << 20;
        config.max_processes = 32;
    });
    let out = sb
        .sh("for i in $(seq 16); do head -c 1000K /dev/zero > /tmp/f$i; done 2>/dev/null; \
             echo tmp=$(du -sm /tmp | cut -f1); \
             (head -c 2M /dev/zero > big) 2>/dev/null; echo file=$(stat -c %s big); \
             dd if=/dev/zero of=/dev/null bs=1G count=1 2>&1 | head -c 200; echo; \
             for i in $(seq 16); do head -c 1000K /dev/zero > /dev/shm/f$i; done 2>/dev/null; \
             echo shm=$(du -sm /dev/shm | cut -f1); (echo x > /dev/made) 2>&1; \
             python3 -c 'import os; os.memfd_create(\"x\")' 2>&1 | tail -1")
        .unwrap();
    let stdout = text(&out, "stdout");
    let tmp: u32 = stdout.lines().find_map(|l| l.strip_prefix("tmp=")).unwrap().parse().unwrap();
    assert!((7..=9).contains(&tmp), "/tmp holds about 8 MiB of the 16 written (du rounds up): {stdout}");
    assert!(stdout.contains("file=1048576\n"), "a file stops at 1 MiB: {stdout}");
    assert!(stdout.contains("memory exhausted"), "a 1 GiB buffer is refused under 512 MiB: {stdout}");
    // Found in the second round: bubblewrap's `/dev` is a tmpfs of half the RAM, and memfd
    // pages count against no limit.
    let shm: u32 = stdout.lines().find_map(|l| l.strip_prefix("shm=")).unwrap().parse().unwrap();
    assert!((7..=9).contains(&shm), "/dev/shm holds about 8 MiB: {stdout}");
    assert!(stdout.contains("/dev/made: Read-only file system"), "{stdout}");
    if Path::new("/usr/bin/python3").exists() {
        assert!(stdout.contains("PermissionError"), "memfd_create is refused: {stdout}");
    }
    if root() {
        // Commands run as nobody, so the process limit holds across the whole sandbox.
        // At the limit the shell dies on the fork it cannot make; the file says how far it got.
        sb.sh("for i in $(seq 64); do sleep 3 & echo $i > started; done").unwrap();
        let out = sb.sh("cat started").unwrap();
        let running: u32 = text(&out, "stdout").trim().parse().unwrap_or_else(|_| panic!("{out:?}"));
        assert!(running <= 32, "{running} processes under a limit of 32: {out:?}");
    }
}
