"""A result folder that explains itself: its model card, the end-of-run summary, and expert numbering.

- `model_card(record)`: the folder's README.md, a Hugging Face model card (YAML front matter with
  `base_model`, `tags`, `library_name`) saying what was done, how to load the result, and that
  `betas` need this repository's `load_model`.
- `summary_table(record)`: per MoE layer, the dropped experts, the best loss and its margin to the
  next best candidate; for dynamic skipping, beta and the calibration skip rate. Printed at the
  end of a run, and in the card.
- `read_expert_map` / `add_original_numbering`: pruning an already pruned checkpoint numbers its
  experts 0..r-1 again. Each run records, per MoE layer, which expert of the ORIGINAL model each
  of its experts is (`expert_map`: current index -> original index) and the kept and dropped
  experts in that numbering; the next run composes its own decisions with its input's map.

`record` is the run's pruning_info.json (main.py writes both).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

INFO_FILE = "pruning_info.json"
PAPER = "[Lu et al., ACL 2024](https://arxiv.org/abs/2402.14800)"
# Where the card's loading snippets point: the reader's path to the result folder.
FOLDER = "path/to/this/folder"

# method -> (what it is, the card's tag, what it did)
METHODS = {
    "layerwise_pruning": ("layer-wise expert pruning", "expert-pruning",
                          "per MoE layer, the kept experts are the r whose combination best reproduces the layer's "
                          "original output on the calibration data (the dropped experts leave the router)"),
    "progressive_pruning": ("progressive expert pruning", "expert-pruning",
                            "as layer-wise pruning, layer after layer, each layer fed by the model pruned so far "
                            "while the targets stay the original model's outputs"),
    "dynamic_skipping": ("dynamic skipping", "dynamic-skipping",
                         "a token skips its j-th routed expert (j >= 2) when w_j < beta * w_1; beta per MoE layer "
                         "is the median of w_j / w_1 over the calibration tokens, stored as `betas` in config.json"),
    "random_pruning": ("random expert pruning (baseline)", "expert-pruning", "the r kept experts drawn at random"),
    "frequency_pruning": ("frequency expert pruning (baseline)", "expert-pruning",
                          "the r experts most often in the calibration tokens' top-k kept"),
    "reap_pruning": ("REAP expert pruning (baseline)", "expert-pruning",
                     "the r experts with the largest router-weighted expert activation norm kept"),
}


def _pruning(record: dict) -> bool:
    return any("kept_experts" in layer for layer in record["layers"].values())


def _layers(record: dict) -> list[tuple[str, dict]]:
    return sorted(record["layers"].items(), key=lambda kv: int(kv[0]))


# ---- expert numbering across repeated pruning -----------------------------------------------


def read_expert_map(folder: Path | None) -> dict[str, list[int]] | None:
    """Per MoE layer, the original-model index of each expert of the checkpoint in `folder`, from the
    pruning_info.json a run of main.py left there: its "expert_map" or, from a version before expert maps,
    its kept experts. None for a checkpoint no run of ours made (its numbering is the original one)."""
    path = folder / INFO_FILE if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        found = info.get("expert_map") or {k: v["kept_experts"] for k, v in info["layers"].items()
                                           if "kept_experts" in v}
        expert_map = {str(int(k)): [int(e) for e in v] for k, v in found.items()}
        if any(len(set(v)) != len(v) or min(v, default=0) < 0 for v in expert_map.values()):
            raise ValueError("repeated or negative expert indices")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("ignoring %s (%s): the result's experts are numbered as in %s only", path, e, folder)
        return None
    return expert_map or None


def add_original_numbering(record: dict, input_map: dict[str, list[int]] | None, n_experts: dict[str, int]) -> None:
    """Add the original model's numbering to `record` (in place).

    input_map: the input checkpoint's expert map (`read_expert_map`), None for an original model;
    n_experts: {"<MoE layer>": experts in the result}.
    Pruning results get "expert_map" and, per layer, "kept_experts_original" / "dropped_experts_original";
    other results carry their input's map on, when it has one, for the next pruning run to compose.
    """
    pruning = _pruning(record)
    inputs = {k: len(v["kept_experts"]) + len(v["dropped_experts"]) if pruning else n_experts[k]
              for k, v in record["layers"].items()}
    if input_map is not None and {k: len(v) for k, v in input_map.items()} != inputs:
        logger.warning("the input's %s does not match its MoE layers (experts per layer %s, its expert_map %s): "
                       "the result's experts are numbered as in the input only", INFO_FILE, inputs,
                       {k: len(v) for k, v in input_map.items()})
        input_map = None
    if not pruning:
        if input_map is not None:
            record["expert_map"] = input_map
        return
    original = input_map or {k: list(range(n)) for k, n in inputs.items()}
    for k, layer in record["layers"].items():
        layer["kept_experts_original"] = [original[k][e] for e in layer["kept_experts"]]
        layer["dropped_experts_original"] = [original[k][e] for e in layer["dropped_experts"]]
    record["expert_map"] = {k: v["kept_experts_original"] for k, v in _layers(record)}


# ---- the summary ------------------------------------------------------------------------------


def _number(x: float | None, fmt: str = ".6g") -> str:
    return "-" if x is None else format(x, fmt)


def _per_rank(x, fmt: str) -> str:
    """A top-2 layer's one number, or a top-k layer's list (ranks 2..k)."""
    return ", ".join(format(v, fmt) for v in x) if isinstance(x, list) else format(x, fmt)


def _margin(layer: dict) -> float | None:
    """Loss of the next best candidate scored minus the best loss (None with fewer than two candidates)."""
    losses = sorted(layer.get("loss", {}).values())
    return losses[1] - losses[0] if len(losses) > 1 else None


def summary_rows(record: dict) -> tuple[list[str], list[list[str]]]:
    """(header, one row per MoE layer)."""
    if not _pruning(record):
        header = ["layer", "beta", "calibration skip rate"]
        return header, [[k, _per_rank(v["beta_median"], ".4f"),
                         _per_rank(v["calib_skip_rate"], ".3f") if "calib_skip_rate" in v else "-"]
                        for k, v in _layers(record)]
    renumbered = any(v.get("dropped_experts_original", v["dropped_experts"]) != v["dropped_experts"]
                     for v in record["layers"].values())  # the input was itself a pruned model
    header = ["layer", "dropped experts", *(["dropped (original numbering)"] if renumbered else []),
              "best loss", "margin to the next best"]
    rows = []
    for k, v in _layers(record):
        rows.append([k, ", ".join(map(str, v["dropped_experts"])),
                     *([", ".join(map(str, v["dropped_experts_original"]))] if renumbered else []),
                     _number(v.get("best_loss")), _number(_margin(v), ".4g")])
    return header, rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def summary_table(record: dict) -> str:
    """The summary as aligned text columns (numbers right-aligned), for the terminal."""
    header, rows = summary_rows(record)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, right)).rstrip()
                     for r in [header, *rows])


def markdown_table(record: dict) -> str:
    header, rows = summary_rows(record)
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


# ---- the model card ---------------------------------------------------------------------------


def input_license(folder: Path | None) -> str | None:
    """The `license` of the input folder's own model card: a result derived from its weights inherits it."""
    card = folder / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    parts = card.read_text().split("---", 2)
    try:
        meta = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _front_matter(record: dict, license: str | None) -> str:
    pruned = _pruning(record) or bool(record.get("expert_map"))
    skipping = record["args"]["method"] == "dynamic_skipping"
    meta = {"base_model": record["args"]["model_path"],
            **({"license": license} if license else {}),
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["moe", *(["expert-pruning"] if pruned else []), *(["dynamic-skipping"] if skipping else [])]}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _what_was_done(record: dict) -> str:
    args, calib = record["args"], record["calibration"]
    what, _, how = METHODS[args["method"]]
    source = {"self": "sampled from the model itself"}.get(args["calib_set"], args["calib_path"] or "its default file")
    lines = [f"- Method: `{args['method']}`, {what} ({PAPER}): {how}."]
    if _pruning(record):
        first = record["layers"][_layers(record)[0][0]]
        n = len(first["kept_experts"]) + len(first["dropped_experts"])
        lines.append(f"- Experts kept per MoE layer: r = {args['r']} of {n}.")
        searches = ", ".join(sorted({v["search"] for v in record["layers"].values()}))
        scored = sorted(v["n_evaluated"] for v in record["layers"].values() if "n_evaluated" in v)
        if not scored:  # a baseline: no candidate sets
            lines.append(f"- Selection: {searches}.")
        else:
            count = "all" if scored[-1] == scored[0] == first["n_candidates"] else f"{scored[0]} to {scored[-1]}"
            lines.append(f"- Search: {searches}; {first['n_candidates']} candidate drop sets per MoE layer, "
                         f"{count} of them scored.")
    lines.append(f"- Calibration: `--calib_set {args['calib_set']}` ({source}), {calib['n_blocks']} sequences of "
                 f"{calib['block_size']} tokens, seed {args['seed']}.")
    lines.append(f"- Command: `{record['command']}`" if "command" in record else "")
    lines.append(f"- Every decision, loss and setting: [`{INFO_FILE}`]({INFO_FILE}).")
    return "\n".join(filter(None, lines))


