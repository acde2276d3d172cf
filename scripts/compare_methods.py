"""Compare expert-pruning methods and dynamic skipping on one checkpoint: held-out perplexities.

For one checkpoint: the full model, then every pruning method (`--methods`, short names of the
`*_pruning` entries of the METHODS registry) at every `--r`, calibrated on every `--calib_sets` set
(random_pruning needs no calibration: it runs once per seed, `--random_seeds` seeds from `--seed`,
reported as mean, standard deviation and range). Optionally the layer-wise search with several beam
widths (`--beam_widths`, for models where exhaustive search is impossible; its loss, perplexity and
time), and dynamic-skipping curves (`--skip_scales`): betas calibrated on the first calibration set
(median w2/w1 per layer, the paper's), scaled by each factor, skip rate and perplexity at each, on
the full model and, with `--skip_on_r R`, on the layer-wise r=R model.

Every model is scored with eval/perplexity.py's evaluator on held-out Wikipedia (`--wiki`, field
`text`) and GSM8K test answers (`--gsm8k`, field `answer`); pruned models that keep the same experts
are the same model and are scored once. Everything runs in this process with the
repo's own functions (METHODS, data.build_calib_loader, model.load_model, eval.perplexity); each row
records the `python main.py ...` command that produces the same pruned checkpoint. Writes `--output`
(JSON), a markdown table (`--markdown`, else printed) and two PNGs in `--fig_dir`: perplexity vs kept
experts per method, and skip rate vs perplexity.

    python scripts/compare_methods.py --model_path demo/tiny-moe --r 6 4 --calib_sets c4 math self \\
        --max_block_size 512 --n_blocks_for_stat 32 --dtype float32 --device cpu \\
        --beam_widths 1 4 16 --skip_scales 0.5 0.75 1 1.5 2 --skip_on_r 6 \\
        --output docs/results/demo_compare.json --fig_dir docs/figures --fig_prefix demo_
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import main as pruning_cli  # noqa: E402
from cli import UsageError, fail, resolve_device, sha256_file  # noqa: E402
from data import DATASETS, DataFileError, build_calib_loader, read_texts  # noqa: E402
from eval.perplexity import perplexity, token_blocks  # noqa: E402
from method import METHODS  # noqa: E402
from model import DynamicSkipping, load_model  # noqa: E402
from model.adapters import MoEError, find_moe_blocks  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_CALIB_FILES = {"c4": SHARED / "calib" / "c4-train.00000-of-01024.first1000.json",
                       "math": SHARED / "calib" / "math_pretrain_style.from_MATH_test.json"}
PRUNING = {m[: -len("_pruning")]: m for m in METHODS if m.endswith("_pruning")}  # short name -> registry key
CALIBRATION_FREE = {"random"}  # run once per seed instead of once per calibration set
EVALS = {"wiki": "Wikipedia", "gsm8k": "GSM8K"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint folder")
    p.add_argument("--r", type=int, nargs="+", required=True, help="experts to keep per MoE layer, one or more")
    p.add_argument("--methods", nargs="+", default=list(PRUNING), choices=list(PRUNING),
                   help=f"pruning methods (default: all: {' '.join(PRUNING)})")
    p.add_argument("--calib_sets", nargs="+", default=["c4", "math", "self"], choices=list(DATASETS),
                   help="calibration sets (default: c4 math self); the first also calibrates skipping")
    p.add_argument("--calib_file", action="append", default=[], metavar="SET=PATH",
                   help="file of a calibration set (default: c4 and math from ../shared/data/calib)")
    p.add_argument("--random_seeds", type=int, default=5, help="seeds of random_pruning (default: 5)")
    p.add_argument("--beam_widths", type=int, nargs="*", default=[],
                   help="also run layer-wise pruning with --search beam at these widths (first calibration set)")
    p.add_argument("--skip_scales", type=float, nargs="*", default=[],
                   help="dynamic-skipping curve: scale the calibrated betas by these factors (e.g. 0.5 0.75 1 1.5 2)")
    p.add_argument("--skip_on_r", type=int, default=None,
                   help="also draw the skipping curve on top of layer-wise pruning to this r (first calibration set)")
    p.add_argument("--max_block_size", type=int, default=2048, help="calibration tokens per block (main.py's)")
    p.add_argument("--n_blocks_for_stat", type=int, default=128, help="calibration blocks (main.py's)")
    p.add_argument("--batch_size", type=int, default=8, help="calibration batch size (main.py's)")
    p.add_argument("--seed", type=int, default=42, help="calibration sampling seed; random seeds start here")
    p.add_argument("--search", default="auto", choices=["auto", "exhaustive", "beam"],
                   help="search of layerwise/progressive (main.py's --search)")
    p.add_argument("--device", default=None, help="compute device (default: the GPU when there is one)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="model dtype for pruning and evaluation (default: bfloat16, as main.py)")
    p.add_argument("--wiki", default=str(SHARED / "corpus" / "wiki_heldout.jsonl.xz"), help="held-out Wikipedia")
    p.add_argument("--wiki_docs", type=int, default=200, help="first N articles (0: all; default 200)")
    p.add_argument("--gsm8k", default=str(SHARED / "eval" / "gsm8k_test.jsonl"), help="GSM8K test (field answer)")
    p.add_argument("--gsm8k_docs", type=int, default=0, help="first N answers (0: all, the default)")
    p.add_argument("--eval_block_size", type=int, default=512, help="tokens per scored block (default 512)")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--markdown", default=None, help="markdown file to write (default: print the tables)")
    p.add_argument("--fig_dir", default=None, help="folder of the PNGs (default: the JSON's folder)")
    p.add_argument("--fig_prefix", default="", help="prefix of the PNG names")
    return p.parse_args(argv)


def sha256_files(folder: Path) -> dict[str, str]:
    """sha256 of each weight file of a checkpoint folder."""
    return {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def scaled_betas(betas: dict, scale: float) -> dict:
    """{"layer": beta or [betas for ranks 2..k]} times scale."""
    return {k: [scale * b for b in v] if isinstance(v, list) else scale * v for k, v in betas.items()}


class Comparison:
    """The base model, the evaluation blocks and the calibration loaders, shared by every run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = str(resolve_device(args.device))
        self.calib_files = self._calib_files(args)
        try:
            AutoConfig.from_pretrained(args.model_path)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read a model config from --model_path {args.model_path}: "
                             f"{str(e).splitlines()[0]}") from None
        self.texts = {"wiki": self._texts(args.wiki, "text", args.wiki_docs),
                      "gsm8k": self._texts(args.gsm8k, "answer", args.gsm8k_docs)}
        # The base model stays in host memory: the methods move one layer at a time to the device.
        self.base, self.tokenizer = load_model(args.model_path, device="cpu", dtype=args.dtype, skipping=False)
        blocks = find_moe_blocks(self.base)
        adapter, block = next(iter(blocks.values()))
        self.n_experts, self.top_k, self.n_moe_layers = adapter.num_experts(block), adapter.top_k(block), len(blocks)
        for r in args.r + ([args.skip_on_r] if args.skip_on_r is not None else []):
            for a, b in blocks.values():
                a.check_r(b, r)
        self.eval_blocks = {k: token_blocks(t, self.tokenizer, args.eval_block_size) for k, t in self.texts.items()}
        self._loaders: dict[str, object] = {}
        self._pruned_scores: dict[str, dict] = {}

    @staticmethod
    def _calib_files(args) -> dict[str, str]:
        files = {k: str(v) for k, v in DEFAULT_CALIB_FILES.items()}
        for item in args.calib_file:
            name, sep, path = item.partition("=")
            if not sep or name not in DATASETS:
                raise UsageError(f"--calib_file {item!r}: write SET=PATH with SET one of {', '.join(DATASETS)}")
            files[name] = path
        for name in args.calib_sets:
            if not DATASETS[name].needs_model:
                DATASETS[name].resolve(files.get(name))  # a missing file fails here, before any work
        return files

    @staticmethod
    def _texts(path: str, field: str, n: int) -> list[str]:
        if not Path(path).is_file():
            raise UsageError(f"evaluation file {path} not found; pass --wiki / --gsm8k")
        texts = read_texts(path, field=field)
        return texts[:n] if n > 0 else texts

    def main_argv(self, method: str, r: int | None, calib_set: str, seed: int | None = None, extra=(),
                  model_path: str | None = None) -> list[str]:
        """main.py's flags for one run; parsed by main.parse_args for the method's `args`."""
        a = self.args
        path = [] if DATASETS[calib_set].needs_model else ["--calib_path", self.calib_files[calib_set]]
        return ["--method", method, *([] if r is None else ["--r", str(r)]), "--calib_set", calib_set, *path,
                "--model_path", model_path or a.model_path, "--max_block_size", str(a.max_block_size),
                "--n_blocks_for_stat", str(a.n_blocks_for_stat), "--batch_size", str(a.batch_size),
                "--num_workers", "0", "--seed", str(a.seed if seed is None else seed), "--device", self.device,
                "--dtype", a.dtype, *extra]

    def loader(self, calib_set: str, model=None):
        """Calibration batches as main.py builds them; `self` samples from `model` (default: the base)."""
        if model is not None and model is not self.base and DATASETS[calib_set].needs_model:
            return self._build_loader(calib_set, model)
        if calib_set not in self._loaders:
            self._loaders[calib_set] = self._build_loader(calib_set, self.base)
        return self._loaders[calib_set]

    def _build_loader(self, calib_set, model):
        a = self.args
        return build_calib_loader(calib_set, self.tokenizer, a.max_block_size, a.n_blocks_for_stat, a.batch_size, 0,
                                  a.seed, path=None if DATASETS[calib_set].needs_model else self.calib_files[calib_set],
                                  model=model, device=self.device)

    def run(self, argv: list[str], model=None, loader=None):
        """(model, info, seconds) of METHODS[method] on a copy of `model` (default: the base model)."""
        cfg = pruning_cli.parse_args(argv)
        loader = loader if loader is not None else self.loader(cfg.calib_set)
        start = time.time()
        out, info = METHODS[cfg.method](copy.deepcopy(model if model is not None else self.base), loader, cfg)
        return out, info, time.time() - start

    def evaluate(self, model, skipping: DynamicSkipping | None = None) -> dict:
        model.to(self.device)
        try:
            out = {}
            for name, blocks in self.eval_blocks.items():
                if skipping is not None:
                    skipping.reset_stats()
                out[name] = perplexity(model, blocks, self.args.eval_batch_size)
                if skipping is not None:
                    out[name]["skip_rate"] = skipping.stats()["skip_rate"]
            return out
        finally:
            model.to("cpu")

    def evaluate_pruned(self, model, info: dict) -> dict:
        """Scores of a model pruned from the base: models keeping the same experts are the same model
        (pruning slices the original tensors), so each kept set is scored once."""
        key = json.dumps({k: v["kept_experts"] for k, v in info["layers"].items()}, sort_keys=True)
        if key not in self._pruned_scores:
            self._pruned_scores[key] = self.evaluate(model)
        return copy.deepcopy(self._pruned_scores[key])


