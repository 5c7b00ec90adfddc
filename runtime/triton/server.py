"""Start the ``tritonserver`` that ``nvidia-pytriton`` ships (Python backend only) on a model repository.

What the bundled server needs, found by reading how pytriton launches it:

- a backend folder whose ``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py`` and
  the backend stub built for *this* interpreter's Python version (the wheel carries one per version under
  ``python_backend_stubs/``; pytriton copies the matching one into place, and so do we);
- ``LD_LIBRARY_PATH`` with the interpreter's lib folder (the stub links ``libpython3.X.so``; taking
  another one from the system would mix two Pythons) and the wheel's ``nvidia_pytriton.libs``;
- the virtual environment's ``bin`` first on ``PATH``: the stub's embedded Python finds its prefix by
  looking up ``python3`` on ``PATH``, so it starts inside the venv and ``model.py`` can import ``river``,
  onnxruntime and numpy<2 from its site-packages (no PYTHONPATH or EXECUTION_ENV_PATH needed).

The server listens on 127.0.0.1 only, on free ports, in its own process group, and is always stopped
(SIGTERM, then SIGKILL to the whole group) when the context ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from river.errors import RiverError
from river.runtime.triton.config import GENERATE_MODEL

HOST = "127.0.0.1"


def pytriton_dist() -> Path:
    """The ``tritonserver`` folder inside the installed nvidia-pytriton package (not imported: it is heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RiverError("nvidia-pytriton is not installed (pip install nvidia-pytriton): "
                         "it ships the tritonserver binary")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise RiverError(f"no tritonserver binary in {dist}/bin")
    return dist


def find_tritonserver() -> Path:
    return pytriton_dist() / "bin" / "tritonserver"


def backend_stub(version: str | None = None) -> Path:
    version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_dist() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (pytriton_dist() / "python_backend_stubs").iterdir())
        raise RiverError(f"nvidia-pytriton has no Python backend stub for Python {version} (it has {have})")
    return stub


def python_libdir() -> Path:
    """The folder with this interpreter's libpython (sysconfig LIBDIR of the venv's base Python)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / name).exists():
        raise RiverError(f"this Python ({sys.executable}) has no shared libpython in '{libdir}': the Python "
                         "backend stub needs one (use a Python built with --enable-shared)")
    return libdir


def server_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [str(python_libdir()), str(pytriton_dist().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def prepare_backends(work: Path) -> Path:
    """A backend folder with the Python backend and the stub for this Python (the stub is copied: the
    backend looks for it next to its library)."""
    src = pytriton_dist() / "backends" / "python"
    dst = work / "backends" / "python"
    dst.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        os.symlink(src / name, dst / name)
    shutil.copy2(backend_stub(), dst / "triton_python_backend_stub")
    return work / "backends"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    repository: Path

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


def _die_with_parent() -> None:
    """Runs in the child before exec: if the process (thread) that started the server dies without
    stopping it (a killed test run), Linux sends the server SIGTERM, so no server is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (Triton unloads its models and stops the stubs), then SIGKILL the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and the stubs it started
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def triton_server(repository: str | Path, *, models: Sequence[str] | None = (GENERATE_MODEL,),
                  ready_timeout: float = 180.0, log_verbose: int = 0, exit_timeout: int = 5,
                  extra_args: Sequence[str] = (), keep_logs: str | Path | None = None) -> Iterator[TritonServer]:
    """Serve ``repository`` with pytriton's tritonserver on 127.0.0.1; yield when every loaded model is ready.

    ``models``: the models to load (explicit model control), by default the generation model only,
    since this server has no onnxruntime or tensorrt backend; None loads the whole repository.
    ``keep_logs``: copy the server log there when it stops (the working folder is removed).
    Enter it from a thread that outlives the server (the server is tied to the starting thread's life).
    """
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise RiverError(f"model repository not found: {repository}")
    binary = find_tritonserver()
    env = server_env()
    work = Path(tempfile.mkdtemp(prefix="river-triton-"))
    shm_prefix = f"river{os.getpid()}x{uuid.uuid4().hex[:8]}"
    proc = None
    try:
        backends = prepare_backends(work)
        http, grpc, metrics = free_ports(3)
        args = [str(binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-address={HOST}", f"--http-port={http}", f"--grpc-address={HOST}", f"--grpc-port={grpc}",
                f"--metrics-address={HOST}", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
                f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
                f"--exit-timeout-secs={exit_timeout}", f"--log-verbose={log_verbose}"]
        if models is not None:
            args.append("--model-control-mode=explicit")
            args += [f"--load-model={m}" for m in models]
        args += list(extra_args)
        log_path = work / "tritonserver.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=work, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        server = TritonServer(proc, http, grpc, metrics, log_path, repository)
        deadline = time.monotonic() + ready_timeout
        while not server.ready():
            if not server.alive():
                raise RiverError(f"tritonserver exited with code {proc.returncode} before it was ready:\n"
                                 f"{_tail(server.logs())}")
            if time.monotonic() > deadline:
                raise RiverError(f"tritonserver was not ready after {ready_timeout:.0f}s:\n{_tail(server.logs())}")
            time.sleep(0.25)
        yield server
    finally:
        if proc is not None:
            _stop(proc, grace=exit_timeout + 10)
        if keep_logs is not None and (work / "tritonserver.log").is_file():
            shutil.copy2(work / "tritonserver.log", keep_logs)
        for leftover in Path("/dev/shm").glob(f"{shm_prefix}*"):  # regions of stubs that were killed
            leftover.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m river.runtime.triton.server",
                                description="Serve a River Triton model repository with nvidia-pytriton's "
                                "tritonserver on 127.0.0.1 until interrupted.")
    p.add_argument("repository")
    p.add_argument("--model", action="append", help=f"model to load (repeatable; default: {GENERATE_MODEL})")
    p.add_argument("--log-verbose", type=int, default=0)
    args = p.parse_args(argv)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt  # unwind through the context manager, which stops the server

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupted)
    try:
        with triton_server(args.repository, models=args.model or (GENERATE_MODEL,),
                           log_verbose=args.log_verbose) as server:
            print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}",
                  flush=True)
            while server.alive():
                time.sleep(0.5)
            print(_tail(server.logs()), file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except RiverError as exc:
        print(f"triton.server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
