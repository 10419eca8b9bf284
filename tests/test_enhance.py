"""The prompt enhancer: answer cleanup, ``chronoedit enhance`` and ``chronoedit edit --use-prompt-enhancer``, against a
real OpenAI-compatible HTTP server on 127.0.0.1 and a tiny random local Qwen2.5-VL."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from vlm_fakes import FakeOpenAIServer, closed_port, system_text, tiny_qwen_vl_dir, user_images, user_text

from chronoedit import cli, editing
from chronoedit.editing import service
from chronoedit.enhance import PREFIX, SYSTEM_PROMPT, PromptError, clean_dense_prompt, user_message
from chronoedit.errors import UserError

pytest.importorskip("openai")
SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cpu"]


def instruction_of(request) -> str:
    match = re.search(r"Edit request: (.*)\n", user_text(request))
    assert match, user_text(request)
    return match.group(1)


def chatty_answer(request) -> str:
    """What a chatty VLM says: thinking, a label, markdown, quotes and a trailing note around the paragraph."""
    return (
        "<think>The image shows a cup.</think>**Enhanced prompt:**\n\n"
        f'"the user wants to {instruction_of(request)}, while the cup, table and lighting stay the same."\n\n'
        "(Word count: 17)"
    )


def expected_prompt(instruction: str) -> str:
    return f"{PREFIX} {instruction}, while the cup, table and lighting stay the same."


@pytest.fixture
def server():
    fake = FakeOpenAIServer(chatty_answer)
    yield fake
    fake.close()


@pytest.fixture
def image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "cup.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path_factory.getbasetemp() / "chronoedit_home"))
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ cleanup
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The user wants to add a hat.", "The user wants to add a hat."),
        ("<think>\nhmm\n</think>\nThe user wants to add a hat.", "The user wants to add a hat."),
        ('Enhanced prompt: "The user wants to add   a\nhat."', "The user wants to add a hat."),
        ("## Prompt\n\n**The user wants to** add a hat.\n\nNote: 5 words.", "The user wants to add a hat."),
        ("“the user wants to add a hat.”", "The user wants to add a hat."),
        ("```\nThe user wants to add a hat.\n```", "The user wants to add a hat."),
        # a preamble that mentions "the user wants to" loses to the paragraph (or line) that starts with it
        (
            "Okay, so the user wants to put a hat on the cat. Here is the rewritten prompt:\n\n"
            "The user wants to place a red hat on the cat.",
            "The user wants to place a red hat on the cat.",
        ),
        (
            "Okay, so the user wants to put a hat on the cat. Rewritten:\n**The user wants to** place a red hat.",
            "The user wants to place a red hat.",
        ),
        (
            'So the user wants to add a hat.\n\nEnhanced prompt: "The user wants to add a red hat."',
            "The user wants to add a red hat.",
        ),
        # a capitalised prefix after a lead-in with punctuation or digits beats a later lower-case mention
        (
            "Sure! Here is the enhanced prompt: The user wants to turn the red car blue, keeping its shape.\n\n"
            "Note: the user wants to keep the background, so I left it out.",
            "The user wants to turn the red car blue, keeping its shape.",
        ),
        (
            "Step 2 result: The user wants to turn the red car blue.\n\n"
            "Note: the user wants to keep the road unchanged.",
            "The user wants to turn the red car blue.",
        ),
        # ... and an earlier lower-case mention in the same paragraph
        (
            "Okay, so the user wants to put a hat on the cat. Here is the rewritten prompt: The user wants to place a "
            "red hat on the cat.",
            "The user wants to place a red hat on the cat.",
        ),
        # a note is no label: a capitalised "Note: The user wants to" does not start the prompt
        (
            "Sure! Here is the enhanced prompt: The user wants to turn the red car blue.\n\n"
            "Note: The user wants to keep the road, so I kept it.",
            "The user wants to turn the red car blue.",
        ),
        ("Rewritten prompt:\n> The user wants to add a hat.", "The user wants to add a hat."),
        # a heading or a list after the prompt is not part of it
        ("The user wants to add a hat.\n\n## Notes\nI kept the background.", "The user wants to add a hat."),
        ("The user wants to add a hat.\n\n- Word count: 7\n- Kept the pose", "The user wants to add a hat."),
        # a restated request that introduces the prompt, an analysis, a request label: not the prompt
        ("The user wants to add a hat. Here is the enhanced prompt:\n\nThe user wants to place a red hat.",
         "The user wants to place a red hat."),
        ("**Analysis:** The user wants a hat.\n\n**Rewritten prompt:** The user wants to place a red hat.",
         "The user wants to place a red hat."),
        ("Understanding the request: The user wants to add a hat.\n\nThe user wants to place a red hat.",
         "The user wants to place a red hat."),
        # a prompt that goes on as a list (the model ignored "no lists"): the list's items join it
        ("The user wants to add a hat. These stay as they are:\n\n- the cat's face\n- the sofa",
         "The user wants to add a hat. These stay as they are: the cat's face; the sofa"),
        ("Sure.\n\nThe user wants to turn the car blue while keeping:\n\n1. the driver\n2. the road",
         "The user wants to turn the car blue while keeping: the driver; the road"),
    ],
)
def test_clean_dense_prompt(answer, expected):
    assert clean_dense_prompt(answer) == expected


@pytest.mark.parametrize("answer", ["A hat is added to the cup.", "", "<think>The user wants to</think>", PREFIX])
def test_clean_dense_prompt_fails_clearly(answer):
    with pytest.raises(PromptError, match="does not contain a prompt starting with 'The user wants to'") as err:
        clean_dense_prompt(answer)
    assert isinstance(err.value, UserError)  # the user's VLM answered badly: one line, not a bug


def test_an_empty_instruction_is_a_user_error():
    with pytest.raises(UserError, match="the edit instruction to enhance is empty") as err:
        user_message(" \n ")
    assert err.value.field == "prompt"


def test_system_prompt_asks_for_the_trained_form():
    for phrase in ("80 to 100 words", '"The user wants to"', "must stay", "camera"):
        assert phrase in SYSTEM_PROMPT


# ------------------------------------------------------------------------------------------------ chronoedit enhance
def test_enhance_cli_prints_the_cleaned_prompt(capsys, server, image, tmp_path):
    code, out, err = run(capsys, "enhance", "-i", image, "-p", "put a red hat on the cup", "--vlm-base-url",
                         server.url, "--vlm-model", "qwen3-vl", "-o", tmp_path / "p.txt")  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == [expected_prompt("put a red hat on the cup")]
    assert (tmp_path / "p.txt").read_text() == expected_prompt("put a red hat on the cup") + "\n"
    (request,) = server.requests
    assert request["model"] == "qwen3-vl" and system_text(request) == SYSTEM_PROMPT
    (sent,) = user_images(request)
    with Image.open(image) as original:
        assert np.array_equal(np.asarray(sent), np.asarray(original.convert("RGB")))


def test_enhance_cli_unreachable_server_is_one_line(capsys, image):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, out, err = run(capsys, "enhance", "-i", image, "-p", "x", "--vlm-base-url", url, "--vlm-model", "m",
                         "--vlm-max-retries", "0")  # fmt: skip
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "chronoedit: enhancing the prompt with m at " + url
    err = err.split("\n", 1)[1]
    assert err.startswith(f"chronoedit: error: cannot reach {url}") and err.count("\n") == 1


def test_enhance_cli_bad_inputs_fail_before_any_request(capsys, server, tmp_path, image):
    code, _, err = run(capsys, "enhance", "-i", tmp_path / "missing.png", "-p", "x", "--vlm-base-url", server.url,
                       "--vlm-model", "m")  # fmt: skip
    assert code == 2 and "input image not found" in err and "missing.png" in err
    code, _, err = run(capsys, "enhance", "-i", image, "-p", "x", "--vlm-base-url", server.url)
    assert code == 2 and "--vlm-base-url needs --vlm-model" in err
    code, _, err = run(capsys, "enhance", "-i", image, "-p", "  ", "--vlm-base-url", server.url, "--vlm-model", "m")
    assert code == 2 and "empty" in err
    assert server.requests == []


def test_enhance_cli_with_a_local_vlm_runs_it_and_rejects_a_formless_answer(capsys, image, monkeypatch):
    """The tiny random VLM's answer is gibberish: the local path runs end to end and the answer is refused clearly."""
    from chronoedit.vlm.local import LocalVLM

    calls = []
    real_chat = LocalVLM.chat
    monkeypatch.setattr(LocalVLM, "chat", lambda self, *a: calls.append(a) or real_chat(self, *a))
    code, out, err = run(capsys, "enhance", "-i", image, "-p", "add a hat", "--vlm-model", tiny_qwen_vl_dir(),
                         "--vlm-device", "cpu", "--vlm-max-tokens", "6", "--quiet")  # fmt: skip
    assert code == 2 and out == ""
    assert "does not contain a prompt starting with 'The user wants to'" in err
    ((system, text, images),) = calls
    assert system == SYSTEM_PROMPT and "add a hat" in text and len(images) == 1


