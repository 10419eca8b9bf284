"""``chronoedit label``: two VLM stages against a real OpenAI-compatible server on 127.0.0.1 (and a tiny local
Qwen2.5-VL), the dataset folder, resuming after a rerun, a SIGKILL or a torn line, and bad input data."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image
from vlm_fakes import FakeOpenAIServer, closed_port, system_text, tiny_qwen_vl_dir, user_images, user_text

import chronoedit
from chronoedit import cli
from chronoedit.errors import UserError
from chronoedit.label import METADATA_COLUMNS, PairsError, label_pairs, read_pairs
from chronoedit.label.prompts import DENSE_SYSTEM_PROMPT, INSTRUCTION_SYSTEM_PROMPT, clean_instruction

pytest.importorskip("openai")

COLORS = {(200, 30, 30): "red", (30, 30, 200): "blue", (30, 160, 30): "green", (230, 200, 40): "yellow",
          (120, 120, 120): "grey"}  # fmt: skip
NAMES = {name: rgb for rgb, name in COLORS.items()}


def colour(image: Image.Image) -> str:
    return COLORS[tuple(int(v) for v in np.asarray(image).reshape(-1, 3)[0])]


def answer(request) -> str:
    """A deterministic VLM: stage 1 names the colour change (or says no change), stage 2 wraps the instruction."""
    images = user_images(request)
    assert len(images) == 2
    if system_text(request) == INSTRUCTION_SYSTEM_PROMPT:
        before, after = map(colour, images)
        return "No change." if before == after else f"Instruction: turn the {before} square {after}"
    assert system_text(request) == DENSE_SYSTEM_PROMPT
    instruction = re.search(r"Editing instruction: (.*)\n", user_text(request)).group(1)
    return f"<think>ok</think>The user wants to {instruction}, keeping the frame and lighting unchanged."


def dense(instruction: str) -> str:
    return f"The user wants to {instruction}, keeping the frame and lighting unchanged."


@pytest.fixture
def server():
    fake = FakeOpenAIServer(answer)
    yield fake
    fake.close()


def square(color: str, size=(32, 24)) -> Image.Image:
    return Image.new("RGB", size, NAMES[color])


def make_pairs(root: Path, pairs: dict[str, tuple[str, str]]) -> Path:
    """``root/source/NAME.png`` + ``root/target/NAME.png`` for each NAME: (source colour, target colour)."""
    for role in ("source", "target"):
        (root / role).mkdir(parents=True, exist_ok=True)
    for name, (before, after) in pairs.items():
        square(before).save(root / "source" / f"{name}.png")
        square(after).save(root / "target" / f"{name}.png")
    return root


PAIRS = {"a": ("red", "blue"), "b": ("green", "green"), "c": ("yellow", "grey"), "d": ("blue", "red")}


def label(capsys, pairs, out, server_url, *extra):
    code = cli.main(["label", str(pairs), "--out", str(out), "--vlm-base-url", server_url, "--vlm-model", "vlm",
                     "--vlm-max-retries", "0", *map(str, extra)])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ the happy path
def test_label_folder_two_stages_and_dataset(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", PAIRS)
    out = tmp_path / "dataset"
    code, stdout, stderr = label(capsys, pairs, out, server.url)
    assert code == 0, stderr
    assert stdout.strip() == (f"label: 3 labeled, 1 filtered as no change, 0 already done (dataset in {out}; "
                              "skipped pairs in skipped.csv)")  # fmt: skip
    assert "label" in stderr and "pair" in stderr  # the progress bar
    assert (out / "metadata.csv").read_text().splitlines()[0] == ",".join(METADATA_COLUMNS)
    metadata = rows(out / "metadata.csv")
    assert [r["key"] for r in metadata] == ["a", "c", "d"]
    assert metadata[0] == {"key": "a", "video": "videos/a.mp4", "prompt": dense("turn the red square blue"),
                           "source_image": "images/a_source.png", "target_image": "images/a_target.png"}  # fmt: skip
    assert metadata[1]["prompt"] == dense("turn the yellow square grey")
    no_change = {"key": "b", "source": str(pairs / "source" / "b.png"), "target": str(pairs / "target" / "b.png"),
                 "reason": "no change"}  # fmt: skip
    assert rows(out / "skipped.csv") == [no_change]
    # two requests per labelled pair, one for the "no change" pair; stage 1 sees source then target
    assert [system_text(r) == INSTRUCTION_SYSTEM_PROMPT for r in server.requests] == [True, False, True, True, False,
                                                                                      True, False]  # fmt: skip
    assert [colour(i) for i in user_images(server.requests[0])] == ["red", "blue"]
    assert "turn the red square blue" in user_text(server.requests[1])
    for row in metadata:
        source, target = PAIRS[row["key"]]
        assert colour(Image.open(out / row["source_image"])) == source
        assert colour(Image.open(out / row["target_image"])) == target
        frames = imageio.mimread(out / row["video"], format="FFMPEG")
        assert len(frames) == 2 and frames[0].shape == (24, 32, 3)
        assert np.abs(frames[0].astype(int) - NAMES[source]).mean() < 8  # high-quality encode of [source, target]
        assert np.abs(frames[1].astype(int) - NAMES[target]).mean() < 8
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_label_csv_with_keys_and_given_instruction(capsys, server, tmp_path):
    make_pairs(tmp_path / "imgs", {"x": ("red", "green"), "y": ("grey", "blue")})
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("key,source,target,instruction\n"
                        "first,imgs/source/x.png,imgs/target/x.png,\n"
                        "second,imgs/source/y.png,imgs/target/y.png,paint the square blue\n")  # fmt: skip
    code, _, stderr = label(capsys, csv_path, tmp_path / "ds", server.url, "--quiet")
    assert code == 0, stderr
    assert stderr == ""  # --quiet: no progress bar
    metadata = rows(tmp_path / "ds" / "metadata.csv")
    assert [(r["key"], r["prompt"]) for r in metadata] == [("first", dense("turn the red square green")),
                                                           ("second", dense("paint the square blue"))]  # fmt: skip
    assert len(server.requests) == 3  # the given instruction skips stage 1


def test_suffix_convention_and_metadata_relabel(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    square("red").save(folder / "cat_source.png")
    square("blue").save(folder / "cat_target.jpg")
    square("red").save(folder / "dog_before.webp")
    square("red").save(folder / "dog_after.png")
    pairs = read_pairs(folder)
    assert [(p.key, p.source.name, p.target.name) for p in pairs] == [
        ("cat", "cat_source.png", "cat_target.jpg"),
        ("dog", "dog_before.webp", "dog_after.png"),
    ]


def test_clean_instruction():
    assert clean_instruction('<think>x</think>**Instruction:** "Add a hat."') == "Add a hat."
    assert clean_instruction("a; b; c; d; e") == "a; b; c"
    assert clean_instruction("Instructions:\n1. add a hat;\n2. make the sky pink\n") == "add a hat; make the sky pink"
    for nothing in ("No change.", "no change", "No visible change", "NO CHANGES!", "None"):
        assert clean_instruction(nothing) is None
    assert clean_instruction("Nonetheless add a hat") == "Nonetheless add a hat"


# ------------------------------------------------------------------------------------------------ resuming
def test_rerun_makes_no_new_requests(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", PAIRS)
    assert label(capsys, pairs, tmp_path / "ds", server.url)[0] == 0
    before = (tmp_path / "ds" / "metadata.csv").read_bytes()
    count = len(server.requests)
    code, stdout, _ = label(capsys, pairs, tmp_path / "ds", server.url)
    assert code == 0 and "0 labeled, 0 filtered as no change, 4 already done" in stdout
    assert len(server.requests) == count
    assert (tmp_path / "ds" / "metadata.csv").read_bytes() == before
    # new pairs added to the folder are labelled on the next run, and only they
    make_pairs(pairs, {"e": ("grey", "yellow")})
    code, stdout, _ = label(capsys, pairs, tmp_path / "ds", server.url)
    assert "1 labeled" in stdout and "4 already done" in stdout
    assert len(server.requests) == count + 2


def test_workers_ask_about_several_pairs_at_once(capsys, tmp_path):
    lock, active, peak = threading.Lock(), [0], [0]

    def slow(request):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return answer(request)

    fake = FakeOpenAIServer(slow)
    pairs = make_pairs(tmp_path / "pairs", PAIRS)
    try:
        code, stdout, stderr = label(capsys, pairs, tmp_path / "ds", fake.url, "--workers", "3", "--quiet")
    finally:
        fake.close()
    assert code == 0, stderr
    assert "3 labeled, 1 filtered as no change" in stdout
    metadata = sorted(rows(tmp_path / "ds" / "metadata.csv"), key=lambda r: r["key"])
    assert [(r["key"], r["prompt"]) for r in metadata] == [("a", dense("turn the red square blue")),
                                                           ("c", dense("turn the yellow square grey")),
                                                           ("d", dense("turn the blue square red"))]  # fmt: skip
    assert len(fake.requests) == 7 and peak[0] > 1


def test_workers_need_an_endpoint(capsys, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    code = cli.main(["label", str(pairs), "--out", str(tmp_path / "ds"), "--vlm-model", "x", "--workers", "2"])
    assert code == 2 and "--workers needs --vlm-base-url" in capsys.readouterr().err


def test_retry_skipped_asks_again_about_skipped_pairs_only(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "b": ("green", "green")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    assert len(server.requests) == 3
    code, stdout, _ = label(capsys, pairs, out, server.url, "--retry-skipped")
    assert code == 0 and "0 labeled, 1 filtered as no change, 1 already done" in stdout
    assert len(server.requests) == 4 and [colour(i) for i in user_images(server.requests[3])] == ["green", "green"]
    assert [r["key"] for r in rows(out / "skipped.csv")] == ["b"]  # recorded once, not twice


def test_out_must_be_a_label_dataset_and_not_in_use(capsys, server, tmp_path):
    from chronoedit.label import open_dataset

    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.csv").write_text("file_name,text\nx.png,hi\n")
    assert "has the columns file_name,text, expected key,video,prompt" in bad_run(capsys, server, pairs, foreign)
    with open_dataset(tmp_path / "busy"):
        assert "another chronoedit label is writing to" in bad_run(capsys, server, pairs, tmp_path / "busy")


def test_torn_last_line_is_repaired(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    metadata = out / "metadata.csv"
    lines = metadata.read_text().splitlines(keepends=True)
    metadata.write_text("".join(lines[:2]) + lines[2][:25])  # the write of row "c" was cut short
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "1 labeled" in stdout and "1 already done" in stdout
    assert metadata.read_text() == "".join(lines)  # the torn line is gone and the row written again, whole
    assert (out / "metadata.csv.torn").read_text() == lines[2][:25] + "\n"  # the cut bytes are kept, not lost


def test_reopening_removes_only_true_temp_files(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    mine, stale = out / "plan.tmp-2.txt", out / "images" / "a_source.png.tmp-4242-0123abcd.png"
    mine.write_text("the user's notes")
    stale.write_bytes(b"partial")
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "1 already done" in stdout
    assert mine.read_text() == "the user's notes" and not stale.exists()


def test_whole_last_row_without_a_final_newline_is_kept(capsys, server, tmp_path):
    """A prompt corrected by hand in an editor that drops the final newline: the last row is whole, so it is kept
    (the newline added back) and not asked again; a row cut inside its last cell is still torn and written again."""
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    metadata = out / "metadata.csv"
    original = metadata.read_text()
    edited = original.replace(dense("turn the yellow square grey"), "The user wants to paint it grey, by hand.")
    metadata.write_text(edited.rstrip("\n"))
    requests = len(server.requests)
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "0 labeled" in stdout and "2 already done" in stdout
    assert len(server.requests) == requests
    assert metadata.read_text() == edited
    metadata.write_text(edited[: -len("get.png\n")])  # every cell there, but the last one cut: images/c_tar
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "1 labeled" in stdout and "1 already done" in stdout
    assert metadata.read_text() == original


MULTI_LINE = "The user wants to\npaint the square grey,\nby hand."  # a prompt edited by hand over three lines


def test_multi_line_prompt_as_the_last_row_without_a_newline_is_kept(capsys, server, tmp_path):
    """A newline inside a quoted prompt is no row boundary: the whole last row is kept (its newline added), and the
    next pair's row starts on a line of its own, so the CSV reads back as the rows written."""
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    metadata = out / "metadata.csv"
    edited = metadata.read_text().replace(dense("turn the yellow square grey"), MULTI_LINE)  # quoted already
    assert edited.endswith(f'"{MULTI_LINE}",images/c_source.png,images/c_target.png\n')
    metadata.write_text(edited.rstrip("\n"))
    make_pairs(pairs, {"d": ("blue", "red")})
    requests = len(server.requests)
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "1 labeled" in stdout and "2 already done" in stdout
    assert len(server.requests) == requests + 2  # only d was asked about
    assert metadata.read_text() == edited + (
        f'd,videos/d.mp4,"{dense("turn the blue square red")}",images/d_source.png,images/d_target.png\n'
    )
    assert [(r["key"], r["prompt"]) for r in rows(metadata)] == [("a", dense("turn the red square blue")),
                                                                 ("c", MULTI_LINE),
                                                                 ("d", dense("turn the blue square red"))]  # fmt: skip


