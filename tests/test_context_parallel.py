"""Context parallel (issue 13): one edit over several CPU processes joined by gloo equals the single-process edit
within 1e-5 (fp32): plain, with CFG (batched and as two passes), CFG branches on two rank groups, Ulysses, ring,
Ulysses x ring, temporal reasoning dropped mid-way and never dropped, and token counts the ranks do not divide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parallel_helpers import run_on_ranks
from PIL import Image

from chronoedit import ChronoEditPipeline
from chronoedit.errors import UserError
from chronoedit.parallel import Layout, choose_layout

TOL = 1e-5
STEPS = 3
PLAIN = {"num_frames": 5}
DROPPED = {"num_frames": 29, "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": 1}
KEPT = {"num_frames": 29, "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": STEPS}
# name -> (enable_parallelism arguments, call arguments); 32x48 pixels: 2 x 2 x 3 = 12 tokens per latent frame
TWO_RANKS = {
    "plain_no_cfg": ({}, {**PLAIN, "guidance_scale": 1.0}),
    "cfg_batched": ({}, {**PLAIN, "guidance_scale": 5.0}),
    "cfg_two_passes": ({}, {**PLAIN, "guidance_scale": 5.0, "cfg_batch": False}),
    "cfg_parallel": ({"cfg_parallel": True}, {**PLAIN, "guidance_scale": 5.0}),
    "ring": ({"ring_degree": 2}, {**PLAIN, "guidance_scale": 5.0}),
    "reasoning_dropped": ({}, {**DROPPED, "guidance_scale": 5.0}),
    "reasoning_never_dropped": ({}, {**KEPT, "guidance_scale": 5.0}),
    "cfg_parallel_reasoning_dropped": ({"cfg_parallel": True}, {**DROPPED, "guidance_scale": 5.0}),
    "cfg_parallel_first_block_cache": ({"cfg_parallel": True},
                                       {**PLAIN, "guidance_scale": 5.0, "cache": "first-block:0.5"}),
    "streamed_blocks_reasoning_dropped": ({"stream_blocks": 1}, {**DROPPED, "guidance_scale": 5.0}),  # stays on: last
}  # fmt: skip
# 3 ranks and 2 heads: a ring of 3; at 32x32 pixels a latent frame has 2 x 2 = 4 tokens, 8 per edit: 3 does not
# divide 8 (nor 32 with reasoning) -> padded and masked
THREE_RANKS = {
    "ring3_plain_padded": ({}, {**PLAIN, "guidance_scale": 5.0, "height": 32, "width": 32}),
    "ring3_reasoning_dropped_padded": ({}, {**DROPPED, "guidance_scale": 5.0, "height": 32, "width": 32}),
}
# 4 ranks: Ulysses 2 x ring 2 (12 tokens at 32x48 with a 2-frame edit... and 20 -> 18 real at 48x48), CFG x Ulysses 2
FOUR_RANKS = {
    "ulysses2_ring2_padded": ({"ulysses_degree": 2, "ring_degree": 2},
                              {**PLAIN, "guidance_scale": 5.0, "height": 48, "width": 48}),
    "ulysses2_ring2_reasoning_dropped": ({"ulysses_degree": 2, "ring_degree": 2}, {**DROPPED, "guidance_scale": 5.0}),
    "cfg_parallel_ulysses2": ({"cfg_parallel": True}, {**PLAIN, "guidance_scale": 5.0}),
}  # fmt: skip


def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))


def edit(pipe: ChronoEditPipeline, call: dict) -> dict[str, np.ndarray]:
    args = {"prompt": "turn the cup red", "num_inference_steps": STEPS, "height": 32, "width": 48, **call}
    trajectory = bool(args.get("enable_temporal_reasoning"))
    out = pipe(image=image(), generator=torch.Generator().manual_seed(7), output_type="np",
               return_trajectory=trajectory, **args)  # fmt: skip
    return {"frames": np.asarray(out.frames), "trajectory": np.asarray(out.trajectory if trajectory else [])}


def run_modes(ckpt: str, modes: dict) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """On every rank: each mode's edit with its parallel layout; (layout line, outputs) by mode."""
    pipe = ChronoEditPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for name, (parallel, call) in modes.items():
        parallel = dict(parallel)
        if "stream_blocks" in parallel:  # block streaming composes with the split (on from here on)
            pipe.enable_group_offload("cpu", num_blocks_per_group=parallel.pop("stream_blocks"))
        layout = pipe.enable_parallelism(**parallel)
        results[name] = (layout.describe(), edit(pipe, call))
    pipe.enable_parallelism()
    try:
        edit(pipe, {**PLAIN, "cache": "first-block:0.5"})
    except UserError as exc:
        results["cache_refused"] = str(exc)
    return results


@pytest.fixture(scope="module")
def single(tiny_ckpt):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def two_ranks(tiny_ckpt):
    return run_on_ranks(2, run_modes, str(tiny_ckpt), TWO_RANKS)


@pytest.fixture(scope="module")
def three_ranks(tiny_ckpt):
    return run_on_ranks(3, run_modes, str(tiny_ckpt), THREE_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tiny_ckpt):
    return run_on_ranks(4, run_modes, str(tiny_ckpt), FOUR_RANKS)


def assert_same(single, modes, results, name):
    described, parallel = results[name]
    reference = edit(single, modes[name][1])
    for key in ("frames", "trajectory"):
        assert parallel[key].shape == reference[key].shape
        if not reference[key].size:
            continue
        diff = float(np.abs(parallel[key] - reference[key]).max())
        assert diff <= TOL, f"{name} ({described}): {key} differs by {diff:.2e}"
    return described


