"""Where a run's time goes, per decoder layer: `timing` in pruning_info.json.

Every run records the wall time of each decoder layer's step of the layer walk (reading it from the
checkpoint when streamed, its forwards, the method's work on it, writing it out) and of the capture of
the calibration states. With `--profile` it also splits each layer's time into phases:

    load            reading the layer from the checkpoint (streamed runs) and moving it to the device
    transfer        calibration states between host and device memory
    forward         the decoder layer's forward on the calibration batches (attention, norms, router,
                    the experts the scorer does not compute)
    expert_outputs  the experts' outputs the scorer computes (reused by the forward, see method/pruning.py)
    statistics      their inner products (method/search.py: token_stats) and the candidates' routing masks
    search          scoring the candidate drop sets and choosing
    save            writing the finished layer out (streamed runs) and moving it off the device
    other           the rest of the layer's time (Python, logging, bookkeeping)

Phases are exclusive: a phase entered inside another (the scorer runs inside the layer's forward, whose
experts module it replaces) stops the outer one's clock. GPU work is asynchronous, so a phase's wall time
means something only if the device is synchronised at its ends: with `--profile` every phase boundary
synchronises the compute device (a few hundred synchronisations per layer); without it nothing is
synchronised but once per layer, at its end, so that the layer times add up.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

PHASES = ("load", "transfer", "forward", "expert_outputs", "statistics", "search", "save")


class Profile:
    """Per-layer wall times and, when `phases` is on, their split into `PHASES`."""

    def __init__(self, device: torch.device | str | None = None, phases: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.phases = phases
        self.capture_s = 0.0
        self.layers: dict[int, dict] = {}
        self._stack: list[str] = []
        self._acc: dict[str, float] | None = None  # the current layer's phase seconds
        self._mark = 0.0

    def sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _now(self) -> float:
        return time.perf_counter()

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.sync()
        start = self._now()
        try:
            yield
        finally:
            self.sync()
            self.capture_s += self._now() - start

    @contextmanager
    def layer(self, idx: int) -> Iterator[None]:
        """One decoder layer's step of the walk; phases entered meanwhile are charged to it."""
        self.sync()
        start = self._mark = self._now()
        self._acc = dict.fromkeys(PHASES, 0.0) if self.phases else None
        self._stack = []
        try:
            yield
        finally:
            self.sync()
            total = self._now() - start
            entry = {"total_s": total}
            if self._acc is not None:
                entry["phases_s"] = {**self._acc, "other": max(0.0, total - sum(self._acc.values()))}
            self.layers[idx] = entry
            self._acc = None
            logger.info("layer %d: %s", idx, describe(entry))

    def phase(self, name: str):
        """Charge the time inside to `name` (exclusive of nested phases); a no-op without --profile or outside
        a layer."""
        if self._acc is None:
            return nullcontext()
        return self._phase(name)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def _switch(self) -> None:
        """A phase boundary: the time since the last one goes to the phase on top of the stack (if any)."""
        self.sync()
        now = self._now()
        if self._stack and self._acc is not None:
            self._acc[self._stack[-1]] += now - self._mark
        self._mark = now

    def report(self) -> dict:
        """The `timing` entry of pruning_info.json."""
        return {"profiled": self.phases, "capture_s": self.capture_s,
                "layers": {str(i): v for i, v in sorted(self.layers.items())},
                "layers_total_s": sum(v["total_s"] for v in self.layers.values())}


def describe(entry: dict) -> str:
    """'5.21 s (load 0.80, forward 1.10, ...)' for a layer's timing entry."""
    text = f"{entry['total_s']:.2f} s"
    if "phases_s" in entry:
        text += " (" + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in entry["phases_s"].items() if v) + ")"
    return text


# The profile of the run in progress: main.py sets it around the method call (`profiling`), so that every method
# keeps the signature fn(model, calib_loader, args) and its runner and searches report to it.
_PROFILE: ContextVar[Profile | None] = ContextVar("profile", default=None)


@contextmanager
def profiling(profile: Profile | None) -> Iterator[Profile | None]:
    token = _PROFILE.set(profile)
    try:
        yield profile
    finally:
        _PROFILE.reset(token)


def current() -> Profile | None:
    return _PROFILE.get()


def phase(name: str):
    """`with phase("search"):` charges the time inside to that phase of the current layer (see Profile.phase)."""
    profile = _PROFILE.get()
    return profile.phase(name) if profile is not None else nullcontext()
