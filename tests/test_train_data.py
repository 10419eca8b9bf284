"""Training data and settings: the three CSV layouts, sizing, and one clear error naming the row for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chronoedit import cli
from chronoedit.errors import UserError
from chronoedit.media import save_video
from chronoedit.train.config import build_config, read_config_file
from chronoedit.train.data import check_dataset, clips, fit, load_frames, prepared_frames, read_dataset


def block(color: tuple[int, int, int], corner: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """Grey image with a coloured 16x16 block in the top-left (corner 0) or bottom-right (corner 1)."""
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste(Image.new("RGB", (16, 16), color), (0, 0) if corner == 0 else (size[0] - 16, size[1] - 16))
    return image


def write_csv(folder: Path, lines: list[str], name: str = "metadata.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def pair(tmp_path) -> Path:
    block((255, 0, 0), 0).save(tmp_path / "s.png")
    block((255, 0, 0), 1).save(tmp_path / "t.png")
    return tmp_path


# ------------------------------------------------------------------------------------------------------- layouts
def test_labeler_layout_prefers_the_images_over_the_video(pair):
    save_video([block((0, 0, 255), 0), block((0, 0, 255), 1)], pair / "v.mp4")
    write_csv(pair, ["key,video,prompt,source_image,target_image", "a,v.mp4,move it,s.png,t.png", "b,v.mp4,move,,"])
    first, second = read_dataset(pair)
    assert (first.source, first.target, first.video) == (pair / "s.png", pair / "t.png", None)
    assert second.video == pair / "v.mp4" and second.source is None
    frames = load_frames(second)
    assert len(frames) == 2 and frames[0].size == (32, 32)  # a 2-frame video is a pair
    assert np.asarray(frames[0])[4, 4, 2] > 200  # blue block top-left in the source frame


def test_nvidia_layout_with_a_reasoning_video(tmp_path):
    frames = [block((0, 255, 0), 0)] * 14 + [block((0, 255, 0), 1)] * 15  # 29 frames
    save_video(frames, tmp_path / "r.mp4")
    write_csv(tmp_path, ["key,video,prompt", "r,r.mp4,the block slides"])
    (spec,) = read_dataset(tmp_path)
    loaded = load_frames(spec)
    assert len(loaded) == 29 and [len(clip) for clip in clips(loaded)] == [25, 5]


def test_simple_layout_pair_becomes_source_then_target_four_times(pair):
    csv = write_csv(pair, ["source,target,prompt", "s.png,t.png,move the block"], name="pairs.csv")
    (spec,) = read_dataset(csv)
    assert spec.key == "row2"
    (clip,) = clips(load_frames(spec))
    assert len(clip) == 5 and clip[1:] == [clip[1]] * 4 and clip[0] is not clip[1]


def test_samples_are_cropped_to_the_training_size_keeping_the_aspect(pair):
    block((255, 0, 0), 0, size=(64, 32)).save(pair / "wide_s.png")
    block((255, 0, 0), 1, size=(64, 32)).save(pair / "wide_t.png")
    write_csv(pair, ["source,target,prompt", "wide_s.png,wide_t.png,move"])
    (spec,) = read_dataset(pair)
    assert [f.size for f in prepared_frames(spec, 32, 32, 0)] == [(32, 32), (32, 32)]
    assert [f.size for f in prepared_frames(spec, None, None, 64 * 32)] == [(64, 32), (64, 32)]
    assert fit(Image.new("RGB", (64, 32)), 32, 32).size == (32, 32)


# -------------------------------------------------------------------------------------------------- bad data
def test_empty_csv_is_an_error(tmp_path):
    write_csv(tmp_path, ["source,target,prompt"])
    with pytest.raises(UserError, match="no rows"):
        read_dataset(tmp_path)
    (tmp_path / "metadata.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_dataset(tmp_path)


def test_duplicate_key_names_both_rows(pair):
    write_csv(pair, ["key,prompt,source,target", "a,move,s.png,t.png", "b,move,s.png,t.png", "a,move,s.png,t.png"])
    with pytest.raises(UserError, match=r"row 4 \(key 'a'\): key 'a' appears more than once \(also row 2\)"):
        read_dataset(pair)


def test_missing_image_names_row_and_file(pair):
    write_csv(pair, ["key,prompt,source_image,target_image", "ok,move,s.png,t.png", "bad,move,s.png,gone.png"])
    with pytest.raises(UserError, match=r"row 3 \(key 'bad'\): target file not found: .*gone\.png"):
        read_dataset(pair)


def test_unreadable_image_names_row_and_file(pair):
    (pair / "broken.png").write_bytes(b"not a png at all")
    write_csv(pair, ["key,prompt,source,target", "k1,move,broken.png,t.png"])
    (spec,) = read_dataset(pair)
    with pytest.raises(UserError, match=r"row 2 \(key 'k1'\): cannot read source image .*broken\.png"):
        check_dataset([spec])
    with pytest.raises(UserError, match=r"row 2 \(key 'k1'\).*broken\.png"):
        load_frames(spec)


def test_mismatched_sizes_name_the_row_and_both_sizes(pair):
    block((1, 2, 3), 1, size=(48, 32)).save(pair / "t48.png")
    write_csv(pair, ["key,prompt,source,target", "m,move,s.png,t48.png"])
    (spec,) = read_dataset(pair)
    with pytest.raises(UserError, match=r"row 2 \(key 'm'\): source 32x32 and target 48x32 differ in size"):
        check_dataset([spec])
    with pytest.raises(UserError, match=r"row 2 \(key 'm'\): source 32x32 and target 48x32 differ"):
        load_frames(spec)


def test_exif_rotated_camera_jpeg_pairs_with_an_upright_target(tmp_path):
    """The source is stored 48x32 with EXIF orientation 6 (shown 32x48, as it is loaded); the target is 32x48."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    block((200, 30, 30), 0, size=(32, 48)).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "s.jpg", exif=exif)
    block((30, 30, 200), 1, size=(32, 48)).save(tmp_path / "t.png")
    block((30, 30, 200), 1, size=(48, 32)).save(tmp_path / "wide.png")
    write_csv(tmp_path, ["key,prompt,source,target", "ok,recolour,s.jpg,t.png", "bad,recolour,s.jpg,wide.png"])
    ok, bad = read_dataset(tmp_path)
    check_dataset([ok])
    assert [f.size for f in load_frames(ok)] == [(32, 48), (32, 48)]
    with pytest.raises(UserError, match=r"row 3 \(key 'bad'\): source 32x48 and target 48x32 differ in size"):
        check_dataset([bad])


