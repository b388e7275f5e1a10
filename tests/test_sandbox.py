"""The sandbox contains hostile programs and leaves the host as it was.

Every hostile program is bounded so that it cannot hurt the host even if containment broke
(a fork bomb stops at 2,000 forks whose children sleep 30 s; ``sleep`` children carry a unique
marker so the test can find them on the host), and every test checks the host afterwards,
not only the outcome. Tests named ``..._all_backends`` run on every backend that works here
(weak containment allowed explicitly): they cover what even the weakest one promises. The
others run on the backend run_code picks, which must be bubblewrap wherever bwrap is installed
(CI installs it). ``test_install_layouts_contain_everything`` runs the sandbox from virtual
environments under /tmp and in a 0700 folder, as root and as another user.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from trainables import sandbox
from trainables.sandbox import SandboxUnavailable, available_backends, detect_backend, run_code

REPO = Path(__file__).resolve().parents[1]
ALL_BACKENDS = available_backends()
SLACK_S = 3.0  # allowed beyond the timeout: sandbox start-up and teardown on 2 busy cores


def marker(seconds: int = 1000) -> str:
    """A unique ``sleep`` duration, ``seconds``.<12 digits>, findable in the host's process
    table."""
    return f"{seconds}.{uuid.uuid4().int % 10**12:012d}"


def host_pids_with(text: str) -> list[int]:
    """Live host processes whose command line contains ``text``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def host_process_count() -> int:
    return sum(1 for e in os.scandir("/proc") if e.name.isdigit())


def test_bwrap_is_used_when_installed() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install -y bubblewrap)")
    assert detect_backend() == "bwrap"


def test_ok_program_returns_stdout() -> None:
    outcome = run_code("print('hello', 6 * 7)")
    assert outcome.status == "ok" and outcome.returncode == 0
    assert outcome.stdout == "hello 42\n"
    assert not outcome.output_truncated
    assert outcome.to_dict()["stdout"] == "hello 42\n"


def test_syntax_error_is_error() -> None:
    outcome = run_code("def f(:\n    pass\n")
    assert outcome.status == "error" and outcome.returncode == 1
    assert "SyntaxError" in outcome.stderr


def test_sys_exit_code_is_kept() -> None:
    outcome = run_code("import sys\nsys.exit(3)")
    assert outcome.status == "error" and outcome.returncode == 3


def test_stdin_reaches_program() -> None:
    outcome = run_code("print(input()[::-1])", stdin="olleh\n")
    assert outcome.status == "ok" and outcome.stdout == "hello\n"


def test_signal_death_is_killed() -> None:
    outcome = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert outcome.status == "killed" and outcome.returncode == -9


def bomb(mark: str, forks: int = 2000, hold: float = 0.3) -> str:
    """A fork bomb of ``forks`` whose children sleep; it prints how many forks succeeded after
    holding them ``hold`` seconds (so a watcher sees the plateau)."""
    return f"""
import os, time
n = 0
for _ in range({forks}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{mark}"])
    n += 1
time.sleep({hold})
print(n)
"""


def run_watched(mark: str, **kwargs) -> tuple[sandbox.Outcome, int, float]:
    """run_code while a thread counts the host's processes carrying ``mark``: (outcome, the
    most seen alive at once, seconds)."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], len(host_pids_with(mark)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        outcome = run_code(bomb(mark), **kwargs)
    finally:
        done.set()
        watcher.join()
    return outcome, peak[0], time.monotonic() - start


def test_fork_bomb_is_bounded() -> None:
    mark = marker(seconds=30)  # a breach leaves up to 2,000 sleepers for 30 s, not longer
    before = host_process_count()
    outcome, peak, seconds = run_watched(mark, timeout=10, max_processes=16)
    assert seconds < 10 + SLACK_S
    assert outcome.status == "ok", outcome.stderr
    forks = int(outcome.stdout)
    assert 0 < forks < 16  # the limit stopped it, and counts the program itself
    assert 0 < peak <= forks
    assert host_pids_with(mark) == []
    # Other work shares this machine, so allow drift, far below the 2,000 of a breach.
    assert host_process_count() < before + 200


def _unreadable_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the interpreter's own folders were 0700: no uid can be dropped to."""
    real = sandbox._interpreter()
    monkeypatch.setattr(sandbox, "_interpreter", lambda: replace(real, readable=False, reachable=False))


