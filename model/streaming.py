"""Stream a checkpoint through the layer walk: host memory holds one decoder layer's weights, not the model's.

`LayerStream.plan` builds the model on the meta device (no weights) and checks, reading only the safetensors
headers, that transformers' own loading code maps the checkpoint onto it one decoder layer at a time.
`open` then loads the weights outside the decoder layers (embeddings, final norm, lm_head) and computes the
buffers transformers computes at load (rotary inv_freq); from there `model.runner.LayerRunner.iter_layers`
loads each decoder layer from the shards when the walk reaches it (`load`) and, when the walk moves on,
hands its (pruned) tensors to the output and frees them (`store`). `save_weights` is the weight writer of
`model.checkpoint.save_checkpoint`.

Same tensors as `from_pretrained` + `save_pretrained`, through the same library code: each layer's tensors
go through `convert_and_load_state_dict_in_model`, the function `from_pretrained` runs on the whole checkpoint
(its renamings and conversions, e.g. per-expert `w1`/`w3` tensors fused into `gate_up_proj`, dtype casts),
with the conversion list `from_pretrained` uses; the output goes through `remove_tied_weights_from_state_dict`
and `revert_weight_conversion` as in `save_pretrained`, so it keeps the input's (hub) names. transformers 5.x
`save_pretrained` writes those hub names (it reverts its conversions), so the checkpoints of 8 of the 9
supported families store per-expert tensors that must be fused on load; only GPT-OSS stores the module's own
names (docs/streaming.md). Every conversion transformers has for these families acts within one decoder layer.

One shortcut: a fused expert tensor whose conversion is the library's stack (MergeModulelist) or stack then
concatenate (Concatenate, dim 1) is filled by reading each per-expert tensor from its shard straight into its
slice (`_load_fused`): the library's loader reads each into a new buffer, stacks and concatenates, three copies
of the layer in fresh memory where this makes one. Which key lands where still comes from the library
(`rename_source_key`, the converter's patterns, its `dot_natural_key` order); tests compare both paths tensor for
tensor on every family.

Output: shards of at most `max_shard_bytes` made of whole layers (a layer larger than that is a shard of its
own), each written as soon as the next layer might not fit in it, so host memory holds at most one shard of
finished layers. A result that fits in
one shard is `model.safetensors`, written by the same `safetensors` call on the same tensors as
`save_pretrained`: the same bytes. Larger results are `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`, as `save_pretrained` names them (its shard boundaries fall between tensors,
ours between layers).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import _getdtype, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.modeling_utils import LoadStateDictConfig, remove_tied_weights_from_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from cli import available_cpus

from .adapters import decoder_layers

logger = logging.getLogger(__name__)

REST = -1  # the unit of the weights outside the decoder layers; layer i is unit i
_SHARD_METADATA = {"format": "pt"}  # what save_pretrained writes into every shard of an unquantized model
# Read per-expert checkpoint tensors straight into their slices of the fused expert tensors (one copy) instead of
# through the library's stack + concatenate (three); tests switch it off to compare with the library's path.
FAST_EXPERT_READ = True


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator returns memory its own way
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_freed_memory() -> None:
    """Return the freed heap memory to the OS. glibc serves allocations under its mmap threshold (which rises up
    to 32 MB as large blocks are freed) from heaps it returns only when asked: a layer's per-expert tensors of a
    few MB (e.g. Qwen3-30B-A3B's 3 MB) and the conversion's copies would otherwise stay with the process, layer
    after layer."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{key: (dtype name, shape, first byte, end byte)} of a safetensors file, from its header (the format: an
    8-byte little-endian header length, a JSON header of each tensor's dtype, shape and data offsets relative
    to the end of the header, then the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _read_into(fd: int, offset: int, out: torch.Tensor) -> None:
    """Read out.nbytes bytes of the file at `offset` straight into the (contiguous, CPU) tensor `out`."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done} of a safetensors shard")
        done += n


def _fusion(converter: WeightConverter) -> str | None:
    """'stack' for [MergeModulelist(0)], 'stack+cat' for [MergeModulelist(0), Concatenate(1)] (the two fused-expert
    layouts of the supported families, read by `LayerStream._load_fused`), None for anything else."""
    ops = list(converter.operations)
    if len(converter.target_patterns) != 1 or not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return "stack"
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim == 1:
        return "stack+cat"
    return None


class NotStreamable(Exception):
    """Why a checkpoint cannot be streamed (the run then loads it into host memory, or stops on --load stream)."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{checkpoint key: safetensors file} of the weights `from_pretrained` reads from `folder`."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    stored = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".msgpack"))
    raise NotStreamable(f"the weights are not safetensors ({', '.join(stored) or 'no weight files'}); streaming "
                        f"reads tensors one at a time from safetensors shards")


