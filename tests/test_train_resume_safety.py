"""Resuming ``chronoedit train`` from checkpoints that cannot be trusted: a crafted pickle in any file of a checkpoint
is refused in one line and never runs; a damaged latest checkpoint is one line naming the file, and ``--resume
previous`` goes back to the one before it (the damaged one renamed aside, nothing deleted); a half-copied checkpoint
is never picked; an earlier version's checkpoint still resumes. Also: ``--model-path demo`` trains, and a bad value
in a training config file names the file and the key."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import cli
from chronoedit.train.loop import read_log

CHECKPOINT_1 = "checkpoints/checkpoint-000001"
CHECKPOINT_2 = "checkpoints/checkpoint-000002"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """2 pairs: a coloured block moves from the top-left to the bottom-right corner."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = ["key,prompt,source,target"]
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        for name, corner in (("s", (0, 0)), ("t", (16, 16))):
            image = Image.new("RGB", (32, 32), (128, 128, 128))
            image.paste(Image.new("RGB", (16, 16), color), corner)
            image.save(folder / f"{name}{i}.png")
        lines.append(f"p{i},move block {i} to the bottom right,s{i}.png,t{i}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def train_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model-path", str(ckpt), "--dataset", str(data), "--output-dir", str(out), "--cache-dir",
            str(out.parent / "cache"), "--height", "32", "--width", "32", "--mixed-precision", "no",
            "--no-gradient-checkpointing", "--lora-rank", "4", "--learning-rate", "5e-3", "--quiet",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def two_step_run(tiny_ckpt, pairs, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint after each step; tests work on copies."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "2", "--checkpoint-every", "1")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run.parent / "cache", tmp_path / "cache")
    return Path(shutil.copytree(run, tmp_path / "run"))


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


class Payload:
    """Unpickling it makes the folder ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# ---------------------------------------------------------------------------------------------- hostile pickles
def test_the_payload_runs_when_unpickled_without_restriction(tmp_path):
    """The test's payload works: loading it the way accelerate loaded custom states runs it."""
    torch.save(Payload(tmp_path / "ran"), tmp_path / "payload.pkl")
    torch.load(tmp_path / "payload.pkl", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def old_layout(checkpoint: Path) -> None:
    """Rewrite a checkpoint as earlier versions saved it through accelerate: the step counter pickled in
    custom_checkpoint_0.pkl, numpy arrays in random_states_0.pkl, no train_state.json."""
    counters = json.loads((checkpoint / "train_state.json").read_text())
    states = torch.load(checkpoint / "random_states_0.pt", weights_only=True)
    name, keys, pos, has_gauss, cached = states["numpy"]
    torch.save({"step": counters["step"]}, checkpoint / "custom_checkpoint_0.pkl")
    torch.save({"step": counters["accelerator_step"], "random_state": states["python"],
                "numpy_random_seed": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
                "torch_manual_seed": states["torch"]}, checkpoint / "random_states_0.pkl")  # fmt: skip
    (checkpoint / "train_state.json").unlink()
    (checkpoint / "random_states_0.pt").unlink()


@pytest.mark.parametrize(
    ("name", "layout", "form"),
    [("optimizer.bin", "new", "torch"), ("scheduler.bin", "new", "torch"), ("random_states_0.pt", "new", "torch"),
     ("optimizer.bin", "new", "pickle"), ("custom_checkpoint_0.pkl", "old", "torch"),
     ("random_states_0.pkl", "old", "torch"), ("custom_checkpoint_0.pkl", "old", "pickle")],
)  # fmt: skip
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(two_step_run, tiny_ckpt, pairs, tmp_path, capsys,
                                                                    name, layout, form):  # fmt: skip
    """Each file a resume reads that could hold a pickle, in this version's and the earlier layout, as torch.save
    writes it and as a bare pickle: one line naming the file; the payload never runs; nothing is trained."""
    out = copy_run(two_step_run, tmp_path)
    checkpoint = out / CHECKPOINT_2
    if layout == "old":
        old_layout(checkpoint)
    marker = tmp_path / "payload-ran"
    if form == "torch":
        torch.save(Payload(marker), checkpoint / name)
    else:
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    log = (out / "train_log.jsonl").read_text()
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    if form == "torch":  # refused by what it would build
        assert err[0].startswith(f"chronoedit: error: resume: refusing to load {checkpoint / name}: "), err
        assert f"it would build the Python object {os.mkdir.__module__}.mkdir" in err[0], err
    else:  # a bare pickle is not even read
        assert f"resume: {checkpoint / name} is not a file written by torch.save" in err[0], err
    assert not marker.exists()
    assert (out / "train_log.jsonl").read_text() == log and not (out / "checkpoints" / "checkpoint-000003").exists()


def test_an_earlier_versions_checkpoint_resumes_like_this_versions(two_step_run, tiny_ckpt, pairs, tmp_path, capsys):
    """The same checkpoint in accelerate's former layout (step and numpy random state in pickles, read as plain data)
    resumes to the same next loss as in this version's layout."""
    losses = {}
    for layout in ("new", "old"):
        out = copy_run(two_step_run, tmp_path / layout)
        if layout == "old":
            old_layout(out / CHECKPOINT_2)
        code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
        assert code == 0, capsys.readouterr().err
        assert "resumed at step 2" in capsys.readouterr().out
        log = read_log(out / "train_log.jsonl")
        assert [r["step"] for r in log] == [1, 2, 3]
        losses[layout] = log[2]["loss"]
        assert (out / "checkpoints" / "checkpoint-000003" / "train_state.json").is_file()
    assert losses["old"] == losses["new"]


# ------------------------------------------------------------------------------------------- damaged checkpoints
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [("optimizer.bin", truncate, "is truncated or corrupt"),
     ("lora.safetensors", truncate, "is truncated or corrupt"),
     ("scheduler.bin", lambda p: p.write_bytes(b""), "is empty"),
     ("random_states_0.pt", lambda p: p.write_bytes(os.urandom(300)), "is not a file written by torch.save"),
     ("random_states_0.pt", lambda p: torch.save({"python": (3, (1, 2), None)}, p), "not a valid set of random"),
     ("train_state.json", lambda p: p.write_text('{"step": 2, "accel'), "is truncated or corrupt"),
     ("train_state.json", lambda p: p.write_text('{"step": -2, "accelerator_step": 2}'), "step must be an integer"),
     ("train_config.json", lambda p: p.write_text('{"lora_rank": "4"}'), "is corrupt: lora_rank must be an integer"),
     ("optimizer.bin", lambda p: p.unlink(), "is missing"),
     ("optimizer.bin", lambda p: (p.unlink(), os.mkfifo(p)), "a named pipe")],
    ids=["optimizer-truncated", "lora-truncated", "scheduler-empty", "rng-garbage", "rng-invalid", "state-truncated",
         "state-negative", "config-wrong-type", "optimizer-missing", "optimizer-fifo"],
)  # fmt: skip
def test_a_damaged_latest_checkpoint_is_one_line_naming_the_file(two_step_run, tiny_ckpt, pairs, tmp_path, capsys,
                                                                 name, damage, says):  # fmt: skip
    """Found before anything loads; the line names the file and, where it helps, --resume previous."""
    out = copy_run(two_step_run, tmp_path)
    damage(out / CHECKPOINT_2 / name)
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert str(out / CHECKPOINT_2 / name) in err[0] and says in err[0], err
    if "named pipe" not in says:
        assert err[0].endswith("resume from the one before, checkpoint-000001, with --resume previous"), err
    assert not (out / "checkpoints" / "checkpoint-000003").exists()


def test_resume_previous_goes_back_one_checkpoint_and_sets_the_latest_aside(two_step_run, tiny_ckpt, pairs, tmp_path,
                                                                            capsys):  # fmt: skip
    """Step 2 is re-trained from checkpoint 1 exactly as before (same loss); the damaged checkpoint 2 is kept, renamed
    aside, where neither a resume nor pruning picks it."""
    out = copy_run(two_step_run, tmp_path)
    truncate(out / CHECKPOINT_2 / "optimizer.bin")
    damaged = (out / CHECKPOINT_2 / "optimizer.bin").read_bytes()
    before = read_log(out / "train_log.jsonl")
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3", "--resume", "previous",
                               "--checkpoint-every", "1", "--checkpoints-total-limit", "2"))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "resumed at step 1" in capsys.readouterr().out
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[1]["loss"] == pytest.approx(before[1]["loss"], rel=1e-6, abs=1e-7)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-000002", "checkpoint-000002.skipped", "checkpoint-000003"]
    assert (out / "checkpoints" / "checkpoint-000002.skipped" / "optimizer.bin").read_bytes() == damaged


