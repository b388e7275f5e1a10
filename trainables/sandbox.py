"""Run untrusted, model-generated Python programs in a contained subprocess.

Each call gets a fresh temporary folder, a wall-clock timeout, rlimits (address space, CPU
seconds, processes, file size, open files, no core files), no network, a scrubbed environment,
a bounded tail of stdout and stderr, a bounded number of processes and, when the program ends,
the death of every process it started. ``python -m trainables.sandbox --check`` prints what
this machine gets. Containment comes from the first backend that works here, found once:

- ``bwrap`` (bubblewrap; ``apt-get install -y bubblewrap``): read-only root, private ``/tmp``,
  ``/dev`` and ``/proc``, the caller's home hidden, new network, PID, IPC and UTS namespaces.
  The PID namespace dies with the program, which also ends children that left its session
  with ``setsid`` / ``start_new_session=True`` (killing a process group does not reach them).
- ``unshare`` (util-linux): the same namespaces, but the host's files stay writable wherever
  file permissions allow; an audit hook refuses Python-level writes outside the folder.
- ``rlimits``: no namespaces; the audit hook also refuses sockets, which code run through
  ``ctypes`` or a child process can get around. Leftover children are killed by their
  process group, their pids cgroup and, when the sandbox has its own uid, by that uid.

Where the interpreter lives. ``--tmpfs /tmp`` hides an interpreter installed under ``/tmp``
(a virtual environment there made the bwrap probe fail with ``execvp .../bin/python: No such
file or directory``), and a folder without o+x on the way (``/root`` is 0700, so are many
homes) keeps a dropped uid out of a conda or pyenv interpreter. So under bwrap ``/tmp``, the
caller's home and every such folder are covered with an empty tmpfs, and the interpreter's
folders (``sys.prefix``, ``sys.base_prefix``, the real executable's folder, every ``sys.path``
entry) are bound back read-only at their own paths, with the folders leading to them made
0755 (``--dir``; bwrap itself creates missing parents of a mount point as 0700).

Process count: never unbounded, on any backend, root or not. The kernel ignores
``RLIMIT_NPROC`` for uid 0 (a plain-rlimits sandbox run as root let a bounded fork bomb reach
2,000 live processes), so the count is bounded by the first of these that applies:

- a uid: as root, the program drops to a uid of its own (``_UID_BASE`` + pid and call counter,
  so concurrent sandboxes do not share a budget) where the interpreter's files are readable
  by other uids (under bwrap: once bound back; bwrap keeps only CAP_SETUID/CAP_SETGID until
  that drop); as a non-root caller under ``bwrap`` / ``unshare`` a user namespace, where the
  kernel counts ``RLIMIT_NPROC`` per (namespace, uid): the sandbox's own processes only; under
  ``rlimits`` as non-root the caller's current task count plus ``max_processes``.
- a pids cgroup of its own per call (``pids.max``), where one can be made (cgroup v1's pids
  hierarchy, or a cgroup v2 folder whose ``cgroup.subtree_control`` has ``pids``; usually as
  root only). The launching shell moves itself into it before it execs the backend, so
  nothing forks outside it; it also finds every leftover for the final kill. Not used where a
  uid applies: the move costs a call ~3-25 ms.
- a count the supervisor enforces, where neither applies but the backend has a PID namespace:
  every ``_POLL_S`` it counts the namespace's processes and kills all of them when there are
  too many (a burst between two counts can briefly exceed the limit).

Where none applies (``rlimits`` as root with no writable cgroup and an interpreter other uids
cannot read) ``run_code`` raises :class:`SandboxUnavailable` (one line: what to install or
allow) unless weaker containment is allowed explicitly (``allow_weak=True``, or
:func:`allow_weak_containment` for the whole process, as ``--allow-weak-sandbox`` does).

Speed (``python benchmarks/sandbox.py --json``; 2 cores shared with other work, root,
bwrap 0.8): ``print(1)`` runs 17-37 calls/s sequentially and 31-44 calls/s from two threads,
depending on the load (unshare 38 / 76, rlimits 50 / 56 in one run). A call is ~12 ms of
interpreter start, ~4.5 ms of bootstrap (mostly ``import os``, which programs need anyway),
~8 ms of bwrap namespaces and mounts, and ~1.5 ms of the caller's CPU. The interpreter starts
with ``-I -S``: ``site`` costs ~40 ms a start here (a ``.pth`` file that imports ``certifi``):
a bare ``python -c`` managed 14-18 calls/s, ``python -I -S -c`` 70-83. ``-S`` keeps
site-packages importable (``import numpy, pandas`` works) because the sandbox sets
``sys.path`` to what ``python -I`` computes on the host once (``.pth`` path lines included;
``.pth`` import lines, e.g. import-hook editable installs, are not run). There is no warm
pool: pre-started sandboxes would hide the ~25 ms start latency, but the start's CPU is the
limit on two busy cores, so callers that need throughput should call from a few threads.

Environment knobs (for emulating another machine, or for an operator who wants less):
``APIUPDATE_SANDBOX_BACKENDS`` (comma-separated subset of ``bwrap,unshare,rlimits`` that
detection may pick) and ``APIUPDATE_SANDBOX_CGROUP=0`` (never make pids cgroups).

Needs Linux >= 5.3 (pidfds watch the program's exit without a pid-reuse race) and, for a
prompt teardown on timeout, /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
"""

