"""``chronoedit edit`` end to end on tiny random-weight checkpoints (CPU, a few steps, 32x32 pixels)."""

from __future__ import annotations

import imageio.v2 as imageio
import pytest
from PIL import Image

pytest.importorskip("chronoedit.pipeline", reason="chronoedit.pipeline is not importable yet (pipeline not landed)")
pytest.importorskip("chronoedit.demo", reason="chronoedit.demo is not importable yet")

from chronoedit import cli, editing

SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A CHRONOEDIT_HOME shared by the session, so the demo checkpoint is built once and never in ~/.cache."""
    return tmp_path_factory.mktemp("chronoedit_home")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, demo_home):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHRONOEDIT_HOME", str(demo_home))
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 120, 40)).save(path)
    return path


def edit(capsys, *argv):
    code = cli.main(["edit", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines(), err


def frame_count(path):
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return reader.count_frames()
    finally:
        reader.close()


def test_readme_command_on_the_demo_model(capsys, tmp_path):
    """The README's edit: demo model, shipped example image, default output folder."""
    lines, err = edit(capsys, "-p", "put a red hat on the cup", "-o", "outputs/edit.png", *SMALL)
    assert lines == ["wrote edited image: outputs/edit.png (32x32)"]
    assert "demo model has random weights" in err and "--model-path" in err
    stages = [line for line in err.splitlines() if line.startswith("chronoedit: ") and "note:" not in line]
    assert [line.split(" ")[1] for line in stages] == ["loading", "editing", "decoding"]  # the long steps say so
    with Image.open(tmp_path / "outputs" / "edit.png") as result:
        assert result.size == (32, 32) and result.mode == "RGB"
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["edit.png"]  # no temp files left


def test_edit_video_without_reasoning(capsys, tiny_ckpt, image, tmp_path):
    lines, _ = edit(
        capsys,
        "-i",
        image,
        "-p",
        "make it blue",
        "--model-path",
        tiny_ckpt,
        "-o",
        "v.mp4",
        "--output-image",
        "e.jpg",
        "--quiet",
        *SMALL,
    )
    assert lines == ["wrote video: v.mp4 (5 frames)", "wrote edited image: e.jpg (32x32)"]
    assert frame_count(tmp_path / "v.mp4") == 5


def test_reasoning_outputs(capsys, tiny_ckpt, image, tmp_path):
    lines, err = edit(
        capsys,
        "-i",
        image,
        "-p",
        "make it blue",
        "--model-path",
        tiny_ckpt,
        "--enable-temporal-reasoning",
        "--num-frames",
        "9",
        "--num-temporal-reasoning-steps",
        "1",
        "-o",
        "edit.png",
        "--trajectory",
        "t.mp4",
        "--trajectory-sheet",
        "t.png",
        *SMALL,
    )
    assert lines[0] == "wrote edited image: edit.png (32x32)"
    assert lines[1].startswith("wrote trajectory video: t.mp4 (")
    assert lines[2].startswith("wrote trajectory contact sheet: t.png (")
    frames = int(lines[1].split("(")[1].split()[0])
    assert frame_count(tmp_path / "t.mp4") == frames
    with Image.open(tmp_path / "t.png") as sheet:
        assert sheet.width >= 32 and sheet.height >= 32
    assert "temporal reasoning for 1 steps" in err


def test_reasoning_mp4_is_the_trajectory(capsys, tiny_ckpt, image, tmp_path):
    lines, _ = edit(
        capsys,
        "-i",
        image,
        "-p",
        "x",
        "--model-path",
        tiny_ckpt,
        "--enable-temporal-reasoning",
        "--num-frames",
        "9",
        "-o",
        "r.mp4",
        "--quiet",
        *SMALL,
    )
    assert len(lines) == 1 and lines[0].startswith("wrote trajectory video: r.mp4 (")
    assert frame_count(tmp_path / "r.mp4") == int(lines[0].split("(")[1].split()[0])


def test_same_seed_same_image(capsys, tiny_ckpt, image, tmp_path):
    for name in ("a.png", "b.png"):
        edit(capsys, "-i", image, "-p", "x", "--model-path", tiny_ckpt, "--seed", "7", "-o", name, "--quiet", *SMALL)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_bad_model_folder_is_one_line(capsys, image, tmp_path):
    (tmp_path / "empty-model").mkdir()
    code = cli.main(
        ["edit", "-i", str(image), "-p", "x", "--model-path", str(tmp_path / "empty-model"), "--quiet", *SMALL]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("chronoedit: error: "), err
    assert "empty-model" in err and "Traceback" not in err
    assert not (tmp_path / "outputs" / "edit.png").exists()