def test_resume_previous_needs_an_earlier_checkpoint(two_step_run, tiny_ckpt, pairs, tmp_path, capsys):
    out = copy_run(two_step_run, tmp_path)
    shutil.rmtree(out / CHECKPOINT_1)
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3", "--resume", "previous"))
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert f"--resume previous: {out / 'checkpoints'} holds only checkpoint-000002, no earlier checkpoint" in err[0]
    truncate(out / CHECKPOINT_2 / "optimizer.bin")  # the only one, damaged: start over
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
    err = error_lines(capsys)
    assert code == 2 and err[0].endswith(f"the only checkpoint: delete {out / CHECKPOINT_2} to start the run over")


def test_a_half_copied_checkpoint_is_never_picked(two_step_run, tiny_ckpt, pairs, tmp_path, capsys):
    """A later checkpoint folder without its train_state.json (copied or written in part) is not complete: the run
    resumes from the latest complete one."""
    out = copy_run(two_step_run, tmp_path)
    partial = Path(shutil.copytree(out / CHECKPOINT_2, out / "checkpoints" / "checkpoint-000009"))
    (partial / "train_state.json").unlink()
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
    assert code == 0, capsys.readouterr().err
    assert "resumed at step 2" in capsys.readouterr().out


def test_plain_data_that_does_not_fit_the_run_is_one_line(two_step_run, tiny_ckpt, pairs, tmp_path, capsys):
    """An optimizer state of tensors and numbers, but for other parameters: named, not a traceback."""
    out = copy_run(two_step_run, tmp_path)
    torch.save({"state": {}, "param_groups": [{"params": [0, 1], "lr": 1.0}]}, out / CHECKPOINT_2 / "optimizer.bin")
    code = cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3"))
    err = [line for line in error_lines(capsys) if line.startswith("chronoedit: error:")]
    assert code == 2 and len(err) == 1, err
    assert f"resume: {out / CHECKPOINT_2 / 'optimizer.bin'} does not fit this run" in err[0]