def test_unreadable_video_names_row_and_file(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    write_csv(tmp_path, ["key,video,prompt", "v,bad.mp4,move"])
    (spec,) = read_dataset(tmp_path)
    with pytest.raises(UserError, match=r"row 2 \(key 'v'\): cannot read video .*bad\.mp4"):
        load_frames(spec)


def test_video_with_a_bad_frame_count_names_the_row(tmp_path):
    save_video([block((9, 9, 9), 0)] * 5, tmp_path / "five.mp4")
    write_csv(tmp_path, ["key,video,prompt", "v5,five.mp4,move"])
    (spec,) = read_dataset(tmp_path)
    with pytest.raises(UserError, match=r"row 2 \(key 'v5'\): video .*five\.mp4 has 5 frames"):
        load_frames(spec)


def test_cli_reports_bad_data_in_one_line_before_loading_a_model(capsys, pair, tmp_path):
    write_csv(pair, ["key,prompt,source,target", "x,move,s.png,nope.png"])
    code = cli.main(["train", "--model-path", str(tmp_path / "no-model"), "--dataset", str(pair),
                     "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("chronoedit: error: ") and "row 2 (key 'x')" in err[0]
    assert not (tmp_path / "out" / "lora.safetensors").exists()


# ------------------------------------------------------------------------------------------------------ settings
def test_toml_and_json_configs_with_flags_overriding(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('model_path = "m"\ndataset = "d"\nlora_rank = 8\nmax_steps = 5\nlora_targets = ["q", "v"]\n')
    config = build_config(read_config_file(toml), {"max_steps": 7})
    assert (config.lora_rank, config.max_steps, config.lora_targets, config.alpha) == (8, 7, ["q", "v"], 8.0)
    assert config.lr == 1e-4 and build_config({"model_path": "m", "dataset": "d", "mode": "full"}, {}).lr == 1e-5
    js = tmp_path / "t.json"
    js.write_text('{"model_path": "m", "dataset": "d", "lora_alpha": 4}')
    assert build_config(read_config_file(js), {}).alpha == 4.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"height": 30, "width": 32}, "height must be a multiple of 16"),
        ({"height": 32}, "give both height and width"),
        ({"mode": "qlora"}, "mode must be one of lora, full"),
        ({"flow_shift": 0.0}, "flow_shift must be a positive"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"model_path": ""}, "model_path is required"),
    ],
)
def test_bad_settings_name_the_setting(values, message):
    with pytest.raises(UserError, match=message) as err:
        build_config({"model_path": "m", "dataset": "d"}, values)
    assert err.value.field == next(iter(values))  # a user error about that setting, not a bug