from __future__ import annotations

import argparse
import errno
import functools
import itertools
import json
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "killed"]
Backend = Literal["bwrap", "unshare", "rlimits"]
BACKENDS: tuple[Backend, ...] = ("bwrap", "unshare", "rlimits")

_IS_ROOT = os.geteuid() == 0
# Sandbox uids as root: far above any distribution's user ranges (subuid ranges start at
# 100000); the low 24 bits are (pid & 0xFFFF) << 8 | call counter & 0xFF.
_UID_BASE = 0x40000000
_call_counter = itertools.count()
_cgroup_counter = itertools.count()
_DETECT_LOCK = threading.Lock()
# Generated programs write small files (CSV, JSON); 64 MiB bounds a runaway writer on disk.
_MAX_FILE_BYTES = 64 << 20
_MAX_OPEN_FILES = 256
# After the program exits, how long to keep draining pipes that leftover children may hold.
_EXIT_GRACE_S = 0.2
# After killing a namespace's init on timeout, how long the kernel may take to reap the rest.
_TEARDOWN_S = 5.0
# The supervisor's count interval where nothing else bounds the processes.
_POLL_S = 0.005
_READ_CHUNK = 1 << 16
# Last stderr line of a program that ran out of address space (Python, NumPy, C++, glibc).
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_PYTHON_FLAGS = ("-I", "-S", "-B", "-X", "utf8")
# Processes of the containment itself inside the count: the launching process (bwrap's or
# unshare's monitor, or the interpreter itself) and bwrap's init (PID 1 of its namespace).
_OVERHEAD = {"bwrap": 2, "unshare": 1, "rlimits": 0}
_SH = "/bin/sh"
# Moves the launching shell into the call's cgroup before anything forks, then becomes the
# backend: every process of the call is born inside the cgroup. A failed write stops here.
_ENTER_CGROUP = 'echo $$ > "$0" && exec "$@"'
_ALLOW_WEAK = False

# Runs inside the sandbox as `python -I -S -c`, before the program: rlimits, the uid drop, the
# audit hook of the weaker backends, then the program as __main__ in the same process (one
# exec fewer than starting a second interpreter). Uncaught exceptions print the usual
# traceback and exit 1; sys.exit(n) exits n.
_BOOTSTRAP = r"""
import os, resource, sys
prog, wd, limits, ids, guard, path = sys.argv[1:7]
mem, cpu, nproc, fsize, nofile = map(int, limits.split(","))
for res, soft, hard in (
    (resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu, cpu + 1),
    (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
    (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0),
):
    resource.setrlimit(res, (soft, hard))
if ids:
    uid, gid = map(int, ids.split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
os.chdir(wd)
if guard:
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _FS_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod",
                  "os.chown", "os.symlink", "os.link", "os.utime", "shutil.rmtree"}
    _NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}

    def _guard(event, args, inside=wd + os.sep, net=guard == "fs+net"):
        if event == "open":
            target, mode, flags = args
            if isinstance(mode, str):
                writes = any(c in mode for c in "wax+")
            else:
                writes = bool(flags & _WRITE_FLAGS)
            targets = [target] if writes else []
        elif event in _FS_EVENTS:
            targets = args
        elif net and event in _NET_EVENTS:
            raise PermissionError("sandbox: network access is disabled")
        else:
            return
        for t in targets:
            if isinstance(t, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(t))
                if p != "/dev/null" and not (p + os.sep).startswith(inside):
                    raise PermissionError(f"sandbox: no writes outside {wd}: {p}")

    sys.addaudithook(_guard)
sys.argv[:] = [prog]
sys.path[:] = [wd, *path.split("\n")]
import builtins
builtins.exit = builtins.quit = sys.exit
main = type(sys)("__main__")
main.__file__ = prog
main.__builtins__ = builtins
sys.modules["__main__"] = main
with open(prog, "rb") as f:
    code = compile(f.read(), prog, "exec")
exec(code, main.__dict__)
"""


class SandboxUnavailable(RuntimeError):
    """Nothing on this machine bounds the program's processes, and weaker containment was not
    allowed explicitly. The message is one line naming what to install or allow."""


def allow_weak_containment(allow: bool = True) -> None:
    """Let every later call of this process run where nothing bounds the number of processes
    (what ``--allow-weak-sandbox`` asks for); ``run_code(allow_weak=...)`` overrides it."""
    global _ALLOW_WEAK
    _ALLOW_WEAK = bool(allow)


@dataclass(frozen=True)
class Outcome:
    """What a sandboxed program did.

    status: "ok" (exit 0), "error" (non-zero exit), "timeout" (wall clock exceeded, the whole
    sandbox killed), "memory" (MemoryError or allocation failure under the address-space
    limit), "killed" (ended by a signal, e.g. SIGXCPU / SIGKILL from the CPU-time limit, or
    by the supervisor for too many processes).
    returncode: exit status, negative signal number when killed, None on timeout.
    stdout / stderr: the last ``max_output`` bytes of each, decoded as UTF-8 (bad bytes
    replaced). seconds: wall time of the whole call.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    output_truncated: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class _Interpreter:
    """How the sandboxed interpreter is laid out, computed once from the host's."""

    sys_path: tuple[str, ...]  # `python -I`'s sys.path on the host, given to `-S` runs
    hidden: tuple[str, ...]  # covered by an empty tmpfs under bwrap (/tmp, home, 0700 folders)
    exposed: tuple[str, ...]  # interpreter folders under `hidden`, bound back read-only
    folders: tuple[str, ...]  # every folder the interpreter needs
    reachable: bool  # any uid can reach and read them as they lie (no bind mounts needed)
    readable: bool  # any uid can read them once bound back (their own modes allow it)