# ---------------------------------------------------------------------------------------- edit --use-prompt-enhancer
def spy_order(monkeypatch):
    """Record when the VLM is released and when the editing pipeline loads, and the prompt the edit runs with."""
    from chronoedit.vlm.openai_api import OpenAIVLM

    events: list[str] = []
    real_close, real_load, real_generate = OpenAIVLM.close, service.load_pipeline, service.generate
    monkeypatch.setattr(OpenAIVLM, "close", lambda self: events.append("vlm released") or real_close(self))
    monkeypatch.setattr(service, "load_pipeline", lambda spec, report: events.append("pipeline load")
                        or real_load(spec, report))
    monkeypatch.setattr(service, "generate", lambda pipe, edit, *args, **kwargs: events.append(f"edit: {edit.prompt}")
                        or real_generate(pipe, edit, *args, **kwargs))  # fmt: skip
    return events


def test_edit_with_prompt_enhancer(capsys, server, image, tmp_path, monkeypatch):
    events = spy_order(monkeypatch)
    code, out, err = run(capsys, "edit", "-i", image, "-p", "make the cup blue", "--model-path", "demo", "-o",
                         "out/cup.png", "--use-prompt-enhancer", "--prompt-enhancer-model", "qwen3-vl",
                         "--prompt-enhancer-base-url", server.url, *SMALL)  # fmt: skip
    assert code == 0, err
    enhanced = expected_prompt("make the cup blue")
    assert out.splitlines() == [f"enhanced prompt: {enhanced}", "wrote enhanced prompt: out/cup.prompt.txt",
                                "wrote edited image: out/cup.png (32x32)"]  # fmt: skip
    assert (tmp_path / "out" / "cup.prompt.txt").read_text() == enhanced + "\n"
    assert events == ["vlm released", "pipeline load", f"edit: {enhanced}"]
    assert len(server.requests) == 1 and instruction_of(server.requests[0]) == "make the cup blue"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cup.png", "cup.prompt.txt"]


def test_edit_enhancer_failure_writes_nothing_and_loads_no_pipeline(capsys, image, tmp_path, monkeypatch):
    events = spy_order(monkeypatch)
    fake = FakeOpenAIServer(lambda request: "I would rather not.")
    try:
        code, _, err = run(capsys, "edit", "-i", image, "-p", "make it blue", "--model-path", "demo", "-o",
                             "out/x.png", "--use-prompt-enhancer", "--prompt-enhancer-model", "m",
                             "--prompt-enhancer-base-url", fake.url, *SMALL)  # fmt: skip
    finally:
        fake.close()
    assert code == 2 and "does not contain a prompt starting with" in err and "I would rather not" in err
    assert events == ["vlm released"]
    assert list((tmp_path / "out").iterdir()) == []


def test_enhancer_flags_need_use_prompt_enhancer(capsys, image, server):
    code, _, err = run(capsys, "edit", "-i", image, "-p", "x", "--prompt-enhancer-model", "m", *SMALL)
    assert code == 2 and "--prompt-enhancer-model needs --use-prompt-enhancer" in err
    assert server.requests == []