def test_full_fine_tuning_resumes_exactly_from_its_safetensors_checkpoint(tiny_ckpt, pairs, tmp_path, capsys):
    """Every weight in model.safetensors, the optimizer's moments in optimizer.bin: a run stopped after step 2 and
    resumed matches an uninterrupted one at step 3."""
    full = ["--mode", "full", "--checkpoint-every", "1"]
    assert cli.main(train_args(tiny_ckpt, pairs, tmp_path / "a" / "straight", "--max-steps", "3", *full)) == 0
    out = tmp_path / "b" / "resumed"
    assert cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "2", *full)) == 0
    assert sorted(p.name for p in (out / CHECKPOINT_2).glob("*.safetensors")) == ["model.safetensors"]
    capsys.readouterr()
    assert cli.main(train_args(tiny_ckpt, pairs, out, "--max-steps", "3", *full)) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    straight = [r["loss"] for r in read_log(tmp_path / "a" / "straight" / "train_log.jsonl")]
    assert [r["loss"] for r in read_log(out / "train_log.jsonl")] == pytest.approx(straight, rel=1e-6, abs=1e-7)


def test_checkpoint_random_states_are_plain_tensors_and_numbers(two_step_run):
    """What a checkpoint's random-state file holds loads with weights_only and restores each generator."""
    states = torch.load(two_step_run / CHECKPOINT_2 / "random_states_0.pt", weights_only=True)
    assert set(states) == {"python", "numpy", "torch"}
    random.Random().setstate(states["python"])
    assert states["numpy"][0] == "MT19937" and states["numpy"][1].shape == (624,)
    assert torch.Generator().set_state(states["torch"]) is not None


# --------------------------------------------------------------------------------------------------- demo model
def test_train_accepts_the_demo_model(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(train_args(Path("demo"), pairs, out, "--max-steps", "1"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the demo model has random weights" in captured.err
    assert f"wrote LoRA: {out / 'lora.safetensors'}" in captured.out
    assert "demo-v1" in json.loads((out / "train_config.json").read_text())["model_path"]


# ------------------------------------------------------------------------------------------------- config files
@pytest.mark.parametrize(
    ("values", "says"),
    [({"lora_rank": "8"}, "lora_rank must be an integer, got '8'"),
     ({"max_steps": 0}, "max_steps must be a positive integer, got 0"),
     ({"learning_rate": -1e-4}, "learning_rate must be a positive finite number"),
     ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be >= 1"),
     ({"gradient_checkpointing": "false"}, "gradient_checkpointing must be true or false"),
     ({"batch_size": 10**400}, "batch_size must be at most 2147483647, got a 401-digit integer"),
     ({"flow_shift": 10**400}, "flow_shift must be a number, got a 401-digit integer"),
     ({"seed": -1}, "seed must be an integer from 0 to 4294967295, got -1"),
     ({"adam_beta2": 1.0}, "adam_beta2 must be >= 0 and < 1, got 1.0"),
     ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number >= 0, got nan"),
     ({"max_steps": 2**31 - 1, "batch_size": 2**20}, "max_steps x gradient_accumulation_steps x batch_size is")],
)  # fmt: skip
def test_a_bad_value_in_a_config_file_names_the_file_and_the_key(tmp_path, capsys, values, says):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"model_path": str(tmp_path), "dataset": str(tmp_path), **values}))
    code = cli.main(["train", str(path)])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"chronoedit: error: config {path}: {says}"), err


def test_a_flag_overriding_a_bad_file_value_is_checked_as_a_flag(tmp_path, capsys):
    path = tmp_path / "train.toml"
    path.write_text(f'model_path = "{tmp_path}"\ndataset = "{tmp_path}"\nlora_rank = 0\n')
    code = cli.main(["train", str(path), "--lora-rank", "-3"])
    err = error_lines(capsys)
    assert code == 2 and err == ["chronoedit: error: lora_rank must be a positive integer, got -3"], err