@pytest.mark.parametrize("cut", ["The user wants to\n", "The user wants to\npaint the squ"], ids=["at-newline", "mid"])
def test_multi_line_prompt_cut_inside_its_quotes_is_torn(capsys, server, tmp_path, cut):
    """A write cut inside a quoted multi-line prompt leaves no open quote behind: the row is dropped, asked again,
    and written whole."""
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    metadata = out / "metadata.csv"
    original = metadata.read_text()
    lines = original.splitlines(keepends=True)
    metadata.write_text("".join(lines[:2]) + f'c,videos/c.mp4,"{cut}')
    requests = len(server.requests)
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0 and "1 labeled" in stdout and "1 already done" in stdout
    assert len(server.requests) == requests + 2
    assert metadata.read_text() == original
    assert [r["key"] for r in rows(metadata)] == ["a", "c"]


@pytest.mark.parametrize(
    "tail",
    [
        "no chan",  # an unquoted reason cut mid-text looks whole
        '"no change: the VLM said the ima',  # cut inside its quotes
        '"no change: I cannot say ""yes',  # cut right after an escaped quote: ends in a quote, yet torn
    ],
    ids=["unquoted-cut", "quoted-cut", "escaped-quote-cut"],
)
def test_a_skipped_row_without_its_newline_is_retried(capsys, server, tmp_path, tail):
    """A skipped row's reason may be cut anywhere, so a last row without its newline is dropped and the pair asked
    again (cheap); its cut bytes are kept in skipped.csv.torn."""
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "b": ("green", "green")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    skipped = out / "skipped.csv"
    (header, row) = skipped.read_text().splitlines(keepends=True)
    assert row.endswith(",no change\n")
    skipped.write_text(header + row[: -len("no change\n")] + tail)
    requests = len(server.requests)
    code, stdout, _ = label(capsys, pairs, out, server.url)
    assert code == 0
    assert "1 filtered as no change, 1 already done" in stdout and len(server.requests) == requests + 1
    assert skipped.read_text() == header + row
    assert (out / "skipped.csv.torn").read_text() == row[: -len("no change\n")] + tail + "\n"


