"""Make a run's edited images through the batch engine (resumable, settings recorded in sidecars, fixed seeds), or
find images made elsewhere (``--outputs DIR``) by item id.

With the prompt enhancer on, each instruction is rewritten once (cached in ``enhanced_prompts.jsonl``) and the
manifest carries the rewritten prompt; the judge still sees the benchmark's own instruction.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from .. import files
from ..batch import Batch, Summary, error_path, run_batch
from ..editing import EditRunner, EditSettings, ModelSpec
from ..vlm import VLM, VLMConfig
from .items import GEDIT, Benchmark, EvalItem
from .judge import ReplyCache, file_digest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
OUTPUTS = "outputs"
MANIFEST = "manifest.jsonl"
ENHANCED = "enhanced_prompts.jsonl"


def enhanced_prompts(benchmark: Benchmark, out_dir: Path, config: VLMConfig,
                     open_vlm: Callable[[VLMConfig], VLM], quiet: bool = False) -> dict[str, str]:  # fmt: skip
    """Every item's instruction rewritten by the prompt enhancer, asked once per (image, instruction, model)."""
    import hashlib

    from ..enhance import enhance_prompt
    from ..media import load_image

    cache = ReplyCache(out_dir / ENHANCED)
    prompts: dict[str, str] = {}
    vlm: VLM | None = None
    try:
        for item in benchmark.items:
            key = hashlib.sha256(json.dumps([file_digest(item.image), item.instruction, config.model]).encode())
            record = cache.get(key.hexdigest())
            if record is None:
                if vlm is None:
                    if not quiet:
                        print(f"chronoedit: enhancing prompts with {config.where()}", file=sys.stderr, flush=True)
                    vlm = open_vlm(config)
                prompt = enhance_prompt(vlm, load_image(item.image), item.instruction)
                record = {"key": key.hexdigest(), "id": item.id, "prompt": prompt, "enhancer": config.model}
                cache.put(record)
            prompts[item.id] = record["prompt"]
    finally:
        if vlm is not None:
            vlm.close()
    return prompts


def write_manifest(benchmark: Benchmark, out_dir: Path, prompts: dict[str, str] | None = None) -> Path:
    """The batch manifest of a run: one row per item (absolute input path, the prompt the model gets)."""
    path = out_dir / MANIFEST
    rows = [{"id": item.id, "input": str(item.image.resolve()),
             "prompt": (prompts or {}).get(item.id, item.instruction)} for item in benchmark.items]  # fmt: skip
    files.save_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), path)
    return path


def generate(benchmark: Benchmark, out_dir: Path, spec: ModelSpec, settings: EditSettings, runner: EditRunner,
             prompts: dict[str, str] | None = None, quiet: bool = False) -> Summary:  # fmt: skip
    """Run the batch engine over the benchmark into ``out_dir/outputs`` (rows already done are skipped)."""
    manifest = write_manifest(benchmark, out_dir, prompts)
    batch = Batch(manifest=manifest, out_dir=out_dir / OUTPUTS, model=spec, defaults=settings)
    return run_batch(batch, quiet=quiet, runner=runner)


def find_output(item: EvalItem, folder: Path, fmt: str) -> Path | None:
    """The edited image of ``item`` in ``folder``: ``ID.<png|jpg|jpeg|webp>``; for GEdit also its own layout
    ``[fullset/]GROUP/LANGUAGE/KEY.png``."""
    names = [folder / f"{item.id}{suffix}" for suffix in IMAGE_SUFFIXES]
    if fmt == GEDIT and item.extra.get("key"):
        for base in (folder / "fullset", folder):
            names += [base / item.category / item.language / f"{item.extra['key']}{s}" for s in IMAGE_SUFFIXES]
    return next((path for path in names if path.is_file()), None)


def generation_error(item: EvalItem, out_dir: Path) -> str | None:
    """The batch engine's recorded error for an item that failed to generate, if any."""
    record = error_path(out_dir / OUTPUTS, item.id)
    try:
        return str(json.loads(record.read_text(encoding="utf-8")).get("error", "failed"))
    except (OSError, ValueError):
        return None
