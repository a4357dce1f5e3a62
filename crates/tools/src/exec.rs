//! `exec`: an allow-listed command inside bubblewrap with a seccomp filter.
//!
//! The sandbox: every namespace unshared (so no network: only a down loopback), all
//! capabilities dropped, the system directories bound read-only, a private `/tmp`, `/proc` and
//! `/dev`, the work root the only writable host path, a new session, killed with its parent.
//! Seccomp filters (built with seccompiler, handed to `bwrap --add-seccomp-fd FD` through
//! pipes) refuse mounts, namespaces (`unshare`, `setns`, and `clone` with a `CLONE_NEW*`
//! flag; `clone3` answers ENOSYS so the C library falls back to `clone`), tracing, kernel
//! modules, keyrings, BPF, io_uring and every socket that is not a Unix socket. The command runs under a wall-clock limit (the whole
//! sandbox is killed at the deadline) and keeps at most the configured bytes of output.
//!
//! If bubblewrap cannot build this sandbox on the host (missing, or namespaces not permitted)
//! the tool answers [`ToolError::Unavailable`]; it never runs anything unsandboxed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::FdFlags;
use rustix::process::{Pid, PidfdFlags};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{CommandSpec, ConfigError, ExecConfig, Limits};
use crate::reality::{Access, Reality};
use crate::util::{SANDBOXED, output, params, spec, to_value};
use crate::{CallScope, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};

/// The `exec` tool.
pub struct ExecTool {
    spec: ToolSpec,
    /// The sandbox, or why it cannot run here.
    sandbox: Result<Sandbox, String>,
}

struct Sandbox {
    bwrap: PathBuf,
    work_root: PathBuf,
    work: Reality,
    commands: BTreeMap<String, CommandSpec>,
    ro_binds: Vec<PathBuf>,
    /// The host uid and gid to switch to before starting bubblewrap (`None`: stay as we are,
    /// already unprivileged).
    run_as: Option<(u32, u32)>,
    /// Inside: the uid and gid, and the `/etc/passwd` and `/etc/group` naming them.
    identity: (u32, u32),
    timeout: Duration,
    max_output: usize,
    tmp_bytes: u64,
    limits: ChildLimits,
    /// The seccomp programs: the deny list (EPERM), and `clone3` (ENOSYS, so the C library
    /// falls back to `clone`, whose flags the first program can inspect).
    seccomp: [Vec<u8>; 2],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecParams {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    cwd: Option<String>,
}

#[derive(Serialize)]
struct ExecResult {
    command: String,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    duration_ms: u64,
}

impl ExecTool {
    /// Validates the allow-list and the work root, builds the seccomp filter and checks once
    /// that bubblewrap can create the sandbox here.
    pub fn new(config: &ExecConfig, limits: &Limits) -> Result<Self, ConfigError> {
        for (name, command) in &config.commands {
            let bad = |reason: &str| ConfigError::BadCommand { name: name.clone(), reason: reason.to_owned() };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(bad("names may only use ASCII letters, digits, '_' and '-'"));
            }
            if !command.program.is_absolute() {
                return Err(bad("program must be an absolute path"));
            }
        }
        let run_as = run_as(config)?;
        let sandbox = match &config.work_root {
            None => {
                Err("exec is disabled: set tools.exec.work_root and allow-list commands in tools.exec.commands"
                    .to_owned())
            }
            Some(root) => {
                let work_root = crate::reality::validate_dir(root)?;
                let work = Reality::new(std::slice::from_ref(&work_root), limits)?;
                Sandbox::new(config, work_root, work, run_as).and_then(|s| s.probe().map(|()| s))
            }
        };
        let names: Vec<&str> = config.commands.keys().map(String::as_str).collect();
        let spec = spec(
            "exec",
            &format!(
                "Runs an allow-listed command ({}) in a sandbox: no network, read-only system, writable only inside the work root, killed after {} ms, output cut at {} bytes per stream.",
                if names.is_empty() { "none configured".to_owned() } else { names.join(", ") },
                config.timeout_ms,
                config.max_output_bytes
            ),
            json!({
                "type": "object",
                "properties": {
                    "command": { "enum": names },
                    "args": { "type": "array", "items": { "type": "string" }, "description": "appended to the command's fixed arguments" },
                    "cwd": { "type": "string", "description": "working directory inside the work root (absolute, or relative to it); default the work root" }
                },
                "required": ["command"],
                "additionalProperties": false
            }),
            json!({
                "type": "object",
                "properties": {
                    "command": { "type": "string" },
                    "exit_code": { "type": ["integer", "null"] },
                    "signal": { "type": ["integer", "null"] },
                    "stdout": { "type": "string" },
                    "stderr": { "type": "string" },
                    "stdout_truncated": { "type": "boolean" },
                    "stderr_truncated": { "type": "boolean" },
                    "duration_ms": { "type": "integer" }
                },
                "required": ["command", "exit_code", "signal", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "duration_ms"]
            }),
            ToolAnnotations { read_only: false, destructive: true, idempotent: false, open_world: false },
            SANDBOXED,
        );
        Ok(Self { spec, sandbox })
    }

