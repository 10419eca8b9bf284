"""``chronoedit batch`` end to end on the tiny checkpoint (CPU, 2 steps, 32x32): outputs, sidecars, resume, failures,
bad manifests and SIGKILL safety."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("chronoedit.pipeline", reason="chronoedit.pipeline is not importable yet (pipeline not landed)")

from chronoedit import __version__, cli
from chronoedit.batch import Batch, Summary, run_batch
from chronoedit.editing import MODEL_PATH_ENV, EditRunner, EditSettings, load_pipeline, resolve_model
from chronoedit.editing import runner as runner_module

SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cpu", "--quiet"]
SMALL_SETTINGS = EditSettings(height=32, width=32, num_inference_steps=2)  # SMALL as the application layer's


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path_factory.getbasetemp() / "chronoedit_home"))
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)


@pytest.fixture
def calls(monkeypatch):
    """Count pipeline runs (by the row's prompt) while still running them: the runner's ``generate``, wrapped."""
    seen: list[str] = []
    real = runner_module.generate

    def counting(pipe, edit, *args, **kwargs):
        seen.append(edit.instruction)
        return real(pipe, edit, *args, **kwargs)

    monkeypatch.setattr(runner_module, "generate", counting)
    return seen


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test (whoever made the runner: the CLI or the test)."""
    monkeypatch.setattr(EditRunner, "load", lambda self: pytest.fail("the model must not be loaded"))


def make_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        Image.new("RGB", (48, 32), (40 * i % 256, 120, 200)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch(capsys, manifest, out, *extra, model):
    """``chronoedit batch`` through the CLI: (exit code, stdout lines, stderr)."""
    code = cli.main(["batch", str(manifest), "--out", str(out), "--model-path", str(model), *SMALL, *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def run_rows(manifest, out, *, model, load=load_pipeline) -> Summary:
    """The batch through the application layer (SMALL's settings) on a runner that loads the model with ``load``."""
    spec = resolve_model(str(model), device="cpu")
    batch = Batch(manifest=Path(manifest), out_dir=Path(out), model=spec, defaults=SMALL_SETTINGS)
    return run_batch(batch, quiet=True, runner=EditRunner(spec, load=load))


def three_rows(tmp_path: Path) -> Path:
    make_images(tmp_path / "data" / "imgs", 3)
    return write_jsonl(
        tmp_path / "data" / "m.jsonl",
        [
            {"id": "a", "input": "imgs/img0.png", "prompt": "make it red"},
            {"id": "b", "image": "imgs/img1.png", "prompt": "make it blue", "seed": 7, "output_format": "jpg"},
            {"input": str(tmp_path / "data" / "imgs" / "img2.png"), "prompt": "add snow", "num_inference_steps": 1,
             "guidance_scale": 2.5, "output_format": "webp", "negative_prompt": "blurry"},
        ],
    )  # fmt: skip


def test_jsonl_batch_writes_images_and_sidecars(capsys, tiny_ckpt, tmp_path, calls):
    manifest = three_rows(tmp_path)
    code, lines, _ = batch(capsys, manifest, "out", model=tiny_ckpt)
    assert code == 0 and lines == ["batch: 3 done, 0 skipped, 0 failed (outputs in out)"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a.json", "a.png", "b.jpg", "b.json", "img2.json", "img2.webp"]  # fmt: skip
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("img2.webp", "WEBP")):
        with Image.open(out / name) as image:
            assert image.format == fmt and image.size == (32, 32)
    a, b, c = (json.loads((out / f"{i}.json").read_text()) for i in ("a", "b", "img2"))
    assert a["input"] == str((tmp_path / "data" / "imgs" / "img0.png").resolve())
    assert (a["output"], a["prompt"], a["seed"], a["num_inference_steps"]) == ("a.png", "make it red", 0, 2)
    assert (a["height"], a["width"], a["guidance_scale"], a["enable_temporal_reasoning"]) == (32, 32, 5.0, False)
    assert (b["seed"], b["output"]) == (7, "b.jpg")
    assert (c["num_inference_steps"], c["guidance_scale"], c["negative_prompt"]) == (1, 2.5, "blurry")
    for sidecar in (a, b, c):
        assert sidecar["chronoedit_version"] == __version__ and sidecar["model_path"] == str(tiny_ckpt)
        assert sidecar["timings"]["generate_s"] > 0 and sidecar["run_id"] == a["run_id"]
    assert sorted(calls) == ["add snow", "make it blue", "make it red"]


def test_csv_manifest(capsys, tiny_ckpt, tmp_path):
    make_images(tmp_path, 2)
    with open(tmp_path / "m.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "input", "prompt", "seed", "enable_temporal_reasoning", "num_frames"])
        writer.writerow(["one", "img0.png", "make it red, please", "3", "", ""])
        writer.writerow(["two", "img1.png", "add rain", "", "true", "9"])
    code, lines, _ = batch(capsys, tmp_path / "m.csv", tmp_path / "o", model=tiny_ckpt)
    assert code == 0, lines
    one, two = (json.loads((tmp_path / "o" / f"{i}.json").read_text()) for i in ("one", "two"))
    assert (one["prompt"], one["seed"], one["enable_temporal_reasoning"]) == ("make it red, please", 3, False)
    assert (two["seed"], two["enable_temporal_reasoning"], two["num_frames"]) == (0, True, 9)


def test_rerun_skips_done_rows_and_redoes_partial_ones(capsys, tiny_ckpt, tmp_path, calls, monkeypatch):
    manifest = three_rows(tmp_path)
    assert batch(capsys, manifest, "out", model=tiny_ckpt)[0] == 0
    assert len(calls) == 3
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.json")}

    loads = []

    def counting_load(spec, report):  # the runner's loader: the seam that sees every model load
        loads.append(spec)
        return load_pipeline(spec, report)

    summary = run_rows(manifest, "out", model=tiny_ckpt, load=counting_load)
    assert (summary.exit_code, summary.line(Path("out"))) == (0, "batch: 0 done, 3 skipped, 0 failed (outputs in out)")
    assert len(calls) == 3 and loads == []  # nothing ran, the model was not even loaded
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.json")} == before

    (tmp_path / "out" / "b.json").unlink()  # b's image exists but it is not done without its sidecar
    (tmp_path / "out" / "img2.json").write_text('{"truncated": ')  # a sidecar that does not parse: redo
    summary = run_rows(manifest, "out", model=tiny_ckpt, load=counting_load)
    assert (summary.exit_code, summary.line(Path("out"))) == (0, "batch: 2 done, 1 skipped, 0 failed (outputs in out)")
    assert sorted(calls[3:]) == ["add snow", "make it blue"] and len(loads) == 1
    code, lines, _ = batch(capsys, manifest, "out", model=tiny_ckpt)  # and through the CLI: all done
    assert (code, lines) == (0, ["batch: 0 done, 3 skipped, 0 failed (outputs in out)"])
    assert (tmp_path / "out" / "a.json").read_bytes() == before["a.json"]
    assert json.loads((tmp_path / "out" / "b.json").read_text())["run_id"] != json.loads(before["b.json"])["run_id"]


def test_failed_row_is_recorded_and_the_batch_goes_on(capsys, tiny_ckpt, tmp_path):
    make_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    os.mkfifo(tmp_path / "pipe.png")  # would block a reader for ever: refused at once
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "ok1", "input": "img0.png", "prompt": "x"},
            {"id": "gone", "input": "missing.png", "prompt": "x"},
            {"id": "bad", "input": "broken.png", "prompt": "x"},
            {"id": "badseed", "input": "img1.png", "prompt": "x", "seed": "abc"},
            {"id": "nosteps", "input": "img1.png", "prompt": "x", "num_inference_steps": 0},
            {"id": "fifo", "input": "pipe.png", "prompt": "x"},
            {"id": "ok2", "input": "img1.png", "prompt": "y"},
        ],
    )
    code, lines, err = batch(capsys, manifest, "out", model=tiny_ckpt)
    assert code == 1
    assert lines == ["batch: 2 done, 0 skipped, 5 failed (outputs in out)"]
    out = tmp_path / "out"
    assert (out / "ok1.png").exists() and (out / "ok2.png").exists()
    errors = {i: json.loads((out / f"{i}.error.json").read_text())
              for i in ("gone", "bad", "badseed", "nosteps", "fifo")}  # fmt: skip
    fifo = tmp_path / "pipe.png"
    assert errors["fifo"]["error"] == f"cannot read image {fifo}: it is a named pipe, not a regular file"
    assert "input image not found" in errors["gone"]["error"] and errors["gone"]["manifest_line"] == 2
    assert errors["gone"]["input"] == str(tmp_path / "missing.png")  # absolute, as in the result sidecars
    assert "cannot read image" in errors["bad"]["error"]
    assert "seed must be an integer" in errors["badseed"]["error"]
    assert errors["nosteps"]["error"] == "num_inference_steps must be between 1 and 1000, got 0"  # the column
    assert all("\n" not in e["error"] for e in errors.values())
    assert not (out / "gone.png").exists() and not (out / "gone.json").exists()
    assert "row gone (line 2) failed: input image not found" in err

    (tmp_path / "missing.png").write_bytes((tmp_path / "img0.png").read_bytes())  # fix one row and rerun
    code, lines, _ = batch(capsys, manifest, "out", model=tiny_ckpt)
    assert (code, lines) == (1, ["batch: 1 done, 2 skipped, 4 failed (outputs in out)"])
    assert (out / "gone.json").exists() and not (out / "gone.error.json").exists()


class FailingPipe:
    """A stand-in pipeline: a grey frame for every prompt but ``boom``, where it raises as a bug would."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def set_flow_shift(self, shift) -> None:
        pass

    def __call__(self, *, prompt, height, width, **kwargs):
        self.prompts.append(prompt)
        if prompt == "boom":
            raise RuntimeError("boom: a bug, not a user error")
        return types.SimpleNamespace(frames=np.full((1, 1, height, width, 3), 0.5, dtype=np.float32))


def test_a_full_disk_stops_the_batch_in_one_line_and_a_rerun_finishes_it(capsys, tmp_path, monkeypatch):
    """Out of space while writing a row's image or its sidecar: the batch stops with one line naming the file (every
    later row would fail alike), leaves no partial or temp file and no error record; once there is room again a rerun
    skips the finished rows and completes the rest."""
    from chronoedit import files, media

    make_images(tmp_path, 1)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": f"r{i}", "input": "img0.png", "prompt": f"p{i}"} for i in range(4)])  # fmt: skip
    out, real_save, real_json = tmp_path / "out", media.save_image, files.write_json
    full = {"image": "r1.png", "sidecar": "r2.json"}

    def save_image(image, path):
        if Path(path).name == full["image"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path)

    def write_json(path, data):
        if Path(path).name == full["sidecar"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_json(path, data)

    monkeypatch.setattr(media, "save_image", save_image)
    monkeypatch.setattr(files, "write_json", write_json)
    monkeypatch.setattr(runner_module, "load_pipeline", lambda spec, report: FailingPipe())
    code, lines, err = batch(capsys, manifest, out, model="demo")
    errors = [line for line in err.splitlines() if "note: the demo model" not in line]
    assert (code, lines) == (2, [])
    assert errors == [f"chronoedit: error: cannot write {out / 'r1.png'}: the disk is full"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["r0.json", "r0.png"]

    full["image"] = None  # the next run gets further: the sidecar write fails
    code, lines, err = batch(capsys, manifest, out, model="demo")
    assert code == 2 and err.splitlines()[-1] == f"chronoedit: error: cannot write {out / 'r2.json'}: the disk is full"
    assert "Traceback" not in err
    assert not (out / "r2.error.json").exists() and not any(files.is_temp_name(p.name) for p in out.iterdir())

    full["sidecar"] = None  # room again
    code, lines, _ = batch(capsys, manifest, out, model="demo")
    assert (code, lines) == (0, [f"batch: 2 done, 2 skipped, 0 failed (outputs in {out})"])


def test_a_bug_in_a_row_stops_the_batch_while_user_errors_are_recorded(capsys, tiny_ckpt, tmp_path, monkeypatch):
    """Only a user error is a row's failure (recorded, the batch goes on); any other exception ends the batch as a
    bug, with no error record (a rerun redoes the row)."""
    make_images(tmp_path, 1)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "gone", "input": "missing.png", "prompt": "x"},
        {"id": "good", "input": "img0.png", "prompt": "fine"},
        {"id": "bug", "input": "img0.png", "prompt": "boom"},
        {"id": "never", "input": "img0.png", "prompt": "after"},
    ])  # fmt: skip
    pipe, out = FailingPipe(), tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom: a bug, not a user error"):
        run_rows(manifest, out, model="demo", load=lambda spec, report: pipe)
    assert pipe.prompts == ["fine", "boom"]  # the row after the bug did not run
    assert "input image not found" in json.loads((out / "gone.error.json").read_text())["error"]
    with Image.open(out / "good.png") as image:
        assert image.size == (32, 32)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "gone.error.json", "good.json", "good.png"]  # fmt: skip

    # Through the CLI (real model, its runner's generate failing on "boom"): the traceback, a bug line, exit code 1.
    real = runner_module.generate

    def failing(pipe, edit, *args, **kwargs):
        if edit.instruction == "boom":
            raise RuntimeError("boom: a bug, not a user error")
        return real(pipe, edit, *args, **kwargs)

    monkeypatch.setattr(runner_module, "generate", failing)
    code, lines, err = batch(capsys, manifest, tmp_path / "cli", model=tiny_ckpt)
    assert code == 1 and lines == []  # no summary: the batch did not finish
    assert "Traceback" in err and "RuntimeError: boom: a bug, not a user error" in err
    assert err.strip().splitlines()[-1] == cli.BUG_NOTE and "chronoedit: error:" not in err
    assert not (tmp_path / "cli" / "bug.error.json").exists() and (tmp_path / "cli" / "gone.error.json").exists()
    assert (tmp_path / "cli" / "good.json").exists() and not (tmp_path / "cli" / "never.png").exists()


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        (None, "m.jsonl", "manifest not found"),
        ("\n\n", "m.jsonl", "is empty"),
        ('{"input": "a.png", "prompt": "x"}\n{"input": "b.png", "prompt": \n', "m.jsonl", "cannot parse line 2"),
        ('{"input": "a.png", "prompt": "x"}\n[1, 2]\n', "m.jsonl", "line 2 is not a JSON object"),
        ('{"input": "a.png", "prompt": "x", "id": "k"}\n{"input": "b.png", "prompt": "y", "id": "k"}\n', "m.jsonl",
         "duplicate id 'k' in line 2 (also line 1)"),
        ('{"input": "a.png", "prompt": "x"}\n{"input": "d/a.png", "prompt": "y"}\n', "m.jsonl", "duplicate id 'a'"),
        ('{"input": "a.png", "prompt": "x"}\n\n{"input": "b.png"}\n', "m.jsonl", "missing prompt in line 3"),
        ('{"prompt": "x"}\n', "m.jsonl", "missing input image"),
        ('{"input": "a.png", "prompt": "x", "seeed": 1}\n', "m.jsonl", "unknown field 'seeed' in line 1"),
        ('{"input": "a.png", "prompt": "x", "id": "../up"}\n', "m.jsonl", "bad id '../up' in line 1"),
        ("input,prompt\na.png,x\nb.png,\n", "m.csv", "missing prompt in line 3"),
        ("input,prompt\na.png,x,extra\n", "m.csv", "line 2 has more cells than the header"),
        ("input,prompt,prompt\na.png,x,y\n", "m.csv", "the header names column 'prompt' more than once"),
        ('input,prompt\na.png,"two\nlines"\nb.png,x,extra\n', "m.csv", "line 4 has more cells than the header"),
        ('input,prompt\na.png,"two\nlines"\n\nb.png,\n', "m.csv", "missing prompt in line 5"),
        ('input,prompt\na.png,x\nb.png,"open\nquote\n', "m.csv", "cannot parse the record starting at line 3"),
        ('{"input": "a.png", "prompt": "x\u2028y"}\n{"input": "b.png"}\n', "m.jsonl", "missing prompt in line 2"),
        (b"input,prompt\na.png,\xff\n", "m.csv", "not UTF-8 text"),
    ],
)  # fmt: skip
def test_bad_manifest_is_one_line_and_exit_2(capsys, tmp_path, no_loading, content, name, expected):
    manifest = tmp_path / name
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    elif content is not None:
        manifest.write_text(content)
    code, lines, err = batch(capsys, manifest, "out", model="demo")
    assert code == 2 and lines == []
    assert len(err.strip().splitlines()) == 1 and err.startswith("chronoedit: error: "), err
    assert expected in err and "Traceback" not in err


def test_a_named_pipe_manifest_is_refused_at_once(capsys, tmp_path, no_loading):
    """A FIFO manifest does not block the batch."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    code, _, err = batch(capsys, fifo, "out", model="demo")
    assert code == 2 and err == f"chronoedit: error: cannot read manifest {fifo}: it is a named pipe, not a regular " \
                                "file\n"
    # a row naming a FIFO: test_failed_row_is_recorded_and_the_batch_goes_on


def test_bad_flags_exit_2_before_loading(capsys, tmp_path, no_loading):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"input": "a.png", "prompt": "x"}])
    code, _, err = batch(capsys, manifest, "out", "--output-format", "gif", model="demo")
    assert code == 2 and "argument --output-format: invalid choice: 'gif'" in err
    code, _, err = batch(capsys, manifest, "out", model=tmp_path / "nope")
    assert code == 2 and "model folder not found" in err
    code, _, err = batch(capsys, manifest, "out", "--num-inference-steps", "0", model="demo")  # named as the flag
    assert (code, err) == (2, "chronoedit: error: --num-inference-steps must be between 1 and 1000, got 0\n")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def _kill_at_a_random_moment(code: str, env: dict, out: Path, rng: random.Random) -> None:
    """Start the batch, wait for a random number of finished images (0-3) plus a random 0-0.3 s, then SIGKILL."""
    wanted, extra_s = rng.randint(0, 3), rng.uniform(0, 0.3)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and len([p for p in out.glob("r*.png") if ".tmp-" not in p.name]) >= wanted + 1):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.005)
        time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it was killed"


