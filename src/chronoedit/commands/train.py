"""``chronoedit train [CONFIG] [--flags]``: LoRA or full fine-tuning of ChronoEdit on edit pairs and reasoning videos.

Every setting of :class:`chronoedit.train.TrainConfig` is a flag; a TOML/JSON config file gives defaults and flags
override it. Runs on one device as is, and on many under ``accelerate launch`` (see the epilog).
"""

from __future__ import annotations

import argparse
import sys
import types
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..train import TrainConfig

EPILOG = """\
dataset: a folder with metadata.csv (or a CSV file), paths relative to it, one of
  key,video,prompt,source_image,target_image   (chronoedit label; the images are used when given)
  key,video,prompt                             (NVIDIA/DiffSynth; 2-frame video = pair, 26 or 29 = reasoning video)
  source,target,prompt
A pair trains as [source, target x 4] (2 latent frames); a reasoning video (26 frames as NVIDIA's: 25 trajectory
frames then the target; or 29, the target last) as 8 latent frames: those of its first 25 frames, then the edit
latent of [source, target x 4], as NVIDIA trained.

config file (TOML or JSON, same names as the flags with underscores), e.g. train.toml:
  model_path = "ChronoEdit-14B-Diffusers"
  dataset = "data/pairs"
  output_dir = "runs/my-lora"
  lora_rank = 32
  max_steps = 2000
  validation_every = 250

results: OUTPUT_DIR/lora.safetensors (diffusers layout: chronoedit edit --lora-path, diffusers' load_lora_weights)
and lora_comfyui.safetensors (Wan names, lora_A/lora_B: NVIDIA's DiffSynth inference, ComfyUI, diffusers), or
OUTPUT_DIR/transformer/ (--mode full: chronoedit edit --transformer; the base model's dtype unless --save-fp32);
train_log.jsonl (step, loss, lr, seconds);
checkpoints/checkpoint-N (resumed automatically: --resume auto; --resume previous goes back one, e.g. when the latest
is damaged); validation/step_N_KEY.png (source | edit | target). A checkpoint holds only tensors and plain data
(safetensors, torch.save tables loaded with weights_only, JSON): a file that would need other objects is refused.

several GPUs / nodes: accelerate's own config, no flags here, e.g.
  accelerate config                      # answer: multi-GPU, DeepSpeed ZeRO-2 (or FSDP), bf16
  accelerate launch -m chronoedit.cli train train.toml
DeepSpeed ZeRO-2 config file for accelerate (accelerate launch --config_file zero2.yaml ...):
  compute_environment: LOCAL_MACHINE
  distributed_type: DEEPSPEED
  deepspeed_config: {zero_stage: 2, gradient_accumulation_steps: 1, gradient_clipping: 1.0,
                     offload_optimizer_device: none, offload_param_device: none}
  mixed_precision: bf16
  num_processes: 8
FSDP: distributed_type: FSDP with fsdp_config: {fsdp_sharding_strategy: FULL_SHARD,
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_transformer_layer_cls_to_wrap: TransformerBlock,
  fsdp_use_orig_params: true, fsdp_state_dict_type: SHARDED_STATE_DICT}
(validation edits are skipped under FSDP / ZeRO-3, where the weights are sharded).
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand: a config file and one flag per setting."""
    from ..train.config import HELP, TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a LoRA or fine-tune ChronoEdit on edit pairs / reasoning videos",
        description="Train ChronoEdit (LoRA or full) with accelerate. Flags override the config file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="TOML or JSON config file (optional)")
    for f in fields(TrainConfig):
        _add_flag(parser, f.name, str(f.type), HELP.get(f.name, ""))
    parser.set_defaults(handler=handle)
    return parser


def _add_flag(parser: argparse.ArgumentParser, name: str, annotation: str, help_text: str) -> None:
    """--name-with-dashes, typed from the annotation; default SUPPRESS so only flags given override the file."""
    flag = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if annotation == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif annotation.startswith("list"):
        parser.add_argument(flag, nargs="+", metavar="NAME", **kwargs)
    else:
        kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        parser.add_argument(flag, type=kind, metavar=name.split("_")[-1].upper(), **kwargs)


def handle(args: argparse.Namespace) -> int:
    """Build the config (file < flags), train, print where the result went."""
    from ..train import build_config, read_config_file, train

    values = vars(args).copy()
    config_file = values.pop("config", None)
    for key in ("handler", "command"):
        values.pop(key, None)
    file_values = read_config_file(config_file) if config_file else {}
    config = demo_model(build_config(file_values, values, source=config_file))
    _quiet_libraries(config.quiet)
    result = train(config, log=_log(config.quiet))
    if not result.main_process:
        return 0
    if result.resumed_from:
        print(f"resumed at step {result.resumed_from}")
    kind = "LoRA" if config.mode == "lora" else "transformer"
    print(f"trained {result.step} steps; wrote {kind}: {result.output}")
    return 0


def demo_model(config: TrainConfig) -> TrainConfig:
    """``--model-path demo``, as in every other command: the tiny random-weight checkpoint (built on first use),
    with the same note that its results are noise."""
    from .. import editing
    from ..demo import default_demo_dir
    from ..files import writing

    if config.model_path != editing.DEMO:
        return config
    report = editing.Report(note=lambda message: print(f"chronoedit: note: {message}", file=sys.stderr, flush=True))
    with writing(default_demo_dir(), "create the demo model in"):
        path = editing.checkpoint_path(editing.ModelSpec(model_path=editing.DEMO), report)
    return replace(config, model_path=path)


def _quiet_libraries(quiet: bool) -> None:
    """No weight-loading bars from transformers / diffusers (a log line says what loads); with --quiet no warnings."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, transformers_logging):
        logging_module.disable_progress_bar()
        if quiet:
            logging_module.set_verbosity_error()


def _log(quiet: bool) -> types.FunctionType:
    def log(message: str) -> None:
        if not quiet:
            print(f"chronoedit: {message}", file=sys.stderr, flush=True)

    return log