    /// Whether commands can run here, or why not.
    pub fn availability(&self) -> Result<(), &str> {
        self.sandbox.as_ref().map(|_| ()).map_err(String::as_str)
    }
}

impl Tool for ExecTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params_json: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let sandbox = self.sandbox.as_ref().map_err(|why| ToolError::Unavailable(why.clone()))?;
        let p: ExecParams = params(params_json)?;
        if let Some(prefixes) = &scope.path_prefixes
            && !prefixes.iter().any(|prefix| sandbox.work_root.starts_with(prefix))
        {
            return Err(ToolError::Forbidden(format!(
                "the caller's path prefixes do not cover the exec work root {}",
                sandbox.work_root.display()
            )));
        }
        let command = sandbox.commands.get(&p.command).ok_or_else(|| {
            let allowed: Vec<&str> = sandbox.commands.keys().map(String::as_str).collect();
            ToolError::Forbidden(format!(
                "command {:?} is not allow-listed (allowed: {})",
                p.command,
                allowed.join(", ")
            ))
        })?;
        if p.args.iter().any(|a| a.contains('\0')) {
            return Err(ToolError::InvalidParams("an argument contains a NUL byte".into()));
        }
        let cwd = match &p.cwd {
            Some(cwd) => sandbox.work.open(&CallScope::default(), Path::new(cwd), Access::Dir)?.path,
            None => sandbox.work_root.clone(),
        };
        let mut timeout = sandbox.timeout;
        if let Some(deadline) = scope.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        let mut argv: Vec<OsString> = command.args.iter().map(OsString::from).collect();
        argv.extend(p.args.iter().map(OsString::from));
        let run = sandbox.run(&command.program, &argv, &cwd, timeout)?;
        if run.timed_out {
            return Err(ToolError::Timeout(format!("{} was killed after {} ms", p.command, timeout.as_millis())));
        }
        let result = ExecResult {
            command: p.command,
            exit_code: run.status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&run.status),
            stdout: String::from_utf8_lossy(&run.stdout.0).into_owned(),
            stderr: String::from_utf8_lossy(&run.stderr.0).into_owned(),
            stdout_truncated: run.stdout.1,
            stderr_truncated: run.stderr.1,
            duration_ms: u64::try_from(run.elapsed.as_millis()).unwrap_or(u64::MAX),
        };
        Ok(output(to_value(&result)?, SANDBOXED))
    }
}

/// What a sandboxed run produced: each stream with whether it was cut.
struct Run {
    status: std::process::ExitStatus,
    stdout: (Vec<u8>, bool),
    stderr: (Vec<u8>, bool),
    timed_out: bool,
    elapsed: Duration,
}

