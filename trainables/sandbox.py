"""Run untrusted, model-generated Python programs in a contained subprocess.

Each call gets a fresh temporary folder, a wall-clock timeout, rlimits (address space, CPU
seconds, processes, file size, open files, no core files), no network, a scrubbed environment,
a bounded tail of stdout and stderr, and, when the program ends, the death of every process it
started. Containment comes from the first backend that works on this machine, found once:

- ``bwrap`` (bubblewrap; ``apt-get install -y bubblewrap``): read-only root, private ``/tmp``,
  ``/dev`` and ``/proc``, the caller's home hidden, new network, PID, IPC and UTS namespaces.
  The PID namespace dies with the program, which also ends children that left its session
  with ``setsid`` / ``start_new_session=True`` (killing a process group does not reach them).
- ``unshare`` (util-linux): the same namespaces, but the host's files stay writable wherever
  file permissions allow; an audit hook refuses Python-level writes outside the folder.
- ``rlimits``: no namespaces; the audit hook also refuses sockets, which code run through
  ``ctypes`` or a child process can get around. Leftover children are killed by their
  process group and, when the sandbox has its own uid, by that uid.

Process limits: the kernel ignores ``RLIMIT_NPROC`` for uid 0 (DESIGN.md section 5: a
plain-rlimits sandbox run as root let a bounded fork bomb reach 2,000 live processes), so a
program never runs as the caller's uid 0. As root, the program drops to a uid of its own
(``_UID_BASE`` + pid and call counter, so concurrent sandboxes do not share a budget);
under ``bwrap`` it keeps only CAP_SETUID/CAP_SETGID until that drop, and the caller's home is
covered with an empty tmpfs and the interpreter's folders bound back read-only, because a
pyenv interpreter under ``/root`` (mode 0700) is otherwise out of the dropped uid's reach.
The weaker backends drop the uid only where the interpreter is reachable by other users.
As a non-root caller nothing can switch uids, so ``bwrap`` and ``unshare`` open a user
namespace, where the kernel counts ``RLIMIT_NPROC`` per (namespace, uid): the limit set inside
counts the sandbox's own processes only, not the caller's others. Under ``rlimits`` as
non-root the limit is the caller's current task count plus ``max_processes``.

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

Needs Linux >= 5.3 (pidfds watch the program's exit without a pid-reuse race) and, for a
prompt teardown on timeout, /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
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
_DETECT_LOCK = threading.Lock()
# Generated programs write small files (CSV, JSON); 64 MiB bounds a runaway writer on disk.
_MAX_FILE_BYTES = 64 << 20
_MAX_OPEN_FILES = 256
# After the program exits, how long to keep draining pipes that leftover children may hold.
_EXIT_GRACE_S = 0.2
# After killing a namespace's init on timeout, how long the kernel may take to reap the rest.
_TEARDOWN_S = 5.0
_READ_CHUNK = 1 << 16
# Last stderr line of a program that ran out of address space (Python, NumPy, C++, glibc).
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_PYTHON_FLAGS = ("-I", "-S", "-B", "-X", "utf8")

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


@dataclass(frozen=True)
class Outcome:
    """What a sandboxed program did.

    status: "ok" (exit 0), "error" (non-zero exit), "timeout" (wall clock exceeded, the whole
    sandbox killed), "memory" (MemoryError or allocation failure under the address-space
    limit), "killed" (ended by a signal, e.g. SIGXCPU / SIGKILL from the CPU-time limit).
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
    hidden: tuple[str, ...]  # covered by an empty tmpfs under bwrap (home, private folders)
    exposed: tuple[str, ...]  # interpreter folders under `hidden`, bound back read-only
    reachable: bool  # every interpreter folder is searchable by any uid


@dataclass(frozen=True)
class _Plan:
    """Per-backend settings that do not change between calls."""

    backend: Backend
    drop_uid: bool  # root only: run the program as a uid of its own
    guard: str  # audit hook: "" none, "fs" refuse writes outside, "fs+net" also sockets


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
    folders = {
        *(p if os.path.isdir(p) else os.path.dirname(p) for p in sys_path),
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
        os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
    }
    hidden = set()
    home = os.path.expanduser("~")
    if home != "/" and os.path.isdir(home):
        hidden.add(home)
    for folder in folders:
        for parent in reversed(Path(folder).parents):  # from / downwards
            if str(parent) != "/" and not parent.stat().st_mode & 0o001:
                hidden.add(str(parent))
                break
    hidden_top = _topmost(hidden)
    exposed = {f for f in folders if _inside(f, hidden_top)}
    return _Interpreter(
        sys_path=sys_path, hidden=hidden_top, exposed=_topmost(exposed),
        reachable=all(_searchable_by_others(f) for f in folders),
    )


def _plan(backend: Backend) -> _Plan:
    reachable = _interpreter().reachable
    if backend == "bwrap":
        return _Plan(backend, drop_uid=_IS_ROOT, guard="")
    if backend == "unshare":
        return _Plan(backend, drop_uid=_IS_ROOT and reachable, guard="fs")
    return _Plan(backend, drop_uid=_IS_ROOT and reachable, guard="fs+net")


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