def _no_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_cgroup_root", lambda: None)


@pytest.mark.parametrize("bound", ["cgroup", "uid"])
def test_each_bound_alone_stops_a_fork_bomb(bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pids cgroup without a uid of its own (the interpreter unreadable by other uids), or
    a uid without a cgroup: either holds the bomb at the limit by itself."""
    if "bwrap" not in ALL_BACKENDS:
        pytest.skip("bubblewrap is not installed (apt-get install -y bubblewrap)")
    if bound == "cgroup":
        if sandbox._cgroup_root() is None:
            pytest.skip("no pids cgroup can be made here (needs root and a writable /sys/fs/cgroup)")
        _unreadable_interpreter(monkeypatch)
    else:
        _no_cgroup(monkeypatch)
    assert sandbox._plan("bwrap").bounds == (bound,)
    mark = marker(seconds=30)
    outcome, peak, _ = run_watched(mark, timeout=10, max_processes=12, backend="bwrap")
    assert outcome.status == "ok", outcome.stderr
    forks = int(outcome.stdout)
    assert 0 < forks < 12 and 0 < peak <= forks
    assert host_pids_with(mark) == []


def test_supervisor_kills_a_fork_bomb_where_nothing_else_bounds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root, no cgroup, no uid to drop to: the supervisor counts the PID namespace and kills
    it all once it holds more than the limit (a burst between two counts may overshoot)."""
    if os.geteuid() != 0 or "bwrap" not in ALL_BACKENDS:
        pytest.skip("needs root and bubblewrap")
    _no_cgroup(monkeypatch)
    _unreadable_interpreter(monkeypatch)
    assert sandbox._plan("bwrap").bounds == ("supervisor",)
    mark = marker(seconds=30)
    outcome, peak, seconds = run_watched(mark, timeout=10, max_processes=16, backend="bwrap")
    assert outcome.status == "killed" and outcome.returncode == -9, outcome
    assert "more than 16 processes" in outcome.stderr and outcome.stdout == ""
    assert seconds < 5 and peak < 200, (seconds, peak)  # killed long before 2,000
    assert host_pids_with(mark) == []


def test_refuses_where_nothing_bounds_processes_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """rlimits as root with no cgroup and no uid: one clear line, unless weak is allowed."""
    if os.geteuid() != 0:
        pytest.skip("as non-root the caller's uid always bounds the count")
    _no_cgroup(monkeypatch)
    _unreadable_interpreter(monkeypatch)
    assert sandbox._plan("rlimits").bounds == ()
    assert sandbox.containment("rlimits").refusal
    with pytest.raises(SandboxUnavailable) as refused:
        run_code(bomb(marker(seconds=30)), backend="rlimits")  # never started
    message = str(refused.value)
    assert "\n" not in message and "bubblewrap" in message and "--allow-weak-sandbox" in message
    assert run_code("print(1)", backend="rlimits", allow_weak=True).stdout == "1\n"
    sandbox.allow_weak_containment(True)
    try:
        assert run_code("print(2)", backend="rlimits").stdout == "2\n"
        with pytest.raises(SandboxUnavailable):  # the call's own choice wins
            run_code("print(3)", backend="rlimits", allow_weak=False)
    finally:
        sandbox.allow_weak_containment(False)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainables.sandbox", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **(env or {})})


def test_check_prints_the_backend_and_what_it_contains() -> None:
    result = _cli("--check")
    backend = detect_backend()
    assert f"backend: {backend}" in result.stdout, result.stdout
    for aspect in ("network", "filesystem", "processes", "uid", "memory", "leftovers", "environment"):
        assert f"  {aspect} " in result.stdout, aspect
    if backend == "bwrap":
        assert result.returncode == 0 and "fail-closed: yes" in result.stdout, result.stdout
    else:
        assert result.returncode == 1 and "fail-closed: no" in result.stdout


def test_check_and_run_on_a_machine_without_bubblewrap(tmp_path: Path) -> None:
    """As on a machine with rlimits only: --check fails and says what is weak; where nothing
    bounds processes (root, no cgroup, interpreter unreadable by others) a run is refused in
    one line unless --allow-weak-sandbox is given."""
    env = {"APIUPDATE_SANDBOX_BACKENDS": "rlimits", "APIUPDATE_SANDBOX_CGROUP": "0"}
    check = _cli("--check", env=env)
    assert check.returncode == 1 and "backend: rlimits" in check.stdout, check.stdout
    assert "weak:" in check.stdout and "fail-closed: yes" not in check.stdout
    program = tmp_path / "prog.py"
    program.write_text("print('ran')\n")
    refused = os.geteuid() == 0 and not sandbox._interpreter().reachable
    run = _cli(str(program), env=env)
    if refused:
        assert "refuses to run" in check.stdout
        assert run.returncode == 1 and run.stdout == "", run
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "bubblewrap" in lines[0] and "--allow-weak-sandbox" in lines[0], run.stderr
    else:
        assert run.returncode == 0 and json.loads(run.stdout)["stdout"] == "ran\n"
    allowed = _cli(str(program), "--allow-weak-sandbox", env=env)
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["stdout"] == "ran\n", allowed.stderr


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_infinite_loop_times_out_all_backends(backend: sandbox.Backend) -> None:
    mark = marker()
    program = f"""
import subprocess
subprocess.Popen(["sleep", "{mark}"])
print("spawned", flush=True)
while True:
    pass
"""
    start = time.monotonic()
    outcome = run_code(program, timeout=1.0, backend=backend, allow_weak=True)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and outcome.returncode is None
    assert outcome.stdout == "spawned\n"
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert host_pids_with(mark) == []


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_allocation_is_memory_all_backends(backend: sandbox.Backend) -> None:
    outcome = run_code("x = bytearray(10 * 2**30)\nprint('allocated')", backend=backend, allow_weak=True)
    assert outcome.status == "memory", outcome
    assert "allocated" not in outcome.stdout
    assert outcome.seconds < 5.0 + SLACK_S


def test_numpy_allocation_is_memory() -> None:
    pytest.importorskip("numpy")
    outcome = run_code("import numpy as np\nnp.ones(10**10)", memory_mb=512)
    assert outcome.status == "memory", outcome.stderr


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_network_to_host_listener_fails_all_backends(backend: sandbox.Backend) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        program = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"leak")
    print("connected")
