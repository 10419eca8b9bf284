"""Block streaming and stored-dtype weights: bf16 weights kept as stored (memory-mapped), cast to the compute dtype one
group of blocks at a time, give exactly what the model upcast at load gives; no more than k groups are ever cast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chronoedit import loading
from chronoedit.demo import TinySpec, tiny_transformer_state_dict, transformer_config
from chronoedit.errors import UserError
from chronoedit.mapped import mapped_tensors
from chronoedit.model import ChronoEditTransformer3DModel, TransformerConfig
from chronoedit.model.transformer import keeps_fp32
from chronoedit.saving import save_transformer
from chronoedit.streaming import is_streamed, loaded_groups, stream_blocks, unstream

SPEC = TinySpec(num_layers=5, num_attention_heads=2, attention_head_dim=128)


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny 5-block transformer (real RoPE split) saved in bf16 (fp32 islands as the cast keeps them), sharded."""
    model = ChronoEditTransformer3DModel(TransformerConfig.from_dict(transformer_config(SPEC)))
    model.load_state_dict(tiny_transformer_state_dict(SPEC))
    model.cast_to(torch.bfloat16)
    return save_transformer(model, tmp_path_factory.mktemp("bf16") / "transformer", max_shard_bytes=200_000)


def _inputs(model, frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, frames, 4, 6, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, cfg.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 257, cfg.image_dim, generator=g),
        return_dict=False,
    )


def _streamed(folder, group_size=1):
    model = loading.load_transformer(folder, torch_dtype=torch.float32, keep_stored_dtype=True, mmap=True)
    stream_blocks(model, model.blocks, "cpu", torch.float32, group_size=group_size, keep_fp32=keeps_fp32)
    return model


