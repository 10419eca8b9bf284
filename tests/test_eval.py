"""``chronoedit eval``: benchmark readers, rubrics, a scripted judge on a fake OpenAI-compatible server on 127.0.0.1
(exact aggregates against hand-computed values for each format), unusable replies, the reply cache and resuming after
SIGKILL, metrics and statistics. Local fixtures only (the judge prompts here are our own text in the published
formats)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlm_fakes import FakeOpenAIServer, user_images, user_text

import chronoedit
from chronoedit import cli
from chronoedit.errors import UserError
from chronoedit.evaluation import read_benchmark
from chronoedit.evaluation.metrics import changed_fraction, psnr, ssim, ssim_reference, to_tensor
from chronoedit.evaluation.readers import BenchmarkError
from chronoedit.evaluation.stats import bootstrap_ci, pooled_mean, sign_test
from chronoedit.evaluation.sweep import parse_sweep

pytest.importorskip("openai")

IMGEDIT_PROMPTS = {
    "add": "You rate object additions. Score three aspects from 1 to 5.\nExample Response Format:\nBrief reasoning: "
    "a few words.\nPrompt Compliance: A number from 1 to 5.\nVisual Naturalness: A number from 1 to 5.\nPhysical & "
    "Detail Coherence: A number from 1 to 5.\nediting instruction is : <edit_prompt>.\n",
    "remove": "You rate object removals.\nExample Response Format:\nBrief reasoning: a few words.\nPrompt Compliance: "
    "A number from 1 to 5.\nVisual Naturalness: A number from 1 to 5.\nPhysical & Detail Integrity: A number from 1 "
    "to 5.\nediting instruction is : <edit_prompt>.\n",
}
VIE_PROMPTS = '''_context_no_delimit = """You judge AI images. Answer as
{
"score" : [...],
"reasoning" : "..."
}"""
_prompts_0shot_two_image_edit_rule = "RULES: the first image is the original, the second the edit."
_prompts_0shot_tie_rule_SC = (
    "Two scores 0-10: editing success, and over-editing. Editing instruction: <instruction>"
)
_prompts_0shot_rule_PQ = "Two scores 0-10: naturalness and artifacts of the image."
unrelated = 3
'''


def image(path: Path, rgb=(120, 80, 40), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def generic_bench(root: Path, items: dict[str, str]) -> Path:
    """items: id -> category; instruction 'edit ID'; each with an input and an output image (outputs/ID.png)."""
    rows = []
    for number, (item_id, category) in enumerate(items.items()):
        image(root / "images" / f"{item_id}.png", (10 * number, 50, 90))
        image(root / "outputs" / f"{item_id}.png", (10 * number + 40, 50, 90))
        rows.append({"id": item_id, "image": f"images/{item_id}.png", "prompt": f"edit {item_id}",
                     "category": category})  # fmt: skip
    return write_jsonl(root / "bench.jsonl", rows)


def scores(run: Path) -> list[dict[str, str]]:
    with open(run / "scores.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def judged(capsys, bench, out, server, *extra):
    return run_cli(capsys, bench, "--out", out, "--vlm-base-url", server.url, "--vlm-model", "judge-x", "--quiet",
                   "--bootstrap", 200, *extra)  # fmt: skip


def item_of(request) -> str:
    """The item id a request is about ('edit ID' in the instruction)."""
    text = user_text(request)
    return text.split("edit ", 1)[1].split()[0].rstrip(".") if "edit " in text else ""


def scripted(replies: dict[str, list[str] | str]):
    """A responder answering per item id (a list: one reply per ask, the last repeated)."""
    asked: dict[str, int] = {}

    def respond(request) -> str:
        key = item_of(request)
        answers = replies[key]
        if isinstance(answers, str):
            return answers
        index = asked.get(key, 0)
        asked[key] = index + 1
        return answers[min(index, len(answers) - 1)]

    return respond


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    monkeypatch.delenv("CHRONOEDIT_MODEL_PATH", raising=False)


def pbench(action, identity, visual, reasoning="ok") -> str:
    return json.dumps({"action_fidelity": action, "identity_preservation": identity, "visual_coherence": visual,
                       "reasoning": reasoning})  # fmt: skip


# ------------------------------------------------------------------------------------- exact aggregates per format
def test_generic_aggregates_match_hand_computed_values(capsys, tmp_path):
    bench = generic_bench(tmp_path, {"a": "human", "b": "human", "c": "robot"})
    fake = FakeOpenAIServer(scripted({"a": "```json\n" + pbench(5, 4, 3) + "\n```", "b": pbench(2, 2, 2),
                                      "c": "Here: " + pbench(5, 5, 5, "fine")}))  # fmt: skip
    try:
        code, stdout, stderr = judged(capsys, bench, tmp_path / "run", fake, "--outputs", tmp_path / "outputs")
    finally:
        fake.close()
    assert code == 0, stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # items: a = (5+4+3)/3 = 4, b = 2, c = 5; human = (4+2)/2 = 3, robot = 5; overall = mean of items = 11/3
    assert summary["categories"] == {"human": 3.0, "robot": 5.0}
    assert summary["overall"] == pytest.approx(11 / 3)
    assert summary["axes"] == pytest.approx({"action_fidelity": 4.0, "identity_preservation": 11 / 3,
                                             "visual_coherence": 10 / 3})  # fmt: skip
    low, high = summary["overall_ci"]
    assert 2.0 <= low <= 11 / 3 <= high <= 5.0
    assert summary["judge_model"] == "judge-x" and summary["rubric"] == "pbench-3axis"
    assert f"overall {11 / 3:.3f}" in stdout
    rows = scores(tmp_path / "run")
    assert [(r["id"], r["score"], r["judge_model"], r["rubric"]) for r in rows] == [
        ("a", "4", "judge-x", "pbench-3axis"), ("b", "2", "judge-x", "pbench-3axis"),
        ("c", "5", "judge-x", "pbench-3axis")]  # fmt: skip
    assert rows[2]["reasoning"] == "fine"
    request = fake.requests[0]
    assert len(user_images(request)) == 2 and "edit a" in user_text(request)  # the benchmark's own instruction
    assert float(rows[0]["changed_fraction"]) == 1.0  # every pixel moved by 40/255 > 0.05


def test_imgedit_aggregates_match_hand_computed_values(capsys, tmp_path):
    data = {"1": ("add", "x/1.jpg"), "2": ("add", "x/2.jpg"), "3": ("remove", "y/3.jpg")}
    for key, (_, rel) in data.items():
        image(tmp_path / "imgs" / rel)
        image(tmp_path / "edited" / f"{key}.png", (0, 0, 0))
    (tmp_path / "basic_edit.json").write_text(json.dumps(
        {key: {"id": rel, "prompt": f"edit {key}", "edit_type": kind} for key, (kind, rel) in data.items()}))
    (tmp_path / "prompts.json").write_text(json.dumps(IMGEDIT_PROMPTS))
    replies = {
        "1": "Brief reasoning: close.\nPrompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Coherence: 2",
        "2": "Brief reasoning: great.\n**Prompt Compliance**: 5\nVisual Naturalness: 5\n"
        "Physical & Detail Coherence: 5",
        "3": "Brief reasoning: partial.\nPrompt Compliance: 1\nVisual Seamlessness: 2\nPhysical: 3",  # by order
    }
    fake = FakeOpenAIServer(scripted(replies))
    try:
        code, _, stderr = judged(capsys, tmp_path / "basic_edit.json", tmp_path / "run", fake, "--images",
                                 tmp_path / "imgs", "--outputs", tmp_path / "edited", "--judge-prompts",
                                 tmp_path / "prompts.json")  # fmt: skip
    finally:
        fake.close()
    assert code == 0, stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # items 1 = 3, 2 = 5, 3 = 2; add = 4, remove = 2; overall = mean of edit types = 3
    assert summary["format"] == "imgedit" and summary["categories"] == {"add": 4.0, "remove": 2.0}
    assert summary["overall"] == pytest.approx(3.0)
    assert summary["category_details"]["add"]["axes"]["Prompt Compliance"] == 4.5
    assert "editing instruction is : edit 3." in user_text(fake.requests[2])


def gedit_bench(root: Path) -> Path:
    rows = [("k1", "en", "color_alter"), ("k2", "en", "subject-add"), ("k1", "cn", "color_alter")]
    records = []
    for key, language, group in rows:
        image(root / "src" / f"{key}.png")
        image(root / "gen" / "fullset" / group / language / f"{key}.png", (1, 2, 3))
        records.append({"key": key, "task_type": group, "instruction": f"edit {language}_{key}",
                        "instruction_language": language, "input_image": f"src/{key}.png",
                        "Intersection_exist": True})  # fmt: skip
    return write_jsonl(root / "gedit.jsonl", records)


def test_gedit_aggregates_match_hand_computed_values(capsys, tmp_path):
    bench = gedit_bench(tmp_path)
    (tmp_path / "vie_prompts.py").write_text(VIE_PROMPTS)
    sc = {"en_k1": [8, 6], "en_k2": [10, 10], "cn_k1": [4, 7]}
    pq = iter([[9, 4], [9, 9], [9, 10]])  # asked in item order, after each item's SC question

    def respond(request):
        if len(user_images(request)) == 2:
            return json.dumps({"score": sc[item_of(request)], "reasoning": "sc"})
        return f'{{"score": {json.dumps(next(pq))}, "reasoning": "pq"}}'

    fake = FakeOpenAIServer(respond)
    try:
        code, _, stderr = judged(capsys, bench, tmp_path / "run", fake, "--outputs", tmp_path / "gen",
                                 "--judge-prompts", tmp_path / "vie_prompts.py")  # fmt: skip
    finally:
        fake.close()
    assert code == 0, stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    o1, o2, o3 = math.sqrt(6 * 4), math.sqrt(10 * 9), math.sqrt(4 * 9)  # SC = min, PQ = min, O = sqrt(SC * PQ)
    assert s["categories"] == pytest.approx({"color_alter": (o1 + o3) / 2, "subject-add": o2})
    assert s["overall"] == pytest.approx(((o1 + o3) / 2 + o2) / 2)  # the mean over task groups
    assert s["axes"]["SC"] == pytest.approx(((6 + 4) / 2 + 10) / 2) and s["axes"]["PQ"] == pytest.approx((6.5 + 9) / 2)
    assert s["languages"]["en"]["overall"] == pytest.approx((o1 + o2) / 2)
    assert s["languages"]["cn"]["overall"] == pytest.approx(o3)
    sc_request, pq_request = fake.requests[:2]
    assert "Editing instruction: edit en_k1" in user_text(sc_request) and "RULES" in user_text(sc_request)
    assert len(user_images(pq_request)) == 1 and "naturalness" in user_text(pq_request)


# ----------------------------------------------------------------------------------------------- unusable replies
def test_malformed_refused_and_out_of_range_replies_are_retried_then_recorded(capsys, tmp_path):
    bench = generic_bench(tmp_path, {"good": "x", "late": "x", "refuses": "y", "wild": "y", "nan": "y"})
    replies = {"good": pbench(4, 4, 4), "late": ["scores: 4, 4, 4", "{not json", pbench(2, 3, 4)],
               "refuses": "I'm sorry, but I can't help with evaluating this image.", "wild": pbench(7, 3, 3),
               "nan": '{"action_fidelity": NaN, "identity_preservation": 3, "visual_coherence": 3}'}  # fmt: skip
    fake = FakeOpenAIServer(scripted(replies))
    try:
        code, stdout, stderr = judged(capsys, bench, tmp_path / "run", fake, "--outputs", tmp_path / "outputs")
        asked = len(fake.requests)
        again = judged(capsys, bench, tmp_path / "run", fake, "--outputs", tmp_path / "outputs")
        assert len(fake.requests) == asked  # failures are recorded: a rerun asks nothing again
        retried = judged(capsys, bench, tmp_path / "run", fake, "--outputs", tmp_path / "outputs",
                         "--judge-retry-failed")  # fmt: skip
    finally:
        fake.close()
    assert code == 1 and again[0] == 1 and retried[0] == 1, stderr
    assert asked == 1 + 3 + 3 + 3 + 3  # good once, late on its 3rd try, the others 3 times each
    assert len(fake.requests) == asked + 3 * 3  # only the 3 failed items were asked again
    rows = {r["id"]: r for r in scores(tmp_path / "run")}
    assert rows["late"]["status"] == "ok" and rows["late"]["score"] == "3"
    assert rows["refuses"]["status"] == "judge_failed" and "refused" in rows["refuses"]["error"]
    assert "action_fidelity is 7, not an integer from 1 to 5" in rows["wild"]["error"]
    assert "after 3 attempts" in rows["nan"]["error"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "judge_failed": 3} and summary["overall"] == pytest.approx(3.5)
    assert "3 judge failed" in stdout


def test_an_unreachable_judge_is_one_line_and_a_rerun_resumes(capsys, tmp_path):
    bench = generic_bench(tmp_path, {"a": "x"})
    code, _, stderr = run_cli(capsys, bench, "--out", tmp_path / "run", "--outputs", tmp_path / "outputs",
                              "--vlm-base-url", "http://127.0.0.1:9/v1", "--vlm-model", "j", "--vlm-max-retries", 0,
                              "--quiet")  # fmt: skip
    assert code == 2 and stderr.count("chronoedit: error:") == 1 and "cannot reach" in stderr


def test_resume_after_sigkill_asks_nothing_twice(capsys, tmp_path):
    bench = generic_bench(tmp_path, {f"i{n}": "x" for n in range(4)})
    gate = threading.Event()

    def stalling(request):
        if len(fake.requests) == 3:  # the third item: hang until the run is killed
            gate.wait(30)
        return pbench(3, 4, 5)

    fake = FakeOpenAIServer(stalling)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(chronoedit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "chronoedit.cli", "eval", str(bench), "--out", str(out),
                             "--outputs", str(tmp_path / "outputs"), "--vlm-base-url", fake.url,
                             "--vlm-model", "judge-x", "--quiet", "--no-clip"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(fake.requests) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fake.requests) == 3, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gate.set()
        cached = [json.loads(line)["id"] for line in (out / "judge_cache.jsonl").read_text().splitlines()]
        assert cached == ["i0", "i1"]
        code, _, stderr = judged(capsys, bench, out, fake, "--outputs", tmp_path / "outputs")
    finally:
        gate.set()
        fake.close()
    assert code == 0, stderr
    asked_after = [item_of(r) for r in fake.requests[3:]]
    assert asked_after == ["i2", "i3"]  # the killed question again, and the one never asked; none of the cached
    assert json.loads((out / "summary.json").read_text())["overall"] == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------------- bad inputs
def bad(capsys, *argv) -> str:
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2 and stdout == "", stderr
    lines = [line for line in stderr.splitlines() if line.startswith("chronoedit: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_bad_benchmarks_are_one_line_before_anything_runs(capsys, tmp_path):
    bench = generic_bench(tmp_path, {"a": "x"})
    out = tmp_path / "run"
    assert "benchmark not found" in bad(capsys, tmp_path / "nope.jsonl", "--out", out, "--no-judge")
    (tmp_path / "b1.jsonl").write_text('{"id": "a", "image": "images/a.png", "prompt": "p"}\n{"id": \n')
    assert "b1.jsonl: cannot parse line 2" in bad(capsys, tmp_path / "b1.jsonl", "--out", out, "--no-judge")
    (tmp_path / "b5.csv").write_text("id,image,prompt,prompt\na,images/a.png,p,q\n")  # the manifests' CSV rules
    assert "names column 'prompt' more than once" in bad(capsys, tmp_path / "b5.csv", "--out", out, "--no-judge")
    write_jsonl(tmp_path / "b2.jsonl", [{"id": "a", "image": "images/missing.png", "prompt": "p"}])
    assert "input image of item 'a' not found" in bad(capsys, tmp_path / "b2.jsonl", "--out", out, "--no-judge")
    write_jsonl(tmp_path / "b3.jsonl", [{"id": "a", "image": "images/a.png", "prompt": "p", "colour": "red"}])
    assert "unknown column 'colour'" in bad(capsys, tmp_path / "b3.jsonl", "--out", out, "--no-judge")
    write_jsonl(tmp_path / "b4.jsonl", [{"id": "../a", "image": "images/a.png", "prompt": "p"}])
    assert "bad id '../a'" in bad(capsys, tmp_path / "b4.jsonl", "--out", out, "--no-judge")
    (tmp_path / "basic_edit.json").write_text(json.dumps({"1": {"id": "images/a.png", "prompt": "p",
                                                                "edit_type": "extract"}}))  # fmt: skip
    assert "needs its prompts: give --judge-prompts" in bad(capsys, tmp_path / "basic_edit.json", "--out", out)
    (tmp_path / "prompts.json").write_text(json.dumps(IMGEDIT_PROMPTS))
    assert "no prompt for edit type 'extract'" in bad(capsys, tmp_path / "basic_edit.json", "--out", out,
                                                      "--judge-prompts", tmp_path / "prompts.json")  # fmt: skip
    assert "--sweep cannot vary 'colour'" in bad(capsys, bench, "--out", out, "--sweep", "colour=1,2")
    assert not out.exists()


def test_a_run_folder_keeps_its_generation_settings(capsys, tmp_path):
    bench = generic_bench(tmp_path, {"a": "x"})
    out = tmp_path / "run"
    assert run_cli(capsys, bench, "--out", out, "--outputs", tmp_path / "outputs", "--no-judge", "--quiet")[0] == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    line = bad(capsys, bench, "--out", out, "--outputs", other, "--no-judge", "--quiet")
    assert "holds a run made with other settings (outputs changed): use another --out" in line


def test_gedit_parquet_files_are_read_with_their_embedded_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (9, 8, 7)).save(buffer, format="PNG")
    table = pa.table({"task_type": ["tone_transfer"], "key": ["abc"], "instruction": ["make it warm"],
                      "instruction_language": ["en"], "Intersection_exist": [False],
                      "input_image": [{"bytes": buffer.getvalue(), "path": None}]})  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000.parquet")
    bench = read_benchmark(tmp_path / "data", extract_dir=tmp_path / "inputs")
    (item,) = bench.items
    assert bench.format == "gedit" and item.id == "en_abc" and item.category == "tone_transfer"
    assert item.extra == {"key": "abc", "intersection_exist": False}
    with Image.open(item.image) as picture:
        assert picture.size == (16, 8) and picture.getpixel((0, 0)) == (9, 8, 7)
    with pytest.raises(BenchmarkError, match="not a GEdit-Bench file"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "data" / "train-00001.parquet")
        read_benchmark(tmp_path / "data", extract_dir=tmp_path / "inputs")


# -------------------------------------------------------------------------------------------- metrics and stats
def test_metrics_against_hand_values_and_torchmetrics():
    a = np.zeros((8, 10, 3), dtype=np.uint8)
    b = a.copy()
    b[:2, :5] = 200  # 10 of 80 pixels changed
    first, second = Image.fromarray(a), Image.fromarray(b)
    assert changed_fraction(first, second) == pytest.approx(10 / 80)
    mse = 10 * 3 * (200 / 255) ** 2 / (80 * 3)
    assert psnr(second, first) == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert psnr(first, first) == math.inf
    rng = np.random.default_rng(0)
    x = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    y = Image.fromarray(np.clip(np.asarray(x, dtype=int) + rng.integers(-30, 30, (40, 48, 3)), 0, 255).astype("uint8"))
    ours = ssim_reference(to_tensor(y), to_tensor(x))
    assert 0.3 < ours < 0.99 and ssim(x, x) == pytest.approx(1.0)
    tm = pytest.importorskip("torchmetrics.functional.image")
    assert ours == pytest.approx(float(tm.structural_similarity_index_measure(to_tensor(y), to_tensor(x),
                                                                              data_range=1.0)), abs=1e-6)
    assert ssim(y, x) == pytest.approx(ours, abs=1e-6)


def test_sign_test_and_bootstrap():
    assert sign_test([1, 2, 3, 4, 5]) == (5, 0, 0, pytest.approx(2 / 32))
    assert sign_test([1, -1, 0]) == (1, 1, 1, 1.0)
    assert sign_test([0.5] * 9 + [-0.5]) == (9, 1, 0, pytest.approx(2 * 11 / 1024))
    values = [1.0, 2.0, 3.0, 4.0]
    low, high = bootstrap_ci([values], pooled_mean, 500)
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert bootstrap_ci([values], pooled_mean, 500) == (low, high)  # seeded
    assert bootstrap_ci([[3.0] * 5], pooled_mean, 100) == (3.0, 3.0)


def test_parse_sweep():
    assert parse_sweep("num_temporal_reasoning_steps=0,10,50") == ("num_temporal_reasoning_steps", [0, 10, 50])
    assert parse_sweep("guidance-scale=1,5.5") == ("guidance_scale", [1.0, 5.5])
    assert parse_sweep("enable_temporal_reasoning=false,true") == ("enable_temporal_reasoning", [False, True])
    with pytest.raises(UserError, match="is not int"):
        parse_sweep("seed=1,x")
    with pytest.raises(UserError, match="twice"):
        parse_sweep("seed=1,1")
