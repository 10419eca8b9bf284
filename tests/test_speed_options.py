"""The speed options through the application layer to every front end: ``--cache`` / ``--no-cfg-batch`` on the
command line, ``cache`` / ``cfg_batch`` in batch rows and in the HTTP API, all resolved once and handed to the
pipeline's call."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from chronoedit import cli, editing
from chronoedit.batch import Row, row_settings
from chronoedit.commands.flags import add_sampling_args, edit_settings
from chronoedit.editing import EditSettings, resolve_model, resolve_sampling, service
from chronoedit.errors import UserError
from chronoedit.speed.caches import CacheSpec, parse_cache


@pytest.mark.parametrize(("text", "expected"), [
    ("first-block", CacheSpec("first-block", 0.05)), ("First-Block:0.1", CacheSpec("first-block", 0.1)),
    ("taylorseer", CacheSpec("taylorseer", 5)), ("taylorseer:3", CacheSpec("taylorseer", 3)),
    ("none", None), ("", None), (None, None),
])  # fmt: skip
def test_cache_names(text, expected):
    assert parse_cache(text) == expected


@pytest.mark.parametrize("text", ["teacache", "first-block:-0.1", "first-block:nan", "taylorseer:2.5", "mag:0.1"])
def test_bad_cache_names_name_the_field(text):
    with pytest.raises(UserError) as err:
        parse_cache(text)
    assert err.value.field == "cache"


def test_the_flags_give_the_settings():
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    settings = edit_settings(parser.parse_args(["--cache", "first-block:0.1", "--no-cfg-batch"]))
    assert (settings.cache, settings.cfg_batch) == ("first-block:0.1", False)
    default = edit_settings(parser.parse_args([]))
    assert (default.cache, default.cfg_batch) == (None, None)


def test_resolved_once_with_defaults():
    model = resolve_model("demo", device="cpu")
    values = resolve_sampling(EditSettings(cache="taylorseer"), model)
    assert (values.cache, values.cfg_batch) == ("taylorseer:5", True)
    assert resolve_sampling(EditSettings(cfg_batch=False), model).cfg_batch is False
    with pytest.raises(UserError) as err:
        resolve_sampling(EditSettings(cfg_batch="no"), model)
    assert err.value.field == "cfg_batch"


def test_batch_rows_override_the_batch(tmp_path):
    defaults = EditSettings(cache="first-block:0.05")
    row = Row(line=2, id="a", input=tmp_path / "a.png", prompt="x", fields={"cache": "none", "cfg_batch": "false"})
    settings = row_settings(defaults, row)
    assert (settings.cache, settings.cfg_batch) == ("none", False)
    assert row_settings(defaults, Row(2, "b", tmp_path / "b.png", "x")).cache == "first-block:0.05"


def test_api_options_reach_the_settings():
    pytest.importorskip("fastapi")
    from chronoedit.serve.editing import job_settings
    from chronoedit.serve.options import EditOptions

    options = EditOptions.model_validate({"prompt": "x", "cache": "taylorseer:4", "cfg_batch": False})
    settings = job_settings(EditSettings(cache="first-block"), options)
    assert (settings.cache, settings.cfg_batch) == ("taylorseer:4", False)
    assert job_settings(EditSettings(cache="first-block"), EditOptions(prompt="x")).cache == "first-block"


class RecordingPipe:
    def __init__(self):
        self.kwargs = None

    def set_flow_shift(self, shift):
        pass

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        h, w, f = kwargs["height"], kwargs["width"], kwargs["num_frames"]
        return SimpleNamespace(frames=np.full((1, f, h, w, 3), 0.5, dtype=np.float32), trajectory=None)


@pytest.mark.parametrize(("flags", "expected"), [
    ([], {}),
    (["--cache", "first-block", "--no-cfg-batch"], {"cache": "first-block:0.05", "cfg_batch": False}),
])  # fmt: skip
def test_the_cli_hands_them_to_the_pipeline(monkeypatch, capsys, tmp_path, flags, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)
    pipe = RecordingPipe()
    monkeypatch.setattr(service, "load_pipeline", lambda spec, report=None: pipe)
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--height", "32", "--width", "48", "--quiet", *flags])
    assert code == 0, capsys.readouterr().err
    assert {k: pipe.kwargs[k] for k in ("cache", "cfg_batch") if k in pipe.kwargs} == expected
    assert Path("outputs/edit.png").is_file()


def test_a_bad_cache_flag_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(service, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--cache", "first-block:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cache" in err[0] and "threshold" in err[0]