/// Which host uid and gid `exec` switches to: the configured ones, or `nobody` (65534) when the
/// server is root; never root. `None` when the server is unprivileged and nothing else was asked.
fn run_as(config: &ExecConfig) -> Result<Option<(u32, u32)>, ConfigError> {
    let (euid, egid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let root = euid == 0;
    let uid = config.run_as_uid.unwrap_or(if root { NOBODY } else { euid });
    let gid = config.run_as_gid.unwrap_or(if root { NOBODY } else { egid });
    if uid == 0 || gid == 0 {
        return Err(ConfigError::BadUser("exec never runs commands as root (uid or gid 0)".into()));
    }
    if !root && (uid != euid || gid != egid) {
        return Err(ConfigError::BadUser(format!(
            "running commands as {uid}:{gid} needs the server to run as root (it runs as {euid}:{egid})"
        )));
    }
    Ok(root.then_some((uid, gid)))
}

/// The conventional uid and gid of `nobody`/`nogroup`.
const NOBODY: u32 = 65534;

impl Sandbox {
    fn new(config: &ExecConfig, work_root: PathBuf, work: Reality, run_as: Option<(u32, u32)>) -> Result<Self, String> {
        if !config.bwrap.is_file() {
            return Err(format!(
                "bubblewrap not found at {} (install it: apt-get install -y bubblewrap)",
                config.bwrap.display()
            ));
        }
        Ok(Self {
            bwrap: config.bwrap.clone(),
            work_root,
            work,
            commands: config.commands.clone(),
            ro_binds: config.ro_binds.clone(),
            run_as,
            identity: run_as
                .unwrap_or_else(|| (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw())),
            timeout: Duration::from_millis(config.timeout_ms),
            max_output: config.max_output_bytes,
            tmp_bytes: config.tmp_bytes.max(1 << 20),
            limits: ChildLimits {
                file_bytes: config.max_file_bytes,
                memory_bytes: config.max_memory_bytes,
                // A process limit counts every process of the real uid: only meaningful when
                // the sandbox has a uid of its own, not the server's (whose threads count too).
                processes: if run_as.is_some() { config.max_processes } else { 0 },
            },
            seccomp: [seccomp_program()?, clone3_program()?],
        })
    }

    /// Runs `bwrap --version` inside the full sandbox once, so a host without user namespaces
    /// (or with a broken bwrap) is reported at start-up, not on the first call.
    fn probe(&self) -> Result<(), String> {
        let run = self
            .run(&self.bwrap, &[OsString::from("--version")], &self.work_root, Duration::from_secs(10))
            .map_err(|e| format!("bubblewrap sandbox probe failed: {e}"))?;
        if run.timed_out || !run.status.success() {
            let hint = match self.run_as {
                Some((uid, gid)) => format!(
                    "; commands run as {uid}:{gid} because the server runs as root, so the work root {} \
                     and the directories above it must be searchable by that user, and the work root \
                     writable (chown it, or set tools.exec.run_as_uid/run_as_gid)",
                    self.work_root.display()
                ),
                None => String::new(),
            };
            return Err(format!(
                "bubblewrap cannot create the sandbox on this host (namespaces not permitted?): {}{hint}",
                String::from_utf8_lossy(&run.stderr.0).trim()
            ));
        }
        Ok(())
    }

    fn bwrap_args(&self, seccomp_fds: [i32; 2], identity_fds: (i32, i32), cwd: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/local/bin:/usr/bin:/bin",
            "--setenv",
            "LANG",
            "C.UTF-8",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let mut push = |items: &[&std::ffi::OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
        push(&["--setenv".as_ref(), "HOME".as_ref(), self.work_root.as_os_str()]);
        for bind in &self.ro_binds {
            match std::fs::read_link(bind) {
                // Merged-usr hosts: /bin -> usr/bin is recreated as a symlink, not bound.
                Ok(target) => push(&["--symlink".as_ref(), target.as_os_str(), bind.as_os_str()]),
                Err(_) if bind.exists() => push(&["--ro-bind".as_ref(), bind.as_os_str(), bind.as_os_str()]),
                Err(_) => {}
            }
        }
        if !self.ro_binds.iter().any(|b| self.bwrap.starts_with(b)) {
            push(&["--ro-bind".as_ref(), self.bwrap.as_os_str(), self.bwrap.as_os_str()]);
        }
        push(&["--proc".as_ref(), "/proc".as_ref(), "--dev".as_ref(), "/dev".as_ref()]);
        // `/tmp` and `/dev/shm` are sized: a tmpfs holds memory, and bubblewrap's `/dev` is one
        // as large as half the RAM (it is remounted read-only below).
        let tmp_bytes = self.tmp_bytes.to_string();
        push(&["--size".as_ref(), tmp_bytes.as_ref(), "--tmpfs".as_ref(), "/tmp".as_ref()]);
        push(&["--size".as_ref(), tmp_bytes.as_ref(), "--tmpfs".as_ref(), "/dev/shm".as_ref()]);
        // Who the command is, and nobody else: not the host's accounts.
        let (passwd, group) = (identity_fds.0.to_string(), identity_fds.1.to_string());
        push(&["--ro-bind-data".as_ref(), passwd.as_ref(), "/etc/passwd".as_ref()]);
        push(&["--ro-bind-data".as_ref(), group.as_ref(), "/etc/group".as_ref()]);
        push(&["--bind".as_ref(), self.work_root.as_os_str(), self.work_root.as_os_str()]);
        // The sandbox's own root (where `/etc` and the mount points live) is read-only: the
        // only writable places are the work root and the sized `/tmp`.
        push(&["--remount-ro".as_ref(), "/dev".as_ref(), "--remount-ro".as_ref(), "/".as_ref()]);
        push(&["--chdir".as_ref(), cwd.as_os_str()]);
        for fd in seccomp_fds {
            let fd = fd.to_string();
            push(&["--add-seccomp-fd".as_ref(), fd.as_ref()]);
        }
        push(&["--".as_ref()]);
        args
    }

    fn run(&self, program: &Path, argv: &[OsString], cwd: &Path, timeout: Duration) -> Result<Run, ToolError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| ToolError::Failed(format!("exec: {what}: {e}"));
        let [deny, clone3] = &self.seccomp;
        let (deny, clone3) = data_fd(deny)
            .and_then(|deny| data_fd(clone3).map(|clone3| (deny, clone3)))
            .map_err(|e| failed("passing the seccomp filter", &e))?;
        let seccomp_fds = [deny.as_raw_fd(), clone3.as_raw_fd()];
        let (uid, gid) = self.identity;
        let home = self.work_root.display();
        let passwd = data_fd(format!("sandbox:x:{uid}:{gid}:referee exec:{home}:/bin/sh\n").as_bytes());
        let group = data_fd(format!("sandbox:x:{gid}:\n").as_bytes());
        let (passwd, group) =
            passwd.and_then(|p| group.map(|g| (p, g))).map_err(|e| failed("passing /etc/passwd", &e))?;
        let start = Instant::now();
        let mut command = Command::new(&self.bwrap);
        prepare_child(
            &mut command,
            &[seccomp_fds[0], seccomp_fds[1], passwd.as_raw_fd(), group.as_raw_fd()],
            self.limits,
        );
        if let Some((uid, gid)) = self.run_as {
            // Before exec: setgroups([]) (std does it for a root parent), setgid, setuid. bwrap
            // then builds the sandbox unprivileged, in a user namespace owned by this uid.
            std::os::unix::process::CommandExt::uid(std::os::unix::process::CommandExt::gid(&mut command, gid), uid);
        }
        let mut child = command
            .args(self.bwrap_args(seccomp_fds, (passwd.as_raw_fd(), group.as_raw_fd()), cwd))
            .arg(program)
            .args(argv)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(&format!("starting {}", self.bwrap.display()), &e))?;
        drop((deny, clone3, passwd, group));
        let stdout = child.stdout.take().map(|s| capped_reader(s, self.max_output));
        let stderr = child.stderr.take().map(|s| capped_reader(s, self.max_output));
        let waited = wait_until(&child, timeout);
        let timed_out = !matches!(waited, Ok(true));
        if timed_out {
            // Killing bwrap kills the sandbox: it is pid 1's parent and --die-with-parent is set,
            // and the pid namespace dies with its init. Also done when waiting itself failed, so
            // no sandbox outlives the call.
            let _ = child.kill();
        }
        let status = child.wait().map_err(|e| failed("waiting", &e))?;
        waited.map_err(|e| failed("waiting", &e))?;
        let join =
            |h: Option<std::thread::JoinHandle<(Vec<u8>, bool)>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(Run { status, stdout: join(stdout), stderr: join(stderr), timed_out, elapsed: start.elapsed() })
    }
}