@dataclass(frozen=True)
class _CgroupRoot:
    """A folder where this process can make pids cgroups."""

    path: str
    version: int  # 1 (the v1 pids hierarchy) or 2 (unified)


@dataclass(frozen=True)
class _Plan:
    """Per-backend settings that do not change between calls."""

    backend: Backend
    drop_uid: bool  # root only: run the program as a uid of its own
    guard: str  # audit hook: "" none, "fs" refuse writes outside, "fs+net" also sockets
    cgroup: _CgroupRoot | None  # a pids cgroup per call is made here
    bounds: tuple[str, ...]  # what bounds the process count: "cgroup", "uid", "supervisor"


@dataclass(frozen=True)
class Containment:
    """What a backend contains on this machine (``python -m trainables.sandbox --check``).

    lines: (aspect, what the sandbox does), for network, filesystem, processes, uid, memory,
    leftovers, environment and output. weaknesses: what is weaker than bwrap with a bounded
    process count. refusal: why ``run_code`` refuses to run (without ``allow_weak``), or None.
    """

    backend: Backend
    bounds: tuple[str, ...]
    lines: tuple[tuple[str, str], ...]
    weaknesses: tuple[str, ...]
    refusal: str | None

    @property
    def fail_closed(self) -> bool:
        """Every line is enforced by the kernel and the process count is bounded."""
        return not self.weaknesses and self.refusal is None

    def summary(self) -> str:
        """One line, e.g. ``bwrap; processes bounded by: cgroup, uid``."""
        bounds = ", ".join(self.bounds) if self.bounds else "nothing"
        weak = "" if self.fail_closed else "; weak: " + "; ".join(
            (["processes not bounded"] if self.refusal else []) + list(self.weaknesses))
        return f"{self.backend}; processes bounded by: {bounds}{weak}"[:490]


class _Tail:
    """Keeps the last ``limit`` bytes of a stream, so 100 MB of output costs 64 KiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]
            self.truncated = True

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _searchable_by_others(path: str) -> bool:
    """Whether every folder from / down to ``path`` lets any uid pass (o+x)."""
    current = Path(path)
    for folder in [current, *current.parents] if current.is_dir() else current.parents:
        try:
            if not folder.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _open_to_others(folder: str) -> bool:
    """Whether any uid may list and enter ``folder`` itself (o+rx), whatever its parents."""
    try:
        return os.stat(folder).st_mode & 0o005 == 0o005
    except OSError:
        return False


def _inside(path: str, folders: tuple[str, ...] | list[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or below one of them."""
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _topmost(paths: set[str]) -> tuple[str, ...]:
    """``paths`` without those inside another one, sorted so parents come first."""
    kept: list[str] = []
    for p in sorted(paths, key=lambda p: (p.count(os.sep), p)):
        if not _inside(p, kept):
            kept.append(p)
    return tuple(kept)


@functools.cache
def _interpreter() -> _Interpreter:
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; print('\\n'.join(sys.path))"],
        capture_output=True, text=True, check=True, env={"PATH": os.defpath},
    )
    sys_path = tuple(p for p in probe.stdout.splitlines() if p and os.path.exists(p))
    real_exe = os.path.realpath(sys.executable)
    folders = {
        os.path.abspath(f) for f in (
            *(p if os.path.isdir(p) else os.path.dirname(p) for p in sys_path),
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(sys.executable), os.path.dirname(real_exe),
        )
    }
    # bwrap mounts an empty tmpfs on /tmp: a virtual environment there must be bound back.
    hidden = {"/tmp"}
    home = os.path.expanduser("~")
    if home != "/" and os.path.isdir(home):
        hidden.add(os.path.abspath(home))
    for folder in folders:
        for parent in reversed(Path(folder).parents):  # from / downwards
            if str(parent) != "/" and not parent.stat().st_mode & 0o001:
                hidden.add(str(parent))
                break
    hidden_top = _topmost(hidden)
    exposed = {f for f in folders if _inside(f, hidden_top)}
    stdlib_os = os.path.join(os.path.dirname(os.__file__), "os.py")
    readable = (
        all(_open_to_others(f) for f in folders)
        and os.stat(real_exe).st_mode & 0o001 != 0
        and (not os.path.exists(stdlib_os) or os.stat(stdlib_os).st_mode & 0o004 != 0)
    )
    reachable = readable and all(
        _searchable_by_others(f) for f in (*folders, tempfile.gettempdir()))
    return _Interpreter(
        sys_path=sys_path, hidden=hidden_top, exposed=_topmost(exposed),
        folders=tuple(sorted(folders)), reachable=reachable, readable=readable,
    )