@pytest.mark.parametrize("name", sorted(TWO_RANKS))
def test_two_ranks_equal_one_process(single, two_ranks, name):
    """(With a step cache: each rank of a CFG pair keeps its branch's cache, as one process keeps one per branch.)"""
    described = assert_same(single, TWO_RANKS, two_ranks, name)
    expected = "CFG branches on 2 groups" if TWO_RANKS[name][0].get("cfg_parallel") else "ring 2" if "ring" in name \
        else "Ulysses 2"  # fmt: skip
    assert described == f"context parallel on 2 ranks: {expected}"


def test_a_step_cache_with_the_sequence_split_is_refused_in_one_line(two_ranks):
    assert "step caches do not run with the token sequence split over ranks" in two_ranks["cache_refused"]


@pytest.mark.parametrize("name", sorted(THREE_RANKS))
def test_three_ranks_pad_and_mask_a_sequence_they_do_not_divide(single, three_ranks, name):
    assert assert_same(single, THREE_RANKS, three_ranks, name) == "context parallel on 3 ranks: ring 3"


@pytest.mark.parametrize("name", sorted(FOUR_RANKS))
def test_four_ranks_ulysses_times_ring_and_cfg_groups(single, four_ranks, name):
    assert_same(single, FOUR_RANKS, four_ranks, name)


# ------------------------------------------------------------------------------------------------------- layouts
def test_default_layouts_prefer_ulysses_and_fall_back_to_a_ring():
    assert choose_layout(8, 40) == Layout(ulysses=8)
    assert choose_layout(8, 40, cfg_parallel=True) == Layout(cfg=2, ulysses=4)
    assert choose_layout(6, 40) == Layout(ulysses=2, ring=3)
    assert choose_layout(3, 40) == Layout(ring=3)
    assert choose_layout(4, 40, ring=2) == Layout(ulysses=2, ring=2)
    assert choose_layout(1, 40) == Layout()
    layout = Layout(cfg=2, ring=2, ulysses=2)
    assert [layout.coordinates(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"world": 8, "heads": 40, "ulysses": 3}, "must multiply to 8"),
        ({"world": 6, "heads": 40, "ulysses": 3, "ring": 2}, "does not divide the model's 40 attention heads"),
        ({"world": 3, "heads": 40, "cfg_parallel": True}, "needs an even number of ranks"),
        ({"world": 4, "heads": 40, "ulysses": 0}, "must be a whole number"),
    ],
)
def test_impossible_layouts_are_one_line(args, message):
    with pytest.raises(UserError, match=message) as info:
        choose_layout(**args)
    assert "\n" not in str(info.value)


def test_enable_parallelism_needs_a_process_group(single):
    with pytest.raises(UserError, match=r"torch\.distributed initialised first"):
        single.enable_parallelism()


# ------------------------------------------------------------------------------------------------ the command line
def test_torchrun_edit_on_two_ranks_writes_once_the_single_process_image(tiny_ckpt, tmp_path):
    import os
    import subprocess
    import sys

    args = ["edit", "--model-path", str(tiny_ckpt), "-p", "turn the cup red", "--num-inference-steps", "2",
            "--height", "32", "--width", "48", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launch, "-m", "chronoedit", *args, "-o", str(tmp_path / "cp.png")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote edited image") == 1  # rank 0 writes, the other rank says nothing
    assert "context parallel on 2 ranks: Ulysses 2" in done.stderr
    one = subprocess.run([sys.executable, "-m", "chronoedit", *args, "-o", str(tmp_path / "one.png"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    parallel, single = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("cp.png", "one.png"))
    assert np.abs(parallel - single).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.png", "one.png"]


@pytest.mark.parametrize(
    ("world", "flags", "message"),
    [
        ("2", ["--ulysses-degree", "3"], "2 ranks cannot be split as ulysses 3 x ring ?"),
        ("4", ["--ulysses-degree", "4"], "--ulysses-degree 4 does not divide the model's 2 attention heads"),
        ("3", ["--cfg-parallel"], "--cfg-parallel needs an even number of ranks, got 3"),
        ("2", ["--cfg-parallel", "--guidance-scale", "1"], "--cfg-parallel splits the two classifier-free"),
        (None, ["--ring-degree", "2"], "--ring-degree needs several processes: launch with torchrun"),
    ],
)
def test_a_layout_that_cannot_run_is_one_line_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch, capsys,
                                                                     world, flags, message):  # fmt: skip
    from chronoedit.cli import main

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:  # as torchrun sets them; the layout is checked before any process group starts
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["edit", "--model-path", str(tiny_ckpt), "-p", "x", "-o", str(tmp_path / "o.png"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("chronoedit: error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_only_rank_0_says_an_error_every_rank_meets(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from chronoedit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    code = main(["edit", "--model-path", str(tiny_ckpt), "-p", "x", "-o", str(tmp_path / "o.png"),
                 "--ulysses-degree", "3"])  # fmt: skip
    assert (code, capsys.readouterr().err) == (2, "")  # rank 0 prints the line (the test above)


def test_one_gpu_named_for_every_process_is_refused(monkeypatch):
    from chronoedit.editing.parallel import rank_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="would put all 2 processes on one device: give cuda"):
        rank_device("cuda:0", Layout(ulysses=2))
    assert rank_device("cpu", Layout(ulysses=2)) == "cpu"


def test_the_prompt_enhancer_is_refused_under_torchrun(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from chronoedit.cli import main

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code = main(["edit", "--model-path", str(tiny_ckpt), "-p", "x", "-o", str(tmp_path / "o.png"),
                 "--use-prompt-enhancer"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--use-prompt-enhancer does not run under torchrun" in err, err
