"""lm-eval model type `moe-skip`: lm-eval's own `hf` model plus this project's dynamic skipping.

Importing this module registers the type in lm-eval's model registry, so that

    lm_eval --model moe-skip --model_args pretrained=output/<run> ...

works wherever this module was imported first (`python -m eval.run_lm_eval ...` does that and then
runs lm-eval's own CLI). The checkpoint is loaded exactly as `--model hf` loads it (lm-eval's HFLM:
dtype, device, `parallelize=True`, `accelerate launch` data parallelism, peft, ... all as there); then,
when its config has `betas`, dynamic skipping is switched on (model/dynamic_skipping.py).
`skipping=False` in the model arguments evaluates the same checkpoint without it.

Skip rates: the router hooks count routed tokens and skipped expert slots on each process; after
each batch of requests every process's counters are gathered (one all-gather), and the totals over
all processes go into the results (`config.dynamic_skipping`: betas, tokens, skipped, skip_rate,
per layer and per process) and the log.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from model.dynamic_skipping import DynamicSkipping
from model.loading import check_checkpoint

MODEL_NAME = "moe-skip"
log = logging.getLogger("lm_eval.models.moe_skip")  # under lm-eval's logger: its CLI shows it like its own lines


@register_model(MODEL_NAME)
class MoESkipLM(HFLM):
    """lm-eval's HFLM with the checkpoint's `betas` applied (see the module docstring)."""

    def __init__(self, pretrained, skipping: bool = True, **kwargs):
        if isinstance(pretrained, str):
            # The path, the config and its betas, before lm-eval reads a weight (raises CheckpointError, BetasError).
            check_checkpoint(pretrained, skipping=skipping, **kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        model = self.model  # unwrapped when accelerate holds it
        self.dynamic_skipping: DynamicSkipping | None = getattr(model, "dynamic_skipping", None)  # load_model's
        if self.dynamic_skipping is None and hasattr(self.config, "betas"):
            self.dynamic_skipping = DynamicSkipping(model)
        if self.dynamic_skipping is not None:
            if skipping:
                self.dynamic_skipping.enable()
                if self.rank == 0:
                    devices = sorted({str(p.device) for p in model.parameters()})
                    log.info("dynamic skipping on: betas %s; model on %s", self.config.betas, ", ".join(devices))
            else:
                self.dynamic_skipping.disable()
        self._skip_counts: torch.Tensor | None = None  # (processes, MoE layers, [tokens, skipped]) once gathered

    @property
    def skipping(self) -> bool:
        return self.dynamic_skipping is not None and self.dynamic_skipping.enabled

    # ---- counting ---------------------------------------------------------------------------------
    def _local_counts(self) -> torch.Tensor:
        """(MoE layers, 2): this process's routed tokens and skipped slots per layer, in layer order."""
        layers = self.dynamic_skipping.stats()["layers"]
        return torch.tensor([[layers[k]["tokens"], layers[k]["skipped"]] for k in sorted(layers, key=int)],
                            dtype=torch.long)

    def _gather_counts(self) -> None:
        """Every process's counters, on every process: a collective, so each process calls it at the same point."""
        local = self._local_counts()
        if self.world_size > 1:
            gathered = self.all_gather(local.to(self.device)).cpu()  # concatenated along the first dimension
            self._skip_counts = gathered.view(self.world_size, *local.shape)
        else:
            self._skip_counts = local[None]

    def _run(self, method, requests, **kwargs):
        out = method(requests, **kwargs)
        if self.skipping:
            # lm-eval calls each request type on every process (padding the shorter ones), then waits for all.
            self._gather_counts()
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # `--batch_size auto` runs trial batches of dummy tokens: not evaluated tokens, so not counted.
        if not self.skipping:
            return super()._detect_batch_size(requests, pos)
        with self.dynamic_skipping.uncounted():
            return super()._detect_batch_size(requests, pos)

    # ---- reporting --------------------------------------------------------------------------------
    def skip_report(self) -> dict | None:
        """Skip rates over every process's tokens: totals, per MoE layer and per process; None without skipping."""
        if self.dynamic_skipping is None:
            return None
        if not self.skipping:
            return {"enabled": False, "betas": self.config.betas}
        counts = self._skip_counts if self._skip_counts is not None else self._local_counts()[None]
        names = sorted(self.dynamic_skipping.stats()["layers"], key=int)

        def rate(tokens: int, skipped: int) -> dict:
            return {"tokens": tokens, "skipped": skipped, "skip_rate": skipped / tokens if tokens else 0.0}

        total = counts.sum(dim=0)  # (layers, 2)
        return {"enabled": True, "betas": self.config.betas,
                **rate(*map(int, total.sum(dim=0))),
                "layers": {name: rate(*map(int, total[i])) for i, name in enumerate(names)},
                "processes": [rate(*map(int, c.sum(dim=0))) for c in counts]}

    def get_model_info(self) -> dict:
        """lm-eval puts this into results["config"] (on the first process, after the evaluation)."""
        info = super().get_model_info()
        report = self.skip_report()
        if report is not None:
            info["dynamic_skipping"] = report
            if report["enabled"]:
                log.info("dynamic skipping: skip rate %.2f%% (%d skipped expert slots over %d routed tokens, %d "
                         "process(es))", 100 * report["skip_rate"], report["skipped"], report["tokens"],
                         len(report["processes"]))
        return info