# --------------------------------------------------------------------------- pids cgroups
def _cgroup_candidates() -> list[_CgroupRoot]:
    """Folders that could hold per-call pids cgroups: this process's own cgroup (and, for
    v2, the hierarchy's root, which may hold processes and children at once)."""
    try:
        own_lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    own = {}  # controllers ("" for v2) -> path inside that hierarchy
    for line in own_lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            own[parts[1]] = parts[2]
    found: list[_CgroupRoot] = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, mountpoint, fstype, options = fields[3], fields[4], rest[0], rest[2].split(",")
        if fstype == "cgroup2":
            path, version = own.get(""), 2
        elif fstype == "cgroup" and "pids" in options:
            path = next((p for c, p in own.items() if "pids" in c.split(",")), None)
            version = 1
        else:
            continue
        if path is None or not (root == "/" or path == root or path.startswith(root + "/")):
            continue
        relative = path[len(root):] if root != "/" else path
        folder = os.path.normpath(os.path.join(mountpoint, relative.lstrip("/")))
        candidates = [folder]
        if version == 2 and folder != mountpoint:
            candidates.append(mountpoint)
        for c in candidates:
            if version == 2:
                try:
                    if "pids" not in Path(c, "cgroup.subtree_control").read_text().split():
                        continue
                except OSError:
                    continue
            found.append(_CgroupRoot(c, version))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _cgroup_root() -> _CgroupRoot | None:
    """Where per-call pids cgroups can be made, tried once (None: nowhere; the other bounds
    apply). Empty cgroups left by callers that died are removed on the way."""
    if os.environ.get("APIUPDATE_SANDBOX_CGROUP", "1") == "0" or not os.access(_SH, os.X_OK):
        return None
    for candidate in _cgroup_candidates():
        try:
            for entry in os.scandir(candidate.path):
                parts = entry.name.split("-")
                if len(parts) == 4 and parts[0] == "sandbox" and parts[1].isdigit() and (
                        not _pid_alive(int(parts[1]))):
                    try:
                        os.rmdir(entry.path)
                    except OSError:
                        pass
            probe = _cgroup_create(candidate, 8)
        except OSError:
            continue
        _cgroup_remove(probe)
        return candidate
    return None


def _cgroup_create(root: _CgroupRoot, limit: int) -> str:
    """A new pids cgroup under ``root`` allowing ``limit`` tasks (processes and threads)."""
    path = os.path.join(
        root.path, f"sandbox-{os.getpid()}-{next(_cgroup_counter)}-{secrets.token_hex(4)}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(limit))
    except OSError:
        os.rmdir(path)
        raise
    return path


def _cgroup_kill(path: str, version: int) -> None:
    """SIGKILL everything in a call's cgroup (cgroup.kill on v2 where the kernel has it),
    through pidfds of processes checked to be members, so a reused pid is not hit."""
    if version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
            return
        except OSError:
            pass
    name = os.path.basename(path)
    for _ in range(200):
        try:
            pids = Path(path, "cgroup.procs").read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in map(int, pids):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if name in Path(f"/proc/{pid}/cgroup").read_text():
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.001)


def _cgroup_remove(path: str) -> None:
    """rmdir a call's cgroup once the kernel has let go of its last (killed) task."""
    for _ in range(400):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                return
            time.sleep(0.005)


# --------------------------------------------------------------------------- plans
def _plan(backend: Backend) -> _Plan:
    interp = _interpreter()
    if backend == "bwrap":  # the interpreter's folders are bound back at 0755 parents
        drop_uid, guard = _IS_ROOT and interp.readable, ""
    elif backend == "unshare":
        drop_uid, guard = _IS_ROOT and interp.reachable, "fs"
    else:
        drop_uid, guard = _IS_ROOT and interp.reachable, "fs+net"
    # A uid bounds the count for free; moving the launcher into a pids cgroup costs ~3-25 ms a
    # call here (the migration waits for an RCU grace period): 19 -> 44 ms a call for print(1).
    bounds = ["uid"] if drop_uid or not _IS_ROOT else []
    cgroup = None if bounds else _cgroup_root()
    if cgroup is not None:
        bounds.append("cgroup")
    if not bounds and backend != "rlimits":  # a PID namespace the supervisor can count
        bounds.append("supervisor")
    return _Plan(backend, drop_uid, guard, cgroup, tuple(bounds))


