"""Greedy decoding with a static KV cache, one decode step replayed from a CUDA graph.

`generate()` in transformers runs each decode step as hundreds of small kernel launches from
Python (~0.9 ms per Mixtral layer on an H200 at batch 1): the GPU mostly waits for the host.
`StaticDecoder` keeps every input of a decode step in fixed buffers (token ids, positions, a
4D attention mask, transformers' own `StaticCache`, which advances its length on the device),
captures one step once in a `torch.cuda.CUDAGraph` and replays it: one launch per token.
Everything on that path must stay on the device: the fused experts kernels and the skipping
kernel (model/kernels.py) are written for it; the skip counters are updated in place.

It produces exactly what `model.generate(do_sample=False, min_new_tokens=n, max_new_tokens=n)`
does (greedy, the banned token ids -- EOS -- never chosen) as long as the model's logits have
a clear top-1 margin (kernels of different shapes round differently): the tests and the GPU
check compare the tokens. With `graph=False` the same static loop runs eagerly (any device).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from transformers import StaticCache

from .compile_parts import compiled_parts


class StaticDecoder:
    def __init__(self, model: nn.Module, batch_size: int, max_len: int, graph: bool = True,
                 banned_token_ids: tuple[int, ...] = (), compile_parts: tuple[str, ...] = (),
                 compile_backend: str | Callable = "inductor"):
        self.model = model
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graph=False on the CPU")
        self.batch_size, self.max_len, self.use_graph = batch_size, max_len, graph
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        b, dev = batch_size, self.device
        # Decode-step inputs: fixed addresses, updated in place (inside the graph).
        self.input_ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.position_ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot of the token being fed
        self.mask = torch.zeros(b, 1, 1, max_len, dtype=torch.bool, device=dev)  # True = may attend
        self.banned = torch.tensor(list(banned_token_ids), dtype=torch.long, device=dev)
        self.out = torch.zeros(b, max_len, dtype=torch.long, device=dev)  # generated ids by cache slot
        self.graph: torch.cuda.CUDAGraph | None = None
        # Modules torch.compile'd for the decode step only (model/compile_parts.py): the prefill runs
        # eagerly (its shapes change with the prompt), the captured step replays inductor's kernels.
        self.compile_parts, self.compile_backend = tuple(compile_parts), compile_backend

    # ---- one step ---------------------------------------------------------------------------
    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) greedy ids, banned ids never chosen (generate's min_new_tokens)."""
        logits = logits.float()
        if self.banned.numel():
            logits = logits.index_fill(-1, self.banned, float("-inf"))
        return logits.argmax(dim=-1)

    def _step(self) -> None:
        """Feed input_ids at slot `pos`; leave the next token in input_ids and out[:, pos + 1]."""
        self.mask.index_fill_(-1, self.pos, True)
        logits = self.model(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.mask,
                            past_key_values=self.cache, use_cache=True).logits[:, -1, :]
        nxt = self._next_token(logits)
        self.pos.add_(1)
        self.out.index_copy_(1, self.pos, nxt.unsqueeze(1))
        self.input_ids.copy_(nxt.unsqueeze(1))
        self.position_ids.add_(1)

    def _capture(self) -> None:
        # Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture. The warm-up
        # steps write into the cache; `generate` resets everything before it decodes.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        state = [self.input_ids, self.position_ids, self.pos, self.mask, self.out]
        state += [layer.cumulative_length for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        saved = [t.clone() for t in state]
        with compiled_parts(self.model, self.compile_parts, self.compile_backend):
            with torch.cuda.stream(stream):
                for _ in range(2):  # the first one compiles
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, v in zip(state, saved):  # capturing does not run the step: this is the state it starts from
                t.copy_(v)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()

    # ---- generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[torch.Tensor, float]:
        """Greedy ids (B, max_new_tokens) for left-padded prompts (B, P); also the clock() after the prefill."""
        b, p = input_ids.shape
        if b != self.batch_size or p + max_new_tokens > self.max_len:
            raise ValueError(f"batch {b} x {p}+{max_new_tokens} tokens does not fit this decoder "
                             f"({self.batch_size} x {self.max_len})")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        self.cache.reset()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding, as generate
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        first = self._next_token(logits)
        t_first = clock()
        # Decode state: the prompt's real tokens visible, the first new token fed at slot p.
        self.mask.zero_()
        self.mask[:, 0, 0, :p] = attention_mask.bool()
        self.pos.fill_(p)
        self.position_ids.copy_(position_ids[:, -1:] + 1)
        self.input_ids.copy_(first.unsqueeze(1))
        self.out.zero_()
        self.out[:, p] = first
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            for _ in range(max_new_tokens - 1):
                self.graph.replay()
        else:
            with compiled_parts(self.model, self.compile_parts, self.compile_backend):
                for _ in range(max_new_tokens - 1):
                    self._step()
        return self.out[:, p:p + max_new_tokens].clone(), t_first


def greedy_agreement(out: torch.Tensor, ref: torch.Tensor, scores, margin: float, rel_margin: float = 0.0) -> dict:
    """Compare greedy tokens `out` (batch, n) of one implementation with `ref` (batch, n) of another, whose
    per-step logits are `scores` (n tensors of (batch, vocab), as `generate(output_scores=True)` returns them).

    Two implementations that differ only in float rounding may pick different tokens where the reference's top
    logits are within `margin + rel_margin * |top logit|` (a near-tie: either token is a correct greedy choice;
    the relative part follows the float format's spacing, e.g. 2 ** -6 = two bfloat16 steps) and part from there,
    so each sequence is compared up to the reference's first near-tie. Returns, per sequence: `steps_before_tie`
    (n if none), `equal_before_tie` (the tokens agree on those steps) and `tie_token_ok` (at the tie step `out`
    holds one of the tied tokens; None without a tie)."""
    logits = torch.stack([s.float() for s in scores], dim=1)  # (batch, n, vocab)
    top2 = logits.topk(2, dim=-1).values  # (batch, n, 2)
    slack = margin + rel_margin * top2[..., 0].abs()  # (batch, n)
    tie = (top2[..., 0] - top2[..., 1]) < slack  # (batch, n)
    n = tie.shape[1]
    result = {"steps_before_tie": [], "equal_before_tie": [], "tie_token_ok": []}
    for b in range(out.shape[0]):
        k = int(tie[b].int().argmax()) if bool(tie[b].any()) else n
        result["steps_before_tie"].append(k)
        result["equal_before_tie"].append(bool(torch.equal(out[b, :k].cpu(), ref[b, :k].cpu())))
        if k < n:
            step = logits[b, k]
            result["tie_token_ok"].append(bool(step[int(out[b, k])] >= step.max() - slack[b, k]))
        else:
            result["tie_token_ok"].append(None)
    return result


# The margin below which a greedy step counts as a tie (greedy_agreement's `margin`, `rel_margin`): two
# implementations of the same model that differ only in shapes (a static KV cache padded to its length against a
# growing one, a traced graph against eager modules) give logits that differ by float rounding, so where the
# reference's top two logits are that close either token is a correct greedy choice and the sequences may part.
# float32: rounding differences are ~1e-5 at the demo model's logit magnitude (<= 20), 1e-3 absolute leaves 100x
# room; bfloat16: its spacing is 2^-8..2^-7 of a value's magnitude (0.125 at 16-32), 2^-6 of the top logit is two
# of those steps. (The demo model has real near-ties: a top-two gap of 1e-4 in float32, exact ties in bfloat16.)
GREEDY_TIE_MARGIN = {torch.float32: (1e-3, 0.0), torch.bfloat16: (0.0, 2.0 ** -6)}


def greedy_reference(model, ids, mask, n):
    """transformers' `generate`, greedy, exactly n new tokens (EOS banned): (tokens (batch, n), per-step scores)."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        r = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                           eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True, output_scores=True)
    return r.sequences[:, ids.shape[1]:], r.scores