@contextmanager
def _quiet_progress():
    """transformers' "Loading weights" bar is per call here, i.e. per layer: switched off for the loads."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _persistent_tensors(module: nn.Module):
    """(owner module, name, tensor) of every parameter and persistent buffer below `module`: its state dict."""
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                yield owner, name, p
        for name, b in owner._buffers.items():
            if b is not None and name not in owner._non_persistent_buffers_set:
                yield owner, name, b


class _Shards:
    """Output shards filled with whole units, each written as soon as the next unit might not fit in it (so that
    finished layers do not wait in memory while the next one is loaded and processed)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []  # (temporary file, keys, bytes)

    def add(self, tensors: dict[str, torch.Tensor], next_bytes: int) -> None:
        """Add a unit; `next_bytes` bounds the size of the unit that comes next (0: none)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        if self.pending_bytes + next_bytes > self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.written) + 1:05d}.safetensors"  # renamed once the count is known
        save_file(self.pending, path, metadata=_SHARD_METADATA)
        self.written.append((path, sorted(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_parameters: int) -> None:
        if self.pending:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.folder / SAFE_WEIGHTS_NAME)
            return
        n = len(self.written)
        weight_map = {}
        for i, (path, keys, _) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_parameters": total_parameters,
                              "total_size": sum(size for _, _, size in self.written)},
                 "weight_map": weight_map}
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# The stream the runner of a model uses: registered while the stream is open (`with stream:`).
_ACTIVE: dict[int, "LayerStream"] = {}


def stream_of(model: nn.Module) -> "LayerStream | None":
    """The open stream that `model` belongs to, or None when its weights are in memory."""
    return _ACTIVE.get(id(model))


class LayerStream:
    """A model whose decoder layers live in the checkpoint until the layer walk reaches them.

    plan(...) -> stream (meta skeleton, checked); stream.open(out_dir) loads the weights outside the decoder
    layers; `with stream:` makes LayerRunner load and store the layers; stream.save_weights(model, out_dir)
    writes the rest and the index.
    """

    def __init__(self, model, files: dict[str, Path], units: dict[int, list[str]], weight_mapping: list,
                 dtype: torch.dtype, missing: set[str]):
        self.model = model
        self.files, self.units = files, units
        self.weight_mapping, self.dtype = weight_mapping, dtype
        self._missing = missing  # module keys the checkpoint lacks: tied ones, filled by tie_weights
        self.layers = decoder_layers(model)
        self.prefix = next(name for name, m in model.named_modules() if m is self.layers)
        self.stored: dict[int, dict[str, tuple]] = {}  # layer -> {key: (shape, dtype)} as written
        # Bytes each layer writes at most (unpruned, in the load dtype): when the next one may not fit in the
        # shard being filled, the shard is written before that layer is loaded.
        self.layer_bytes = [sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                            for layer in self.layers]
        self.shards: _Shards | None = None
        self._layouts: dict[Path, dict] = {}  # safetensors headers, read when first needed
        # checkpoint key -> (module key it loads into, the converter source pattern it matched or None), by `_units`
        self._renamed: dict[str, tuple[str, str | None]] = {}

    # ---- planning: meta device only ------------------------------------------------------------
    @classmethod
    def plan(cls, folder: str | Path, config, dtype: torch.dtype, **model_kwargs) -> "LayerStream":
        """Build the skeleton and map the checkpoint onto it, reading only the safetensors headers.

        model_kwargs: from_config's (e.g. attn_implementation). Raises NotStreamable with the reason.
        """
        folder = Path(folder)
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
                getattr(quantization, "quant_method", "?")
            raise NotStreamable(f"the checkpoint is quantized ({method}): transformers dequantizes it while loading "
                                f"the whole model")
        files = checkpoint_files(folder)
        config = copy.deepcopy(config)  # from_config writes the dtype into it
        config.name_or_path = str(folder)  # as from_pretrained sets it
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
        model.eval()
        weight_mapping = get_model_conversion_mapping(model)  # what from_pretrained uses (no key_mapping, unquantized)

        shapes: dict[str, torch.Tensor] = {}  # the checkpoint as meta tensors: its header, no data
        for path in sorted(set(files.values())):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    if key in files and files[key] == path:
                        s = f.get_slice(key)
                        shapes[key] = torch.empty(s.get_shape(), dtype=_getdtype(s.get_dtype()), device="meta")
        missing_keys = set(files) - set(shapes)
        if missing_keys:
            raise NotStreamable(f"the weight index names {len(missing_keys)} tensors its shards lack, e.g. "
                                f"{sorted(missing_keys)[0]}")

        # Dry run of from_pretrained's loading on the meta device: the same renamings, conversions, shape checks.
        with _quiet_progress():
            info, _ = convert_and_load_state_dict_in_model(model, shapes, cls._load_config(model, weight_mapping,
                                                                                          dtype, "meta"))
        tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
        problems = [f"{len(info.conversion_errors)} weights fail transformers' conversion"
                    if info.conversion_errors else "",
                    f"{len(info.mismatched_keys)} weights have another shape than the model's, e.g. "
                    f"{sorted(info.mismatched_keys)[0][0]}" if info.mismatched_keys else "",
                    f"the checkpoint lacks {len(info.missing_keys - tied)} weights of the model (from_pretrained "
                    f"initialises them at random), e.g. {sorted(info.missing_keys - tied)[0]}"
                    if info.missing_keys - tied else ""]
        if any(problems):
            raise NotStreamable("; ".join(filter(None, problems)))
        if info.unexpected_keys:
            logger.info("%d checkpoint tensors are not weights of the model and are not read (from_pretrained "
                        "ignores them too), e.g. %s", len(info.unexpected_keys), sorted(info.unexpected_keys)[0])

        stream = cls(model, files, {}, weight_mapping, dtype, set(info.missing_keys))
        stream.units = stream._units(shapes)
        return stream

    @staticmethod
    def _load_config(model, weight_mapping: list, dtype: torch.dtype, device: str) -> LoadStateDictConfig:
        return LoadStateDictConfig(device_map={"": device}, dtype=dtype, dtype_plan=model._get_dtype_plan(dtype),
                                   weight_mapping=weight_mapping)

    def _units(self, shapes: dict[str, torch.Tensor]) -> dict[int, list[str]]:
        """{unit: checkpoint keys}: the unit of a key is that of the module weight it loads into, found by the
        renaming `convert_and_load_state_dict_in_model` applies (a converter's key: its first target)."""
        renamings = [t for t in self.weight_mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self.weight_mapping if isinstance(t, WeightConverter)]
        module_keys = self.model.state_dict()
        units: dict[int, list[str]] = {}
        for key in shapes:
            target, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix,
                                                module_keys)
            if target not in module_keys:
                target, pattern = key, None  # as the library does: a key the renamings miss may be the module's own
            if target not in module_keys:
                continue  # not a weight of the model: not read (reported above)
            self._renamed[key] = (target, pattern)
            units.setdefault(self._unit_of(target), []).append(key)
        return units

    def _unit_of(self, module_key: str) -> int:
        head = f"{self.prefix}."
        return int(module_key[len(head):].split(".", 1)[0]) if module_key.startswith(head) else REST

    # ---- loading and storing ----------------------------------------------------------------------
    def open(self, out_dir: str | Path, max_shard_bytes: int) -> "LayerStream":
        """Load everything outside the decoder layers; finished layers go to `out_dir` in shards of at most
        `max_shard_bytes`."""
        self.shards = _Shards(Path(out_dir), max_shard_bytes)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model = self.model
        # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: from_pretrained allocates them
        # on the CPU and has the model's own init compute them; the same here, while the weights are on meta.
        for name, buf in list(model.named_non_persistent_buffers()):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = torch.empty_like(buf, device="cpu")
        model.initialize_weights()
        self._load(REST)
        model.tie_weights(missing_keys=set(self._missing), recompute_mapping=False)  # lm_head to the embeddings
        self._check_loaded(REST)
        return self

    def _load(self, unit: int) -> None:
        keys = self.units.get(unit, [])
        if FAST_EXPERT_READ and hasattr(os, "preadv"):  # POSIX; elsewhere the library's loader reads everything
            fused, keys = self._fused_targets(keys)
            self._load_fused(fused)
        with ExitStack() as files, _quiet_progress():
            # pread: each tensor is read into memory, no mapping of the shard lingers in this process
            handles = {path: files.enter_context(safe_open(path, "pt", backend="pread"))
                       for path in sorted({self.files[k] for k in keys})}
            tensors = {k: handles[self.files[k]].get_slice(k) for k in keys}
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, self._load_config(
                self.model, self.weight_mapping, self.dtype, "cpu"))
        if info.conversion_errors or info.mismatched_keys:
            raise RuntimeError(f"loading {'layer ' + str(unit) if unit != REST else 'the embeddings'} failed: "
                               f"{info.conversion_errors or sorted(info.mismatched_keys)}")
        _release_freed_memory()  # the per-expert tensors fused into one (stack, concatenate) and their copies

    def _fused_targets(self, keys: list[str]) -> tuple[dict[str, tuple[str, list[list[str]]]], list[str]]:
        """Split a unit's checkpoint keys into fused expert tensors that `_load_fused` reads and the keys left to the
        library's loader: ({module key: (kind, per source pattern in the converter's order, the keys of experts
        0..n-1)}, other keys).

        A target qualifies when its converter is [MergeModulelist(0)] or [MergeModulelist(0), Concatenate(1)], every
        source pattern has the same number of tensors of one shape, and the stacked (and concatenated) shape and
        the load dtype are the module's; anything else goes through the library. The experts' order is the
        library's: it stacks the tensors in `dot_natural_key` order of their checkpoint keys."""
        by_pattern = {pattern: c for c in self.weight_mapping if isinstance(c, WeightConverter)
                      for pattern in c.source_patterns}
        groups: dict[str, dict[str, list[str]]] = {}
        rest = []
        for key in keys:
            target, pattern = self._renamed[key]
            if pattern is None or _fusion(by_pattern[pattern]) is None:
                rest.append(key)
            else:
                groups.setdefault(target, {}).setdefault(pattern, []).append(key)
        fused = {}
        for target, per_pattern in groups.items():
            converter = by_pattern[next(iter(per_pattern))]
            kind = _fusion(converter)
            patterns = list(converter.source_patterns)
            parts = [sorted(per_pattern.get(p, []), key=dot_natural_key) for p in patterns]
            shapes = [{self._layout(k)[1] for k in ks} for ks in parts]
            n = len(parts[0])
            ok = (set(per_pattern) == set(patterns) and all(len(ks) == n > 0 for ks in parts)
                  and all(len(sh) == 1 for sh in shapes) and (kind == "stack+cat" or len(parts) == 1))
            if ok:
                shapes = [next(iter(sh)) for sh in shapes]
                ok = all(len(sh) >= 1 and sh[1:] == shapes[0][1:] for sh in shapes)
            if ok:
                expected = ((n, *shapes[0]) if kind == "stack" else
                            (n, sum(sh[0] for sh in shapes), *shapes[0][1:]))
                owner, _, name = target.rpartition(".")
                param = self.model.get_submodule(owner)._parameters.get(name)  # None: a buffer
                ok = param is not None and tuple(param.shape) == expected and param.dtype == self.dtype
            if ok:
                fused[target] = (kind, parts)
            else:
                rest.extend(k for ks in per_pattern.values() for k in ks)
        return fused, rest

    def _layout(self, key: str) -> tuple[str, tuple[int, ...], int, int]:
        path = self.files[key]
        if path not in self._layouts:
            self._layouts[path] = safetensors_layout(path)
        return self._layouts[path][key]

    def _load_fused(self, fused: dict[str, tuple[str, list[list[str]]]]) -> None:
        """Fill the module weights of `fused` (`_fused_targets`' first result) from their per-expert tensors, each
        read from its shard straight into its slice: expert j of source pattern p is out[j] ("stack") or
        out[j, rows of p] ("stack+cat", the rows after those of the patterns before p, as Concatenate(dim=1) lays
        them out)."""
        if not fused:
            return
        jobs, params = [], []
        for target, (kind, parts) in fused.items():
            owner, _, name = target.rpartition(".")
            module = self.model.get_submodule(owner)
            old = module._parameters[name]
            out = torch.empty(tuple(old.shape), dtype=self.dtype)
            params.append((module, name, nn.Parameter(out, requires_grad=old.requires_grad)))
            row = 0
            for keys in parts:
                rows = self._layout(keys[0])[1][0]
                for j, key in enumerate(keys):
                    jobs.append((key, out[j] if kind == "stack" else out[j, row:row + rows]))
                row += rows
        fds = {}
        try:
            for path in {self.files[key] for key, _ in jobs}:
                fds[path] = os.open(path, os.O_RDONLY)

            def read(job):
                key, dst = job
                dtype_name, shape, start, end = self._layout(key)
                src_dtype = _getdtype(dtype_name)
                if end - start != torch.Size(shape).numel() * src_dtype.itemsize:
                    raise RuntimeError(f"{key}: its safetensors header gives {end - start} bytes for "
                                       f"{shape} {dtype_name}")
                if src_dtype == dst.dtype:
                    _read_into(fds[self.files[key]], start, dst)
                else:  # the library casts to the load dtype on read; the same, through a buffer
                    buf = torch.empty(shape, dtype=src_dtype)
                    _read_into(fds[self.files[key]], start, buf)
                    dst.copy_(buf)

            # preadv releases the GIL: the experts' tensors are read in parallel
            with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
                list(pool.map(read, jobs))
        finally:
            for fd in fds.values():
                os.close(fd)
        for module, name, param in params:
            module._parameters[name] = param

    def _check_loaded(self, unit: int) -> None:
        state = (self.model.state_dict() if unit == REST else
                 self.layers[unit].state_dict(prefix=f"{self.prefix}.{unit}."))
        left = [k for k, t in state.items() if t.device.type == "meta" and self._unit_of(k) == unit]
        if left:
            raise RuntimeError(f"{len(left)} weights were not loaded from the checkpoint, e.g. {left[0]}")

    def load(self, idx: int) -> None:
        """Decoder layer idx's weights from the checkpoint, on the CPU (the runner moves the layer on)."""
        if idx in self.stored:
            raise RuntimeError(f"layer {idx} was already written out: a streamed model is walked once (its layers "
                               f"are read from the checkpoint); use --load in_memory")
        self._load(idx)
        self._check_loaded(idx)

    def store(self, idx: int) -> None:
        """Hand decoder layer idx (finished, on the CPU) to the output, then free its weights (back to meta)."""
        layer = self.layers[idx]
        state = layer.state_dict(prefix=f"{self.prefix}.{idx}.")
        self.stored[idx] = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
        self._emit(state, self.layer_bytes[idx + 1] if idx + 1 < len(self.layers) else self._rest_bytes())
        for owner, name, t in list(_persistent_tensors(layer)):
            meta = t.to("meta")
            if isinstance(t, nn.Parameter):
                owner._parameters[name] = nn.Parameter(meta, requires_grad=t.requires_grad)
            else:
                owner._buffers[name] = meta
        _release_freed_memory()

    def _rest_state(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in self.model.state_dict().items() if self._unit_of(k) == REST}

    def _rest_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._rest_state().values())

    def _emit(self, state: dict[str, torch.Tensor], next_bytes: int) -> None:
        """save_pretrained's steps for one unit: tied copies out, ignored keys out, conversions reverted."""
        state = remove_tied_weights_from_state_dict(state, self.model)
        for key in self.model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        state = revert_weight_conversion(self.model, state)
        self.shards.add({k: t.contiguous() for k, t in state.items()}, next_bytes)

    # ---- the end ----------------------------------------------------------------------------------------
    def save_weights(self, model, out_dir: str | Path) -> None:
        """Weight writer of model.checkpoint.save_checkpoint: the weights outside the layers, the shard names and
        the index, and transformers 5.x's config.json and generation config (as save_pretrained writes them)."""
        if model is not self.model or Path(out_dir) != self.shards.folder:
            raise ValueError("a stream writes its own model into the folder it was opened on")
        unwritten = sorted(set(range(len(self.layers))) - set(self.stored))
        if unwritten:
            raise RuntimeError(f"layers {unwritten} were never reached by the layer walk, so never written")
        for idx, written in self.stored.items():
            now = {k: (tuple(t.shape), t.dtype) for k, t in self.layers[idx].state_dict(
                prefix=f"{self.prefix}.{idx}.").items()}
            if now != written:
                raise RuntimeError(f"layer {idx} changed after it was written out (a method that changes layers "
                                   f"after its layer walk cannot stream)")
        self._emit(self._rest_state(), 0)
        self.shards.finish(model.num_parameters())
        model.config.save_pretrained(out_dir)
        if model.can_generate():
            model.generation_config.save_pretrained(out_dir)

    def __enter__(self) -> "LayerStream":
        _ACTIVE[id(self.model)] = self
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.pop(id(self.model), None)