def _prefix(plan: _Plan, workdir: str, memory_bytes: int) -> list[str]:
    """The containment command placed before the interpreter."""
    if plan.backend == "bwrap":
        interp = _interpreter()
        cmd = [_tool("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        if _bwrap_has_size():  # a world-writable /tmp; tmpfs pages escape RLIMIT_AS, so cap it
            cmd += ["--perms", "1777", "--size", str(memory_bytes)]
        cmd += ["--tmpfs", "/tmp"]
        for folder in interp.hidden:
            cmd += ["--tmpfs", folder]
        for folder in interp.exposed:
            # bwrap would create the missing parents of a mount point with mode 0700, out of
            # the dropped uid's reach; --dir makes them 0755.
            parents = [
                p for p in Path(folder).parents
                if _inside(str(p), interp.hidden) and str(p) not in interp.hidden
            ]
            for parent in reversed(parents):
                cmd += ["--dir", str(parent)]
            cmd += ["--ro-bind", folder, folder]
        cmd += [
            # --chdir / : bwrap has no CAP_DAC_OVERRIDE left to enter the sandbox uid's 0700
            # folder; _BOOTSTRAP enters it after the uid drop.
            "--bind", workdir, workdir, "--chdir", "/",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session",
        ]
        if _IS_ROOT:  # keep only what the uid drop in _BOOTSTRAP needs
            cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
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
    sandbox_uid: int | None, plan: _Plan,
) -> tuple[int | None, _Tail, _Tail]:
    """Run ``cmd``, reading both pipes incrementally in this thread until the program exits
    and its pipes close (or the deadline passes), and kill everything it left behind.

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
                for key, _ in sel.select(until - now):
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
    if exited_at is None:
        return None, out, err
    if plan.backend == "bwrap" and 128 < returncode < 128 + signal.NSIG:
        returncode = 128 - returncode  # bwrap exits 128 + N when the program died of signal N
    return returncode, out, err


def _run(
    source: bytes, *, timeout: float, memory_mb: int, max_processes: int, max_output: int,
    stdin: str | None, backend: Backend | None,
) -> Outcome:
    start = time.monotonic()
    plan = _plan(backend or detect_backend())
    interp = _interpreter()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
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
        returncode, out, err = _supervise(
            cmd, workdir, None if stdin is None else stdin.encode("utf-8"), timeout,
            max_output, sandbox_uid, plan,
        )
    finally:
        _remove_tree(workdir)
    stderr = err.text()
    return Outcome(
        status=_status(returncode, stderr), returncode=returncode, stdout=out.text(),
        stderr=stderr, seconds=round(time.monotonic() - start, 4),
        output_truncated=out.truncated or err.truncated,
    )


_PROBE = "import email.mime.text, json; print('ok')"  # stdlib files not loaded at start-up
_WEAKNESS = {
    "unshare": "the host's files stay writable where permissions allow (only Python-level "
    "writes outside the work folder are refused)",
    "rlimits": "no namespaces: network and file writes are refused only by a Python audit "
    "hook that ctypes or child processes can bypass, and children that call setsid "
    "survive unless the sandbox has its own uid",
}


def _probe(backend: Backend) -> str | None:
    """Why ``backend`` cannot run a program here, or None when it can."""
    if backend != "rlimits" and shutil.which(backend) is None:
        return f"{backend} is not installed"
    outcome = _run(
        _PROBE.encode(), timeout=10.0, memory_mb=512, max_processes=32, max_output=4096,
        stdin=None, backend=backend,
    )
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
    reasons: list[str] = []
    for backend in BACKENDS:
        reason = _probe(backend)
        if reason is None:
            if reasons:
                weaker = _WEAKNESS[backend]
                if _IS_ROOT and not _plan(backend).drop_uid:
                    weaker += "; the interpreter is not reachable by other uids, so the " \
                        "program runs as root and RLIMIT_NPROC is not enforced"
                warnings.warn(
                    f"sandbox: using the {backend!r} backend ({'; '.join(reasons)}); "
                    f"containment is weaker: {weaker}. Install bubblewrap "
                    "(apt-get install -y bubblewrap).", RuntimeWarning, stacklevel=4,
                )
            return backend
        reasons.append(reason)
    raise RuntimeError(f"sandbox: no backend can run Python here: {'; '.join(reasons)}")


def run_code(
    source: str, *, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
    max_output: int = 65536, stdin: str | None = None, backend: Backend | None = None,
) -> Outcome:
    """Run a Python program in the sandbox and report what it did.

    timeout: wall-clock seconds; the CPU-time limit is one second more, as a backstop.
    memory_mb: address-space limit (``import pandas`` needs ~370 MB of address space).
    max_processes: processes and threads the program may have at once.
    max_output: bytes kept from the end of stdout and of stderr.
    stdin: text fed to the program; None gives it /dev/null.
    backend: None uses ``detect_backend()``; tests and benchmarks name one to compare.
    """
    return _run(
        source.encode("utf-8"), timeout=timeout, memory_mb=memory_mb,
        max_processes=max_processes, max_output=max_output, stdin=stdin, backend=backend,
    )


def run_file(
    path: str | os.PathLike[str], *, timeout: float = 5.0, memory_mb: int = 512,
    max_processes: int = 32, max_output: int = 65536, stdin: str | None = None,
    backend: Backend | None = None,
) -> Outcome:
    """``run_code`` for a program stored in a file; the sandbox runs a copy of it in its own
    folder, so the program cannot touch the original."""
    return _run(
        Path(path).read_bytes(), timeout=timeout, memory_mb=memory_mb,
        max_processes=max_processes, max_output=max_output, stdin=stdin, backend=backend,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m trainables.sandbox FILE``: print the outcome as one JSON line, exit 0
    whatever the program did (2 when FILE is missing)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("file", type=Path, help="Python program to run")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="address-space limit")
    parser.add_argument("--max-processes", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=65536, help="bytes kept per stream")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(f"sandbox: no such file: {args.file}", file=sys.stderr)
        return 2
    outcome = run_file(
        args.file, timeout=args.timeout, memory_mb=args.memory_mb,
        max_processes=args.max_processes, max_output=args.max_output,
    )
    print(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
