"""river-bench's HumanEval sandbox against adversarial samples: each escape a model could write (read
the project, write outside its folder, use the network, leave setsid'd children behind) is contained."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from river.runtime.bench import sandbox
from river.runtime.bench.sandbox import PROJECT, isolation, passes

CONTAINED = isolation() == "namespaces"
needs_namespaces = pytest.mark.skipif(not CONTAINED, reason="no root/unshare here: only limits and a process group")


def sample(body: str) -> tuple[dict, str]:
    """A problem whose check passes exactly when ``body`` (the 'completion') runs without raising."""
    problem = {"prompt": "def f():\n", "test": "def check(f):\n    assert f() is None\n", "entry_point": "f"}
    return problem, textwrap.indent(textwrap.dedent(body), "    ") + "\n    return None\n"


def marked_processes(marker: str) -> list[int]:
    """Processes whose command line carries ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.fixture(autouse=True)
def own_tmp(tmp_path, monkeypatch):
    """Sandbox folders go to a folder of the test's own, checked empty afterwards (each removed)."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield
    assert list(folder.iterdir()) == []


def test_honest_samples_pass_and_fail():
    assert passes(*sample("x = sum(range(10))"))
    assert not passes(*sample("raise ValueError"))


def test_environment_is_scrubbed_and_python_isolated():
    assert passes(*sample("""
        import os, sys
        assert set(os.environ) <= {"PATH", "LC_CTYPE"} and "PYTHONPATH" not in os.environ, dict(os.environ)
        assert sys.flags.isolated and os.listdir(".") == ["check.py"]
    """))


@needs_namespaces
def test_cannot_read_the_project():
    assert (PROJECT / "README.md").is_file()
    assert passes(*sample(f"""
        import os
        project = {str(PROJECT)!r}  # hidden: empty, or gone when it lives under the sandbox's fresh /tmp
        assert not os.path.exists(os.path.join(project, 'README.md'))
        assert not os.path.isdir(project) or os.listdir(project) == []
    """))
    assert not passes(*sample(f"open({str(PROJECT / 'README.md')!r}).read()"))


@needs_namespaces
def test_cannot_write_outside_its_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    for where in (target, PROJECT / f"escaped-{uuid.uuid4().hex}", Path("/dev/shm") / f"escaped-{uuid.uuid4().hex}"):
        assert not passes(*sample(f"open({str(where)!r}, 'w').write('out')"))
        assert not where.exists()
    assert passes(*sample("open('inside.txt', 'w').write('fine')"))  # its own folder (a tmpfs on /tmp) is writable


@needs_namespaces
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    assert not passes(*sample(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"))
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    # a listening socket inside is unreachable from outside
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = threading.Thread(target=passes, args=sample(f"""
        import socket, time
        s = socket.socket(); s.bind(('0.0.0.0', {port})); s.listen(); time.sleep(1.5)
    """))
    listener.start()
    time.sleep(0.7)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    listener.join()


@pytest.mark.parametrize("parent", ["returns", "hangs"])
def test_setsid_children_die_with_the_sample(parent):
    """A double-forked, setsid'd child outlives neither the timeout nor a sample that returns."""
    marker = f"river-escape-{uuid.uuid4().hex}"
    if not CONTAINED and os.geteuid() == 0:
        pytest.skip("root without namespaces: RLIMIT_NPROC does not bind root, a setsid'd child can escape")
    started = time.time()
    passes(*sample(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)  # {marker}"])
            os._exit(0)
        time.sleep(0.5)
        while {parent == 'hangs'}:
            pass
    """), timeout=2.0)
    assert time.time() - started < 10
    time.sleep(0.3)
    assert marked_processes(marker) == []


def test_timeout_kills_the_sample():
    started = time.time()
    assert not passes(*sample("while True: pass"), timeout=1.0)
    assert time.time() - started < 5


def test_process_count_is_limited(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_PROCESSES", 4)
    if not CONTAINED and os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC does not bind root")
    assert not passes(*sample("""
        import os, time
        kids = [os.fork() for _ in range(8)]
        if 0 in kids: time.sleep(5); os._exit(0)
    """), timeout=3.0)