def command(argv: list[str]) -> str:
    return "python main.py " + shlex.join(argv)


def pruning_row(method, r, calib_set, argv, info, seconds, scores, **extra) -> dict:
    layers = info["layers"]
    losses = [v["best_loss"] for v in layers.values() if "best_loss" in v]
    return {"method": method, "r": r, "calib_set": calib_set, **extra, "command": command(argv),
            "prune_seconds": seconds, "total_loss": sum(losses) if losses else None,
            "n_evaluated": sum(v.get("n_evaluated", 0) for v in layers.values()) or None,
            "kept_experts": {k: v["kept_experts"] for k, v in layers.items()}, **scores}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pruning(c: Comparison, results: dict, keep: set) -> dict:
    """Every method x r x calibration set; returns the models named in `keep` ((method, r, calib_set))."""
    a = c.args
    kept_models = {}
    for r in a.r:
        for method in a.methods:
            if method in CALIBRATION_FREE:
                for seed in range(a.seed, a.seed + a.random_seeds):
                    argv = c.main_argv(PRUNING[method], r, a.calib_sets[0], seed=seed)
                    model, info, seconds = c.run(argv)
                    row = pruning_row(method, r, None, argv, info, seconds, c.evaluate_pruned(model, info), seed=seed)
                    results["pruning"].append(row)
                    log(f"{method} r={r} seed={seed}: wiki {row['wiki']['perplexity']:.3f}")
                continue
            for calib_set in a.calib_sets:
                argv = c.main_argv(PRUNING[method], r, calib_set, extra=("--search", a.search))
                model, info, seconds = c.run(argv)
                row = pruning_row(method, r, calib_set, argv, info, seconds, c.evaluate_pruned(model, info))
                results["pruning"].append(row)
                log(f"{method} r={r} {calib_set}: wiki {row['wiki']['perplexity']:.3f} ({seconds:.1f} s)")
                if (method, r, calib_set) in keep:
                    kept_models[(method, r, calib_set)] = (model, argv)
    results["random_summary"] += random_summary(results["pruning"], a.r)
    return kept_models


