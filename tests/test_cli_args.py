"""``chronoedit edit`` argument validation: every bad invocation fails before the model is loaded.

Model loading is replaced by a function that raises AssertionError, so a validation path that reached it would
surface as a test failure (the CLI does not turn AssertionError into a one-line error).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from chronoedit import cli, editing
from chronoedit.commands import edit as edit_cmd
from chronoedit.editing import service
from chronoedit.sizing import auto_size


@pytest.fixture(autouse=True)
def no_model(monkeypatch, tmp_path):
    """Work in a temp folder, without a model path from the environment, with model loading forbidden."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)

    def forbidden(spec, report=None):
        raise AssertionError("model loading reached during argument validation")

    monkeypatch.setattr(service, "load_pipeline", forbidden)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (120, 80, 40)).save(path)
    return path


def run_cli(capsys, *argv):
    code = cli.main(["edit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, err, contains):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("chronoedit: error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------- the brief's cases
def test_missing_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "-i", tmp_path / "nope.png", "-p", "x")
    assert_one_error(code, err, f"input image not found: {tmp_path / 'nope.png'}")
    assert not (tmp_path / "outputs").exists()  # nothing created before failing


def test_corrupt_input(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code, _, err = run_cli(capsys, "-i", bad, "-p", "x")
    assert_one_error(code, err, f"cannot read image {bad}:")


def test_truncated_input(capsys, tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "-i", cut, "-p", "x")
    assert_one_error(code, err, f"cannot read image {cut}:")


def test_height_without_width(capsys, image):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--height", "64")
    assert_one_error(code, err, "--height and --width must be given together")


def test_height_not_multiple_of_16(capsys, image):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--height", "70", "--width", "64")
    assert_one_error(code, err, "must be multiples of 16")
    assert "height 70" in err


def test_num_frames_30_with_reasoning(capsys, image):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--enable-temporal-reasoning", "--num-frames", "30")
    assert_one_error(code, err, "--num-frames must be 4k+1")
    assert "got 30" in err


def test_reasoning_steps_above_steps(capsys, image):
    code, _, err = run_cli(
        capsys,
        "-i",
        image,
        "-p",
        "x",
        "--enable-temporal-reasoning",
        "--num-inference-steps",
        "8",
        "--num-temporal-reasoning-steps",
        "9",
    )
    assert_one_error(code, err, "--num-temporal-reasoning-steps must be between 0 and --num-inference-steps (8)")


def test_negative_reasoning_steps(capsys, image):
    code, _, err = run_cli(
        capsys, "-i", image, "-p", "x", "--enable-temporal-reasoning", "--num-temporal-reasoning-steps", "-1"
    )
    assert_one_error(code, err, "got -1")


def test_unknown_output_suffix(capsys, image):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "-o", "out.gif")
    assert_one_error(code, err, "unknown output suffix '.gif' for out.gif: use .png, .jpg, .jpeg, .webp or .mp4")


def test_unwritable_output(capsys, image, tmp_path):
    target = image / "sub" / "edit.png"  # under a regular file
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "-o", target)
    assert_one_error(code, err, f"cannot write output {target}: {image} is not a directory")


# ------------------------------------------------------------------------------------------------------ more checks
def test_prompt_required_for_real_models(capsys, image, tmp_path):
    code, _, err = run_cli(capsys, "-i", image, "--model-path", tmp_path)
    assert_one_error(code, err, "--prompt is required")


def test_missing_model_folder(capsys, image, tmp_path):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--model-path", tmp_path / "no" / "model")
    assert_one_error(code, err, "model folder not found")


