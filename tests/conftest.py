"""Shared, session-scoped fixtures: tiny random ChronoEdit checkpoints in the real diffusers folder layout; a check
that the tests leave nothing running when the session ends."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import traceback

# Never reach the Hugging Face hub from the test suite (set before transformers/diffusers are imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's local test instances report nowhere

from pathlib import Path

import pytest

from chronoedit.demo import TinySpec, build_tiny_checkpoint

TINY_SPEC = TinySpec(num_attention_heads=2, attention_head_dim=16)  # D = 32; hits the reference's RoPE split bug
TINY_SPEC_HD128 = TinySpec(num_attention_heads=2, attention_head_dim=128, shards=3)  # real RoPE split 44/42/42
LEFTOVER_GRACE_S = 10.0  # what a test just stopped (a server thread after shutdown, a killed child) may take to end


# ---------------------------------------------------------------- nothing left running at the end of the session


def _harmless(thread: threading.Thread) -> bool:
    """Library threads that may outlive the tests. Only tqdm's monitor: tqdm starts one per process with its first
    bar, and it only ever sleeps in ``Event.wait`` (pure Python, no native code), so the interpreter ends it cleanly."""
    monitor = sys.modules.get("tqdm._monitor")
    return monitor is not None and isinstance(thread, monitor.TMonitor)


def _where(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)
    stack = [f for f in stack if f.filename != threading.__file__] or stack  # not Thread's own plumbing if possible
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-3:]))


def _leftover_threads(deadline: float) -> list[str]:
    """Every thread still running but the main thread and :func:`_harmless` ones: daemon threads too. A daemon thread
    is not waited for at exit, but one still inside native code (torch loading or running a model) when the
    interpreter finalizes aborts the process ("terminate called without an active exception")."""
    found = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or _harmless(thread):
            continue
        if isinstance(thread, threading._DummyThread):  # a native thread that ran Python code: cannot be joined,
            continue  # never shown as ended (a library's own pool, e.g. torch's autograd thread)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            kind = "daemon thread" if thread.daemon else "thread"
            found.append(f"{kind} {thread.name!r} is still running: {_where(thread)}")
    return found


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, command name) of a process from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], name


def _descendants(root: int) -> list[tuple[int, str, str]]:
    """(pid, state, command name) of every process under ``root`` (children, their children...)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            procs[int(entry.name)] = stat
    found, parents = [], {root}
    while parents:
        children = [(pid, state, name) for pid, (ppid, state, name) in procs.items() if ppid in parents]
        found += children
        parents = {pid for pid, _, _ in children}
    return found


def _leftover_processes(deadline: float) -> list[str]:
    """Child processes (and theirs) still running or never waited for (zombies): every process a test starts must
    have ended, and been reaped, by the end of the test."""
    multiprocessing.active_children()  # reaps the multiprocessing children that have ended
    if not Path(f"/proc/{os.getpid()}/stat").exists():  # no /proc (not Linux): multiprocessing's own children only
        return [f"child process {child.pid} ({child.name}) is running" for child in multiprocessing.active_children()]
    while (found := _descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"child process {pid} ({name}) is " + ("a zombie: nothing waited for it" if state == "Z" else "running")
            for pid, state, name in found]  # fmt: skip


def _leftover_process_group() -> list[str]:
    """An initialised torch.distributed process group (its gloo / TCPStore threads are native threads)."""
    if "torch.distributed" not in sys.modules:
        return []
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return [f"a torch.distributed process group is initialised (backend {dist.get_backend()}, world size "
                f"{dist.get_world_size()}): destroy_process_group() was not called"]  # fmt: skip
    return []


def _stop_resource_tracker() -> None:
    """Starting a process by ``spawn`` (serve's worker pool, Ray) starts multiprocessing's resource tracker, a helper
    that lives as long as this process: infrastructure, not a test's leftover. Stop it before counting children."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_pid", None) is not None:
        tracker._stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The seed of the random test order (pytest-randomly) at the end, also under -q, which hides its header line."""
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"random test order: --randomly-seed={seed} repeats it")


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running():  # type: ignore[no-untyped-def]
    """Fail the run when, after the last test and every fixture's teardown, a test left a thread, a child process or a
    torch.distributed process group behind (defined first: torn down last). Whatever is still there when the process
    exits can hang it or abort it after every test passed."""
    yield
    _stop_resource_tracker()
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = _leftover_threads(deadline) + _leftover_processes(deadline) + _leftover_process_group()
    if left:
        pytest.fail("the tests left these running at the end of the session:\n  " + "\n  ".join(left), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _own_home(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """chronoedit's own files (demo model, remembered weight digests) go to a session folder, not the user's home
    (tests that need another folder set CHRONOEDIT_HOME themselves)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHRONOEDIT_HOME", str(tmp_path_factory.mktemp("chronoedit_home")))
        yield


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    """The spec of :func:`tiny_ckpt` (head_dim 16, 2 heads, one safetensors file)."""
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_spec_hd128() -> TinySpec:
    """The spec of :func:`tiny_ckpt_hd128` (head_dim 128, 2 heads, 3 transformer shards)."""
    return TINY_SPEC_HD128


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint folder (head_dim 16), built once per session. Treat it as read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "ChronoEdit-tiny", TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_ckpt_hd128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint folder with head_dim 128 and a 3-shard transformer, built once per session. Read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_hd128") / "ChronoEdit-tiny-hd128", TINY_SPEC_HD128)
