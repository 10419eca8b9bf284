"""Run a function on several CPU processes joined by a gloo process group, as ``torchrun`` would start them (each
process a fresh interpreter with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set): rank 0's result
comes back, any rank's error fails the test with that rank's traceback, and no process outlives the call.

Usage: ``run_on_ranks(2, module_level_function, *picklable_args)``."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for a process (and one thread per process: two cores here)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip


def run_on_ranks(world: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``world`` new processes in one gloo group; rank 0's return value."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        folder = Path(tmp)
        (folder / "call.pkl").write_bytes(pickle.dumps((fn, args)))
        port = free_port()
        path = os.pathsep.join([str(Path(__file__).parent), *sys.path])
        procs = [
            subprocess.Popen([sys.executable, __file__, str(folder)],
                             env={**os.environ, **launch_env(rank, world, port), "PYTHONPATH": path})
            for rank in range(world)
        ]  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):  # one rank failed: the others would wait forever
                    break
                time.sleep(0.1)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        errors = [f"rank {r}:\n{(folder / f'error{r}.txt').read_text()}" for r in range(world)
                  if (folder / f"error{r}.txt").exists()]  # fmt: skip
        if errors:
            raise AssertionError("\n".join(errors))
        if not (folder / "result.pkl").exists():
            codes = [p.returncode for p in procs]
            raise AssertionError(f"the {world} ranks did not finish within {TIMEOUT_S:.0f} s (exit codes {codes})")
        return pickle.loads((folder / "result.pkl").read_bytes())


def _main(folder: Path) -> int:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S / 2))
    try:
        fn, args = pickle.loads((folder / "call.pkl").read_bytes())
        value = fn(*args)
        if rank == 0:
            (folder / "result.pkl").write_bytes(pickle.dumps(value))
        return 0
    except BaseException:  # reported to the test
        (folder / f"error{rank}.txt").write_text(traceback.format_exc())
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