@functools.cache
def _tool(name: str) -> str:
    """Absolute path of a containment tool, looked up once in the caller's PATH (the
    sandbox's own PATH would otherwise decide which binary Popen runs)."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed")
    return path


@functools.cache
def _bwrap_has_size() -> bool:
    """bwrap >= 0.7 can cap a tmpfs (--size); older ones (Ubuntu 22.04: 0.6) cannot."""
    result = subprocess.run([_tool("bwrap"), "--help"], capture_output=True, text=True)
    return "--size" in result.stdout


def _bind(option: str, folder: str, hidden: tuple[str, ...], made: set[str]) -> list[str]:
    """bwrap arguments binding ``folder`` at its own path. Parents inside a hidden folder are
    made with --dir first: bwrap would create them with mode 0700, out of a dropped uid's
    reach."""
    args: list[str] = []
    for parent in reversed(Path(folder).parents):
        p = str(parent)
        if _inside(p, hidden) and p not in hidden and p not in made:
            args += ["--dir", p]
            made.add(p)
    return [*args, option, folder, folder]


def _prefix(plan: _Plan, workdir: str, memory_bytes: int) -> list[str]:
    """The containment command placed before the interpreter."""
    if plan.backend == "bwrap":
        interp = _interpreter()
        cmd = [_tool("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for folder in interp.hidden:
            if folder == "/tmp" and _bwrap_has_size():
                # a world-writable /tmp; tmpfs pages escape RLIMIT_AS, so cap it
                cmd += ["--perms", "1777", "--size", str(memory_bytes)]
            cmd += ["--tmpfs", folder]
        made: set[str] = set()
        for folder in interp.exposed:
            cmd += _bind("--ro-bind", folder, interp.hidden, made)
        cmd += [
            # --chdir / : bwrap has no CAP_DAC_OVERRIDE left to enter the sandbox uid's 0700
            # folder; _BOOTSTRAP enters it after the uid drop.
            *_bind("--bind", workdir, interp.hidden, made), "--chdir", "/",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session",
        ]
        if _IS_ROOT:  # keep only what the uid drop in _BOOTSTRAP needs
            cmd += ["--cap-drop", "ALL"]
            if plan.drop_uid:
                cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user"]
        return [*cmd, "--"]
    if plan.backend == "unshare":
        user = [] if _IS_ROOT else ["--user", "--map-root-user"]
        return [
            _tool("unshare"), *user, "--net", "--pid", "--ipc", "--uts",
            "--fork", "--kill-child", "--mount-proc", "--",
        ]
    return []


# --------------------------------------------------------------------------- processes
def _uid_tasks(uid: int) -> list[int]:
    """Pids whose real uid is ``uid``, read from /proc/PID/status (directory ownership is
    root's once a process has changed uid, so stat() would miss them)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry.name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _count_own_tasks() -> int:
    """Threads and processes of the caller's uid: RLIMIT_NPROC counts both."""
    count = 0
    for pid in _uid_tasks(os.getuid()):
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


def _descendants(pid: int) -> int:
    """Live processes below ``pid``. Inside a PID namespace every process descends from its
    init (orphans are reparented to it), so none is missed by leaving the session."""
    count, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            count += len(children)
            stack += map(int, children)
    return count


def _kill_uid(uid: int) -> None:
    """Kill every process of a sandbox uid; repeat while a forking program races us."""
    for _ in range(100):
        pids = _uid_tasks(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_children(pid: int) -> bool:
    """SIGKILL the direct children of ``pid``, through pidfds so a pid reused between
    reading the list and signalling cannot be hit. False when the kernel does not list
    children (CONFIG_PROC_CHILDREN off)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    for child in children:
        try:
            fd = os.pidfd_open(int(child))
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the sandbox's process group. Called before the leader is reaped, so its pid
    (the group id) cannot have been reused."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _environment(workdir: str) -> dict[str, str]:
    """The whole environment of the program: nothing of the caller's is inherited."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        # BLAS / OpenMP pools start one thread per core and count against the process limit.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _remove_tree(folder: str) -> None:
    """Delete the work folder even where the program removed its own permissions."""

    def unlock(func, path, _exc_info) -> None:  # type: ignore[no-untyped-def]
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=unlock)


def _status(returncode: int | None, stderr: str) -> Status:
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "ok"
    lines = stderr.rstrip().splitlines()
    if lines and any(marker in lines[-1] for marker in _MEMORY_MARKERS):
        return "memory"
    return "killed" if returncode < 0 else "error"


def _supervise(
    cmd: list[str], workdir: str, stdin: bytes | None, timeout: float, max_output: int,
    sandbox_uid: int | None, plan: _Plan, cgroup: str | None, max_descendants: int | None,
) -> tuple[int | None, _Tail, _Tail, bool]:
    """Run ``cmd``, reading both pipes incrementally in this thread until the program exits
    and its pipes close (or the deadline passes), and kill everything it left behind.
    ``max_descendants``: the supervisor's process count (None: not counted here). Returns the
    exit status (None on timeout), both tails, and whether the count was exceeded.

    The exit is watched through a pidfd, which becomes readable when the leader exits without
    reaping it: the process group can be killed afterwards without a pid-reuse race.
    """
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment(workdir),
        cwd=workdir, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    out, err = _Tail(max_output), _Tail(max_output)
    pending = memoryview(stdin or b"")
    exited_at: float | None = None
    too_many = False
    pidfd = os.pidfd_open(proc.pid)

    def kill_all() -> None:
        if plan.backend != "rlimits" and exited_at is None:
            # The leader is bwrap's or unshare's monitor; its child is the namespace's init.
            # Killing the init first makes the kernel kill and reap the whole namespace, and
            # the monitor exits only after that, so waiting for the monitor means nothing of
            # the program is left. (Killing the monitor instead would leave the namespace to
            # die asynchronously, after run_code has returned.)
            if _kill_children(proc.pid):
                select.select([pidfd], [], [], _TEARDOWN_S)
        _kill_group(proc)
        if cgroup is not None and plan.cgroup is not None:
            _cgroup_kill(cgroup, plan.cgroup.version)
        if sandbox_uid is not None and plan.backend == "rlimits":
            _kill_uid(sandbox_uid)

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ, "exit")
            sel.register(proc.stdout, selectors.EVENT_READ, out)  # type: ignore[arg-type]
            sel.register(proc.stderr, selectors.EVENT_READ, err)  # type: ignore[arg-type]
            if proc.stdin is not None:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
            while any(isinstance(k.data, _Tail) for k in sel.get_map().values()) or (
                exited_at is None
            ):
                now = time.monotonic()
                # After the exit, pipes still held by leftovers get _EXIT_GRACE_S to drain.
                until = deadline if exited_at is None else exited_at + _EXIT_GRACE_S
                if now >= until:
                    break
                wait = until - now
                if max_descendants is not None and exited_at is None:
                    if _descendants(proc.pid) > max_descendants:
                        too_many = True
                        break
                    wait = min(wait, _POLL_S)
                for key, _ in sel.select(wait):
                    if key.data == "exit":
                        exited_at = time.monotonic()
                        sel.unregister(pidfd)
                        kill_all()
                    elif key.data == "stdin":
                        try:
                            written = os.write(key.fd, pending[:_READ_CHUNK])
                        except BrokenPipeError:  # the program stopped reading
                            written = len(pending)
                        pending = pending[written:]
                        if not pending:
                            sel.unregister(key.fileobj)
                            key.fileobj.close()  # type: ignore[union-attr]
                    elif chunk := os.read(key.fd, _READ_CHUNK):
                        key.data.add(chunk)
                    else:
                        sel.unregister(key.fileobj)
        if exited_at is None:
            kill_all()
    finally:
        os.close(pidfd)
    returncode = proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if too_many:
        return -signal.SIGKILL, out, err, True
    if exited_at is None:
        return None, out, err, False
    if plan.backend == "bwrap" and 128 < returncode < 128 + signal.NSIG:
        returncode = 128 - returncode  # bwrap exits 128 + N when the program died of signal N
    return returncode, out, err, False