def test_sigkill_then_rerun_loses_nothing(tiny_ckpt, tmp_path):
    """Killed twice at random moments (seed printed on failure), then rerun: every row once, complete and valid."""
    seed = int(os.environ.get("CHRONOEDIT_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    count = 12
    make_images(tmp_path, count)
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": f"r{i}", "input": f"img{i}.png", "prompt": f"edit {i}"} for i in range(count)]
    )
    out = tmp_path / "out"
    argv = ["batch", str(manifest), "--out", str(out), "--model-path", str(tiny_ckpt), *SMALL]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = f"import sys; from chronoedit.cli import main; sys.exit(main({argv!r}))"

    def done_sidecars() -> dict[str, dict]:
        result = {}
        for path in out.glob("r*.json"):
            with contextlib.suppress(ValueError):
                result[path.stem] = json.loads(path.read_text())
        return result

    after_kill: dict[str, dict] = {}
    for _ in range(2):
        _kill_at_a_random_moment(code, env, out, rng)
        now = done_sidecars()
        assert all(now[k] == v for k, v in after_kill.items()), f"seed {seed}: a done row was redone"
        after_kill = now
    assert len(after_kill) < count, f"seed {seed}: the batch finished before it was killed"
    for row_id in after_kill:  # every sidecar written before the kill has its complete image
        with Image.open(out / f"{row_id}.png") as image:
            image.load()

    rerun = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == (
        f"batch: {count - len(after_kill)} done, {len(after_kill)} skipped, 0 failed (outputs in {out})"
    )
    final = done_sidecars()
    assert sorted(final) == sorted(f"r{i}" for i in range(count)), f"seed {seed}"
    for row_id, sidecar in final.items():
        with Image.open(out / f"{row_id}.png") as image:
            image.load()
            assert image.size == (32, 32)
        if row_id in after_kill:  # done before the kill: not produced again
            assert sidecar == after_kill[row_id]
    run_ids = {s["run_id"] for s in final.values()}
    assert 1 <= len(run_ids) <= 3, f"seed {seed}"
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name or ".probe-" in p.name or "error" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"r{i}.png" for i in range(count)] + [f"r{i}.json" for i in range(count)]
    )


