"""VLM backends: the OpenAI-compatible client against a real HTTP server on 127.0.0.1, and a tiny local Qwen2.5-VL."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
from PIL import Image
from vlm_fakes import FakeOpenAIServer, closed_port, tiny_qwen_vl_dir, user_images, user_text

from chronoedit.errors import UserError
from chronoedit.vlm import VLMConfig, VLMError, fit_image, load_vlm, strip_thinking

pytest.importorskip("openai")


@pytest.fixture
def server():
    fake = FakeOpenAIServer(lambda request: f"<think>hmm</think>echo: {user_text(request)}")
    yield fake
    fake.close()


def config(server_url: str, **kwargs) -> VLMConfig:
    kwargs.setdefault("max_retries", 0)
    return VLMConfig(model="qwen-test", base_url=server_url, api_key_env="CHRONOEDIT_TEST_KEY", **kwargs)


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ helpers
def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think>\n\nanswer") == "answer"
    assert strip_thinking("reasoning without an opening tag</think> answer") == "answer"
    assert strip_thinking("<THINK>x</THINK>one<think>y</think> two") == "one two"
    assert strip_thinking("plain") == "plain"
    assert strip_thinking("<think>The user wants to ... out of tokens") == ""  # unclosed: nothing usable


def test_fit_image_keeps_aspect_and_small_images():
    small = noise(20, 10, 0)
    assert fit_image(small, 1000) is small
    big = fit_image(noise(400, 100, 1), 10_000)
    assert big.width * big.height <= 10_000 and abs(big.width / big.height - 4) < 0.1


def test_config_checks_values():
    with pytest.raises(UserError, match="timeout") as err:
        VLMConfig(model="m", timeout=0)
    assert err.value.field == "vlm_timeout"
    with pytest.raises(UserError, match="model name is empty") as err:
        VLMConfig(model=" ", field_prefix="prompt_enhancer")
    assert err.value.field == "prompt_enhancer_model"


# ------------------------------------------------------------------------------------------------ OpenAI-compatible
def test_openai_request_carries_model_system_text_and_images(server, monkeypatch):
    monkeypatch.setenv("CHRONOEDIT_TEST_KEY", "sk-test-123")
    images = [noise(40, 24, 1), noise(16, 16, 2)]
    with load_vlm(config(server.url)) as vlm:
        answer = vlm.chat("be brief", "describe", images)
    assert answer == "echo: describe"  # the <think> block is gone
    (request,) = server.requests
    assert request["model"] == "qwen-test"
    assert request["messages"][0] == {"role": "system", "content": "be brief"}
    assert user_text(request) == "describe"
    assert request["_authorization"] == "Bearer sk-test-123"
    sent = user_images(request)
    assert [np.asarray(s).tolist() for s in sent] == [np.asarray(i).tolist() for i in images]  # lossless, in order
    assert request["temperature"] == 0


def test_openai_without_key_uses_a_placeholder_for_local_servers(server, monkeypatch):
    monkeypatch.delenv("CHRONOEDIT_TEST_KEY", raising=False)
    with load_vlm(config(server.url)) as vlm:
        vlm.chat("s", "t")
    assert server.requests[0]["_authorization"] == "Bearer EMPTY"


@pytest.mark.parametrize("status", [500, 429])
def test_openai_retries_with_backoff_then_succeeds(server, status):
    server.failures = [(status, "overloaded"), (status, "overloaded")]
    with load_vlm(config(server.url, max_retries=2)) as vlm:
        assert vlm.chat("s", "hello") == "echo: hello"
    assert len(server.requests) == 3


def test_openai_gives_up_after_max_retries(server):
    server.failures = [(503, "model is loading")] * 3
    with load_vlm(config(server.url, max_retries=1)) as vlm, pytest.raises(VLMError) as err:
        vlm.chat("s", "hello")
    assert len(server.requests) == 2
    message = str(err.value)
    assert "HTTP 503" in message and "model is loading" in message and server.url in message and "qwen-test" in message
    assert "\n" not in message


def test_openai_timeout_is_one_clear_line(server):
    server.delay = 1.5
    start = time.monotonic()
    with load_vlm(config(server.url, timeout=0.3)) as vlm, pytest.raises(VLMError, match=r"no answer within 0\.3 s"):
        vlm.chat("s", "hello")
    assert time.monotonic() - start < 1.4


def test_openai_auth_error_names_the_key_variable(server, monkeypatch):
    server.api_key = "right"
    monkeypatch.delenv("CHRONOEDIT_TEST_KEY", raising=False)
    with load_vlm(config(server.url)) as vlm, pytest.raises(VLMError) as err:
        vlm.chat("s", "hello")
    assert "authentication failed (HTTP 401" in str(err.value) and "$CHRONOEDIT_TEST_KEY is not set" in str(err.value)
    monkeypatch.setenv("CHRONOEDIT_TEST_KEY", "wrong")
    with load_vlm(config(server.url)) as vlm, pytest.raises(VLMError, match="set but rejected"):
        vlm.chat("s", "hello")
    monkeypatch.setenv("CHRONOEDIT_TEST_KEY", "right")
    with load_vlm(config(server.url)) as vlm:
        assert vlm.chat("s", "ok") == "echo: ok"


def test_openai_unreachable_server():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with load_vlm(config(url)) as vlm, pytest.raises(VLMError) as err:
        vlm.chat("s", "hello")
    assert str(err.value).startswith(f"cannot reach {url}")
    assert isinstance(err.value, UserError)  # the user's endpoint, not a bug: one line on the command line


def test_openai_timeout_hint_names_the_front_ends_flag(server):
    server.delay = 1.5
    with load_vlm(config(server.url, timeout=0.3, field_prefix="prompt_enhancer")) as vlm, \
            pytest.raises(UserError, match=r"raise --prompt-enhancer-timeout or check the server"):  # fmt: skip
        vlm.chat("s", "hello")


def test_openai_wrong_path_suggests_v1(server):
    with load_vlm(config(server.url.removesuffix("/v1"))) as vlm, pytest.raises(VLMError, match="ends in /v1"):
        vlm.chat("s", "hello")


def test_openai_empty_answer_is_an_error():
    fake = FakeOpenAIServer(lambda request: "<think>only thoughts</think>")
    try:
        with load_vlm(config(fake.url)) as vlm, pytest.raises(VLMError, match="empty answer"):
            vlm.chat("s", "hello")
    finally:
        fake.close()


@pytest.mark.parametrize("content, answer", [
    ([{"type": "text", "text": "a red "}, {"type": "text", "text": "hat"}], "a red hat"),  # parts, as some servers do
    ([{"type": "image_url", "image_url": {"url": "x"}}], "empty answer"),
    ({"text": "hi"}, "content that is not text"),
    (42, "content that is not text"),
])  # fmt: skip
def test_openai_content_that_is_a_list_of_parts_or_no_text(content, answer):
    """Text parts are joined; content that holds no text is one VLMError line, not a traceback."""
    fake = FakeOpenAIServer(lambda request: content)
    try:
        with load_vlm(config(fake.url)) as vlm:
            if isinstance(content, list) and answer == "a red hat":
                assert vlm.chat("s", "hello") == answer
            else:
                with pytest.raises(VLMError, match=answer):
                    vlm.chat("s", "hello")
    finally:
        fake.close()


def test_openai_adapts_to_reasoning_models_that_refuse_max_tokens_and_temperature():
    fake = FakeOpenAIServer(lambda request: "fine")
    fake.failures = [
        (400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'."),
        (400, "Unsupported value: 'temperature' does not support 0 with this model."),
    ]
    try:
        with load_vlm(config(fake.url)) as vlm:
            assert vlm.chat("s", "one") == "fine"
            assert vlm.chat("s", "two") == "fine"  # remembered: no more refusals
    finally:
        fake.close()
    sent = [{k for k in ("max_tokens", "max_completion_tokens", "temperature") if k in r} for r in fake.requests]
    assert sent == [{"max_tokens", "temperature"}, {"max_completion_tokens", "temperature"},
                    {"max_completion_tokens"}, {"max_completion_tokens"}]  # fmt: skip


def test_openai_other_bad_requests_are_reported(server):
    server.failures = [(400, "image too large")]
    with load_vlm(config(server.url)) as vlm, pytest.raises(VLMError, match=r"HTTP 400: image too large$"):
        vlm.chat("s", "t")
    assert len(server.requests) == 1


def test_openai_vllm_image_limit_gets_a_hint(server):
    server.failures = [(400, "At most 1 image(s) may be provided in one request.")]
    with load_vlm(config(server.url)) as vlm, pytest.raises(VLMError, match="--limit-mm-per-prompt"):
        vlm.chat("s", "t", [noise(8, 8, 0), noise(8, 8, 1)])


def test_openai_closed_client_refuses(server):
    vlm = load_vlm(config(server.url))
    vlm.close()
    vlm.close()  # twice is fine
    with pytest.raises(VLMError, match="closed"):
        vlm.chat("s", "t")


# ------------------------------------------------------------------------------------------------ local transformers
@pytest.fixture(scope="module")
def tiny_vlm_dir():
    return tiny_qwen_vl_dir()


@pytest.mark.parametrize(("family", "model_class"), [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                                     ("qwen3_vl", "Qwen3VLForConditionalGeneration")])  # fmt: skip
def test_local_vlm_runs_images_through_the_vision_tower_and_releases(family, model_class):
    vlm = load_vlm(VLMConfig(model=str(tiny_qwen_vl_dir(family)), device="cpu", max_new_tokens=5))
    assert type(vlm).__name__ == "LocalVLM" and vlm.dtype == "fp32" and type(vlm.model).__name__ == model_class
    vision = vlm.model.model.visual
    seen: list[int] = []
    vision.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    answer = vlm.chat("You describe images.", "What changed?", [noise(40, 24, 3), noise(24, 24, 4)])
    assert isinstance(answer, str) and answer.strip() == answer
    assert seen == [(40 // 4) * (24 // 4) + (24 // 4) * (24 // 4)]  # both images' 4x4 patches, in one forward
    assert isinstance(vlm.chat("sys", "text only"), str)
    assert len(seen) == 1  # no image, no vision forward
    model_ref = weakref.ref(vlm.model)
    vlm.close()
    gc.collect()
    assert vlm.model is None and model_ref() is None
    with pytest.raises(VLMError, match="released"):
        vlm.chat("s", "t")


def test_local_vlm_is_a_context_manager(tiny_vlm_dir):
    with load_vlm(VLMConfig(model=str(tiny_vlm_dir), device="cpu", max_new_tokens=2)) as vlm:
        assert vlm.model is not None
    assert vlm.model is None


def test_local_vlm_missing_folder(tmp_path):
    with pytest.raises(VLMError, match=r"VLM model folder not found: .*nowhere"):
        load_vlm(VLMConfig(model=str(tmp_path / "nowhere"), device="cpu"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("device", "message"), [("cuda", "CUDA is not available"), ("auto", "CUDA is not available"),
                                                 ("banana", "unknown vlm_device 'banana'")])  # fmt: skip
def test_local_vlm_device_checked_before_loading(tiny_vlm_dir, device, message):
    with pytest.raises(UserError, match=message) as err:
        load_vlm(VLMConfig(model=str(tiny_vlm_dir), device=device))
    assert err.value.field == "vlm_device"
    assert "--vlm-device" in err.value.render(lambda name: "--" + name.replace("_", "-"))


def test_local_vlm_dtype_checked_before_loading(tiny_vlm_dir):
    with pytest.raises(UserError, match="unknown prompt_enhancer_dtype 'fp8': use one of bf16, fp16, fp32") as err:
        load_vlm(VLMConfig(model=str(tiny_vlm_dir), device="cpu", dtype="fp8", field_prefix="prompt_enhancer"))
    assert err.value.field == "prompt_enhancer_dtype"


def test_local_vlm_folder_without_a_model(tmp_path):
    with pytest.raises(VLMError, match="cannot load"):
        load_vlm(VLMConfig(model=str(tmp_path), device="cpu"))


def test_importing_stays_light():
    code = (
        "import sys, chronoedit.vlm, chronoedit.vlm.cli, chronoedit.enhance, chronoedit.label; "
        "print(sorted(m for m in ('openai', 'transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