/// Resource limits set in the child before bubblewrap starts; inherited by the sandbox and
/// everything it runs (0: unlimited).
#[derive(Clone, Copy, Debug)]
struct ChildLimits {
    file_bytes: u64,
    memory_bytes: u64,
    processes: u64,
}

/// In the child between fork and exec: makes every descriptor it would inherit, except stdio
/// and `keep`, close-on-exec, so bubblewrap (and the sandbox) get only what they are handed —
/// the server's own descriptors are all close-on-exec already; this catches the ones it
/// inherited without the flag from whatever started it (a shell's `7<secret`, a supervisor's
/// leaked pipe) — and sets `limits`.
#[allow(unsafe_code, reason = "pre_exec has no safe API; the closure below is async-signal-safe")]
fn prepare_child(command: &mut Command, keep: &[std::os::fd::RawFd], limits: ChildLimits) {
    // The ranges between the kept descriptors, computed before the fork: the closure must not
    // allocate.
    let mut kept: Vec<u32> = keep.iter().filter_map(|&fd| u32::try_from(fd).ok()).filter(|&fd| fd > 2).collect();
    kept.sort_unstable();
    let mut ranges = Vec::with_capacity(kept.len() + 1);
    let mut low = 3u32;
    for fd in kept {
        if fd > low {
            ranges.push((low, fd - 1));
        }
        low = fd.saturating_add(1);
    }
    ranges.push((low, u32::MAX));
    // The fallback for kernels without close_range (before 5.11): every descriptor number up
    // to the open-file limit.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1 << 20);
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    let rlimits = [
        (libc::RLIMIT_FSIZE, limits.file_bytes),
        (libc::RLIMIT_AS, limits.memory_bytes),
        (libc::RLIMIT_NPROC, limits.processes),
    ];
    // SAFETY: the closure runs in the child between fork and exec. It calls only close_range,
    // fcntl and setrlimit, all async-signal-safe, touches no lock and allocates nothing
    // (`ranges` and `rlimits` were built before the fork and are only read). Marking descriptors close-on-exec does not
    // close them, so nothing in the child that still runs before exec (std's error pipe,
    // which is close-on-exec already) loses a descriptor it uses.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            for &(resource, value) in &rlimits {
                if value > 0 {
                    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            for &(first, last) in &ranges {
                let done = libc::syscall(libc::SYS_close_range, first, last, libc::CLOSE_RANGE_CLOEXEC) == 0;
                if !done {
                    for fd in first..=last.min(limit) {
                        libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
}

/// A pipe holding `bytes`, its read end inheritable (`FD_CLOEXEC` cleared) for `bwrap
/// --seccomp FD` or `--ro-bind-data FD`. Each is far smaller than a pipe buffer, so writing
/// never blocks.
fn data_fd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let written = rustix::io::write(&write, bytes)?;
    if written != bytes.len() {
        return Err(std::io::Error::other("a sandbox pipe took only part of its data"));
    }
    drop(write);
    rustix::io::fcntl_setfd(&read, FdFlags::empty())?;
    Ok(read)
}

/// Waits for the child to exit; `false` if `timeout` passed first.
fn wait_until(child: &Child, timeout: Duration) -> std::io::Result<bool> {
    let pidfd = rustix::process::pidfd_open(Pid::from_child(child), PidfdFlags::empty())?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let wait =
            Timespec { tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX), tv_nsec: left.subsec_nanos().into() };
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&wait)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            Ok(_) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a stream to its end on a thread, keeping the first `max` bytes.
fn capped_reader(mut stream: impl Read + Send + 'static, max: usize) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = max.saturating_sub(kept.len());
                    let take = n.min(room);
                    kept.extend_from_slice(chunk.get(..take).unwrap_or_default());
                    truncated |= take < n;
                }
            }
        }
        (kept, truncated)
    })
}