def test_sigkill_mid_run_loses_at_most_the_pair_in_flight(capsys, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey"), "d": ("blue", "red"),
                                            "e": ("grey", "green")})  # fmt: skip
    gate = threading.Event()

    def stalling(request):
        if len(fake.requests) == 5:  # stage 1 of the third pair: hang until the labeler is killed
            gate.wait(30)
        return answer(request)

    fake = FakeOpenAIServer(stalling)
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(Path(chronoedit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "chronoedit.cli", "label", str(pairs), "--out", str(out),
                             "--vlm-base-url", fake.url, "--vlm-model", "vlm", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(fake.requests) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fake.requests) == 5, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gate.set()
        assert [r["key"] for r in rows(out / "metadata.csv")] == ["a", "c"]  # both finished pairs survived
        code, stdout, stderr = label(capsys, pairs, out, fake.url)
    finally:
        gate.set()
        fake.close()
    assert code == 0, stderr
    assert "2 labeled" in stdout and "2 already done" in stdout
    assert [r["key"] for r in rows(out / "metadata.csv")] == ["a", "c", "d", "e"]
    assert len(fake.requests) == 5 + 4  # only the pairs not done were asked about again
    assert [p.name for p in out.rglob("*") if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------------------------------ bad data
def bad_run(capsys, server, pairs, out, *extra):
    code, stdout, stderr = label(capsys, pairs, out, server.url, *extra)
    assert code == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if line.startswith("chronoedit: error:")]
    assert len(lines) == 1, stderr
    assert server.requests == []  # nothing was sent: the data is checked before the VLM is used
    return lines[0]


def test_missing_image_in_csv_names_the_line(capsys, server, tmp_path):
    make_pairs(tmp_path / "imgs", {"x": ("red", "green")})
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("source,target\nimgs/source/x.png,imgs/target/x.png\nimgs/source/x.png,imgs/target/no.png\n")
    error = bad_run(capsys, server, csv_path, tmp_path / "ds")
    assert "pairs.csv line 3: target image" in error and "no.png: not found" in error
    assert rows(tmp_path / "ds" / "metadata.csv") == []


def test_unreadable_image_names_the_file(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "b": ("red", "blue")})
    (pairs / "target" / "b.png").write_bytes(b"not a png at all")
    error = bad_run(capsys, server, pairs, tmp_path / "ds")
    assert "source/b.png: target image" in error and "not a readable image" in error