except OSError as exc:
    print("blocked", type(exc).__name__)
"""
        outcome = run_code(program, backend=backend, allow_weak=True)
        assert outcome.status == "ok", outcome.stderr
        assert outcome.stdout.startswith("blocked")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever reached the listener
            listener.accept()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_write_outside_workdir_all_backends(backend: sandbox.Backend, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    name = f"sandbox-escape-{uuid.uuid4().hex}"
    # /tmp and /var/tmp are world-writable on the host: only the sandbox's private /tmp and
    # read-only root (or the audit hook) keep a dropped uid from writing there.
    targets = [tmp_path / "escape.txt", Path("/tmp", name), Path("/var/tmp", name), victim]
    program = f"""
for target in {[str(t) for t in targets]!r}:
    try:
        with open(target, "w") as f:
            f.write("escaped")
        print("wrote", target)
    except OSError as exc:
        print("refused", target, type(exc).__name__)
with open("inside.txt", "w") as f:  # the work folder itself is writable
    f.write("fine")
print("inside ok")
"""
    outcome = run_code(program, backend=backend, allow_weak=True)
    assert outcome.status == "ok", outcome.stderr
    assert outcome.stdout.count("\n") == len(targets) + 1
    assert outcome.stdout.endswith("inside ok\n")
    assert not any(target.exists() for target in targets[:3])
    assert victim.read_text() == "original"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_environment_secret_not_inherited_all_backends(
    backend: sandbox.Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SANDBOX_SECRET_TOKEN", secret)
    outcome = run_code(
        "import os\nprint(os.environ.get('SANDBOX_SECRET_TOKEN'))\nprint(sorted(os.environ))",
        backend=backend, allow_weak=True,
    )
    assert outcome.status == "ok", outcome.stderr
    assert outcome.stdout.startswith("None\n")
    assert secret not in outcome.stdout + outcome.stderr


def test_secret_not_readable_from_parent_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SANDBOX_SECRET_TOKEN", secret)
    program = f"""
import os
for pid in (os.getppid(), 1, {os.getpid()}):
    try:
        print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError as exc:
        print(pid, "refused", type(exc).__name__)
