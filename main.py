"""Expert pruning and dynamic skipping for MoE LLMs (Lu et al., ACL 2024, arXiv 2402.14800).

    python main.py --method layerwise_pruning --r 6 --calib_set c4 --model_path Mixtral-8x7B-v0.1

writes <output_path>/<model>_<method>_r<r>_<calib_set>_<n_blocks>_<timestamp>/ holding a
Hugging Face checkpoint, its tokenizer and pruning_info.json (every decision).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402

from data import DATASETS, DataFileError, build_calib_loader  # noqa: E402
from method import METHODS  # noqa: E402
from model.adapters import MoEError, find_moe_blocks  # noqa: E402
from model.loading import DTYPES  # noqa: E402

logger = logging.getLogger("main")

class UsageError(Exception):
    """Bad flags or paths: reported as one line, nothing written."""


@dataclass
class RunConfig:
    """Every setting of a run; saved in pruning_info.json under "args"."""

    method: str
    calib_set: str
    model_path: str
    r: int | None = None
    output_path: str = "./output"
    max_block_size: int = 2048
    n_blocks_for_stat: int = 128
    batch_size: int = 8
    num_workers: int = 4
    seed: int = 42
    use_flash_attention_2: bool = False
    calib_path: str | None = None
    device: str | None = None
    dtype: str = "bfloat16"
    search: str = "auto"
    exhaustive_limit: int = 20000
    beam_width: int = 4
    swap_rounds: int = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="layerwise_pruning: keep the r experts per layer that best reproduce the original "
                        "layer output; progressive_pruning: the same, layer after layer on the already pruned "
                        "model; dynamic_skipping: calibrate per-layer betas for skipping the 2nd expert")
    p.add_argument("--r", type=int, default=None, help="number of experts to keep per MoE layer (pruning methods)")
    p.add_argument("--calib_set", required=True, choices=list(DATASETS),
                   help="calibration set: " + "; ".join(f"{k}: {v.default_paths[0]}" for k, v in DATASETS.items()))
    p.add_argument("--model_path", required=True, help="checkpoint folder (or hub id) of the model to prune")
    p.add_argument("--output_path", default="./output",
                   help="folder under which the run's result folder is created (default: ./output)")
    p.add_argument("--max_block_size", type=int, default=2048,
                   help="tokens per calibration sequence, at most the tokenizer's model_max_length (default: 2048)")
    p.add_argument("--n_blocks_for_stat", type=int, default=128,
                   help="number of calibration sequences; 0 or negative uses the whole file (default: 128)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="sequences per forward batch; the loss sums one Frobenius norm per batch (default: 8)")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers for the calibration batches")
    p.add_argument("--seed", type=int, default=42, help="seed for document sampling and everything random")
    p.add_argument("--use_flash_attention_2", action="store_true", help="load the model with Flash Attention 2")
    p.add_argument("--calib_path", default=None,
                   help="calibration file to read instead of the calibration set's default path")
    p.add_argument("--device", default=None,
                   help="compute device, e.g. cuda, cuda:1, cpu (default: the GPU when there is one). Layers are "
                        "moved there one at a time; the model itself stays in host memory")
    p.add_argument("--dtype", default="bfloat16", choices=[k for k in DTYPES if k != "auto"],
                   help="dtype to load the model in (default: bfloat16, as the paper)")
    p.add_argument("--search", default="auto", choices=["auto", "exhaustive", "beam"],
                   help="how to find the kept set: exhaustive tries every drop set (the paper); beam scales to "
                        "many experts (greedy elimination with a beam, then swap refinement); auto: exhaustive "
                        "when there are at most --exhaustive_limit candidate sets, else beam")
    p.add_argument("--exhaustive_limit", type=int, default=20000,
                   help="largest number of candidate drop sets searched exhaustively with --search auto")
    p.add_argument("--beam_width", type=int, default=4, help="beam width of --search beam")
    p.add_argument("--swap_rounds", type=int, default=4, help="at most this many swap-refinement rounds of beam")
    return p


def parse_args(argv=None) -> RunConfig:
    ns = build_parser().parse_args(argv)
    return RunConfig(**vars(ns))


def save_dir_name(cfg: RunConfig, now: datetime | None = None) -> str:
    model_name = Path(cfg.model_path.rstrip("/")).name
    r = f"_r{cfg.r}" if cfg.method.endswith("_pruning") else ""
    fa = "fatt2_" if cfg.use_flash_attention_2 else ""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{model_name}_{cfg.method}{r}_{cfg.calib_set}_{cfg.n_blocks_for_stat}_{fa}{stamp}"


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use e.g. cuda, cuda:1 or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def check_args(cfg: RunConfig) -> None:
    pruning = cfg.method.endswith("_pruning")
    if pruning and cfg.r is None:
        raise UsageError(f"--method {cfg.method} needs --r, the number of experts to keep per MoE layer")
    if pruning and cfg.r < 1:
        raise UsageError(f"--r must be at least 1, got {cfg.r}")
    if not pruning and cfg.r is not None:
        logger.warning("--r is not used by %s", cfg.method)
    if cfg.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_block_size < 1:
        raise UsageError(f"--max_block_size must be at least 1, got {cfg.max_block_size}")
    if cfg.beam_width < 1 or cfg.swap_rounds < 0 or cfg.exhaustive_limit < 1:
        raise UsageError("--beam_width and --exhaustive_limit must be >= 1 and --swap_rounds >= 0")
    if cfg.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {cfg.num_workers}")


def check_model(cfg: RunConfig):
    """Read the config and build the model skeleton on the meta device: family and --r checks cost nothing."""
    try:
        config = AutoConfig.from_pretrained(cfg.model_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read a model config from --model_path {cfg.model_path}: "
                         f"{str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    blocks = find_moe_blocks(skeleton)
    if cfg.method.endswith("_pruning"):
        for adapter, block in blocks.values():
            adapter.check_r(block, cfg.r)
    else:
        from method.skipping import check_skippable
        check_skippable(skeleton)
    return config


def load_model(cfg: RunConfig):
    kwargs = {"dtype": DTYPES[cfg.dtype]}
    if cfg.use_flash_attention_2:
        kwargs["attn_implementation"] = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, **kwargs)
    model.eval()
    return model


def peak_memory(device: torch.device) -> dict:
    out = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run(cfg: RunConfig) -> Path:
    start = time.time()
    check_args(cfg)
    device = resolve_device(cfg.device)
    cfg.device = str(device)
    save_path = Path(cfg.output_path) / save_dir_name(cfg)
    if save_path.exists():
        raise UsageError(f"output folder {save_path} already exists; remove it or choose another --output_path")
    logger.info("config: %s", json.dumps(asdict(cfg)))
    check_model(cfg)
    set_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    # File sets are read before the (slow) model load, so that a bad file fails fast;
    # `self` samples from the model, which must be loaded first.
    needs_model = DATASETS[cfg.calib_set].needs_model
    model = load_model(cfg) if needs_model else None
    calib_loader = build_calib_loader(cfg.calib_set, tokenizer, cfg.max_block_size, cfg.n_blocks_for_stat,
                                      cfg.batch_size, cfg.num_workers, cfg.seed, path=cfg.calib_path,
                                      model=model, device=device)
    n_blocks = len(calib_loader.dataset)
    logger.info("calibration: %d blocks of %d tokens", n_blocks, len(calib_loader.dataset[0]))
    if model is None:
        model = load_model(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model, info = METHODS[cfg.method](model, calib_loader, cfg)

    record = {
        "args": asdict(cfg),
        "calibration": {"n_blocks": n_blocks, "block_size": len(calib_loader.dataset[0])},
        **info,
        "wall_time_s": time.time() - start,
        **peak_memory(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save(model, tokenizer, record, save_path)
    return save_path


def save(model, tokenizer, record: dict, save_path: Path) -> None:
    """Write into a hidden sibling folder, then rename: a failed run leaves nothing behind.
    config.json and the tokenizer files come from the input folder (model/checkpoint.py says why)."""
    from model.checkpoint import save_checkpoint

    tmp = save_path.with_name(f".{save_path.name}.partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_checkpoint(model, tokenizer, record["args"]["model_path"], tmp)
        (tmp / "pruning_info.json").write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(save_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO,
                        datefmt="%Y-%m-%d %H:%M:%S")
    cfg = parse_args(argv)
    try:
        save_path = run(cfg)
    except (UsageError, DataFileError, MoEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved to {save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
