"""The sandbox contains hostile programs and leaves the host as it was.

Every hostile program is bounded so that it cannot hurt the host even if containment broke
(a fork bomb stops at 1,000 forks whose children sleep 30 s; ``sleep`` children carry a unique
marker so the test can find them on the host), and every test checks the host afterwards,
not only the outcome. Tests named ``..._all_backends`` run on every backend that works here:
they cover what even the weakest one promises. The others run on the backend run_code picks,
which must be bubblewrap wherever bwrap is installed (CI installs it).
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
import uuid
from pathlib import Path

import pytest

from trainables import sandbox
from trainables.sandbox import available_backends, detect_backend, run_code

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


def test_fork_bomb_is_bounded() -> None:
    mark = marker(seconds=30)  # a breach leaves 1,000 sleepers for 30 s, not longer
    before = host_process_count()
    bomb = f"""
import os
n = 0
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{mark}"])
    n += 1
print(n)
"""
    start = time.monotonic()
    outcome = run_code(bomb, timeout=10, max_processes=16)
    assert time.monotonic() - start < 10 + SLACK_S
    assert outcome.status == "ok", outcome.stderr
    forks = int(outcome.stdout)
    assert 0 < forks < 16  # the limit stopped it, and counts the program itself
    assert host_pids_with(mark) == []
    # Other work shares this machine, so allow drift, far below the 1,000 of a breach.
    assert host_process_count() < before + 200


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
    outcome = run_code(program, timeout=1.0, backend=backend)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and outcome.returncode is None
    assert outcome.stdout == "spawned\n"
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert host_pids_with(mark) == []


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_allocation_is_memory_all_backends(backend: sandbox.Backend) -> None:
    outcome = run_code("x = bytearray(10 * 2**30)\nprint('allocated')", backend=backend)
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
        outcome = run_code(program, backend=backend)
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
    outcome = run_code(program, backend=backend)
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
        backend=backend,
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
    outcome = run_code(program, timeout=10, max_output=65536, backend=backend)
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
        if os.path.exists(candidate) and sandbox._searchable_by_others(candidate):
            return candidate
    return None


def test_fork_bomb_bounded_for_non_root_caller() -> None:
    """As a non-root caller nothing can switch uids; the CLI must still bound a fork bomb."""
    python = _python_for_other_uids()
    if os.geteuid() != 0 or shutil.which("setpriv") is None or python is None:
        pytest.skip("needs root (to become another user), setpriv and a world-readable python")
    if not sandbox._searchable_by_others(str(REPO / "trainables" / "sandbox.py")):
        pytest.skip("the checkout is not readable by other users")
    mark = marker(seconds=30)
    folder = tempfile.mkdtemp(prefix="sandbox-test-")
    try:
        os.chmod(folder, 0o755)
        bomb = Path(folder) / "bomb.py"
        bomb.write_text(
            "import os\nn = 0\nfor _ in range(1000):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\n    n += 1\nprint(n)\n"
        )
        os.chmod(bomb, 0o644)
        result = subprocess.run(
            ["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", python,
             str(REPO / "trainables" / "sandbox.py"), str(bomb), "--max-processes", "16"],
            capture_output=True, text=True, timeout=30, cwd=folder,
            env={"PATH": os.defpath, "HOME": folder},
        )
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "ok", outcome
    assert 0 < int(outcome["stdout"]) < 16
    assert host_pids_with(mark) == []


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