"""
    outcome = run_code(program)
    assert outcome.status == "ok", outcome.stderr
    assert outcome.stdout.count("\n") == 3
    assert secret not in outcome.stdout + outcome.stderr


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_100mb_output_is_truncated_all_backends(backend: sandbox.Backend) -> None:
    program = """
import sys
block = ("x" * 1023 + "\\n") * 1024
for _ in range(100):
    sys.stdout.write(block)
sys.stdout.write("END\\n")
"""
    start = time.monotonic()
    outcome = run_code(program, timeout=10, max_output=65536, backend=backend, allow_weak=True)
    assert time.monotonic() - start < 10 + SLACK_S
    assert outcome.status == "ok", outcome.stderr
    assert outcome.output_truncated
    assert len(outcome.stdout) == 65536 and outcome.stdout.endswith("x\nEND\n")


def test_detached_child_dies_with_program() -> None:
    mark = marker()
    program = f"""
import subprocess
child = subprocess.Popen(["sleep", "{mark}"], start_new_session=True)
print("started", child.pid, child.poll() is None, flush=True)
"""
    start = time.monotonic()
    outcome = run_code(program, timeout=5)
    assert time.monotonic() - start < 5 + SLACK_S
    assert outcome.status == "ok", outcome.stderr
    assert outcome.stdout.startswith("started") and outcome.stdout.endswith("True\n")
    assert host_pids_with(mark) == []


def _python_for_other_uids() -> str | None:
    """An interpreter an unprivileged uid can run (pyenv under /root is not one)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(candidate) and sandbox._searchable_by_others(os.path.realpath(candidate)):
            return candidate
    return None


# --------------------------------------------------------------------------- install layouts
# Runs in the layout's own interpreter, perhaps as another user: every containment check once,
# one JSON object on stdout. argv: the layout's folder, the process limit, a unique marker.
LAYOUT_DRIVER = r'''
import json, os, socket, sys, threading, time

import trainables.sandbox as sb

folder, limit, mark = sys.argv[1], int(sys.argv[2]), sys.argv[3]
result = {"module": sb.__file__, "backend": sb.detect_backend(), "uid": os.getuid()}


def host_pids_with(text):
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if text.encode() in open(f"/proc/{entry.name}/cmdline", "rb").read():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def timed(program, **kw):
    t0 = time.monotonic()
    out = sb.run_code(program, **kw)
    return out, time.monotonic() - t0


# a fork bomb of 2,000 whose children sleep: alive = the program + its forks so far
bomb_mark = f"30.{mark}1"
peak, done = [0], threading.Event()


def watch():
    while not done.is_set():
        peak[0] = max(peak[0], len(host_pids_with(bomb_mark)))


watcher = threading.Thread(target=watch)
watcher.start()
try:
    out, secs = timed(f"""
import os, time
n = 0
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{bomb_mark}"])
    n += 1
time.sleep(0.5)  # the plateau, for the watcher
print(n)
""", timeout=20, max_processes=limit)
finally:
    done.set()
    watcher.join()
result["bomb"] = {"status": out.status, "forks": out.stdout.strip(), "peak_sleepers": peak[0],
                  "left": len(host_pids_with(bomb_mark)), "seconds": secs, "stderr": out.stderr[-300:]}

out, secs = timed("while True:\n    pass\n", timeout=1.5)
result["loop"] = {"status": out.status, "seconds": secs}

out, _ = timed("x = bytearray(10 * 2**30)\nprint('allocated')\n")
result["alloc"] = {"status": out.status, "stdout": out.stdout}

with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    out, _ = timed(f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=2).sendall(b"x")
    print("connected")
except OSError as exc:
    print("blocked", type(exc).__name__)
""")
    listener.setblocking(False)
    try:
        listener.accept()
        reached = True
    except BlockingIOError:
        reached = False
result["network"] = {"stdout": out.stdout, "reached": reached}

name = f"sandbox-escape-{mark}"
package = os.path.dirname(sb.__file__)
targets = [f"/tmp/{name}", f"/var/tmp/{name}", os.path.join(folder, name), os.path.join(package, name)]
out, _ = timed(f"""
import subprocess
for target in {targets!r}:
    try:
        open(target, "w").write("escaped")
        print("wrote", target)
    except OSError as exc:
        print("refused", type(exc).__name__)
    subprocess.run(["sh", "-c", "echo escaped >> " + target + "-sh"], stderr=subprocess.DEVNULL)
subprocess.run(["sh", "-c", "echo escaped >> " + {sb.__file__!r}], stderr=subprocess.DEVNULL)
open("inside.txt", "w").write("fine")
print("inside ok")
""")
result["write"] = {"stdout": out.stdout, "status": out.status,
                   "created": [t for t in targets + [t + "-sh" for t in targets] if os.path.exists(t)],
                   "module_untouched": "escaped" not in open(sb.__file__).read()}

secret = os.environ["SANDBOX_SECRET_TOKEN"]
out, _ = timed(f"""
import os
print(sorted(os.environ.items()))
for pid in (1, os.getppid(), {os.getpid()}):
    try:
        print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError as exc:
        print(pid, "refused", type(exc).__name__)
""")
result["secret"] = {"status": out.status, "visible": secret in out.stdout + out.stderr,
                    "lines": out.stdout.count("\n")}

out, secs = timed("""
import sys
block = ("x" * 1023 + "\\n") * 1024
for _ in range(200):
    sys.stdout.write(block)
sys.stdout.write("END\\n")
""", timeout=30, max_output=65536)
result["output"] = {"status": out.status, "truncated": out.output_truncated, "length": len(out.stdout),
                    "tail": out.stdout[-6:], "seconds": secs}

setsid_mark = f"1000.{mark}2"
out, _ = timed(f"""
import subprocess
child = subprocess.Popen(["sleep", "{setsid_mark}"], start_new_session=True)
print("started", child.poll() is None)
""")
result["setsid"] = {"stdout": out.stdout, "left": len(host_pids_with(setsid_mark))}
print(json.dumps(result))
'''
LAYOUT_LIMIT = 24
OTHER_UID = 54321