def _run(
    source: bytes, *, timeout: float, memory_mb: int, max_processes: int, max_output: int,
    stdin: str | None, backend: Backend | None, allow_weak: bool | None,
) -> Outcome:
    start = time.monotonic()
    plan = _plan(backend or detect_backend())
    if not plan.bounds:
        if not (_ALLOW_WEAK if allow_weak is None else allow_weak):
            raise SandboxUnavailable(_refusal(plan))
        if not getattr(_probing, "active", False):
            _warn_unbounded(plan.backend)
    interp = _interpreter()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    cgroup = None
    try:
        program = os.path.join(workdir, "main.py")
        with open(program, "wb") as f:
            f.write(source)
        sandbox_uid = None
        ids = ""
        nproc = max_processes
        if plan.drop_uid:
            sandbox_uid = _UID_BASE + ((os.getpid() & 0xFFFF) << 8 | next(_call_counter) & 0xFF)
            ids = f"{sandbox_uid}:{sandbox_uid}"
            os.chown(workdir, sandbox_uid, sandbox_uid)
            os.chown(program, sandbox_uid, sandbox_uid)
        elif plan.backend == "rlimits" and not _IS_ROOT:  # no namespace: the uid's total
            nproc = _count_own_tasks() + max_processes
        memory_bytes = memory_mb << 20
        cpu_seconds = math.ceil(timeout) + 1  # a backstop: the wall clock normally ends it first
        limits = f"{memory_bytes},{cpu_seconds},{nproc},{_MAX_FILE_BYTES},{_MAX_OPEN_FILES}"
        cmd = [
            *_prefix(plan, workdir, memory_bytes), sys.executable, *_PYTHON_FLAGS,
            "-c", _BOOTSTRAP, program, workdir, limits, ids, plan.guard,
            "\n".join(interp.sys_path),
        ]
        if plan.cgroup is not None:
            try:
                cgroup = _cgroup_create(plan.cgroup, max_processes + _OVERHEAD[plan.backend])
            except OSError as e:  # it worked when detected: fail closed rather than run unbounded
                raise SandboxUnavailable(
                    f"sandbox: cannot make a pids cgroup in {plan.cgroup.path} any more: {e}"
                ) from None
            cmd = [_SH, "-c", _ENTER_CGROUP, os.path.join(cgroup, "cgroup.procs"), *cmd]
        # The supervisor counts processes below the launcher: bwrap's init and the program's.
        max_descendants = (
            max_processes + _OVERHEAD[plan.backend] - 1 if "supervisor" in plan.bounds else None)
        returncode, out, err, too_many = _supervise(
            cmd, workdir, None if stdin is None else stdin.encode("utf-8"), timeout,
            max_output, sandbox_uid, plan, cgroup, max_descendants,
        )
    finally:
        if cgroup is not None:
            _cgroup_remove(cgroup)
        _remove_tree(workdir)
    if too_many:
        err.add(f"\nsandbox: killed: more than {max_processes} processes\n".encode())
    stderr = err.text()
    return Outcome(
        status=_status(returncode, stderr), returncode=returncode, stdout=out.text(),
        stderr=stderr, seconds=round(time.monotonic() - start, 4),
        output_truncated=out.truncated or err.truncated,
    )


# --------------------------------------------------------------------------- detection
_PROBE = "import email.mime.text, json; print('ok')"  # stdlib files not loaded at start-up
_WEAKNESS = {
    "unshare": "the host's files stay writable where permissions allow (only Python-level "
    "writes outside the work folder are refused)",
    "rlimits": "no namespaces: network and file writes are refused only by a Python audit "
    "hook that ctypes or child processes can bypass",
}
_INSTALL = "install bubblewrap (apt-get install -y bubblewrap)"


