"""One layer-by-layer runner for decoder-only models.

The first decoder layer's inputs are captured once (a forward pre-hook stops the model
right there), then each decoder layer in turn is moved to the compute device, run on
every calibration batch, and moved back. Host memory holds one set of hidden states
(batches x tokens x hidden) instead of every layer's activations, and the GPU holds one
layer at a time, so a model larger than the GPU can be calibrated on one GPU.
(The pattern of sparsegpt's `*_sequential` and llm-compressor's sequential pipeline.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import decoder_layers


@dataclass
class LayerBatch:
    """One calibration batch at the input of some decoder layer, kept on the offload device."""

    hidden: torch.Tensor  # (batch, seq, hidden)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the layer's other inputs (mask, positions, rotary)


class _Captured(Exception):
    pass


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def capture_io(module: nn.Module) -> Iterator[dict]:
    """Record the first positional input and the output of every forward of `module`.

    Yields a dict with lists 'inputs' and 'outputs'; the hook is removed on exit.
    """
    record: dict[str, list] = {"inputs": [], "outputs": []}

    def hook(_mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        record["inputs"].append(x.detach())
        record["outputs"].append((output[0] if isinstance(output, tuple) else output).detach())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


class LayerRunner:
    def __init__(self, model: nn.Module, device: torch.device | str, offload_device: torch.device | str = "cpu",
                 progress: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.offload = torch.device(offload_device)
        self.layers = decoder_layers(model)
        self.progress = progress

    @torch.no_grad()
    def capture(self, loader) -> list[LayerBatch]:
        """Inputs of decoder layer 0 for every batch of `loader` (dicts with 'input_ids')."""
        base = self.model.get_decoder()
        others = [m for name, m in base.named_children() if m is not self.layers]
        batches: list[LayerBatch] = []

        def pre_hook(_mod, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
            batches.append(LayerBatch(hidden.detach().to(self.offload), _to(kw, self.offload)))
            raise _Captured

        for m in others:
            m.to(self.device)
        handle = self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            for batch in tqdm(loader, desc="Embedding calibration batches", disable=not self.progress):
                try:
                    base(input_ids=batch["input_ids"].to(self.device), use_cache=False)
                except _Captured:
                    pass
                else:  # pragma: no cover - the hook always fires
                    raise RuntimeError("decoder layer 0 was never called")
        finally:
            handle.remove()
            for m in others:
                m.to(self.offload)
        return batches

    def iter_layers(self, desc: str) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer) with the layer on the compute device; it goes back afterwards."""
        for idx in tqdm(range(len(self.layers)), desc=desc, disable=not self.progress):
            layer = self.layers[idx]
            layer.to(self.device)
            try:
                yield idx, layer
            finally:
                layer.to(self.offload)

    @torch.no_grad()
    def forward(self, layer: nn.Module, batch: LayerBatch) -> LayerBatch:
        """Run `layer` on one batch; the output stays on the offload device."""
        out = layer(batch.hidden.to(self.device), **_to(batch.kwargs, self.device))
        out = out[0] if isinstance(out, tuple) else out
        return LayerBatch(out.to(self.offload), batch.kwargs)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
