"""One layer-by-layer runner for decoder-only models.

The inputs of the decoder layers are captured once: the first layer's hidden states and
every layer's own keyword inputs (attention masks differ between sliding-window and full
attention layers, e.g. GPT-OSS, Qwen2-MoE), by running the model with each layer's forward
temporarily replaced by a recording identity. Then each decoder layer in turn is moved to
the compute device, run on every calibration batch, and moved back. One set of hidden states
(batches x tokens x hidden) is kept instead of every layer's activations (a method holds two or
three such sets: the layer's inputs, its outputs, the pruned model's), on the GPU when they fit in
the states budget, else in page-locked host memory with the copies overlapped; the GPU holds one
layer at a time, so a model larger than the GPU is calibrated on one GPU. (The pattern of
sparsegpt's `*_sequential` and llm-compressor's sequential pipeline.)

Resume: with a `LayerJournal`, each finished layer's result (its decisions, losses, betas) is
written to disk when the method records it, and a method asks `runner.recorded(idx)` before
working on a layer. A killed run restarted with the same command gets its finished layers'
results back and only runs their forwards again (with their recorded decisions, no search) to
rebuild the hidden states entering the next layer; where the method's forward takes the MoE output from
its search's expert outputs (method/pruning.py: scored_forward), the replay computes those same expert
outputs, without scoring, so that the states are the same bits. States are not stored: one forward per
finished layer is far cheaper than writing every layer's states (2-4 GiB for Mixtral-8x7B
at the paper's 128 x 2048 tokens) to disk, and re-running the same kernels on the same inputs
gives the same states, so the resumed run ends exactly as an uninterrupted one would.

Streaming: when the model belongs to an open `model.streaming.LayerStream` (its decoder layers still on
the meta device), `iter_layers` reads each layer from the checkpoint as the walk reaches it, and writes it
out and frees it once the walk moves on (the method asked for the next layer, so this one is finished).
A method therefore changes a layer only while it holds it, and walks the layers once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import profiling
from .adapters import decoder_layers
from .streaming import stream_of

logger = logging.getLogger(__name__)


@dataclass
class LayerBatch:
    """One calibration batch at the input of some decoder layer, on the compute device or in host memory
    (`LayerRunner.states_device`)."""

    hidden: torch.Tensor  # (batch, seq, hidden)
    # Keyword inputs of every decoder layer for this batch (mask, positions, rotary), shared by all
    # states of the batch; tensors that layers share are stored once.
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    # Host states written from the GPU asynchronously: recorded when the copy into `hidden` is done.
    ready: Any = None


_DROP_KWARGS = ("past_key_values", "use_cache", "hidden_states")


def _sizes(obj: Any, seen: dict[int, int]) -> None:
    """Bytes of the distinct tensors in nested containers, into seen[id(tensor)]."""
    if isinstance(obj, torch.Tensor):
        seen[id(obj)] = obj.nbytes
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _sizes(o, seen)
    elif isinstance(obj, dict):
        for o in obj.values():
            _sizes(o, seen)


def _to(obj: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """Move tensors in nested containers; `memo` keeps shared tensors shared."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
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


# Tests only: the runner's progress step kills this process (SIGKILL) once this layer is finished.
KILL_AFTER_LAYER_ENV = "MOE_PRUNING_TEST_KILL_AFTER_LAYER"


class LayerJournal:
    """Finished layers' results of one run, a JSON file per layer in `folder`, for resuming it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _file(self, idx: int) -> Path:
        return self.folder / f"{idx}.json"

    def get(self, idx: int) -> dict | None:
        f = self._file(idx)
        return json.loads(f.read_text()) if f.exists() else None

    def put(self, idx: int, info: dict) -> None:
        """Write atomically (a temporary file renamed over the target): a kill leaves the old or the new file."""
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / f".{idx}.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(info))  # floats round-trip exactly (repr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file(idx))

    def finished(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(f.stem) for f in self.folder.glob("*.json"))


# The journal of the run in progress: main.py sets it around the method call (`journaling`), so that every
# method keeps the registry's one signature fn(model, calib_loader, args) and its runner records layers.
_JOURNAL: ContextVar[LayerJournal | None] = ContextVar("layer_journal", default=None)


@contextmanager
def journaling(journal: LayerJournal | None) -> Iterator[None]:
    """Runners created inside record finished layers in `journal` and replay what it already holds."""
    token = _JOURNAL.set(journal)
    try:
        yield
    finally:
        _JOURNAL.reset(token)


def default_budget(device: torch.device) -> int | None:
    """Bytes of a GPU's memory a run gives the calibration states, and as much to the beam search's
    statistics, unless told otherwise: a quarter of its memory each (None on the CPU: no limit)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory // 4