def test_stored_bf16_blocks_stay_bf16_and_mapped(bf16_folder):
    model = _streamed(bf16_folder)
    weight = model.blocks[0].attn1.to_q.weight
    assert weight.dtype == torch.bfloat16 and model.blocks[0].norm2.weight.dtype == torch.float32  # an fp32 island
    assert model.proj_out.weight.dtype == torch.float32 and model.dtype == torch.float32  # the rest: cast once
    before = weight.data_ptr()
    with torch.no_grad():
        model(**_inputs(model))
    assert model.blocks[0].attn1.to_q.weight.data_ptr() == before  # points back at the stored (mapped) tensor
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("group_size", [1, 2, 3])
@pytest.mark.parametrize("frames", [2, 3])
def test_streamed_model_equals_the_model_upcast_at_load(bf16_folder, group_size, frames):
    """bf16 storage with fp32 compute, streamed in groups of k, is exactly the model whose bf16 weights were upcast
    to fp32 when loaded."""
    resident = loading.load_transformer(bf16_folder, torch_dtype=torch.float32)
    assert resident.blocks[0].attn1.to_q.weight.dtype == torch.float32
    streamed = _streamed(bf16_folder, group_size)
    with torch.no_grad():
        expected = resident(**_inputs(resident, frames))[0]
        got = streamed(**_inputs(streamed, frames))[0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("group_size", [1, 2])
def test_never_more_than_k_groups_are_cast(bf16_folder, group_size):
    """While each block runs, the bytes of compute-dtype copies of block weights (everything but the fp32 islands)
    held by the model's blocks never exceed k blocks' worth, and every copy is released afterwards."""
    model = loading.load_transformer(bf16_folder, torch_dtype=torch.float32, keep_stored_dtype=True, mmap=True)
    streaming = stream_blocks(model, model.blocks, "cpu", torch.float32, group_size=group_size, keep_fp32=keeps_fp32)

    def cast_bytes() -> int:
        return sum(p.numel() * 4 for block in model.blocks for n, p in block.named_parameters()
                   if p.dtype == torch.float32 and not keeps_fp32(n))  # fmt: skip

    per_block = sum(p.numel() * 4 for n, p in model.blocks[0].named_parameters() if not keeps_fp32(n))
    seen: list[int] = []
    handles = [block.register_forward_pre_hook(lambda _m, _a: seen.append(cast_bytes())) for block in model.blocks]
    with torch.no_grad(), loaded_groups(streaming) as loaded:
        model(**_inputs(model))
    for handle in handles:
        handle.remove()
    assert loaded == list(range(-(-len(model.blocks) // group_size)))
    assert max(seen) == per_block * group_size and len(seen) == len(model.blocks)
    assert cast_bytes() == 0


def test_a_block_that_raises_leaves_nothing_cast(bf16_folder):
    model = _streamed(bf16_folder)

    def boom(_module, _args, _output):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(**_inputs(model))
    handle.remove()
    with torch.no_grad():
        model(**_inputs(model))  # the next call starts clean
    assert all(p.dtype == torch.bfloat16 for n, p in model.blocks.named_parameters() if not keeps_fp32(n))


def test_unstream_restores_a_plain_model(bf16_folder):
    model = _streamed(bf16_folder)
    assert is_streamed(model)
    unstream(model)
    assert not is_streamed(model) and not model.blocks[0]._forward_pre_hooks


def test_mapped_tensors_equal_safetensors_own_reader(bf16_folder):
    from safetensors.torch import load_file

    for file in sorted(bf16_folder.glob("*.safetensors")):
        mine = dict(mapped_tensors(file))
        theirs = load_file(file)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in theirs)


def test_a_truncated_file_is_one_line_when_mapped(bf16_folder, tmp_path):
    file = sorted(bf16_folder.glob("*.safetensors"))[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt safetensors file"):
        list(mapped_tensors(cut))


def test_streamed_text_encoder_equals_the_encoder_upcast_at_load(tiny_ckpt_hd128):
    """UMT5 stored in bf16, its blocks streamed and its token table looked up (never upcast whole), computes in fp32
    exactly what the encoder upcast to fp32 computes."""
    from transformers import UMT5EncoderModel

    stored = UMT5EncoderModel.from_pretrained(tiny_ckpt_hd128 / "text_encoder", dtype=torch.bfloat16).eval()
    upcast = UMT5EncoderModel.from_pretrained(tiny_ckpt_hd128 / "text_encoder", dtype=torch.bfloat16).eval().float()
    streaming = stream_blocks(stored, stored.encoder.block, "cpu", torch.float32, lookups=[stored.shared])
    ids = torch.randint(0, stored.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad(), loaded_groups(streaming) as loaded:
        got = stored(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = upcast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert loaded == list(range(len(stored.encoder.block)))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert stored.shared.weight.dtype == torch.bfloat16  # the table was looked up, not cast
    assert all(p.dtype == torch.bfloat16 for p in stored.encoder.block.parameters())


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_ckpt_hd128, tmp_path_factory):
    """The tiny checkpoint with its transformer and UMT5 stored in bf16, as the real one is."""
    import shutil

    from transformers import UMT5EncoderModel

    root = Path(shutil.copytree(tiny_ckpt_hd128, tmp_path_factory.mktemp("bf16ckpt") / "ckpt"))
    model = loading.load_transformer(root, subfolder="transformer").cast_to(torch.bfloat16)
    shutil.rmtree(root / "transformer")
    save_transformer(model, root / "transformer", max_shard_bytes=300_000)
    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=torch.bfloat16)
    shutil.rmtree(root / "text_encoder")
    encoder.save_pretrained(root / "text_encoder")
    return root


@pytest.mark.parametrize("reasoning", [False, True])
def test_a_streamed_pipeline_edits_exactly_like_the_upcast_one(bf16_checkpoint, reasoning):
    """The whole edit (CFG on; plain, and with temporal reasoning across the drop) with the transformer and UMT5 kept
    in bf16 and streamed block by block in fp32 equals the edit of the pipeline upcast to fp32 at load."""
    from PIL import Image
    from transformers import UMT5EncoderModel

    from chronoedit import ChronoEditPipeline
    from chronoedit.streaming import stream_components

    upcast = ChronoEditPipeline.from_pretrained(str(bf16_checkpoint), torch_dtype=torch.float32)
    stored = ChronoEditPipeline.from_pretrained(
        str(bf16_checkpoint), torch_dtype=torch.float32,
        transformer=loading.load_transformer(bf16_checkpoint, subfolder="transformer", torch_dtype=torch.float32,
                                             keep_stored_dtype=True, mmap=True),
        text_encoder=UMT5EncoderModel.from_pretrained(bf16_checkpoint / "text_encoder", dtype=torch.bfloat16).eval(),
    )  # fmt: skip
    streams = stream_components(stored.transformer, stored.text_encoder, "cpu", torch.float32, group_size=1)
    image = Image.new("RGB", (48, 32), (200, 120, 40))
    args = dict(image=image, prompt="make it blue", height=32, width=48, num_inference_steps=3, guidance_scale=5.0,
                output_type="np", enable_temporal_reasoning=reasoning, num_frames=9 if reasoning else 5,
                num_temporal_reasoning_steps=2 if reasoning else 0)  # fmt: skip
    with loaded_groups(streams[0]) as loaded:
        got = stored(generator=torch.Generator().manual_seed(3), **args).frames
    expected = upcast(generator=torch.Generator().manual_seed(3), **args).frames
    assert np.array_equal(got, expected)
    assert len(loaded) == 3 * len(stored.transformer.blocks)  # every block once a step (CFG branches in one batch)
    assert stored.transformer.blocks[0].ffn.net[2].weight.dtype == torch.bfloat16


def test_a_mapped_text_encoder_equals_the_one_transformers_loads(bf16_checkpoint):
    from transformers import UMT5EncoderModel

    mapped = loading.load_text_encoder_mapped(bf16_checkpoint)
    loaded = UMT5EncoderModel.from_pretrained(bf16_checkpoint / "text_encoder", dtype=torch.bfloat16).eval()
    assert mapped.encoder.embed_tokens.weight is mapped.shared.weight
    assert {k: v.dtype for k, v in mapped.state_dict().items()} == {k: v.dtype for k, v in loaded.state_dict().items()}
    ids = torch.randint(0, mapped.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


def test_the_offload_blocks_flag_edits_like_the_resident_model(bf16_checkpoint, tmp_path, capsys):
    """``chronoedit edit --offload blocks:2`` on a bf16 checkpoint (kept bf16, fp32 compute) writes the same image as
    the edit that upcasts the checkpoint at load; bad values are one line before anything loads."""
    from PIL import Image

    from chronoedit import cli

    Image.new("RGB", (48, 32), (30, 160, 90)).save(tmp_path / "in.png")
    common = ["edit", "-i", str(tmp_path / "in.png"), "-p", "add snow", "--model-path", str(bf16_checkpoint),
              "--height", "32", "--width", "48", "--num-inference-steps", "2", "--dtype", "fp32",
              "--quiet"]  # fmt: skip
    assert cli.main([*common, "-o", str(tmp_path / "resident.png")]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "streamed.png"), "--offload", "blocks:2"]) == 0
    resident, streamed = (np.asarray(Image.open(tmp_path / n)) for n in ("resident.png", "streamed.png"))
    assert np.array_equal(resident, streamed)
    capsys.readouterr()
    assert cli.main([*common, "-o", str(tmp_path / "x.png"), "--offload", "blocks:0"]) == 2
    assert capsys.readouterr().err == "chronoedit: error: --offload blocks:K needs K from 1 to 64, got 0\n"
