"""Shared, session-scoped fixtures: tiny random ChronoEdit checkpoints in the real diffusers folder layout."""

from __future__ import annotations

import os

# Never reach the Hugging Face hub from the test suite (set before transformers/diffusers are imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path

import pytest

from chronoedit.demo import TinySpec, build_tiny_checkpoint

TINY_SPEC = TinySpec(num_attention_heads=2, attention_head_dim=16)  # D = 32; hits the reference's RoPE split bug
TINY_SPEC_HD128 = TinySpec(num_attention_heads=2, attention_head_dim=128, shards=3)  # real RoPE split 44/42/42


@pytest.fixture(scope="session", autouse=True)
def _own_home(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """chronoedit's own files (demo model, remembered weight digests) go to a session folder, not the user's home
    (tests that need another folder set CHRONOEDIT_HOME themselves)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHRONOEDIT_HOME", str(tmp_path_factory.mktemp("chronoedit_home")))
        yield


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    """The spec of :func:`tiny_ckpt` (head_dim 16, 2 heads, one safetensors file)."""
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_spec_hd128() -> TinySpec:
    """The spec of :func:`tiny_ckpt_hd128` (head_dim 128, 2 heads, 3 transformer shards)."""
    return TINY_SPEC_HD128


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint folder (head_dim 16), built once per session. Treat it as read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "ChronoEdit-tiny", TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_ckpt_hd128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint folder with head_dim 128 and a 3-shard transformer, built once per session. Read-only."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_hd128") / "ChronoEdit-tiny-hd128", TINY_SPEC_HD128)