def _allowed_backends() -> tuple[Backend, ...]:
    """BACKENDS, or the subset APIUPDATE_SANDBOX_BACKENDS names (to emulate a machine
    without bubblewrap, say)."""
    text = os.environ.get("APIUPDATE_SANDBOX_BACKENDS", "").strip()
    if not text:
        return BACKENDS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"APIUPDATE_SANDBOX_BACKENDS: unknown backend(s) {', '.join(unknown)}; "
                         f"use {', '.join(BACKENDS)}")
    return tuple(b for b in BACKENDS if b in names)


def _unbounded(plan: _Plan) -> str:
    return (
        f"nothing bounds the number of processes here (the {plan.backend!r} backend as root, "
        "where RLIMIT_NPROC is not enforced; no pids cgroup can be made; the interpreter's "
        "folders are not readable by other uids)"
    )


def _refusal(plan: _Plan) -> str:
    """The one line SandboxUnavailable says."""
    return (
        f"sandbox: {_unbounded(plan)}; {_INSTALL}, make a pids cgroup writable, or allow "
        "weaker containment explicitly (--allow-weak-sandbox, allow_weak=True)"
    )


_probing = threading.local()  # .active: _run is probing (a trusted program), not warning


def _probe(backend: Backend) -> str | None:
    """Why ``backend`` cannot run a program here, or None when it can."""
    if backend != "rlimits" and shutil.which(backend) is None:
        return f"{backend} is not installed"
    _probing.active = True
    try:
        outcome = _run(
            _PROBE.encode(), timeout=10.0, memory_mb=512, max_processes=32, max_output=4096,
            stdin=None, backend=backend, allow_weak=True,
        )
    finally:
        _probing.active = False
    if outcome.status == "ok" and outcome.stdout == "ok\n":
        return None
    return f"{backend} probe {outcome.status}: {outcome.stderr.strip()[-300:]}"


@functools.cache
def available_backends() -> tuple[Backend, ...]:
    """Every backend that runs a program on this machine, strongest first (probed once)."""
    return tuple(b for b in BACKENDS if _probe(b) is None)


def detect_backend() -> Backend:
    """The strongest working backend, probed once per process. Warns once when it is not
    bwrap, saying what is weaker and why bwrap was not used."""
    with _DETECT_LOCK:  # reward functions may call from several threads at once
        return _detect_backend()


@functools.cache
def _detect_backend() -> Backend:
    allowed = _allowed_backends()
    reasons = [f"{b} excluded by APIUPDATE_SANDBOX_BACKENDS" for b in BACKENDS if b not in allowed]
    for backend in allowed:
        reason = _probe(backend)
        if reason is None:
            c = containment(backend)
            # Where the run will be refused, SandboxUnavailable's line says it all; a run with
            # weak containment allowed warns in _run.
            if backend != "bwrap" and c.refusal is None:
                warnings.warn(
                    f"sandbox: using the {backend!r} backend ({'; '.join(reasons)}); containment "
                    f"is weaker: {'; '.join(c.weaknesses)}. {_INSTALL[0].upper()}{_INSTALL[1:]}.",
                    RuntimeWarning, stacklevel=5,
                )
            return backend
        reasons.append(reason)
    raise SandboxUnavailable(f"sandbox: no backend can run Python here: {'; '.join(reasons)}")


@functools.cache
def _warn_unbounded(backend: Backend) -> None:
    """Once per process and backend: a run with nothing bounding its processes, as allowed."""
    warnings.warn(
        f"sandbox: {_unbounded(_plan(backend))}; running anyway, as allowed explicitly",
        RuntimeWarning, stacklevel=5,
    )


def containment(backend: Backend | None = None) -> Containment:
    """What ``backend`` (default: the detected one) contains on this machine."""
    backend = backend or detect_backend()
    plan = _plan(backend)
    interp = _interpreter()
    weak: list[str] = []
    lines: list[tuple[str, str]] = []
    if backend == "rlimits":
        lines.append(("network", "sockets refused by a Python audit hook only"))
        lines.append(("filesystem", "writes outside the work folder refused by a Python audit "
                                    "hook only"))
        weak.append(_WEAKNESS["rlimits"])
    else:
        lines.append(("network", "a new, empty network namespace (no route to the host's "
                                 "127.0.0.1 listeners)"))
        if backend == "bwrap":
            bound = ", ".join(interp.exposed) or "nothing"
            lines.append(("filesystem", f"read-only root; private /dev, /proc and /tmp; hidden "
                                        f"under empty tmpfs: {', '.join(interp.hidden)}; "
                                        f"bound back read-only: {bound}; writable: the work "
                                        "folder"))
        else:
            lines.append(("filesystem", "host files writable where permissions allow; Python-"
                                        "level writes outside the work folder refused"))
            weak.append(_WEAKNESS["unshare"])
    how = []
    if plan.cgroup is not None:
        how.append(f"a pids cgroup per call under {plan.cgroup.path} (v{plan.cgroup.version})")
    if plan.drop_uid:
        how.append("RLIMIT_NPROC of a uid of its own")
    elif not _IS_ROOT:
        how.append("RLIMIT_NPROC of a user namespace's uid" if backend != "rlimits"
                   else "RLIMIT_NPROC of the caller's uid (its current tasks + the limit)")
    if "supervisor" in plan.bounds:
        how.append(f"the supervisor's count every {_POLL_S * 1000:g} ms (a burst between two "
                   "counts can briefly exceed it; then everything is killed)")
    refusal = None if plan.bounds else _refusal(plan)
    lines.append(("processes", "at most max_processes at once: " + "; ".join(how) if how
                  else "NOT bounded (root, where RLIMIT_NPROC is not enforced)"))
    if plan.drop_uid:
        uid = f"a uid of its own per call (from {_UID_BASE:#x})"
        uid += ", no capabilities" if backend == "bwrap" else ""
    elif _IS_ROOT:
        uid = "root: the interpreter's folders are not readable by other uids"
        if backend == "bwrap":
            uid += " (no capabilities, read-only root)"
        else:
            weak.append("the program runs as root")
    else:
        uid = f"the caller's uid {os.getuid()}" + (
            " (mapped in a user namespace)" if backend != "rlimits" else "")
    lines.append(("uid", uid))
    lines.append(("memory", "RLIMIT_AS of memory_mb per call (also caps the private /tmp)"
                  if backend == "bwrap" else "RLIMIT_AS of memory_mb per call"))
    lines.append(("limits", f"RLIMIT_CPU timeout + 1 s; files {_MAX_FILE_BYTES >> 20} MiB each, "
                            f"{_MAX_OPEN_FILES} open; no core files"))
    if backend == "rlimits":
        leftovers = "killed by process group" + (", cgroup" if plan.cgroup else "") + (
            " and uid" if plan.drop_uid else "")
        if plan.cgroup is None and not plan.drop_uid:
            weak.append("children that call setsid survive the call")
    else:
        leftovers = "the PID namespace dies with the program (setsid children too)"
    lines.append(("leftovers", leftovers))
    lines.append(("environment", "PATH, HOME and TMPDIR (the work folder), LANG, one BLAS "
                                 "thread: nothing of the caller's"))
    lines.append(("output", "the last max_output bytes of stdout and of stderr"))
    return Containment(backend, plan.bounds, tuple(lines), tuple(weak), refusal)