def test_row_presets_switch_loras_per_row(capsys, tiny_ckpt, tmp_path, monkeypatch):
    """A row's preset loads its LoRA once and makes it active only for that row, with its own flow shift."""
    from tiny_loras import attention_lora

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for child in tiny_ckpt.iterdir():
        (ckpt / child.name).symlink_to(child)
    attention_lora(tiny_ckpt, ckpt / "lora" / "chronoedit_distill_lora.safetensors")

    seen = []
    real = runner_module.generate

    def spying(pipe, edit, *args, **kwargs):  # the LoRAs and flow shift the row ran with (still set after it)
        out = real(pipe, edit, *args, **kwargs)
        seen.append((edit.instruction, pipe.get_active_adapters(), pipe.scheduler.config.flow_shift))
        return out

    monkeypatch.setattr(runner_module, "generate", spying)
    make_images(tmp_path, 1)
    rows = [{"id": "plain1", "input": "img0.png", "prompt": "one", "seed": 1},
            {"id": "fast", "input": "img0.png", "prompt": "two", "seed": 1, "preset": "distill",
             "num_inference_steps": 2},
            {"id": "plain2", "input": "img0.png", "prompt": "one", "seed": 1}]  # fmt: skip
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    code, _, err = batch(capsys, manifest, tmp_path / "out", model=ckpt)
    assert code == 0, err
    assert [(prompt, len(active), shift) for prompt, active, shift in seen] == [
        ("one", 0, 5.0), ("two", 1, 2.0), ("one", 0, 5.0)
    ]  # fmt: skip
    sidecar = json.loads((tmp_path / "out" / "fast.json").read_text())
    assert sidecar["preset"] == "distill" and sidecar["guidance_scale"] == 1.0 and sidecar["flow_shift"] == 2.0
    assert [Path(p).name for p, _ in sidecar["loras"]] == ["chronoedit_distill_lora.safetensors"]
    out = tmp_path / "out"
    assert (out / "plain1.png").read_bytes() == (out / "plain2.png").read_bytes()  # the LoRA is off again
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "input": "img0.png", "prompt": "p", "preset": "nope"}])
    code, _, err = batch(capsys, bad, tmp_path / "out2", model=ckpt)
    assert code == 1 and "preset must be one of" in (tmp_path / "out2" / "x.error.json").read_text()


