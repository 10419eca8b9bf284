"""``chronoedit eval`` end to end: a sweep on the demo model through the batch engine, judged by a scripted fake
endpoint, then ``eval compare``; a tiny local Qwen-VL as the judge; the report in a real headless Chromium (screenshot
in ``test-artifacts/eval-report.png``). The demo model has random weights: these runs test the plumbing, not quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval import pbench, run_cli, scores, write_jsonl
from test_web_ui import ARTIFACTS, CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, REQUIRE_BROWSER
from vlm_fakes import FakeOpenAIServer, tiny_qwen_vl_dir, user_images

pytest.importorskip("openai")


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    monkeypatch.delenv("CHRONOEDIT_MODEL_PATH", raising=False)


def bench(root: Path) -> Path:
    rows = []
    for number, (item_id, category) in enumerate((("cup", "human"), ("arm", "robot"), ("car", "driving"))):
        Image.new("RGB", (40, 32), (60 * number, 120, 200 - 50 * number)).save(root / f"{item_id}.png")
        rows.append({"id": item_id, "image": f"{item_id}.png", "prompt": f"move the {item_id}", "category": category})
    return write_jsonl(root / "bench.jsonl", rows)


def brightness_judge(request) -> str:
    """Scores from the edited image's content (so different edits score differently), always in range."""
    edited = np.asarray(user_images(request)[1], dtype=np.float64)
    level = 1 + int(edited.mean() / 256 * 5)
    spread = 1 + int(edited.std() / 64 * 4) % 5
    return pbench(level, spread, 3, f"mean {edited.mean():.1f}")