def test_missing_config_and_dataset_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"config file not found: .*nope\.toml"):
        read_config_file(tmp_path / "nope.toml")
    with pytest.raises(UserError, match=r"dataset not found: .*nowhere") as err:
        read_dataset(tmp_path / "nowhere")
    assert err.value.field == "dataset"


def test_a_dataset_csv_that_is_not_text_is_one_line(capsys, tmp_path):
    (tmp_path / "metadata.csv").write_bytes(b"key,prompt,source,target\n\xff\xfe,move,s.png,t.png\n")
    with pytest.raises(UserError, match=r"cannot read dataset .*metadata\.csv: not UTF-8 text"):
        read_dataset(tmp_path)
    code = cli.main(["train", "--model-path", str(tmp_path / "no-model"), "--dataset", str(tmp_path),
                     "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not UTF-8 text" in err[0], err


def test_an_output_dir_that_cannot_be_created_is_one_line(capsys, pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["train", "--model-path", str(tmp_path / "no-model"), "--dataset", str(pair),
                     "--output-dir", str(blocker / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"chronoedit: error: cannot write {blocker / 'out'}: Not a directory"], err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": "1e-4"}, "learning_rate must be a number or unset, got '1e-4'"),
        ({"max_grad_norm": "1.0"}, "max_grad_norm must be a number, got '1.0'"),
        ({"seed": "3"}, "seed must be an integer, got '3'"),
        ({"seed": 3.0}, "seed must be an integer, got 3.0"),
        ({"lora_rank": True}, "lora_rank must be an integer, got True"),
        ({"gradient_checkpointing": "false"}, "gradient_checkpointing must be true or false, got 'false'"),
        ({"quiet": 1}, "quiet must be true or false, got 1"),
        ({"lora_targets": "q"}, "lora_targets must be a list of strings, got 'q'"),
        ({"lora_targets": ["q", 1]}, r"lora_targets must be a list of strings, got \['q', 1\]"),
        ({"mode": None}, "mode must be a string, got None"),
        ({"height": "32", "width": 32}, "height must be an integer or unset, got '32'"),
    ],
)
def test_config_file_values_of_the_wrong_type_name_the_setting(values, message):
    with pytest.raises(UserError, match=message):
        build_config({"model_path": "m", "dataset": "d", **values}, {})


def test_config_file_numbers_and_nulls_of_the_right_kind_are_accepted():
    config = build_config({"model_path": "m", "dataset": "d", "learning_rate": 1, "lora_alpha": None, "seed": 2}, {})
    assert (config.lr, config.alpha, config.seed) == (1, 32.0, 2)


def test_cli_config_file_with_a_quoted_number_is_one_line(capsys, tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(f'model_path = "{tmp_path}"\ndataset = "{tmp_path}"\nlearning_rate = "1e-4"\n')
    code = cli.main(["train", str(toml)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"chronoedit: error: config {toml}: learning_rate must be a number or unset, got '1e-4'"]


def test_unknown_setting_in_a_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model_path = "m"\nlora_rnak = 4\n')
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['lora_rnak'\]"):
        read_config_file(path)


def test_a_runs_train_config_json_works_as_a_config_file(tmp_path):
    """Its record of the base model's shape is not a setting, and is not an unknown one either."""
    from chronoedit.train.checkpoints import run_settings
    from chronoedit.train.config import TrainConfig, build_config

    written = run_settings(TrainConfig(model_path=str(tmp_path / "m"), dataset=str(tmp_path), lora_rank=8))
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps({**written, "base_model": {"num_layers": 40}}))
    config = build_config(read_config_file(path), {})
    assert config.lora_rank == 8 and config.dataset == str(tmp_path / "metadata.csv")