def check(backend: Backend | None = None) -> int:
    """Print which backend runs and what it contains; 0 when containment is fail-closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            backend = backend or detect_backend()
        except SandboxUnavailable as e:
            print(str(e))
            return 1
        c = containment(backend)
    tool = f" ({_tool(backend)})" if backend != "rlimits" else ""
    print(f"backend: {backend}{tool}; works here: {', '.join(available_backends())}")
    for aspect, text in c.lines:
        print(f"  {aspect:<12} {text}")
    for text in c.weaknesses:
        print(f"  weak:        {text}")
    if c.refusal:
        print(f"refuses to run: {c.refusal}")
    elif c.fail_closed:
        print("fail-closed: yes")
    else:
        print(f"fail-closed: no (programs run with the weaknesses above; {_INSTALL})")
    return 0 if c.fail_closed else 1


def run_code(
    source: str, *, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
    max_output: int = 65536, stdin: str | None = None, backend: Backend | None = None,
    allow_weak: bool | None = None,
) -> Outcome:
    """Run a Python program in the sandbox and report what it did.

    timeout: wall-clock seconds; the CPU-time limit is one second more, as a backstop.
    memory_mb: address-space limit (``import pandas`` needs ~370 MB of address space).
    max_processes: processes and threads the program may have at once.
    max_output: bytes kept from the end of stdout and of stderr.
    stdin: text fed to the program; None gives it /dev/null.
    backend: None uses ``detect_backend()``; tests and benchmarks name one to compare.
    allow_weak: run even where nothing bounds the number of processes (None: the process's
    setting, :func:`allow_weak_containment`; off by default). Without it such a machine
    raises :class:`SandboxUnavailable`.
    """
    return _run(
        source.encode("utf-8"), timeout=timeout, memory_mb=memory_mb,
        max_processes=max_processes, max_output=max_output, stdin=stdin, backend=backend,
        allow_weak=allow_weak,
    )


def run_file(
    path: str | os.PathLike[str], *, timeout: float = 5.0, memory_mb: int = 512,
    max_processes: int = 32, max_output: int = 65536, stdin: str | None = None,
    backend: Backend | None = None, allow_weak: bool | None = None,
) -> Outcome:
    """``run_code`` for a program stored in a file; the sandbox runs a copy of it in its own
    folder, so the program cannot touch the original."""
    return _run(
        Path(path).read_bytes(), timeout=timeout, memory_mb=memory_mb,
        max_processes=max_processes, max_output=max_output, stdin=stdin, backend=backend,
        allow_weak=allow_weak,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m trainables.sandbox FILE``: print the outcome as one JSON line, exit 0
    whatever the program did (2 when FILE is missing, 1 when the sandbox refuses to run).
    ``--check``: print the backend and what it contains, exit 0 when that is fail-closed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("file", type=Path, nargs="?", help="Python program to run")
    parser.add_argument("--check", action="store_true",
                        help="print which backend runs and what it contains")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="address-space limit")
    parser.add_argument("--max-processes", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=65536, help="bytes kept per stream")
    parser.add_argument("--allow-weak-sandbox", action="store_true",
                        help="run even where nothing bounds the number of processes")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.file is None or not args.file.is_file():
        print(f"sandbox: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        outcome = run_file(
            args.file, timeout=args.timeout, memory_mb=args.memory_mb,
            max_processes=args.max_processes, max_output=args.max_output,
            allow_weak=args.allow_weak_sandbox,
        )
    except SandboxUnavailable as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
