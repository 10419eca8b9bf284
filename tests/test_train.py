"""``chronoedit train`` on tiny random checkpoints (CPU, fp32, 32x32): the loss falls when overfitting 4 pairs, a
killed run resumes exactly where an uninterrupted one would be, the cache spares the encoders on the second run,
the LoRA changes ``chronoedit edit`` and loads in diffusers with the same edit, a reasoning video trains, and a full
fine-tune saves a transformer that ``chronoedit edit --transformer`` loads."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel, cli
from chronoedit.errors import UserError
from chronoedit.media import save_video
from chronoedit.train import TrainConfig, train
from chronoedit.train import loop as train_loop
from chronoedit.train.loop import read_log

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
FAST = {"height": 32, "width": 32, "mixed_precision": "no", "gradient_checkpointing": False, "quiet": True}


def block(color: tuple[int, int, int], corner: int) -> Image.Image:
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    image.paste(Image.new("RGB", (16, 16), color), (0, 0) if corner == 0 else (16, 16))
    return image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the thread hand-offs stall (a 200-step
    run took 95 s with 2 threads on a busy machine, 10 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """4 pairs: a coloured block moves from the top-left to the bottom-right corner (the labeler's layout)."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = ["key,video,prompt,source_image,target_image"]
    for i, color in enumerate(COLORS):
        block(color, 0).save(folder / f"s{i}.png")
        block(color, 1).save(folder / f"t{i}.png")
        lines.append(f"p{i},,move block {i} to the bottom right,s{i}.png,t{i}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ckpt_d64(tmp_path_factory) -> Path:
    """Inner dim 64: wide enough to fit the 4 pairs in a few hundred steps (dim 32 learns much slower)."""
    from chronoedit.demo import TinySpec, build_tiny_checkpoint

    spec = TinySpec(num_attention_heads=2, attention_head_dim=32)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("d64") / "ckpt", spec)


def config(ckpt: Path, data: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(model_path=str(ckpt), dataset=str(data), output_dir=str(out), cache_dir=str(cache),
                       **{**FAST, "lora_rank": 8, **kw})  # fmt: skip


def window(losses: list[float], start: int, size: int = 20) -> float:
    return statistics.mean(losses[start : start + size] if start >= 0 else losses[start:])


# ------------------------------------------------------------------------------------------------------ learning
def test_full_fine_tune_overfits_four_pairs_and_saves_a_loadable_transformer(ckpt_d64, pairs, cache_dir, tmp_path,
                                                                              capsys):  # fmt: skip
    out = tmp_path / "full"
    result = train(config(ckpt_d64, pairs, out, cache_dir, mode="full", learning_rate=1e-3, max_steps=200,
                          checkpoint_every=0), log=lambda _: None)  # fmt: skip
    losses = [r["loss"] for r in read_log(out / "train_log.jsonl")]
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == list(range(1, 201))
    assert losses == pytest.approx(result.losses)
    first, last = window(losses, 0), window(losses, -20)
    print(f"full fine-tune loss: first 20 steps {first:.3f}, last 20 {last:.3f}")
    assert last < 0.5 * first
    trained = ChronoEditTransformer3DModel.from_pretrained(str(result.output))
    base = ChronoEditTransformer3DModel.from_pretrained(ckpt_d64, subfolder="transformer")
    assert trained.state_dict().keys() == base.state_dict().keys()
    assert not torch.equal(trained.blocks[0].attn1.to_q.weight, base.blocks[0].attn1.to_q.weight)
    code = cli.main(["edit", "-i", str(pairs / "s0.png"), "-p", "move block 0 to the bottom right", "--model-path",
                     str(ckpt_d64), "--transformer", str(result.output), "-o", str(tmp_path / "e.png"), "--height",
                     "32", "--width", "32", "--num-inference-steps", "2", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err


def test_lora_loss_falls(tiny_ckpt, pairs, cache_dir, tmp_path):
    """With the default targets the tiny random model learns slowly (its frozen head is random); the loss still
    falls steadily. (The full fine-tune above shows the objective overfits.)"""
    out = tmp_path / "lora"
    result = train(config(tiny_ckpt, pairs, out, cache_dir, learning_rate=1e-2, max_steps=60, checkpoint_every=0),
                   log=lambda _: None)  # fmt: skip
    first, last = window(result.losses, 0), window(result.losses, -20)
    print(f"LoRA loss: first 20 steps {first:.3f}, last 20 {last:.3f}")
    assert last < 0.95 * first


# --------------------------------------------------------------------------------------------- resume and cache
class Killed(Exception):
    pass


def test_killed_run_resumes_like_an_uninterrupted_one_without_loading_encoders(tiny_ckpt, pairs, cache_dir, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    """Steps 1-6 with checkpoints every 3; the first run dies after step 5 (its log already holds 4 and 5). The
    resumed run (through the CLI) restarts from checkpoint 3: the log is steps 1..6 once, and the losses equal the
    uninterrupted run's, which needs the optimizer state, the step counter and the data order restored."""
    kw = {"learning_rate": 5e-3, "max_steps": 6, "checkpoint_every": 3}
    straight = train(config(tiny_ckpt, pairs, tmp_path / "straight", cache_dir, **kw), log=lambda _: None)
    out = tmp_path / "killed"
    original = train_loop.after_step

    def dying(run, loss, seconds):
        original(run, loss, seconds)
        if run.state.step == 5:
            raise Killed

    monkeypatch.setattr(train_loop, "after_step", dying)
    with pytest.raises(Killed):
        train(config(tiny_ckpt, pairs, out, cache_dir, **kw), log=lambda _: None)
    monkeypatch.setattr(train_loop, "after_step", original)
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000003"]

    def no_encoders(*args, **kwargs):
        raise AssertionError("an encoder was loaded although the cache is complete")

    monkeypatch.setattr("chronoedit.loading.load_component", no_encoders)
    code = cli.main(["train", "--model-path", str(tiny_ckpt), "--dataset", str(pairs), "--output-dir", str(out),
                     "--cache-dir", str(cache_dir), "--height", "32", "--width", "32", "--mixed-precision", "no",
                     "--no-gradient-checkpointing", "--lora-rank", "8", "--learning-rate", "5e-3", "--max-steps", "6",
                     "--checkpoint-every", "3", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "resumed at step 3" in printed and f"wrote LoRA: {out / 'lora.safetensors'}" in printed
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    print("resume: uninterrupted", [round(x, 5) for x in straight.losses])
    print("resume: killed at 5, resumed from 3", [round(r["loss"], 5) for r in log])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000006"]


# ---------------------------------------------------------------------------------------------- reasoning video
def test_reasoning_video_and_pair_train_together_with_validation(tiny_ckpt, tmp_path):
    """NVIDIA's layout: a 29-frame video (8 latent frames) and a 2-frame video (a pair: 2 latent frames)."""
    data = tmp_path / "videos"
    data.mkdir()
    save_video([block((255, 0, 0), 0)] * 14 + [block((255, 0, 0), 1)] * 15, data / "reason.mp4")
    save_video([block((0, 0, 255), 0), block((0, 0, 255), 1)], data / "pair.mp4")
    (data / "metadata.csv").write_text("key,video,prompt\nr,reason.mp4,slide the block\np,pair.mp4,move the block\n")
    out = tmp_path / "out"
    settings = {"learning_rate": 1e-3, "max_steps": 4, "checkpoint_every": 0, "validation_every": 4,
                "validation_samples": 2, "validation_steps": 2}  # fmt: skip
    result = train(config(tiny_ckpt, data, out, out / "cache", **settings), log=lambda _: None)
    from chronoedit.train.cache import entry_frames

    frames = sorted(entry_frames(e) for e in _entries(out / "cache"))
    assert frames == [2, 8]
    assert result.step == 4 and all(np.isfinite(result.losses))
    images = sorted((out / "validation").glob("step_000004_*.png"))
    assert [p.name for p in images] == ["step_000004_p.png", "step_000004_r.png"]
    with Image.open(images[0]) as sheet:
        assert sheet.size == (96, 32)  # source | edit | target


def _entries(cache: Path) -> list:
    from chronoedit.train.cache import CacheEntry

    return [CacheEntry(spec=None, text=None, image=None, latents=f) for f in (cache / "latents").iterdir()]


# ------------------------------------------------------------------------------------- the LoRA in use elsewhere
@pytest.fixture(scope="module")
def trained_lora_hd128(tiny_ckpt_hd128, pairs, tmp_path_factory) -> Path:
    """A LoRA trained on the head_dim-128 tiny model (where diffusers' pipeline matches ours)."""
    out = tmp_path_factory.mktemp("lora_hd128")
    result = train(config(tiny_ckpt_hd128, pairs, out, out / "cache", learning_rate=1e-2, max_steps=4,
                          checkpoint_every=0), log=lambda _: None)  # fmt: skip
    return result.output


def edit_cli(ckpt: Path, image: Path, output: Path, *extra: str) -> np.ndarray:
    code = cli.main(["edit", "-i", str(image), "-p", "move block 0 to the bottom right", "--model-path", str(ckpt),
                     "-o", str(output), "--height", "32", "--width", "32", "--num-inference-steps", "2", "--seed", "3",
                     "--quiet", *extra])  # fmt: skip
    assert code == 0
    with Image.open(output) as result:
        return np.asarray(result.convert("RGB")).astype(int)


def test_trained_lora_changes_the_cli_edit(tiny_ckpt_hd128, trained_lora_hd128, pairs, tmp_path):
    plain = edit_cli(tiny_ckpt_hd128, pairs / "s0.png", tmp_path / "plain.png")
    with_lora = edit_cli(tiny_ckpt_hd128, pairs / "s0.png", tmp_path / "lora.png", "--lora-path",
                         str(trained_lora_hd128))  # fmt: skip
    assert np.abs(plain - with_lora).max() > 0


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_trained_lora_loads_in_diffusers_with_the_same_edit(tiny_ckpt_hd128, trained_lora_hd128):
    import diffusers

    ref_transformer = diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")
    ref = diffusers.ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128, transformer=ref_transformer.eval())
    ref.load_lora_weights(str(trained_lora_hd128))
    ours = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    ours.load_lora_weights(str(trained_lora_hd128))
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    args = {"image": image, "prompt": "move the block", "height": 32, "width": 32, "num_inference_steps": 3,
            "guidance_scale": 5.0, "output_type": "np"}  # fmt: skip
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    frames_ref = ref(generator=torch.Generator().manual_seed(5), **args).frames
    frames_ours = ours(generator=torch.Generator().manual_seed(5), **args).frames
    ours.disable_lora()
    frames_plain = ours(generator=torch.Generator().manual_seed(5), **args).frames
    assert np.abs(frames_ours - frames_ref).max() <= 1e-4
    assert np.abs(frames_ours - frames_plain).max() > 1e-3  # the LoRA does something


# ------------------------------------------------------------------------------------------- precision and batches
def test_bf16_with_checkpointing_accumulation_and_batches(tiny_ckpt, pairs, cache_dir, tmp_path):
    """The GPU recipe's switches on the CPU: bf16 autocast with the frozen base in bf16 and the LoRA in fp32,
    gradient checkpointing, 2 micro-batches of 2 samples per step; the saved LoRA is fp32 and loads."""
    from safetensors.torch import load_file

    from chronoedit.lora import load_lora

    out = tmp_path / "bf16"
    settings = {"mixed_precision": "bf16", "gradient_checkpointing": True, "gradient_accumulation_steps": 2,
                "batch_size": 2, "max_steps": 2, "checkpoint_every": 0, "learning_rate": 1e-2}  # fmt: skip
    result = train(config(tiny_ckpt, pairs, out, cache_dir, **settings), log=lambda _: None)
    assert result.step == 2 and all(np.isfinite(result.losses))
    tensors = load_file(str(result.output))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained away from zero
    model = ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")
    load_lora(model, result.output)


# ------------------------------------------------------------------------------------------------ two processes
def test_two_processes_under_torchrun_with_a_toml_config(tiny_ckpt, pairs, cache_dir, tmp_path):
    """Data parallel through accelerate alone (gloo on the CPU; NCCL / DeepSpeed / FSDP on GPUs is the same code):
    one log, one LoRA, and each process's RNG state in the checkpoint."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    toml = tmp_path / "train.toml"
    toml.write_text(
        f'model_path = "{tiny_ckpt}"\ndataset = "{pairs}"\noutput_dir = "{out}"\ncache_dir = "{cache_dir}"\n'
        'height = 32\nwidth = 32\nmixed_precision = "no"\ngradient_checkpointing = false\nlora_rank = 4\n'
        "max_steps = 2\ncheckpoint_every = 2\nquiet = true\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "chronoedit.cli",
               "train", str(toml), "--max-steps", "3", "--checkpoint-every", "3"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 3 steps; wrote LoRA") == 1  # the main process reports
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3]  # flags override the file
    names = {p.name for p in (out / "checkpoints" / "checkpoint-000003").iterdir()}
    assert {"random_states_0.pt", "random_states_1.pt", "lora.safetensors", "optimizer.bin",
            "train_state.json"} <= names  # fmt: skip
    assert (out / "lora.safetensors").is_file()


def test_bad_data_found_while_caching_under_torchrun_stops_every_process(tiny_ckpt, pairs, tmp_path):
    """A corrupt video is only found when the main process caches it (the other ranks wait for it): the run still
    ends at once, with the one-line error, instead of leaving the other ranks waiting."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(pairs, data)
    (data / "bad.mp4").write_bytes(b"\x00" * 64)
    with open(data / "metadata.csv", "a") as csv_file:
        csv_file.write("v,bad.mp4,move,,\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "chronoedit.cli",
               "train", "--model-path", str(tiny_ckpt), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache"), "--height", "32", "--width", "32", "--mixed-precision", "no",
               "--max-steps", "2", "--quiet"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("chronoedit: error:")]
    assert len(errors) == 1 and "row 6 (key 'v'): cannot read video" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "out" / "lora.safetensors").exists()


# ------------------------------------------------------------------------------------------------------- memory
def test_each_encoder_is_released_before_the_next_loads_and_before_the_transformer(tiny_ckpt, pairs, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """UMT5, CLIP and the VAE visit one at a time: when a component loads, every encoder of an earlier stage is
    already garbage, and none is alive when the transformer loads."""
    import gc
    import weakref

    from chronoedit import loading

    alive: list[tuple[str, weakref.ref]] = []
    events: list[tuple[str, list[str]]] = []
    real_component, real_transformer = loading.load_component, loading.load_transformer

    def recording_component(path, name, *args, **kwargs):
        gc.collect()
        events.append((name, [n for n, ref in alive if ref() is not None]))
        component = real_component(path, name, *args, **kwargs)
        if isinstance(component, torch.nn.Module):
            alive.append((name, weakref.ref(component)))
        return component

    def recording_transformer(*args, **kwargs):
        gc.collect()
        events.append(("transformer", [n for n, ref in alive if ref() is not None]))
        return real_transformer(*args, **kwargs)

    monkeypatch.setattr(loading, "load_component", recording_component)
    monkeypatch.setattr(loading, "load_transformer", recording_transformer)
    train(config(tiny_ckpt, pairs, tmp_path / "out", tmp_path / "cache", max_steps=1, checkpoint_every=0),
          log=lambda _: None)  # fmt: skip
    assert events == [("tokenizer", []), ("text_encoder", []), ("image_processor", []), ("image_encoder", []),
                      ("vae", []), ("transformer", [])]  # fmt: skip


# ------------------------------------------------------------------------------------- one output folder, one run
def train_args(ckpt: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """``chronoedit train`` on 32x32 samples, rank 4; ``extra`` flags override these."""
    return ["train", "--model-path", str(ckpt), "--dataset", str(data), "--output-dir", str(out), "--cache-dir",
            str(cache), "--height", "32", "--width", "32", "--mixed-precision", "no", "--no-gradient-checkpointing",
            "--lora-rank", "4", "--learning-rate", "5e-3", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def two_step_run(tiny_ckpt, pairs, cache_dir, tmp_path_factory) -> Path:
    """A finished 2-step run of :func:`train_args` with a checkpoint after each step; copy it before changing it."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "2", "--checkpoint-every", "1")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_resume_none_refuses_a_folder_holding_checkpoints(two_step_run, tiny_ckpt, pairs, cache_dir, tmp_path,
                                                          capsys):  # fmt: skip
    """A new run among an earlier run's checkpoints would have its own pruned first and be mixed with them by a later
    --resume auto: it is refused, nothing is touched. Once the checkpoints are deleted, the log starts afresh."""
    import shutil

    out = copy_run(two_step_run, tmp_path)
    log = (out / "train_log.jsonl").read_text()
    code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "3", "--resume", "none"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("chronoedit: error: --resume none starts a new run, but ")
    assert f"use another --output-dir, or delete {out / 'checkpoints'}" in err[0]
    assert names(out / "checkpoints") == ["checkpoint-000001", "checkpoint-000002"]
    assert (out / "train_log.jsonl").read_text() == log
    # resuming an earlier checkpoint of the folder would leave the later one to outrank the new run's
    older = out / "checkpoints" / "checkpoint-000001"
    code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "3", "--resume", str(older)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "later checkpoints (checkpoint-000002)" in err[0], err
    assert names(out / "checkpoints") == ["checkpoint-000001", "checkpoint-000002"]
    shutil.rmtree(out / "checkpoints")
    code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "1", "--resume", "none"))
    assert code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1]
    assert names(out / "checkpoints") == ["checkpoint-000001"]


def test_resume_with_other_settings_names_each_change_and_max_steps_may_grow(two_step_run, tiny_ckpt, pairs,
                                                                             cache_dir, tmp_path, capsys):  # fmt: skip
    """Another rank or targets would not fit the saved LoRA, another dataset, seed or batch another data stream, and
    a new learning rate would be ignored (the optimizer's is restored): one line names each change. Extending a run
    (max_steps), checkpoint, log and validation settings may change."""
    import shutil

    out = copy_run(two_step_run, tmp_path)
    other = Path(shutil.copytree(pairs, tmp_path / "other_pairs"))
    changed = ["--max-steps", "3", "--lora-rank", "8", "--lora-targets", "q", "v", "--seed", "1",
               "--learning-rate", "1e-3", "--batch-size", "2"]  # fmt: skip
    code = cli.main(train_args(tiny_ckpt, other, out, cache_dir, *changed))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    dataset = f"dataset {pairs / 'metadata.csv'} -> {other / 'metadata.csv'}"
    for change in ("lora_rank 4 -> 8", "lora_targets q k v o ffn.0 ffn.2 -> q v", dataset, "batch_size 1 -> 2",
                   "seed 0 -> 1", "learning_rate 0.005 -> 0.001"):  # fmt: skip
        assert change in err[0], err[0]
    assert "lora_alpha" not in err[0]  # unset: it follows the rank
    assert "--resume none and another --output-dir" in err[0]
    code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--mode", "full", "--max-steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mode lora -> full" in err[0] and "lora_rank" not in err[0], err
    assert names(out / "checkpoints") == ["checkpoint-000001", "checkpoint-000002"]
    csv = pairs / "metadata.csv"  # the same dataset as its folder
    code = cli.main(train_args(tiny_ckpt, csv, out, cache_dir, "--max-steps", "3", "--checkpoint-every", "3",
                               "--log-every", "1", "--validation-every", "0"))  # fmt: skip
    assert code == 0 and "resumed at step 2" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3]


def test_resume_compares_what_the_settings_mean(two_step_run, tiny_ckpt, tiny_ckpt_hd128, pairs, cache_dir, tmp_path,
                                               capsys, monkeypatch):  # fmt: skip
    """Targets by the layers they select; the dataset as the file it is from any working directory; the base model
    by its shape, wherever its copy lives."""
    import shutil

    out = copy_run(two_step_run, tmp_path)
    code = cli.main(train_args(tiny_ckpt_hd128, pairs, out, cache_dir, "--max-steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "base model attention_head_dim 16 -> 128" in err[0], err
    assert "lora_targets" not in err[0]
    moved = Path(shutil.copytree(tiny_ckpt, tmp_path / "mirror" / "ChronoEdit-tiny", symlinks=True))
    targets = ["ffn.2", "k", "to_q", "v", "o", "ffn.0", "q"]  # another order, our name for q, q twice
    code = cli.main(train_args(moved, pairs, out, cache_dir, "--max-steps", "3", "--lora-targets", *targets))
    assert code == 0, capsys.readouterr().err

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(pairs, project / "data")
    shutil.copytree(pairs, elsewhere / "data")  # the same relative name, another dataset
    monkeypatch.chdir(project)
    relative = train_args(tiny_ckpt, Path("data"), Path("out"), cache_dir, "--max-steps", "1")
    assert cli.main(relative) == 0
    monkeypatch.chdir(elsewhere)
    assert cli.main(train_args(tiny_ckpt, project / "data", project / "out", cache_dir, "--max-steps", "2")) == 0
    code = cli.main(train_args(tiny_ckpt, Path("data"), project / "out", cache_dir, "--max-steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"dataset {project / 'data' / 'metadata.csv'} -> {elsewhere / 'data' / 'metadata.csv'}" \
        in err[-1], err


def test_resume_accepts_the_same_model_and_dataset_in_other_forms(tiny_ckpt, pairs, cache_dir, tmp_path, capsys):
    """A base-model config re-saved with an optional field as null, and a dataset whose metadata.csv links into a
    blob store (a hub snapshot), given first as its folder and then as the CSV: the same run resumes."""
    import shutil

    model_a = Path(shutil.copytree(tiny_ckpt, tmp_path / "a", symlinks=True))
    model_b = Path(shutil.copytree(tiny_ckpt, tmp_path / "b", symlinks=True))
    for model, extra in ((model_a, {}), (model_b, {"pos_embed_seq_len": None})):
        config_path = model / "transformer" / "config.json"
        config = {k: v for k, v in json.loads(config_path.read_text()).items() if k != "pos_embed_seq_len"}
        config_path.unlink()  # a copy, not the shared fixture's file
        config_path.write_text(json.dumps({**config, **extra}))
    snapshot, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(pairs, snapshot)
    blobs.mkdir()
    (snapshot / "metadata.csv").rename(blobs / "f00d")
    (snapshot / "metadata.csv").symlink_to(blobs / "f00d")
    out = tmp_path / "run"
    assert cli.main(train_args(model_a, snapshot, out, cache_dir, "--max-steps", "1")) == 0
    saved = json.loads((out / "train_config.json").read_text())["dataset"]
    assert saved == str(snapshot.resolve() / "metadata.csv")
    record = out / "checkpoints" / "checkpoint-000001" / "train_config.json"  # as earlier versions saved it
    record.write_text(json.dumps({**json.loads(record.read_text()), "dataset": str(blobs / "f00d")}))
    code = cli.main(train_args(model_b, snapshot / "metadata.csv", out, cache_dir, "--max-steps", "2"))
    assert code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2]


def test_weights_are_hashed_once_per_process_without_a_writable_home_and_again_after_a_rewrite(
        tiny_ckpt, tmp_path, monkeypatch):  # fmt: skip
    import os
    import shutil

    from chronoedit.train import digests
    from chronoedit.train.cache import encoder_identities

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path / "file" / "home"))  # cannot be created
    hashed, notes = [], []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda path: hashed.append(path) or real(path))
    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    first = encoder_identities(str(model), notes.append)
    weights = len(hashed)
    assert weights and encoder_identities(str(model), notes.append) == first and len(hashed) == weights
    assert len([n for n in notes if n.startswith("note: cannot remember weight digests")]) == 1
    (vae,) = (model / "vae").glob("*.safetensors")
    stat, data = vae.stat(), bytearray(vae.read_bytes())
    data[len(data) // 2] ^= 1
    with open(vae, "r+b") as handle:  # rewritten in place, size and modification time kept (cp -p, rsync -t)
        handle.write(bytes(data))
    os.utime(vae, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert encoder_identities(str(model))["latents"] != first["latents"]


def test_encoder_identity_follows_content_not_copies(tiny_ckpt, tmp_path, monkeypatch):
    """Byte-identical copies (another node's download, cp without -p) share the cache; other weights of the same
    size do not, wherever they differ; weights are hashed once per machine."""
    import os
    import shutil

    from chronoedit.train import digests
    from chronoedit.train.cache import encoder_identities

    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path / "home"))
    hashed = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda path: hashed.append(path) or real(path))
    base = Path(shutil.copytree(tiny_ckpt, tmp_path / "base"))  # files this process has not hashed yet
    original = encoder_identities(str(base))
    assert hashed and encoder_identities(str(base)) == original and len(hashed) == len(set(hashed))
    copy = Path(shutil.copytree(base, tmp_path / "copy"))
    for file in copy.rglob("*"):
        os.utime(file, (1e9, 1e9))
    assert encoder_identities(str(copy)) == original
    (weights,) = (copy / "vae").glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 1  # one bit of one weight: same size, other weights
    weights.write_bytes(bytes(data))
    changed = encoder_identities(str(copy))
    assert changed["latents"] != original["latents"] and changed["text"] == original["text"]


def test_torn_last_log_line_is_dropped_when_resuming(two_step_run, tiny_ckpt, pairs, cache_dir, tmp_path, capsys):
    """A crash cut the log's last write: the torn line is dropped (it was after the checkpoint anyway); a broken line
    before the last one is named in one line."""
    out = copy_run(two_step_run, tmp_path)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss": 1.4')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "3"))
    assert code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + '{"step": 2, "lo\n' + lines[2])
    with pytest.raises(UserError, match=rf"{log} line 2 is not a JSON record"):
        read_log(log)
    with pytest.raises(UserError, match=rf"{log} line 2 is not a JSON record"):
        train_loop.truncate_log(log, 3)


def test_samples_of_different_sizes_train_in_batches_of_one_bucket(tiny_ckpt, tmp_path, monkeypatch):
    """batch_size 2 with each sample at its own bucket (no --height/--width): 3 square pairs and 1 wide one make 2
    square batches (the last filled up with a square sample) and 1 wide batch (the wide pair twice) per epoch."""
    data = tmp_path / "mixed"
    data.mkdir()
    lines = ["key,prompt,source,target"]
    for key, size in (("a", (32, 32)), ("b", (32, 32)), ("c", (32, 32)), ("w", (64, 32))):
        Image.new("RGB", size, (200, 0, 0)).save(data / f"{key}_s.png")
        Image.new("RGB", size, (0, 200, 0)).save(data / f"{key}_t.png")
        lines.append(f"{key},make it green,{key}_s.png,{key}_t.png")
    (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    shapes: list[set[tuple[int, ...]]] = []
    original = train_loop.collate

    def recording(items):
        shapes.append({tuple(item["latents"].shape) for item in items})
        return original(items)

    monkeypatch.setattr(train_loop, "collate", recording)
    settings = {**FAST, "height": None, "width": None, "max_area": 64 * 32, "batch_size": 2, "max_steps": 6,
                "checkpoint_every": 0, "learning_rate": 1e-3}  # fmt: skip
    result = train(TrainConfig(model_path=str(tiny_ckpt), dataset=str(data), output_dir=str(tmp_path / "out"),
                               **settings), log=lambda _: None)  # fmt: skip
    assert result.step == 6 and all(np.isfinite(result.losses))
    assert all(len(batch) == 1 for batch in shapes)  # one bucket per batch
    kinds = [next(iter(batch))[-1] for batch in shapes]  # latent width: 4 square, 8 wide
    assert sorted(kinds[:3]) == [4, 4, 8] and sorted(kinds[3:]) == [4, 4, 8]  # per epoch: 2 square, 1 wide


# ---------------------------------------------------------------------------------------------------- cache keys
@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The components loaded by ``chronoedit.loading.load_component``, in order."""
    from chronoedit import loading

    loaded: list[str] = []
    real = loading.load_component

    def recording(path, name, *args, **kwargs):
        loaded.append(name)
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_component", recording)
    return loaded


def cache_once(data: Path, cache: Path, model: Path, max_area: int = 480 * 832, size: int = 32) -> list:
    from chronoedit.train.cache import CacheSettings, build_cache
    from chronoedit.train.data import read_dataset

    settings = CacheSettings(str(model), size, size, max_area, "float32")
    return build_cache(read_dataset(data), cache, settings, torch.device("cpu"), lambda _: None)


def test_replaced_vae_weights_of_the_same_size_rebuild_the_latents(tiny_ckpt, pairs, tmp_path, loads):
    """A fine-tuned VAE dropped in place has the same file size; its modification time tells it apart."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from chronoedit.train.cache import load_entry

    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    before = load_entry(cache_once(pairs, tmp_path / "cache", model)[0])["latents"]
    weights = next((model / "vae").glob("*.safetensors"))
    size, stat = weights.stat().st_size, weights.stat()
    tensors = {k: v + 0.5 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert weights.stat().st_size == size
    loads.clear()
    after = load_entry(cache_once(pairs, tmp_path / "cache", model)[0])["latents"]
    assert loads == ["vae"]
    assert not torch.equal(before, after)


def test_each_cache_stage_is_redone_only_when_its_own_inputs_change(tiny_ckpt, pairs, tmp_path, loads):
    """Rewording one prompt re-runs the text encoder alone; max_area does not matter when height and width are
    given; another training size re-runs CLIP and the VAE but not the text encoder."""
    import shutil

    from chronoedit.train.cache import load_entry

    data = Path(shutil.copytree(pairs, tmp_path / "pairs"))
    cache = tmp_path / "cache"
    first = cache_once(data, cache, tiny_ckpt)
    assert loads == ["tokenizer", "text_encoder", "image_processor", "image_encoder", "vae"]
    metadata = data / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("move block 1 to", "slide block 1 to"))
    loads.clear()
    second = cache_once(data, cache, tiny_ckpt)
    assert loads == ["tokenizer", "text_encoder"]
    assert [e.text == f.text for e, f in zip(first, second, strict=True)] == [True, False, True, True]
    assert [e.latents for e in first] == [e.latents for e in second]
    assert not torch.equal(load_entry(first[1])["prompt_embeds"], load_entry(second[1])["prompt_embeds"])
    loads.clear()
    cache_once(data, cache, tiny_ckpt, max_area=256 * 256)
    assert loads == []
    cache_once(data, cache, tiny_ckpt, size=16)
    assert loads == ["image_processor", "image_encoder", "vae"]


def test_a_second_run_in_the_same_output_folder_is_refused(tiny_ckpt, pairs, cache_dir, tmp_path, capsys):
    """Two runs in one folder would resume, log and checkpoint over each other: the second is one error line."""
    from chronoedit.files import locked

    out = tmp_path / "run"
    out.mkdir()
    with locked(out / ".chronoedit-train.lock", "held by the first run"):
        code = cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"chronoedit: error: another chronoedit train is using {out}"]
    assert not (out / "train_log.jsonl").exists()
    assert cli.main(train_args(tiny_ckpt, pairs, out, cache_dir, "--max-steps", "1")) == 0  # once it is free


def test_caching_shows_a_bar_per_stage_unless_quiet(tiny_ckpt, pairs, tmp_path, capsys):
    args = [a for a in train_args(tiny_ckpt, pairs, tmp_path / "out", tmp_path / "cache", "--max-steps", "1")
            if a != "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    for stage in ("caching prompts", "caching CLIP tokens", "caching latents"):
        assert f"{stage}: 100%" in err and "4/4" in err, err[-2000:]
    quiet = train_args(tiny_ckpt, pairs, tmp_path / "out2", tmp_path / "cache2", "--max-steps", "1")
    assert cli.main(quiet) == 0 and "caching" not in capsys.readouterr().err