def test_mismatched_sizes_name_the_pair(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    square("blue", size=(30, 24)).save(pairs / "target" / "a.png")
    error = bad_run(capsys, server, pairs, tmp_path / "ds")
    assert "source/a.png: source and target sizes differ (32x24 vs 30x24)" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("source,target\n", "has a header but no rows"),
        ("image,prompt\nx.png,hi\n", "has no source or target column"),
    ],
)
def test_empty_or_foreign_csv(capsys, server, tmp_path, text, message):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(text)
    assert message in bad_run(capsys, server, csv_path, tmp_path / "ds")


def test_unmatched_and_duplicate_names(capsys, server, tmp_path):
    """An image without its other half is a bad pair: an error naming it, or recorded with --skip-bad-pairs."""
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    square("red").save(pairs / "source" / "lonely.png")
    square("red").save(pairs / "target" / "widowed.png")
    assert "source/lonely.png has no target image" in bad_run(capsys, server, pairs, tmp_path / "ds")
    code, stdout, _ = label(capsys, pairs, tmp_path / "ds2", server.url, "--skip-bad-pairs")
    assert code == 0 and "1 labeled" in stdout and "2 bad pairs skipped" in stdout
    reasons = {row["key"]: row["reason"] for row in rows(tmp_path / "ds2" / "skipped.csv")}
    assert reasons == {"lonely": "bad pair: source/lonely.png has no target image (expected target/lonely.png or "
                                 ".jpg/.webp)",
                       "widowed": "bad pair: target/widowed.png has no source image (expected source/widowed.png "
                                  "or .jpg/.webp)"}  # fmt: skip
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("key,source,target\nk,a.png,b.png\nK,c.png,d.png\n")
    with pytest.raises(PairsError, match=r"duplicate key 'K' in pairs.csv line 3 \(also pairs.csv line 2\)"):
        read_pairs(csv_path)