def budget_bytes(gib: float | None, device: torch.device) -> int | None:
    """A --*_budget_gib flag in bytes (None: `default_budget`)."""
    return default_budget(device) if gib is None else int(gib * 2**30)


class LayerRunner:
    """states_budget: bytes of compute-device memory for the calibration states (None: `default_budget`). The
    states (every batch's hidden states entering the current layer) live on the compute device when `copies`
    sets of them fit in it (see `capture`), else in host memory, page-locked on a GPU, where each batch is
    copied to the GPU while the previous one computes (`each`) and written back asynchronously."""

    def __init__(self, model: nn.Module, device: torch.device | str, offload_device: torch.device | str = "cpu",
                 progress: bool = True, journal: LayerJournal | None = None, states_budget: int | None = None):
        self.model = model
        self.device = torch.device(device)
        self.offload = torch.device(offload_device)
        self.states_device = self.offload  # decided by `capture`
        self.states_budget = default_budget(self.device) if states_budget is None else states_budget
        self.layers = decoder_layers(model)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.progress = progress
        self.journal = journal if journal is not None else _JOURNAL.get()
        self.stream = stream_of(model)  # None: every weight is in memory
        self.profile = profiling.current() or profiling.Profile(self.device)
        # GPU with host states: copies between host and device run on this side stream.
        self._copy_stream = None
        self._prefetched: dict[int, tuple[LayerBatch, torch.Tensor, Any]] = {}

    def recorded(self, idx: int) -> dict | None:
        """Layer idx's result as recorded by an earlier, killed run of the same command; None to compute it."""
        return self.journal.get(idx) if self.journal is not None else None

    def record(self, idx: int, info: dict) -> None:
        """Layer idx's result (JSON-serialisable): kept for a resumed run."""
        if self.journal is not None:
            self.journal.put(idx, info)

    @torch.no_grad()
    def capture(self, loader, copies: int = 2) -> list[LayerBatch]:
        """Layer-0 hidden states and every layer's keyword inputs, for every batch of `loader`.

        copies: how many sets of states the method holds at once (layerwise: the states entering the layer and
        those leaving it; progressive: also the pruned model's). They stay on the compute device when that many
        sets, and the keyword inputs, fit in `states_budget` (estimated from the first batch), else in host
        memory."""
        with self.profile.capture():
            return self._capture(loader, copies)

    def _capture(self, loader, copies: int) -> list[LayerBatch]:
        base = self.model.get_decoder()
        others = [m for m in base.children() if m is not self.layers]
        batches: list[LayerBatch] = []
        current: dict = {}

        def recorder(idx: int):
            def forward(hidden_states, *args, **kwargs):
                if args:
                    raise TypeError("decoder layers are expected to take keyword inputs besides hidden_states")
                if idx == 0:
                    current["hidden"] = hidden_states.detach()
                current["kwargs"][idx] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
                return hidden_states  # identity: the layer itself does not run
            return forward

        for m in others:
            m.to(self.device)
        try:
            for idx, layer in enumerate(self.layers):
                layer.forward = recorder(idx)  # instance attribute, deleted below
            for batch in tqdm(loader, desc="Embedding calibration batches", disable=not self.progress):
                current.update(kwargs=[None] * len(self.layers))
                base(input_ids=batch["input_ids"].to(self.device), use_cache=False)
                if not batches:
                    self._place_states(current, len(loader) if hasattr(loader, "__len__") else None, copies)
                memo: dict = {}
                stored = self._store(current["hidden"])
                batches.append(LayerBatch(stored.hidden, [_to(kw, self.states_device, memo) for kw in current["kwargs"]],
                                          ready=stored.ready))
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)
            for m in others:
                m.to(self.offload)
        return batches

    def _place_states(self, first: dict, n_batches: int | None, copies: int) -> None:
        """On the compute device if `copies` sets of states and the keyword inputs fit in the budget."""
        self.states_device = self.offload
        if self.device.type != "cuda" or n_batches is None:
            return
        seen: dict[int, int] = {}
        _sizes(first["kwargs"], seen)
        need = n_batches * (copies * first["hidden"].nbytes + sum(seen.values()))
        if self.states_budget is None or need <= self.states_budget:
            self.states_device = self.device
        else:
            self._copy_stream = torch.cuda.Stream(self.device)
        logger.info("calibration states (%d sets of %.2f GiB) in %s memory (budget %s)", copies,
                    n_batches * first["hidden"].nbytes / 2**30,
                    "GPU" if self.states_device == self.device else "page-locked host",
                    "none" if self.states_budget is None else f"{self.states_budget / 2**30:.1f} GiB")

    # ---- states between host and device --------------------------------------------------------------------

    def _host_pinned(self) -> bool:
        return self._copy_stream is not None

    def _store(self, out: torch.Tensor) -> LayerBatch:
        """A layer output as a state: kept where states live (the hidden field only; the caller adds kwargs)."""
        if self.states_device == out.device:
            return LayerBatch(out)
        if not self._host_pinned():
            return LayerBatch(out.to(self.states_device))
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        main = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(main)  # `out` is computed
        with torch.cuda.stream(self._copy_stream):
            host.copy_(out, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        out.record_stream(self._copy_stream)  # not reused by the main stream before the copy is done
        return LayerBatch(host, ready=ready)

    def prefetch(self, batch: LayerBatch) -> None:
        """Start copying a host state to the GPU on the side stream (`forward` then uses the copy)."""
        if not self._host_pinned() or batch.hidden.device == self.device or id(batch) in self._prefetched:
            return
        with torch.cuda.stream(self._copy_stream):
            if batch.ready is not None:
                self._copy_stream.wait_event(batch.ready)
            hidden = batch.hidden.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        hidden.record_stream(torch.cuda.current_stream(self.device))
        self._prefetched[id(batch)] = (batch, hidden, done)

    def each(self, batches: list[LayerBatch]) -> Iterator[LayerBatch]:
        """The batches in order, each one's successor copied to the GPU meanwhile (host states on a GPU)."""
        try:
            for i, batch in enumerate(batches):
                if i + 1 < len(batches):
                    self.prefetch(batches[i + 1])
                yield batch
        finally:
            self._prefetched.clear()

    def _fetch(self, batch: LayerBatch) -> torch.Tensor:
        entry = self._prefetched.pop(id(batch), None)
        if entry is not None and entry[0] is batch:
            torch.cuda.current_stream(self.device).wait_event(entry[2])
            return entry[1]
        if batch.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(batch.ready)
        return batch.hidden.to(self.device, non_blocking=self._host_pinned())

    def iter_layers(self, desc: str) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer) with the layer on the compute device; it goes back afterwards (streamed: it is
        read from the checkpoint first, and written out and freed afterwards)."""
        kill_after = os.environ.get(KILL_AFTER_LAYER_ENV)
        phase = self.profile.phase
        for idx in tqdm(range(len(self.layers)), desc=desc, disable=not self.progress):
            layer = self.layers[idx]
            with self.profile.layer(idx):
                with phase("load"):
                    if self.stream is not None:
                        self.stream.load(idx)
                    layer.to(self.device)
                try:
                    yield idx, layer
                finally:
                    with phase("save"):
                        layer.to(self.offload)
                # Progress step: the caller asked for the next layer, so this one is finished.
                with phase("save"):
                    if self.stream is not None:
                        self.stream.store(idx)
            if kill_after is not None and idx == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)

    @torch.no_grad()
    def forward(self, layer: nn.Module, batch: LayerBatch) -> LayerBatch:
        """Run `layer` on one batch; the output is kept where the states live."""
        phase = self.profile.phase
        with phase("transfer"):
            kwargs = batch.layer_kwargs[self._index[id(layer)]]
            hidden = self._fetch(batch)
            kwargs = _to(kwargs, self.device, {})
        with phase("forward"):
            out = layer(hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
        with phase("transfer"):
            stored = self._store(out)
        return LayerBatch(stored.hidden, batch.layer_kwargs, ready=stored.ready)

    def forward_all(self, layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
        """`forward` on every batch, each one's successor copied to the GPU meanwhile (`each`)."""
        return [self.forward(layer, b) for b in self.each(batches)]


def layer_runner(model: nn.Module, args) -> LayerRunner:
    """The runner of a method call: args.device, and args.states_budget_gib (main.RunConfig) when it has one."""
    device = torch.device(args.device)
    return LayerRunner(model, device, states_budget=budget_bytes(getattr(args, "states_budget_gib", None), device))
