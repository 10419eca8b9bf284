"""Full fine-tuning's sharded load (issue 12, item 6): under FSDP2 each process builds the transformer on the meta
device and reads only its own rows of every weight, so its peak memory is about half of one full copy on 2
processes; the gathered weights equal the checkpoint's and the sharded model trains (gradients on every shard)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parallel_helpers import run_on_ranks

from chronoedit.demo import TinySpec, _save_transformer
from chronoedit.errors import UserError

# 4 blocks at width 1024, FFN 4096: ~270 MB of fp32 weights, well above a process's own memory noise
SPEC = TinySpec(num_layers=4, num_attention_heads=8, attention_head_dim=128, ffn_dim=4096, shards=3)


def anon_mb() -> float:
    """RssAnon (anonymous resident memory: what the process allocated, not file pages it reads) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon")


class PeakAnon:
    """The highest RssAnon while the block runs, sampled every millisecond (the kernel keeps no peak of it)."""

    def __enter__(self) -> PeakAnon:
        import threading

        self.base = self.peak = anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mb())

    @property
    def added(self) -> float:
        return self.peak - self.base


def load_peak(folder: str) -> dict:
    """On every rank: the peak anonymous memory the sharded load added, against one full copy of the weights; the
    gathered weights' largest difference to the file; one training step's gradients."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh

    from chronoedit.train.sharded import load_sharded_transformer

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with PeakAnon() as peak:
        model = load_sharded_transformer(folder, mesh, subfolder=None)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak.added)
    full = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # global shapes, fp32
    stored = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        stored.update(load_file(file))
    diff = max(float((p.full_tensor() - stored[name].float()).abs().max()) for name, p in model.named_parameters())
    local_rows = {name: p.to_local().shape[0] for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 36, 2, 4, 4, generator=g), torch.tensor([500.0]),
         torch.randn(1, 512, SPEC.text_dim, generator=g), torch.randn(1, 257, SPEC.image_dim, generator=g))  # fmt: skip
    model(*x, return_dict=False)[0].square().mean().backward()
    grads = all(p.grad is not None and p.grad.to_local().shape == p.to_local().shape for p in model.parameters())
    return {"peaks": peaks, "full": full, "diff": diff, "rows": local_rows, "grads": grads}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sharded") / "transformer"
    _save_transformer(SPEC, path)
    return str(path)


def test_each_process_loads_only_its_shard_and_the_weights_are_the_checkpoints(folder):
    sharded = run_on_ranks(2, load_peak, folder)
    full = sharded["full"]
    print(f"peak anonymous memory added by the load on each of 2 processes: "
          f"{', '.join(f'{p:.0f}' for p in sharded['peaks'])} MB; one full copy: {full:.0f} MB")  # fmt: skip
    assert full > 250
    for peak in sharded["peaks"]:
        assert peak < 0.65 * full, (peak, full)
    assert sharded["diff"] == 0.0
    assert sharded["rows"]["blocks.0.ffn.net.0.proj.weight"] == SPEC.ffn_dim // 2
    assert sharded["rows"]["scale_shift_table"] == 1  # [1, 2, D]: rank 0 holds the row, rank 1 none
    assert sharded["grads"]


def test_fp8_or_gguf_checkpoints_are_refused_in_one_line(tmp_path):
    from chronoedit.train.sharded import load_sharded_transformer

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError) as info:
        load_sharded_transformer(gguf, mesh=None, subfolder=None)
    assert "\n" not in str(info.value)