def test_model_path_from_environment(capsys, image, tmp_path, monkeypatch):
    monkeypatch.setenv(editing.MODEL_PATH_ENV, str(tmp_path / "missing-model"))
    code, _, err = run_cli(capsys, "-i", image, "-p", "x")
    assert_one_error(code, err, "missing-model")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trajectory", "t.mp4"], "--trajectory needs --enable-temporal-reasoning"),
        (["--trajectory-sheet", "t.png"], "--trajectory-sheet needs --enable-temporal-reasoning"),
        (
            ["--enable-temporal-reasoning", "--num-temporal-reasoning-steps", "0", "--trajectory", "t.mp4"],
            "at least 1 reasoning step",
        ),
        (["--num-temporal-reasoning-steps", "3"], "--num-temporal-reasoning-steps needs --enable-temporal-reasoning"),
        (["--num-frames", "29"], "--num-frames 29 needs --enable-temporal-reasoning"),
        (["--enable-temporal-reasoning", "--num-frames", "5"], "at least 9"),
        (["--enable-temporal-reasoning", "--trajectory", "t.png"], "--trajectory t.png must be a .mp4 video"),
        (["--enable-temporal-reasoning", "--trajectory-sheet", "t.mp4"], "--trajectory-sheet t.mp4 must be an image"),
        (["--output-image", "e.mp4"], "--output-image e.mp4 must be an image"),
        (["-o", "same.png", "--output-image", "same.png"], "both write same.png"),
        (["--num-inference-steps", "0"], "--num-inference-steps must be between 1 and 1000, got 0"),
        (["--num-inference-steps", "100000"], "--num-inference-steps must be between 1 and 1000, got 100000"),
        (["--flow-shift", "0"], "--flow-shift must be between 0.01 and 100"),
        (["--flow-shift", "inf"], "--flow-shift must be between 0.01 and 100"),
        (["--guidance-scale", "nan"], "--guidance-scale must be between 0 and 100, got nan"),
        (["--guidance-scale", "1e308"], "--guidance-scale must be between 0 and 100, got 1e+308"),
        (["--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
        (["--max-area", "100"], "--max-area must be between 256 and 4194304 pixels"),
        (["--max-area", str(10**12)], "--max-area must be between 256 and 4194304 pixels"),
        (["--height", "100000", "--width", "100000"], "the size 100000x100000 (--height x --width) is over the largest "
                                                      "edit, a 4096-pixel side and 4194304 pixels"),
        (["--height", str(2**40), "--width", "16"], f"the size {2**40}x16 (--height x --width) is over"),
        (["--height", "4112", "--width", "16"], "is over the largest edit"),
        (["--height", "2064", "--width", "2048"], "is over the largest edit"),
        (["--device", "meta"], "--device meta: not a device that can run an edit"),
        (["--device", "cpu:x"], "unknown --device"),
        (["--device", "nonsense"], "unknown --device"),
    ],
)
def test_inconsistent_flags(capsys, image, flags, message):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", *flags)
    assert_one_error(code, err, message)


def test_size_bounds_can_be_raised_from_the_environment(capsys, image, monkeypatch):
    """4096x1024 is the largest area at the largest side; the environment raises either bound, and a bad value
    there is one line too."""
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--height", "4096", "--width", "1024")
    assert code == 1 and "AssertionError: model loading reached" in err  # valid: reaches the (forbidden) load
    monkeypatch.setenv("CHRONOEDIT_MAX_SIDE", "8192")
    monkeypatch.setenv("CHRONOEDIT_MAX_AREA", str(8192 * 1024))
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--height", "8192", "--width", "1024")
    assert code == 1 and "AssertionError: model loading reached" in err
    monkeypatch.setenv("CHRONOEDIT_MAX_AREA", "lots")
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--height", "8192", "--width", "1024")
    assert_one_error(code, err, "the environment variable CHRONOEDIT_MAX_AREA must be a whole number of pixels")


def test_unavailable_cuda(capsys, image):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--device", "cuda")
    assert_one_error(code, err, "CUDA is not available")


def test_argparse_errors_are_one_line(capsys, image):
    code, _, err = run_cli(capsys, "-i", image, "-p", "x", "--num-inference-steps", "many")
    assert_one_error(code, err, "invalid int value: 'many'")
    code, _, err = run_cli(capsys, "-i", image, "--no-such-flag")
    assert_one_error(code, err, "unrecognized arguments: --no-such-flag")


def test_help_and_no_command(capsys):
    assert cli.main(["edit", "--help"]) == 0
    assert "--offload_model" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("chronoedit: error: ")


def test_validation_reaches_model_loading_when_valid(capsys, image):
    """A valid invocation gets as far as the (forbidden) model load: the validation above is not vacuous."""
    assert cli.main(["edit", "-i", str(image), "-p", "x", "--height", "32", "--width", "48"]) == 1
    err = capsys.readouterr().err
    assert "AssertionError: model loading reached" in err and "Traceback" in err  # a bug shows as a bug