/// Syscalls a sandboxed command never needs and that widen the attack surface.
const DENIED_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_io_uring_setup,
    // Memory outside every limit: a memfd's pages count against no rlimit.
    libc::SYS_memfd_create,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
];

/// The syscall numbers, plus on x86_64 their x32-ABI aliases (`nr | __X32_SYSCALL_BIT`): the
/// x32 ABI shares the x86_64 audit architecture, so without them a filter keyed on numbers
/// could be bypassed where the kernel enables x32.
fn with_x32_aliases(numbers: &[libc::c_long]) -> Vec<i64> {
    const X32_SYSCALL_BIT: i64 = 0x4000_0000;
    let x32 = cfg!(target_arch = "x86_64");
    numbers.iter().flat_map(|&nr| [Some(nr), x32.then_some(nr | X32_SYSCALL_BIT)]).flatten().collect()
}

/// The seccomp program as the bytes of `struct sock_filter[]`, as `bwrap --seccomp` reads it.
fn seccomp_program() -> Result<Vec<u8>, String> {
    let err = |e: seccompiler::BackendError| format!("building the seccomp filter: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in with_x32_aliases(DENIED_SYSCALLS) {
        rules.insert(nr, Vec::new());
    }
    // Only Unix sockets: no IP, netlink, packet or any other family.
    for nr in with_x32_aliases(&[libc::SYS_socket]) {
        let not_unix =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64).map_err(err)?;
        rules.insert(nr, vec![SeccompRule::new(vec![not_unix]).map_err(err)?]);
    }
    // `clone` that makes a namespace: `unshare` by another name (a nested user namespace
    // hands its creator every capability inside it). Threads and plain forks pass.
    for nr in with_x32_aliases(&[libc::SYS_clone]) {
        let mut makes_namespace = Vec::new();
        for flag in NAMESPACE_FLAGS {
            let set =
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag).map_err(err)?;
            makes_namespace.push(SeccompRule::new(vec![set]).map_err(err)?);
        }
        rules.insert(nr, makes_namespace);
    }
    to_bytes(rules, SeccompAction::Errno(libc::EPERM as u32))
}