def _make_layout(kind: str, uid: int) -> tuple[Path, Path, Path]:
    """(folder, venv, venv python): a virtual environment whose site-packages holds this
    checkout's trainables/sandbox.py, under /tmp (kind "tmp") or in a 0700 folder outside it
    (kind "private", as a home or /root is), owned by ``uid``."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-layout-",
                                 dir="/tmp" if kind == "tmp" or not os.path.isdir("/var/tmp") else "/var/tmp"))
    try:
        os.chmod(base, 0o755 if kind == "tmp" else 0o700)
        python = sys.executable if uid == 0 else _python_for_other_uids()
        venv = base / "venv"
        subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                       capture_output=True, timeout=120)
        purelib = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        package = Path(purelib) / "trainables"
        package.mkdir()
        for name in ("__init__.py", "sandbox.py"):
            shutil.copy(REPO / "trainables" / name, package / name)
        (base / "driver.py").write_text(LAYOUT_DRIVER)
        for path in (base, *base.rglob("*")):
            os.lchown(path, uid, uid)
    except BaseException:
        shutil.rmtree(base)
        raise
    return base, venv, venv / "bin" / "python"


def _as(uid: int) -> list[str]:
    return [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _layout_skip_reason(uid: int) -> str | None:
    if os.geteuid() != 0:
        return "needs root (to become another user and to chown the layouts)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install -y bubblewrap)"
    if uid != 0:
        if shutil.which("setpriv") is None or _python_for_other_uids() is None:
            return "needs setpriv and an interpreter other users can run (e.g. /usr/bin/python3)"
        probe = subprocess.run([*_as(uid), "bwrap", "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "--",
                                "/bin/true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            return f"bwrap cannot run for uid {uid} here (user namespaces?): {probe.stderr.strip()[-200:]}"
    return None


@pytest.mark.parametrize("kind,uid", [("tmp", 0), ("private", 0), ("tmp", OTHER_UID), ("private", OTHER_UID)])
def test_install_layouts_contain_everything(kind: str, uid: int) -> None:
    """The project installed in a virtual environment under /tmp (hidden by bwrap's private
    /tmp) or in a 0700 folder (a home, /root), run as root and as an unprivileged user: every
    promise of the sandbox holds, checked as an effect from outside the sandbox."""
    reason = _layout_skip_reason(uid)
    if reason:
        pytest.skip(reason)
    folder, venv, python = _make_layout(kind, uid)
    secret = f"secret-{uuid.uuid4().hex}"
    # HOME as such users have it: root's own, a service account's that does not exist, or the
    # 0700 folder that holds the environment.
    home = "/root" if uid == 0 else str(folder) if kind == "private" else "/nonexistent"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "SANDBOX_SECRET_TOKEN": secret}
    mark = f"{uuid.uuid4().int % 10**10:010d}"
    try:
        result = subprocess.run(
            [*_as(uid), str(python), str(folder / "driver.py"), str(folder), str(LAYOUT_LIMIT), mark],
            capture_output=True, text=True, timeout=120, cwd=folder, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "RuntimeWarning" not in result.stderr, result.stderr  # no fallback to a weaker backend
        r = json.loads(result.stdout)
        if uid == 0 and kind == "tmp":  # the plain command line, and --check, from that venv
            cli_mark = marker(seconds=30)
            (folder / "bomb.py").write_text(bomb(cli_mark, hold=0))
            cli = subprocess.run([str(python), "-m", "trainables.sandbox", "bomb.py", "--timeout", "5", "--memory-mb",
                                  "512"], capture_output=True, text=True, timeout=60, cwd=folder, env=env)
            check = subprocess.run([str(python), "-m", "trainables.sandbox", "--check"], capture_output=True,
                                   text=True, timeout=60, cwd=folder, env=env)
    finally:
        shutil.rmtree(folder)
        for leak in (*Path("/tmp").glob(f"sandbox-escape-{mark}*"), *Path("/var/tmp").glob(f"sandbox-escape-{mark}*")):
            leak.unlink()  # only where containment broke: the assertions below fail then
    assert r["module"].startswith(str(venv)) and r["uid"] == uid
    assert r["backend"] == "bwrap", r
    fork_bomb = r["bomb"]
    assert fork_bomb["status"] == "ok", fork_bomb
    forks = int(fork_bomb["forks"])
    # never more than the limit alive: the program and its forks (the children sleep 30 s, so
    # every fork that succeeded is alive until the teardown), seen from outside as well
    assert 0 < forks and forks + 1 <= LAYOUT_LIMIT, fork_bomb
    assert 0 < fork_bomb["peak_sleepers"] <= forks and fork_bomb["left"] == 0, fork_bomb
    assert r["loop"]["status"] == "timeout" and 1.5 <= r["loop"]["seconds"] < 1.5 + SLACK_S, r["loop"]
    assert r["alloc"] == {"status": "memory", "stdout": ""}
    assert r["network"]["stdout"].startswith("blocked") and not r["network"]["reached"], r["network"]
    write = r["write"]
    assert write["status"] == "ok" and write["stdout"].endswith("inside ok\n"), write
    # Nothing reached the host (writes to /tmp or a hidden home land in the sandbox's own tmpfs),
    # and the interpreter's packages are read-only, from Python and from a shell alike.
    assert write["stdout"].count("\n") == 5 and write["stdout"].count("refused") >= 2, write
    assert write["created"] == [] and write["module_untouched"], write
    assert r["secret"] == {"status": "ok", "visible": False, "lines": 4}, r["secret"]
    out = r["output"]
    assert out["status"] == "ok" and out["truncated"] and out["length"] == 65536 and out["tail"] == "x\nEND\n", out
    assert r["setsid"] == {"stdout": "started True\n", "left": 0}, r["setsid"]
    if uid == 0 and kind == "tmp":
        assert cli.returncode == 0 and "RuntimeWarning" not in cli.stderr, cli.stderr
        outcome = json.loads(cli.stdout)
        assert outcome["status"] == "ok" and 0 < int(outcome["stdout"]) < 32, outcome
        assert host_pids_with(cli_mark) == []
        assert check.returncode == 0 and "fail-closed: yes" in check.stdout, check.stdout + check.stderr
        assert "backend: bwrap" in check.stdout and str(venv) in check.stdout, check.stdout


def test_cli_prints_one_json_line(tmp_path: Path) -> None:
    program = tmp_path / "prog.py"
    program.write_text("import sys\nprint('hi')\nsys.exit(3)\n")
    result = subprocess.run(
        [sys.executable, "-m", "trainables.sandbox", str(program), "--timeout", "5",
         "--memory-mb", "256"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    outcome = json.loads(lines[0])
    assert outcome["status"] == "error" and outcome["returncode"] == 3
    assert outcome["stdout"] == "hi\n"


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainables.sandbox", str(tmp_path / "absent.py")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