def test_sweep_on_the_demo_model_then_compare(capsys, tmp_path):
    data = bench(tmp_path)
    out = tmp_path / "sweep"
    fake = FakeOpenAIServer(brightness_judge)
    try:
        code, stdout, stderr = run_cli(capsys, data, "--out", out, "--model-path", "demo", "--height", 32, "--width",
                                       32, "--seed", 7, "--sweep", "num_inference_steps=1,2", "--vlm-base-url",
                                       fake.url, "--vlm-model", "judge-x", "--quiet", "--bootstrap", 200)  # fmt: skip
        asked = len(fake.requests)
        rerun = run_cli(capsys, data, "--out", out, "--model-path", "demo", "--height", 32, "--width", 32, "--seed",
                        7, "--sweep", "num_inference_steps=1,2", "--vlm-base-url", fake.url, "--vlm-model",
                        "judge-x", "--quiet", "--bootstrap", 200)  # fmt: skip
    finally:
        fake.close()
    assert code == 0, stderr
    assert asked == 6 and len(fake.requests) == 6 and rerun[0] == 0  # the rerun generated and asked nothing
    print(stdout)  # the sweep table (plumbing only: the demo model's edits are noise)
    table = json.loads((out / "sweep.json").read_text())
    assert [row["num_inference_steps"] for row in table["rows"]] == ["1", "2"]
    assert "vs_first" in table["rows"][1] and table["rows"][1]["vs_first"]["n"] == 3
    assert "num_inference_steps" in stdout and (out / "sweep.csv").read_text().startswith("num_inference_steps,")
    for steps in (1, 2):
        run = out / f"num_inference_steps={steps}"
        sidecar = json.loads((run / "outputs" / "cup.json").read_text())
        assert sidecar["num_inference_steps"] == steps and sidecar["seed"] == 7 and sidecar["prompt"] == "move the cup"
        rows = scores(run)
        assert all(r["status"] == "ok" for r in rows)
        assert all(-1.0 <= float(r["clip_similarity"]) <= 1.0 for r in rows)  # the checkpoint's own CLIP encoder
        summary = json.loads((run / "summary.json").read_text())
        assert set(summary["categories"]) == {"human", "robot", "driving"}
        assert summary["settings"]["settings"]["num_inference_steps"] == steps
    code, stdout, stderr = run_cli(capsys, "compare", out / "num_inference_steps=1", out / "num_inference_steps=2",
                                   "--out", tmp_path / "compare.json", "--bootstrap", 200)  # fmt: skip
    assert code == 0, stderr
    result = json.loads((tmp_path / "compare.json").read_text())
    a = {r["id"]: float(r["score"]) for r in scores(out / "num_inference_steps=1")}
    b = {r["id"]: float(r["score"]) for r in scores(out / "num_inference_steps=2")}
    diffs = [b[k] - a[k] for k in sorted(a)]
    assert result["n"] == 3 and result["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert result["wins"] + result["losses"] + result["ties"] == 3 and 0 < result["sign_p"] <= 1
    assert "overall" in stdout and "W/L/T" in stdout


def test_tiny_local_qwen_vl_judge_end_to_end(capsys, tmp_path):
    """A random tiny Qwen2.5-VL answers nonsense: every item is recorded as a judge failure, nothing crashes, and a
    rerun asks nothing again."""
    data = bench(tmp_path)
    (tmp_path / "made").mkdir()
    for item_id in ("cup", "arm", "car"):
        Image.new("RGB", (32, 32), (5, 5, 5)).save(tmp_path / "made" / f"{item_id}.png")
    argv = [data, "--out", tmp_path / "run", "--outputs", tmp_path / "made", "--vlm-model", tiny_qwen_vl_dir(),
            "--vlm-device", "cpu", "--vlm-max-tokens", 8, "--judge-attempts", 2, "--quiet", "--no-clip"]  # fmt: skip
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 1, stderr
    rows = scores(tmp_path / "run")
    assert [r["status"] for r in rows] == ["judge_failed"] * 3
    assert all("after 2 attempts" in r["error"] for r in rows)
    cache = (tmp_path / "run" / "judge_cache.jsonl").read_text().splitlines()
    assert len(cache) == 3 and all(json.loads(line)["attempts"] == 2 for line in cache)
    assert "3 judge failed" in stdout
    assert run_cli(capsys, *argv)[0] == 1
    assert (tmp_path / "run" / "judge_cache.jsonl").read_text().splitlines() == cache


def test_report_in_chromium(capsys, tmp_path):
    """The report loads offline in Chromium: summary table, chart images decoded, gallery filter by category and
    score; screenshot saved."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail("the report test needs chromium and chromium-driver")
        pytest.skip("chromium and chromium-driver are not installed")
    pytest.importorskip("matplotlib")
    selenium = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    data = bench(tmp_path)
    (tmp_path / "made").mkdir()
    for number, item_id in enumerate(("cup", "arm", "car")):
        Image.new("RGB", (32, 32), (80 * number, 40, 40)).save(tmp_path / "made" / f"{item_id}.png")
    fake = FakeOpenAIServer(brightness_judge)
    try:
        code, _, stderr = run_cli(capsys, data, "--out", tmp_path / "run", "--outputs", tmp_path / "made",
                                  "--vlm-base-url", fake.url, "--vlm-model", "judge-x", "--quiet", "--no-clip")
    finally:
        fake.close()
    assert code == 0, stderr
    options = selenium.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    browser = selenium.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.get((tmp_path / "run" / "report.html").as_uri())
        assert browser.find_element("id", "summary").text.count("\n") >= 4  # header, overall and 3 categories
        images = browser.execute_script("return [...document.images].map(i => [i.alt, i.naturalWidth])")
        assert [w for alt, w in images if alt == "chart"] and all(w > 0 for _, w in images), images
        shown = lambda: int(browser.find_element("id", "shown").text)  # noqa: E731
        assert shown() == 3
        browser.execute_script("const s = document.getElementById('category'); s.value = 'robot';"
                               "s.dispatchEvent(new Event('change'));")  # fmt: skip
        assert shown() == 1
        browser.execute_script("const s = document.getElementById('category'); s.value = '';"
                               "s.dispatchEvent(new Event('change')); const r = document.getElementById('min-score');"
                               "r.value = '5'; r.dispatchEvent(new Event('input'));")  # fmt: skip
        expected = sum(1 for r in scores(tmp_path / "run") if float(r["score"]) >= 5)
        assert shown() == expected
        ARTIFACTS.mkdir(exist_ok=True)
        browser.execute_script("const r = document.getElementById('min-score'); r.value = r.min;"
                               "r.dispatchEvent(new Event('input'));")  # fmt: skip
        browser.save_screenshot(str(ARTIFACTS / "eval-report.png"))
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