def test_only_true_temp_files_are_removed(capsys, tiny_ckpt, tmp_path):
    """Ids and inputs whose names merely contain '.tmp-' survive reruns; a killed batch's real temp files go."""
    from chronoedit.files import is_temp_name

    Image.new("RGB", (48, 32), (9, 99, 199)).save(tmp_path / "holiday.tmp-1.png")
    rows = [{"id": "scan.tmp-2", "input": "holiday.tmp-1.png", "prompt": "x"},
            {"id": "h", "input": "holiday.tmp-1.png", "prompt": "y"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    assert batch(capsys, manifest, tmp_path, model=tiny_ckpt)[:2] == (0, [f"batch: 2 done, 0 skipped, 0 failed "
                                                                        f"(outputs in {tmp_path})"])  # fmt: skip
    stale = [tmp_path / "scan.tmp-2.png.tmp-4242-0123abcd.png", tmp_path / ".scan.tmp-2.png.probe-7-89abcdef"]
    for path in stale:
        path.write_bytes(b"partial")
    code, lines, _ = batch(capsys, manifest, tmp_path, model=tiny_ckpt)
    assert (code, lines) == (0, [f"batch: 0 done, 2 skipped, 0 failed (outputs in {tmp_path})"])
    assert (tmp_path / "holiday.tmp-1.png").is_file() and not any(path.exists() for path in stale)
    assert {"scan.tmp-2.png", "scan.tmp-2.json", "h.png", "h.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not is_temp_name("holiday.tmp-1.png") and not is_temp_name("a.tmp-1-0123abcd.jpg")
    assert is_temp_name("a.json.tmp-1-0123abcd.json") and is_temp_name(".a.png.probe-1-0123abcd")


def test_an_output_never_overwrites_an_input(capsys, tiny_ckpt, tmp_path):
    """Neither a row's own input (default id = the input's stem, --out = the images' folder) nor another row's."""
    make_images(tmp_path, 2)
    own = write_jsonl(tmp_path / "own.jsonl", [{"input": "img0.png", "prompt": "x"}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "a", "input": "img0.png", "prompt": "x"},
                                                   {"id": "img0", "input": "img1.png", "prompt": "y"}])  # fmt: skip
    before = (tmp_path / "img0.png").read_bytes()
    for manifest, row in ((own, "img0 (line 1)"), (other, "img0 (line 2)")):
        code, _, err = batch(capsys, manifest, tmp_path, model=tiny_ckpt)
        assert code == 2 and f"row {row} would write {tmp_path / 'img0.png'}, the input image of line 1" in err
    assert (tmp_path / "img0.png").read_bytes() == before
    assert batch(capsys, other, tmp_path / "out", model=tiny_ckpt)[0] == 0
    Image.new("RGB", (48, 32)).save(tmp_path / "IMG_0001.JPG")  # one file on a case-insensitive file system
    camera = write_jsonl(tmp_path / "camera.jsonl", [{"input": "IMG_0001.JPG", "prompt": "x", "output_format": "jpg"}])
    code, _, err = batch(capsys, camera, tmp_path, model=tiny_ckpt)
    assert code == 2 and "IMG_0001.jpg, the input image of line 1" in err


def test_a_row_whose_input_is_a_symlink_loop_fails_alone(capsys, tiny_ckpt, tmp_path):
    make_images(tmp_path, 1)
    (tmp_path / "loop.png").symlink_to("loop.png")
    rows = [{"id": "bad", "input": "loop.png", "prompt": "x"}, {"id": "good", "input": "img0.png", "prompt": "x"}]
    code, lines, _ = batch(capsys, write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", model=tiny_ckpt)
    assert code == 1 and lines[-1].startswith("batch: 1 done, 0 skipped, 1 failed")
    assert (tmp_path / "out" / "good.png").is_file() and (tmp_path / "out" / "bad.error.json").is_file()


def test_a_rows_max_area_sizes_it_by_area_and_csv_cells_are_trimmed(capsys, tiny_ckpt, tmp_path):
    from chronoedit.sizing import auto_size

    make_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text("id, input, prompt, max_area\nauto, img0.png, x, 3072\nfixed, img1.png , y,\n")
    code, lines, _ = batch(capsys, tmp_path / "m.csv", tmp_path / "o", model=tiny_ckpt)
    assert code == 0, lines
    auto, fixed = (json.loads((tmp_path / "o" / f"{i}.json").read_text()) for i in ("auto", "fixed"))
    assert (auto["width"], auto["height"]) == auto_size(48, 32, 3072) != (32, 32)
    assert (fixed["width"], fixed["height"]) == (32, 32)  # the batch's --height/--width