def test_a_bad_pair_is_a_user_error_before_the_vlm_loads(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    square("blue", size=(30, 24)).save(pairs / "target" / "a.png")

    def no_vlm():
        raise AssertionError("the VLM was loaded for bad data")

    with pytest.raises(UserError, match=r"source/a\.png: source and target sizes differ") as err:
        label_pairs(read_pairs(pairs), tmp_path / "ds", no_vlm)
    assert isinstance(err.value, PairsError)


def test_a_dataset_folder_that_cannot_be_written_is_one_line(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    out = tmp_path / "ds"
    out.mkdir()
    (out / "images").write_text("a file where the images folder goes")
    error = bad_run(capsys, server, pairs, out)
    assert error.startswith(f"chronoedit: error: cannot write {out}: ") and "File exists" in error
    (out / "images").unlink()
    (out / "metadata.csv").write_bytes(b"key,video,prompt,source_image,target_image\n\xff,v,p,s,t\n")
    assert f"{out / 'metadata.csv'} is not UTF-8 text" in bad_run(capsys, server, pairs, out)


def test_skip_bad_pairs_records_them_and_labels_the_rest(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "b": ("red", "blue")})
    square("blue", size=(30, 24)).save(pairs / "target" / "b.png")
    code, stdout, _ = label(capsys, pairs, tmp_path / "ds", server.url, "--skip-bad-pairs")
    assert code == 0 and "1 labeled" in stdout and "1 bad pairs skipped" in stdout
    (skipped,) = rows(tmp_path / "ds" / "skipped.csv")
    assert skipped["key"] == "b" and skipped["reason"].startswith("bad pair: source/b.png: source and target sizes")


def test_server_down_stops_with_one_line_and_keeps_done_rows(capsys, server, tmp_path):
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue"), "c": ("yellow", "grey")})
    out = tmp_path / "ds"
    assert label(capsys, pairs, out, server.url)[0] == 0
    make_pairs(pairs, {"z": ("grey", "red")})
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, _, stderr = label(capsys, pairs, out, url)
    assert code == 2 and f"chronoedit: error: cannot reach {url}" in stderr
    assert [r["key"] for r in rows(out / "metadata.csv")] == ["a", "c"]


# ------------------------------------------------------------------------------------------------ local VLM
def test_label_with_a_local_vlm(capsys, tmp_path, monkeypatch):
    """The tiny random VLM runs both stages end to end; its gibberish dense prompt is recorded as unusable."""
    from chronoedit.vlm.local import LocalVLM

    seen, closed = [], []
    real_chat, real_close = LocalVLM.chat, LocalVLM.close
    monkeypatch.setattr(LocalVLM, "chat", lambda self, system, text, images: seen.append((system, len(images)))
                        or real_chat(self, system, text, images))  # fmt: skip
    monkeypatch.setattr(LocalVLM, "close", lambda self: closed.append(True) or real_close(self))
    pairs = make_pairs(tmp_path / "pairs", {"a": ("red", "blue")})
    code = cli.main(["label", str(pairs), "--out", str(tmp_path / "ds"), "--vlm-model", str(tiny_qwen_vl_dir()),
                     "--vlm-device", "cpu", "--vlm-max-tokens", "6", "--quiet"])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "1 unusable VLM answers skipped" in stdout
    assert seen == [(INSTRUCTION_SYSTEM_PROMPT, 2), (DENSE_SYSTEM_PROMPT, 2)]  # both stages, both images each
    (skipped,) = rows(tmp_path / "ds" / "skipped.csv")
    assert skipped["reason"].startswith("unusable VLM answer: the VLM's answer does not contain a prompt starting")
    assert rows(tmp_path / "ds" / "metadata.csv") == []
    assert closed == [True]