/// Every `CLONE_NEW*` flag.
const NAMESPACE_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

/// `clone3` answers ENOSYS: its flags are in memory a filter cannot read, and on ENOSYS the C
/// library falls back to `clone`, whose flags [`seccomp_program`] checks.
fn clone3_program() -> Result<Vec<u8>, String> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        with_x32_aliases(&[libc::SYS_clone3]).into_iter().map(|nr| (nr, Vec::new())).collect();
    to_bytes(rules, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// A seccomp program allowing everything but `rules`, which get `action`, as the bytes of
/// `struct sock_filter[]` as bubblewrap reads them.
fn to_bytes(rules: BTreeMap<i64, Vec<SeccompRule>>, action: SeccompAction) -> Result<Vec<u8>, String> {
    let err = |e: seccompiler::BackendError| format!("building the seccomp filter: {e}");
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp on {}: {e}", std::env::consts::ARCH))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch).map_err(err)?;
    let program: BpfProgram = filter.try_into().map_err(err)?;
    Ok(program
        .iter()
        .flat_map(|ins| {
            let mut bytes = Vec::with_capacity(8);
            bytes.extend_from_slice(&ins.code.to_ne_bytes());
            bytes.push(ins.jt);
            bytes.push(ins.jf);
            bytes.extend_from_slice(&ins.k.to_ne_bytes());
            bytes
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seccomp_program_is_whole_instructions_and_denies_each_listed_syscall() {
        let program = seccomp_program().unwrap();
        assert_eq!(program.len() % 8, 0);
        // Each denied syscall number appears as the immediate of a jump instruction (k field).
        let immediates: Vec<u32> =
            program.chunks_exact(8).map(|ins| u32::from_ne_bytes([ins[4], ins[5], ins[6], ins[7]])).collect();
        for nr in with_x32_aliases(DENIED_SYSCALLS).into_iter().chain(with_x32_aliases(&[libc::SYS_socket])) {
            assert!(immediates.contains(&u32::try_from(nr).unwrap()), "syscall {nr} missing");
        }
    }
}