def _how_to_load(record: dict) -> str:
    if record["args"]["method"] == "dynamic_skipping":
        return f"""Dynamic skipping needs `load_model` from the project that made this folder (run from its root):

```python
from model import load_model

model, tokenizer = load_model("{FOLDER}")  # skipping on: model.dynamic_skipping.stats() gives skip rates
```

**The `betas` in config.json are ignored by plain transformers, the stock lm-eval (`--model hf`) and
vLLM**: they load this checkpoint as an ordinary model and send every token to all of its top-k
experts, without skipping. Evaluate it with `python eval/run_lm_eval.py --model_path {FOLDER} --tasks ...`
(lm-eval's own CLI with this project's `moe-skip` model type, which applies the betas and reports skip rates;
`accelerate launch` and `parallelize=True` work as with `--model hf`)."""
    return f"""A plain transformers checkpoint: transformers, lm-eval (`--model hf`) and vLLM load it as it is.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{FOLDER}")
tokenizer = AutoTokenizer.from_pretrained("{FOLDER}")
```

It has no `betas` (no dynamic skipping). Were some added by `python main.py --method dynamic_skipping`,
plain transformers, the stock lm-eval and vLLM would ignore them: skipping needs this project's
`from model import load_model`."""


def model_card(record: dict, license: str | None = None) -> str:
    """README.md of a result folder; `record` is its pruning_info.json, `license` the input's."""
    args = record["args"]
    what = METHODS[args["method"]][0]
    base = Path(args["model_path"].rstrip("/")).name
    title = f"{base}, {what}" + (f" to {args['r']} experts per MoE layer" if _pruning(record) else "")
    table = "Per MoE layer (decoder-layer index):" if _pruning(record) else "Per MoE layer: beta and the fraction " \
        "of calibration tokens that skip (w_j / w_1 < beta):"
    loss_note = ("\n\nLoss: the sum over calibration batches of the Frobenius norm of the difference between the "
                 "layer's original MoE output and the pruned one; the margin is how much worse the next best "
                 "candidate set scored." if _pruning(record) else "")
    return f"""{_front_matter(record, license)}
# {title}

`{args['model_path']}` after {what}.

## What was done

{_what_was_done(record)}

{table}

{markdown_table(record)}{loss_note}

## How to load it

{_how_to_load(record)}
"""