def random_summary(pruning_rows: list[dict], rs) -> list[dict]:
    """Per r (in the order given) and seeded method (random_pruning): the seeds and each perplexity's spread."""
    out = []
    for r in rs:
        rows = [x for x in pruning_rows if x["r"] == r and x["method"] in CALIBRATION_FREE]
        for method in sorted({x["method"] for x in rows}):
            mine = [x for x in rows if x["method"] == method]
            out.append({"method": method, "r": r, "seeds": [x["seed"] for x in mine],
                        **{k: spread([x[k]["perplexity"] for x in mine]) for k in EVALS}})
    return out


def run_beams(c: Comparison, results: dict) -> None:
    a = c.args
    calib_set = a.calib_sets[0]
    for r in a.r:
        for width in a.beam_widths:
            argv = c.main_argv("layerwise_pruning", r, calib_set, extra=("--search", "beam", "--beam_width", str(width)))
            model, info, seconds = c.run(argv)
            results["beam"].append(pruning_row("layerwise", r, calib_set, argv, info, seconds,
                                               c.evaluate_pruned(model, info),
                                               search="beam", beam_width=width))
            log(f"layerwise beam {width} r={r}: loss {results['beam'][-1]['total_loss']:.6g} ({seconds:.1f} s)")


def skip_curve(c: Comparison, model, label: str, argv: list[str], base_scores: dict) -> dict:
    """Betas calibrated on `model` (the first calibration set), then perplexity and skip rate per scale."""
    calib_set = c.args.calib_sets[0]
    _, info, seconds = c.run(argv, model=model, loader=c.loader(calib_set, model))
    betas = {k: v["beta_median"] for k, v in info["layers"].items()}
    curve = []
    for scale in c.args.skip_scales:
        with DynamicSkipping(model, scaled_betas(betas, scale)) as skipping:
            curve.append({"scale": scale, **c.evaluate(model, skipping)})
        log(f"skipping on {label}, beta x {scale}: skip rate {curve[-1]['wiki']['skip_rate']:.3f}, "
            f"wiki {curve[-1]['wiki']['perplexity']:.3f}")
    return {"base": label, "calib_set": calib_set, "command": command(argv), "calibration_seconds": seconds,
            "betas_median": betas, "no_skipping": base_scores, "curve": curve}