def test_process_exit_code_and_no_traceback(image, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chronoedit.cli", "edit", "-i", str(tmp_path / "nope.png"), "-p", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"chronoedit: error: input image not found: {tmp_path / 'nope.png'}"]


# -------------------------------------------------------------------------------------------- jobs and outputs (fake)
def _resolve(*argv):
    """(model spec, edit, output plan) of ``chronoedit edit ARGV``."""
    return edit_cmd.resolve(cli.parse_args(["edit", *map(str, argv)]))


def _job(image, *flags):
    return _resolve("-i", image, "-p", "x", *flags)


def test_defaults(image):
    spec, edit, plan = _job(image, "--model-path", ".")
    assert (edit.num_inference_steps, edit.guidance_scale, edit.flow_shift, edit.seed) == (50, 5.0, 5.0, 0)
    assert (edit.width, edit.height) == auto_size(96, 64)
    assert edit.num_frames == 5 and not edit.enable_temporal_reasoning
    assert plan.output == edit_cmd.DEFAULT_OUTPUT and plan.output_image is None
    assert spec.model_path == "." and spec.device == "cpu" and spec.dtype == "fp32"
    _, reasoning, plan = _job(image, "--model-path", ".", "--enable-temporal-reasoning")
    assert reasoning.num_frames == 29 and reasoning.num_temporal_reasoning_steps == 50
    assert not editing.wants_trajectory(reasoning, plan)  # a .png output needs no trajectory


def test_demo_defaults(image):
    spec, edit, _ = _resolve("-i", image)
    assert spec.model_path == "demo" and edit.prompt == editing.DEMO_PROMPT
    assert edit.num_inference_steps == 4 and spec.dtype == "fp32"
    assert edit.width * edit.height <= 256 * 256 and (edit.width, edit.height) == (304, 208)
    assert edit.image.size == (304, 208)


def test_default_input_when_none_given():
    _, edit, _ = _resolve()
    assert edit.image.size == (edit.width, edit.height)
    assert edit.input_name in ("example image", "example image (drawn)")


def test_drawn_example_when_asset_missing(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.resources.files", lambda package: tmp_path / "no-assets")
    _, edit, _ = _resolve()
    assert edit.input_name == "example image (drawn)" and edit.image.size == (edit.width, edit.height)


def test_no_trajectory_requested_without_reasoning_steps(image):
    _, edit, plan = _job(image, "--enable-temporal-reasoning", "--num-temporal-reasoning-steps", "0", "-o", "v.mp4")
    assert not editing.wants_trajectory(edit, plan)
    assert editing.wants_trajectory(*_job(image, "--enable-temporal-reasoning", "-o", "v.mp4")[1:])


def test_explicit_size_and_output_image_only(image):
    _, edit, plan = _job(image, "--height", "32", "--width", "48", "--output-image", "e.png")
    assert (edit.width, edit.height) == (48, 32) and edit.image.size == (48, 32)
    assert plan.output is None and str(plan.output_image) == "e.png"


class FakePipe:
    """Stands in for ChronoEditPipeline: records the call and returns fixed frames."""

    def __init__(self, with_trajectory=True, nan=False):
        self.with_trajectory, self.nan, self.kwargs, self.flow_shift = with_trajectory, nan, None, None

    def set_flow_shift(self, shift):
        self.flow_shift = shift

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        h, w, f = kwargs["height"], kwargs["width"], kwargs["num_frames"]
        frames = np.linspace(0, 1, f * h * w * 3, dtype=np.float32).reshape(1, f, h, w, 3)
        if self.nan:
            frames[0, 0, 0, 0, 0] = np.nan
        trajectory = None
        if kwargs["return_trajectory"] and self.with_trajectory:
            trajectory = np.full((1, 29, h, w, 3), 0.5, dtype=np.float32)
        return SimpleNamespace(frames=frames, trajectory=trajectory)


def _run_fake(monkeypatch, capsys, pipe, *argv):
    monkeypatch.setattr(service, "load_pipeline", lambda spec, report=None: pipe)
    code = cli.main(["edit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_fake_edit_writes_image(monkeypatch, capsys, image, tmp_path):
    pipe = FakePipe()
    code, out, err = _run_fake(
        monkeypatch, capsys, pipe, "-i", image, "-p", "x", "--height", "32", "--width", "48", "--quiet"
    )
    assert code == 0, err
    assert out.strip() == "wrote edited image: outputs/edit.png (48x32)"
    assert Image.open(tmp_path / "outputs" / "edit.png").size == (48, 32)
    assert pipe.kwargs["output_type"] == "np" and pipe.kwargs["return_trajectory"] is False
    assert pipe.kwargs["image"].size == (48, 32) and pipe.kwargs["num_frames"] == 5
    assert pipe.flow_shift == 5.0  # the edit's flow shift is set before it runs


def test_fake_reasoning_outputs(monkeypatch, capsys, image, tmp_path):
    pipe = FakePipe()
    code, out, err = _run_fake(
        monkeypatch,
        capsys,
        pipe,
        "-i",
        image,
        "-p",
        "x",
        "--height",
        "32",
        "--width",
        "32",
        "--enable-temporal-reasoning",
        "--num-inference-steps",
        "4",
        "--num-temporal-reasoning-steps",
        "2",
        "-o",
        "v.mp4",
        "--output-image",
        "e.png",
        "--trajectory-sheet",
        "sheet.png",
    )
    assert code == 0, err
    assert out.strip().splitlines() == [
        "wrote trajectory video: v.mp4 (29 frames)",
        "wrote edited image: e.png (32x32)",
        "wrote trajectory contact sheet: sheet.png (29 frames)",
    ]
    assert pipe.kwargs["enable_temporal_reasoning"] is True and pipe.kwargs["num_temporal_reasoning_steps"] == 2
    assert pipe.kwargs["return_trajectory"] is True
    assert all((tmp_path / name).is_file() for name in ("v.mp4", "e.png", "sheet.png"))


def test_fake_video_is_frames_when_trajectory_has_own_file(monkeypatch, capsys, image):
    code, out, err = _run_fake(
        monkeypatch,
        capsys,
        FakePipe(),
        "-i",
        image,
        "-p",
        "x",
        "--height",
        "32",
        "--width",
        "32",
        "--enable-temporal-reasoning",
        "--num-frames",
        "9",
        "-o",
        "v.mp4",
        "--trajectory",
        "t.mp4",
    )
    assert code == 0, err
    assert out.strip().splitlines() == ["wrote video: v.mp4 (9 frames)", "wrote trajectory video: t.mp4 (29 frames)"]


def test_a_video_the_disk_cannot_hold_is_one_line_and_no_file(monkeypatch, capsys, image, tmp_path):
    """The encoder fails on a full disk after writing part of the file: no "wrote" line, exit 2, one line naming the
    output and the cause, and neither the video nor a temp file is left."""
    from chronoedit import media

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nfor last; do :; done\nhead -c 100 /dev/zero > \"$last\"\n"
                    "echo 'Error writing trailer: No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(media, "_ffmpeg", lambda: str(fake))
    flags = ["--height", "32", "--width", "32", "--enable-temporal-reasoning", "--num-frames", "9", "--quiet"]
    code, out, err = _run_fake(monkeypatch, capsys, FakePipe(), "-i", image, "-p", "x", "-o", "v.mp4", *flags)
    assert_one_error(code, err, "cannot write v.mp4: the disk is full")
    assert "wrote" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg", "in.png"]


def test_fake_nan_output_writes_nothing(monkeypatch, capsys, image, tmp_path):
    code, out, err = _run_fake(
        monkeypatch, capsys, FakePipe(nan=True), "-i", image, "-p", "x", "--height", "32", "--width", "32", "--quiet"
    )
    assert_one_error(code, err, "non-finite values (NaN/Inf) in the output; nothing was written")
    assert out == "" and not (tmp_path / "outputs" / "edit.png").exists()


def test_fake_missing_trajectory_writes_nothing(monkeypatch, capsys, image, tmp_path):
    code, out, err = _run_fake(
        monkeypatch,
        capsys,
        FakePipe(with_trajectory=False),
        "-i",
        image,
        "-p",
        "x",
        "--height",
        "32",
        "--width",
        "32",
        "--enable-temporal-reasoning",
        "--trajectory",
        "t.mp4",
        "--quiet",
    )
    assert code == 1 and "RuntimeError: the pipeline returned no trajectory" in err  # the pipeline's bug, shown as one
    assert out == "" and not (tmp_path / "t.mp4").exists() and not (tmp_path / "outputs" / "edit.png").exists()


def test_keyboard_interrupt(monkeypatch, capsys, image):
    def interrupted(spec, report=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "load_pipeline", interrupted)
    assert cli.main(["edit", "-i", str(image), "-p", "x"]) == 130
    assert capsys.readouterr().err.strip() == "chronoedit: interrupted"
