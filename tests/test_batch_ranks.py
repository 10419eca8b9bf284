"""``torchrun -m chronoedit batch`` over two CPU ranks (gloo) on the tiny checkpoint: every row once, the same outputs
as one process, a killed rank resumed by a one-process rerun, a busy folder and a bad manifest stopping every rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chronoedit import cli, files
from chronoedit.batch import LOCK_NAME, RANKS_LOCK_NAME, TICKETS_NAME, Batch, run_batch
from chronoedit.batch_ranks import Tickets
from chronoedit.editing import MODEL_PATH_ENV, EditRunner, EditSettings, resolve_model
from chronoedit.errors import UserError

SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cpu", "--quiet"]
SMALL_SETTINGS = EditSettings(height=32, width=32, num_inference_steps=2)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def manifest(tmp_path: Path, count: int, extra: list[dict] | None = None) -> Path:
    rows = []
    for i in range(count):
        Image.new("RGB", (48, 32), (40 * i % 256, 120, 200)).save(tmp_path / f"img{i}.png")
        rows.append({"id": f"r{i}", "input": f"img{i}.png", "prompt": f"edit {i}", "seed": i})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows + (extra or [])))
    return path


def torchrun(manifest: Path, out: Path, model: Path | str, nproc: int = 2, *flags: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node=nproc -m chronoedit batch`` (one thread per process), stdout/stderr piped."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "chronoedit", *batch_args(manifest, out, model), *flags]  # fmt: skip
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def batch_args(manifest: Path, out: Path, model: Path | str) -> list[str]:
    return ["batch", str(manifest), "--out", str(out), "--model-path", str(model), *SMALL]


def launch_ranks(manifest: Path, out: Path, model: Path | str, world: int = 2) -> list[tuple[int, str, str]]:
    """The ranks started by hand (the environment torchrun gives them), so each rank's own exit code and output can
    be seen (torchrun stops the others when one exits with an error): (code, stdout, stderr) per rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        argv = [sys.executable, "-m", "chronoedit", *batch_args(manifest, out, model)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [finish(proc) for proc in procs]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def one_process(manifest: Path, out: Path, model: Path):
    """The same batch in this process, one rank: the reference outputs."""
    spec = resolve_model(str(model), device="cpu")
    batch = Batch(manifest=manifest, out_dir=out, model=spec, defaults=SMALL_SETTINGS)
    return run_batch(batch, quiet=True, runner=EditRunner(spec))


def sidecars(out: Path) -> dict[str, dict]:
    found = {}
    for path in out.glob("r*.json"):
        if not files.is_temp_name(path.name) and not path.name.endswith(".error.json"):
            with contextlib.suppress(ValueError):
                found[path.stem] = json.loads(path.read_text())
    return found


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_two_ranks_run_every_row_once_with_one_process_outputs(tiny_ckpt, tmp_path):
    rows = manifest(tmp_path, 6)
    code, out, err = finish(torchrun(rows, tmp_path / "two", tiny_ckpt))
    # the summary counts both ranks' rows, each once (a row run twice would count twice), printed by rank 0 only
    assert (code, out.strip().splitlines()) == (
        0,
        [f"batch: 6 done, 0 skipped, 0 failed (outputs in {tmp_path / 'two'})"],
    ), err

    reference = one_process(rows, tmp_path / "one", tiny_ckpt)
    assert reference.done == 6
    done = sidecars(tmp_path / "two")
    assert sorted(done) == [f"r{i}" for i in range(6)]
    assert len({s["run_id"] for s in done.values()}) == 1
    assert {s["worker"] for s in done.values()} <= {"rank 0 of 2", "rank 1 of 2"}
    for row_id in done:
        diff = np.abs(pixels(tmp_path / "two" / f"{row_id}.png") - pixels(tmp_path / "one" / f"{row_id}.png"))
        assert diff.max() <= 1, row_id
    assert not (tmp_path / "two" / TICKETS_NAME).exists()
    assert [p.name for p in (tmp_path / "two").iterdir() if files.is_temp_name(p.name)] == []

    again = one_process(rows, tmp_path / "two", tiny_ckpt)  # a one-process rerun: the rows the ranks did are done
    assert (again.done, again.skipped, again.failed) == (0, 6, 0)
    assert sidecars(tmp_path / "two") == done


def test_context_parallel_runs_each_row_on_both_ranks_and_rank_0_writes(tiny_ckpt, tmp_path):
    rows = manifest(tmp_path, 3)
    code, out, err = finish(torchrun(rows, tmp_path / "cp", tiny_ckpt, 2, "--context-parallel"))
    summary = f"batch: 3 done, 0 skipped, 0 failed (outputs in {tmp_path / 'cp'})"
    assert (code, out.strip().splitlines()) == (0, [summary]), err
    one_process(rows, tmp_path / "one", tiny_ckpt)
    done = sidecars(tmp_path / "cp")
    assert sorted(done) == ["r0", "r1", "r2"]
    assert {s["worker"] for s in done.values()} == {"rank 0 of 2"}  # every row computed by both, written by rank 0
    for row_id in done:  # the sequence split gives the one-process edit
        assert np.abs(pixels(tmp_path / "cp" / f"{row_id}.png") - pixels(tmp_path / "one" / f"{row_id}.png")).max() == 0


def test_a_failed_row_on_any_rank_makes_every_rank_exit_1(tiny_ckpt, tmp_path):
    rows = manifest(tmp_path, 1, [{"id": "bad", "input": "missing.png", "prompt": "x"}])
    out = tmp_path / "out"
    (code0, out0, err0), (code1, out1, err1) = launch_ranks(rows, out, tiny_ckpt)
    assert (code0, code1) == (1, 1), err0 + err1
    assert (out0, out1) == (f"batch: 1 done, 0 skipped, 1 failed (outputs in {out})\n", "")
    failure = "chronoedit: row bad (line 2) failed: input image not found"
    assert (err0 + err1).count(failure) == 1 and "Traceback" not in err0 + err1
    assert sorted(sidecars(out)) == ["r0"] and (out / "bad.error.json").is_file()


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` (a child of the torchrun process)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != torchrun_pid:
                continue
            if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
    return None


def test_a_killed_rank_is_resumed_by_a_one_process_rerun(tiny_ckpt, tmp_path, capsys):
    count = 12  # ~3 s of rows on two ranks: the kill lands mid-run even on a busy machine
    rows = manifest(tmp_path, count)
    out = tmp_path / "out"
    proc = torchrun(rows, out, tiny_ckpt)
    try:
        deadline = time.monotonic() + 180
        while not (out.is_dir() and sidecars(out)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no row was done"
            time.sleep(0.01)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 is not running"
        os.kill(victim, signal.SIGKILL)
    finally:
        code, _, err = finish(proc)
    assert code != 0, f"the run finished before its rank was killed: {err}"
    before = sidecars(out)
    assert 1 <= len(before) < count, err

    code = cli.main(["batch", str(rows), "--out", str(out), "--model-path", str(tiny_ckpt), *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == (
        f"batch: {count - len(before)} done, {len(before)} skipped, 0 failed (outputs in {out})"
    )
    after = sidecars(out)
    assert sorted(after) == sorted(f"r{i}" for i in range(count))
    assert all(after[row_id] == sidecar for row_id, sidecar in before.items())  # not redone (same run_id, times)
    for row_id in after:
        pixels(out / f"{row_id}.png")  # complete images
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"r{i}.png" for i in range(count)] + [f"r{i}.json" for i in range(count)]
    )
    assert not (out / TICKETS_NAME).exists()


def test_a_busy_folder_stops_every_rank_in_one_line(tiny_ckpt, tmp_path):
    rows = manifest(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    with files.locked(out / LOCK_NAME, "held by the test"):
        (code0, out0, err0), (code1, out1, err1) = launch_ranks(rows, out, tiny_ckpt)
    assert (code0, code1, out0, out1) == (2, 2, "", "")
    assert (err0, err1) == (f"chronoedit: error: another chronoedit batch is writing to {out}\n", "")
    assert sidecars(out) == {}


@pytest.mark.parametrize("rank", [0, 1])
def test_a_bad_manifest_is_one_line_on_rank_0_and_exit_2_everywhere(tiny_ckpt, tmp_path, monkeypatch, capsys, rank):
    """Before the process group starts: each rank finds the error on its own, only rank 0 says it."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    rows = tmp_path / "m.jsonl"
    rows.write_text('{"id": "a", "input": "x.png"}\n')
    assert cli.main(batch_args(rows, tmp_path / "out", tiny_ckpt)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"chronoedit: error: {rows}: missing prompt in line 1\n" if rank == 0 else "")
    assert not (tmp_path / "out").exists()


def test_ranks_still_running_keep_a_new_batch_out(tiny_ckpt, tmp_path, capsys):
    """The ranks of a run whose rank 0 died hold the ranks lock shared: a new batch on the folder is refused."""
    fcntl = pytest.importorskip("fcntl")
    rows = manifest(tmp_path, 1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / RANKS_LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        code = cli.main(["batch", str(rows), "--out", str(out), "--model-path", str(tiny_ckpt), *SMALL])
    assert code == 2
    assert capsys.readouterr().err == f"chronoedit: error: another chronoedit batch is writing to {out}\n"
    assert sidecars(out) == {}


def test_tickets_deal_each_row_once_and_refuse_another_runs_file(tmp_path):
    path = tmp_path / TICKETS_NAME
    first, second = Tickets(path, "run-a").create(), Tickets(path, "run-a")
    assert [first.take(), second.take(), first.take()] == [0, 1, 2]
    assert [first.finish(), second.finish()] == [1, 2]
    assert second.take() == 3
    with pytest.raises(UserError, match="belongs to another batch"):
        Tickets(path, "run-b").take()
    path.unlink()
    with pytest.raises(UserError, match="must be shared by every rank"):
        first.take()