def compare(args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.time()
    c = Comparison(args)
    results = {"model_path": args.model_path, "checkpoint_sha256": sha256_files(Path(args.model_path)),
               "n_experts": c.n_experts, "top_k": c.top_k, "n_moe_layers": c.n_moe_layers,
               "command": "python scripts/compare_methods.py " + shlex.join(argv),
               "settings": {**vars(args), "device": c.device, "calib_files": c.calib_files},
               "eval_data": {k: {"path": p, "field": f, "documents": len(c.texts[k]), "block_size": args.eval_block_size}
                             for k, p, f in (("wiki", args.wiki, "text"), ("gsm8k", args.gsm8k, "answer"))},
               "pruning": [], "random_summary": [], "beam": [], "skipping": []}
    results["full"] = c.evaluate(c.base)
    log(f"full model: wiki {results['full']['wiki']['perplexity']:.3f}, gsm8k {results['full']['gsm8k']['perplexity']:.3f}")
    calib0 = args.calib_sets[0]
    skip_base = ("layerwise", args.skip_on_r, calib0) if args.skip_scales and args.skip_on_r is not None else None
    kept = run_pruning(c, results, {skip_base} if skip_base else set())
    run_beams(c, results)
    if args.skip_scales:
        results["skipping"].append(skip_curve(c, c.base, "full model", c.main_argv("dynamic_skipping", None, calib0),
                                              results["full"]))
        if skip_base:
            if skip_base in kept:
                pruned, prune_argv = kept[skip_base]
                scores = next(x for x in results["pruning"] if (x["method"], x["r"], x["calib_set"]) == skip_base)
            else:  # layerwise was not among --methods or --r
                prune_argv = c.main_argv("layerwise_pruning", args.skip_on_r, calib0, extra=("--search", args.search))
                pruned, info, _ = c.run(prune_argv)
                scores = c.evaluate_pruned(pruned, info)
            label = f"layerwise r={args.skip_on_r}, {calib0}"
            row = skip_curve(c, pruned, label, c.main_argv("dynamic_skipping", None, calib0,
                                                             model_path=f"<output of: {command(prune_argv)}>"),
                             {k: scores[k] for k in EVALS})
            results["skipping"].append(row)
    results["wall_time_s"] = time.time() - start
    results["platform"] = {"device": c.device, "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "transformers": transformers.__version__}
    return results


# ---- tables -------------------------------------------------------------------------------------

def _fmt_spread(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def markdown(res: dict) -> str:
    rs = sorted({x["r"] for x in res["pruning"]}, reverse=True)
    full = res["full"]
    lines = [f"Full model ({res['n_experts']} experts, top-{res['top_k']}): Wikipedia perplexity "
             f"{full['wiki']['perplexity']:.2f}, GSM8K-answer perplexity {full['gsm8k']['perplexity']:.2f}.", ""]
    head = "| method | calibration | " + " | ".join(f"r={r} {EVALS[k]}" for r in rs for k in EVALS) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(rs))]
    # (method, calibration) -> {(r, eval): (value, text)}; random rows show the spread over seeds.
    table: dict[tuple, dict] = {}
    for x in res["pruning"]:
        if x["method"] not in CALIBRATION_FREE:
            table.setdefault((x["method"], x["calib_set"]), {}).update(
                {(x["r"], k): (x[k]["perplexity"], f"{x[k]['perplexity']:.2f}") for k in EVALS})
        else:
            table.setdefault((x["method"], None), {})
    for y in res["random_summary"]:
        table[(y["method"], None)].update({(y["r"], k): (y[k]["mean"], _fmt_spread(y[k])) for k in EVALS})
    best = {c: min(cells[c][0] for cells in table.values() if c in cells) for c in [(r, k) for r in rs for k in EVALS]}
    for (method, calib_set), cells in table.items():
        texts = []
        for c in [(r, k) for r in rs for k in EVALS]:
            value, text = cells.get(c, (None, ""))
            texts.append(f"**{text}**" if value is not None and value == best[c] else text)
        seeds = next((y["seeds"] for y in res["random_summary"] if y["method"] == method), [])
        calib = f"none ({len(seeds)} seeds)" if calib_set is None else calib_set
        lines.append(f"| {method} | {calib} | " + " | ".join(texts) + " |")
    lines.append("")
    lines.append("Bold: the lowest perplexity in the column (for random: the mean). Random: mean ± standard deviation "
                 "(min–max) over seeds.")
    if res["beam"]:
        lines += ["", "| r | calibration | search | summed layer loss | Wikipedia | GSM8K | search time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rs:
            ref = [x for x in res["pruning"] if x["method"] == "layerwise" and x["r"] == r
                   and x["calib_set"] == res["beam"][0]["calib_set"]]
            for x in ref + [b for b in res["beam"] if b["r"] == r]:
                search = f"beam, width {x['beam_width']}" if "beam_width" in x else f"--search {res['settings']['search']}"
                lines.append(f"| {r} | {x['calib_set']} | {search} | {x['total_loss']:.6g} | "
                             f"{x['wiki']['perplexity']:.2f} | {x['gsm8k']['perplexity']:.2f} | {x['prune_seconds']:.1f} |")
    if res["skipping"]:
        lines += ["", "| base model | beta scale | skip rate (Wikipedia / GSM8K) | Wikipedia | GSM8K |",
                  "|---|---|---|---|---|"]
        for s in res["skipping"]:
            ns = s["no_skipping"]
            lines.append(f"| {s['base']} | no skipping | 0 / 0 | {ns['wiki']['perplexity']:.2f} | "
                         f"{ns['gsm8k']['perplexity']:.2f} |")
            for p in s["curve"]:
                mark = " (median, the paper's)" if p["scale"] == 1 else ""
                lines.append(f"| {s['base']} | {p['scale']:g}x{mark} | {p['wiki']['skip_rate']:.3f} / "
                             f"{p['gsm8k']['skip_rate']:.3f} | {p['wiki']['perplexity']:.2f} | "
                             f"{p['gsm8k']['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


# ---- figures ------------------------------------------------------------------------------------

def plot_ppl_vs_kept(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    n = res["n_experts"]
    methods = list(dict.fromkeys(x["method"] for x in res["pruning"]))
    calib_sets = list(dict.fromkeys(x["calib_set"] for x in res["pruning"] if x["calib_set"] is not None))
    colors = dict(zip(methods, plt.cm.tab10.colors))
    styles = dict(zip(calib_sets, ["-", "--", ":", "-."] * 4))
    markers = dict(zip(calib_sets, ["o", "s", "^", "D"] * 4))
    # Methods that choose the same experts coincide: shift each method a little along x to show them all.
    dodge = dict(zip(methods, [0.3 * (i / max(1, len(methods) - 1) - 0.5) for i in range(len(methods))]))
    for ax, k in zip(axes, EVALS):
        for method in methods:
            if method in CALIBRATION_FREE:
                s = sorted((y for y in res["random_summary"] if y["method"] == method), key=lambda y: y["r"])
                xs = [y["r"] + dodge[method] for y in s] + [n + dodge[method]]
                mean = [y[k]["mean"] for y in s] + [res["full"][k]["perplexity"]]
                lo = [y[k]["mean"] - y[k]["min"] for y in s] + [0]
                hi = [y[k]["max"] - y[k]["mean"] for y in s] + [0]
                ax.errorbar(xs, mean, yerr=[lo, hi], color=colors[method], marker="x", capsize=4, linestyle="-",
                            label=f"{method} (mean, min–max over {len(s[0]['seeds'])} seeds)")
                continue
            for calib_set in calib_sets:
                rows = sorted((y for y in res["pruning"] if y["method"] == method and y["calib_set"] == calib_set),
                              key=lambda y: y["r"])
                if rows:
                    ax.plot([y["r"] + dodge[method] for y in rows] + [n + dodge[method]], [y[k]["perplexity"] for y in rows] +
                            [res["full"][k]["perplexity"]], color=colors[method], linestyle=styles[calib_set],
                            marker=markers[calib_set], label=f"{method}, {calib_set}")
        ax.axhline(res["full"][k]["perplexity"], color="k", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("experts kept per MoE layer")
        ax.set_ylabel(f"{EVALS[k]} perplexity")
        ax.set_xticks(sorted({y["r"] for y in res["pruning"]} | {n}))
        ax.set_title(f"held-out {EVALS[k]}", fontsize=10)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{Path(res['model_path']).name}: perplexity vs kept experts (dotted: full model; methods "
                 f"shifted a little along x so that equal results stay visible)", fontsize=11)
    _save(fig, path)


def plot_skip_curve(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, k in zip(axes, EVALS):
        for s, color in zip(res["skipping"], plt.cm.tab10.colors):
            xs = [0.0] + [p[k]["skip_rate"] for p in s["curve"]]
            ys = [s["no_skipping"][k]["perplexity"]] + [p[k]["perplexity"] for p in s["curve"]]
            ax.plot(xs, ys, marker="o", color=color, label=s["base"])
            for p in s["curve"]:
                ax.annotate(f"{p['scale']:g}x", (p[k]["skip_rate"], p[k]["perplexity"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
                if p["scale"] == 1:
                    ax.plot(p[k]["skip_rate"], p[k]["perplexity"], marker="*", markersize=15, color=color,
                            linestyle="none")
        ax.set_xlabel(f"skip rate of the 2nd..k-th expert on {EVALS[k]}")
        ax.set_ylabel(f"{EVALS[k]} perplexity")
        ax.set_title(f"held-out {EVALS[k]} (star: median beta, the paper's)", fontsize=10)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{Path(res['model_path']).name}: dynamic skipping, betas scaled", fontsize=11)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: dict, args: argparse.Namespace) -> list[Path]:
    """JSON, markdown and PNGs, each written to a temporary name and renamed."""
    out = Path(args.output)
    fig_dir = Path(args.fig_dir) if args.fig_dir else out.parent
    targets = []
    figures = [("ppl_vs_kept.png", plot_ppl_vs_kept)] + ([("skip_curve.png", plot_skip_curve)] if res["skipping"] else [])
    for d in {out.parent, fig_dir} | ({Path(args.markdown).parent} if args.markdown else set()):
        d.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        staged.append((tmp, out))
        if args.markdown:
            tmp = Path(args.markdown).with_name(f".{Path(args.markdown).name}.partial")
            tmp.write_text(markdown(res))
            staged.append((tmp, Path(args.markdown)))
        for name, draw in figures:
            final = fig_dir / f"{args.fig_prefix}{name}"
            tmp = final.with_name(f".{final.stem}.partial.png")
            draw(res, tmp)
            staged.append((tmp, final))
        for tmp, final in staged:
            tmp.rename(final)
            targets.append(final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return targets


def check_args(args: argparse.Namespace) -> None:
    if args.random_seeds < 1 and "random" in args.methods:
        raise UsageError("--random_seeds must be at least 1")
    if any(w < 1 for w in args.beam_widths):
        raise UsageError("--beam_widths must be at least 1")
    if any(s < 0 for s in args.skip_scales):
        raise UsageError("--skip_scales must be >= 0")
    if args.skip_on_r is not None and not args.skip_scales:
        raise UsageError("--skip_on_r draws a skipping curve: give --skip_scales too")
    if args.n_blocks_for_stat < 1 or args.max_block_size < 1 or args.batch_size < 1 or args.eval_block_size < 2:
        raise UsageError("--n_blocks_for_stat, --max_block_size, --batch_size must be >= 1 and --eval_block_size >= 2")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        check_args(args)
        res = compare(args, argv)
    except (UsageError, DataFileError, MoEError, FileNotFoundError) as e:
        return fail("compare_methods.py", e)
    for path in write_outputs(res, args):
        print(f"wrote {path}")
    if not args.markdown:
        print(markdown(res))
    print(f"total {res['wall_time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
