"""Streaming the checkpoint (model/streaming.py, --load): the same result as loading the whole model, in a
fraction of the host memory; a clean fall back where a checkpoint or method cannot stream.

The in-memory path (`--load in_memory`: from_pretrained, then save_pretrained) is the reference. Both run the
same library code on the same tensors (loading, conversion, layer forwards, saving), so the results compare
exactly: every output file byte for byte, every decision and loss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import main
from data import make_loader
from method import METHODS
from model.runner import KILL_AFTER_LAYER_ENV, LayerRunner
from model.streaming import LayerStream, NotStreamable

from conftest import DEMO, REPO, save_model, tiny_mixtral_config
from families import FAMILIES, family_config

TIMING = ("wall_time_s", "timing", "peak_host_rss_gib", "peak_gpu_allocated_gib", "resumed_layers")


def _args(method, model, c4_path, out, dtype, *extra, n_blocks=4, block=32):
    r = ["--r", "6"] if method.endswith("_pruning") else []
    return ["--method", method, *r, "--calib_set", "c4", "--calib_path", str(c4_path), "--model_path", str(model),
            "--output_path", str(out), "--max_block_size", str(block), "--n_blocks_for_stat", str(n_blocks),
            "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--dtype", dtype, *extra]


def _result(out: Path) -> tuple[Path, dict]:
    (result,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return result, json.loads((result / "pruning_info.json").read_text())


def _decisions(info: dict) -> dict:
    """pruning_info.json without what differs between two runs of the same work: times, memory, how it loaded
    (also in the recorded command line, which names --load)."""
    out = {k: v for k, v in info.items() if k not in (*TIMING, "loading", "command")}
    out["args"] = {k: v for k, v in info["args"].items() if k not in ("output_path", "load")}
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _family_model(family: str, tmp_path: Path, tokenizer_dir: Path) -> Path:
    if family == "demo":
        return DEMO
    config = tiny_mixtral_config(layers=3) if family == "mixtral" else family_config(family)
    return save_model(config, tmp_path / f"tiny-{family}", tokenizer_dir)


@pytest.mark.parametrize("family,method_name,dtype", [
    ("demo", "layerwise_pruning", "bfloat16"),  # tied embeddings
    ("demo", "progressive_pruning", "float32"),  # a bfloat16 checkpoint cast on load
    ("mixtral", "layerwise_pruning", "float32"),
    ("mixtral", "progressive_pruning", "bfloat16"),
    ("qwen2_moe", "layerwise_pruning", "bfloat16"),  # a gated shared expert
    ("qwen2_moe", "progressive_pruning", "float32"),
    ("deepseek_v3", "layerwise_pruning", "float32"),  # shared experts, a dense layer 0, a bias buffer, groups
    ("deepseek_v3", "progressive_pruning", "bfloat16"),
    ("gpt_oss", "layerwise_pruning", "bfloat16"),  # expert and router biases; names stored as the module's
    ("gpt_oss", "progressive_pruning", "float32"),
    ("qwen3_moe", "progressive_pruning", "bfloat16"),
    ("olmoe", "layerwise_pruning", "float32"),
    ("deepseek_v2", "progressive_pruning", "float32"),
    ("glm4_moe", "layerwise_pruning", "bfloat16"),
    ("phimoe", "progressive_pruning", "bfloat16"),  # a renamed router
    ("mixtral", "dynamic_skipping", "bfloat16"),  # every layer written unchanged, betas in the config
])
def test_streamed_run_writes_the_in_memory_result(family, method_name, dtype, tmp_path, c4_path, tokenizer_dir):
    model = _family_model(family, tmp_path, tokenizer_dir)
    for load in ("stream", "in_memory"):
        args = _args(method_name, model, c4_path, tmp_path / load, dtype, "--load", load,
                     n_blocks=2 if family == "demo" else 4)
        assert main.main(args) == 0
    streamed, streamed_info = _result(tmp_path / "stream")
    reference, reference_info = _result(tmp_path / "in_memory")
    assert streamed_info["loading"] == {"mode": "stream"}
    assert reference_info["loading"] == {"mode": "in_memory", "reason": "--load in_memory"}
    assert _decisions(streamed_info) == _decisions(reference_info)  # decisions, losses, betas: exactly
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in streamed.iterdir()) == files and "model.safetensors" in files
    for name in files:
        if name == "README.md":  # the model card quotes the command line, which names --load
            card = (streamed / name).read_text().replace("--load stream", "--load in_memory")
            assert card == (reference / name).read_text()
        elif name != "pruning_info.json":
            assert (streamed / name).read_bytes() == (reference / name).read_bytes(), name


def test_streamed_shards_load_with_plain_transformers(tmp_path, c4_path, tokenizer_dir):
    """A result larger than --max_shard_size: shards of whole layers and an index, the in-memory path's tensors."""
    model = save_model(tiny_mixtral_config(layers=4), tmp_path / "tiny-mixtral", tokenizer_dir)
    # A pruned layer (6 experts x 3 x 32 x 48 float32, attention, norms) is 0.12 MB, the embeddings and lm_head
    # 0.13 MB: no two of them fit in 200 kB, so each is a shard.
    for load in ("stream", "in_memory"):
        args = _args("progressive_pruning", model, c4_path, tmp_path / load, "float32", "--load", load,
                     "--max_shard_size", "200KB")
        assert main.main(args) == 0
    streamed, _ = _result(tmp_path / "stream")
    reference, _ = _result(tmp_path / "in_memory")
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) == 5
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        with safe_open(streamed / shard, "pt") as f:
            assert sorted(k for k, v in index["weight_map"].items() if v == shard) == sorted(f.keys())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(streamed).values())

    got, want = _tensors(streamed), _tensors(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    loaded = AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in expected.values())


def test_killed_streamed_run_resumes_to_the_in_memory_result(tmp_path, c4_path, tokenizer_dir):
    model = save_model(tiny_mixtral_config(layers=4), tmp_path / "tiny-mixtral", tokenizer_dir)
    # bfloat16 layers of 0.06 MB (0.08 MB unpruned) in shards of at most 100 kB: each is written when done
    args = _args("layerwise_pruning", model, c4_path, tmp_path / "out", "bfloat16", "--max_shard_size", "100KB")
    killed = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, KILL_AFTER_LAYER_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (staging,) = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in (staging / "layers").iterdir()) == ["0.json", "1.json"]
    assert list((staging / "result").glob(".shard-*.safetensors"))  # the killed run had written shards

    assert main.main(args) == 0  # streams again, writes every layer again
    resumed, resumed_info = _result(tmp_path / "out")
    assert resumed_info["resumed_layers"] == [0, 1] and resumed_info["loading"] == {"mode": "stream"}
    in_memory = _args("layerwise_pruning", model, c4_path, tmp_path / "ref", "bfloat16", "--max_shard_size", "100KB",
                      "--load", "in_memory")
    assert main.main(in_memory) == 0
    reference, reference_info = _result(tmp_path / "ref")
    assert _decisions(resumed_info) == _decisions(reference_info)
    got, want = _tensors(resumed), _tensors(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# Peak RSS of main() alone: the process's high-water mark (VmHWM) is reset to its current RSS after the imports
# (writing 5 to /proc/self/clear_refs), whose own peak would otherwise hide a smaller one.
_RSS_PROBE = """
import re, sys, main
def rss(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS")
rc = main.main(sys.argv[1:])
print("RSS", rc, before, rss("VmHWM"))
"""


def _peak_rss_growth(args: list[str]) -> int:
    """Peak RSS of a `main.py` run in a fresh process, in bytes, above what the process held before main()."""
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RSS ")), None)
    assert line is not None, done.stderr
    _, rc, before, after = line.split()
    assert rc == "0", done.stderr
    return (int(after) - int(before)) * 1024


# A model made large for the test: 16 layers of 8 experts of 512 x 2048 (48 MiB a layer in bfloat16), 780 MiB
# of weights in 100 MB shards. A run that streams it (result shards of 30 MB: each layer is written when done)
# holds one layer and the copies transformers makes while fusing its experts on load (about 3 layers' worth at
# the peak); a run that loads it holds all of it, and those copies for every layer. Both also hold what any run
# holds (the calibration data, the library code paged in by the first forwards: about 150 MiB here).
def test_a_model_larger_than_the_memory_budget_still_prunes(tmp_path, c4_path, tokenizer_dir):
    config = tiny_mixtral_config(layers=16, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                 num_key_value_heads=2)
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    big.save_pretrained(tmp_path / "big", max_shard_size="100MB")
    del big
    (tmp_path / "big" / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "big" / "tokenizer_config.json").write_bytes((tokenizer_dir / "tokenizer_config.json").read_bytes())
    weights = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    assert len(list((tmp_path / "big").glob("*.safetensors"))) >= 7 and weights > 700 * 2**20

    budget = weights // 2
    streamed = _peak_rss_growth(_args("layerwise_pruning", tmp_path / "big", c4_path, tmp_path / "stream",
                                      "bfloat16", "--max_shard_size", "30MB", n_blocks=2))
    in_memory = _peak_rss_growth(_args("layerwise_pruning", tmp_path / "big", c4_path, tmp_path / "in_memory",
                                       "bfloat16", "--load", "in_memory", n_blocks=2))
    print(f"weights {weights / 2**20:.0f} MiB; peak RSS growth: streamed {streamed / 2**20:.0f} MiB, "
          f"in memory {in_memory / 2**20:.0f} MiB")
    assert streamed < budget < in_memory
    (result, info) = _result(tmp_path / "stream")
    assert info["loading"] == {"mode": "stream"} and len(info["layers"]) == 16
    assert len(list(result.glob("model-*.safetensors"))) == 17  # each pruned layer is over 30 MB


# ---- where streaming does not apply -------------------------------------------------------------------------

def test_pickled_checkpoint_falls_back_to_memory_and_stream_refuses_it(tmp_path, c4_path, tokenizer_dir, capsys):
    model = save_model(tiny_mixtral_config(), tmp_path / "tiny-bin", tokenizer_dir)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()

    assert main.main(_args("layerwise_pruning", model, c4_path, tmp_path / "out", "float32")) == 0
    err = capsys.readouterr().err
    assert "loading the whole model into host memory: the weights are not safetensors (pytorch_model.bin)" in err
    _, info = _result(tmp_path / "out")
    assert info["loading"]["mode"] == "in_memory" and "not safetensors" in info["loading"]["reason"]

    assert main.main(_args("layerwise_pruning", model, c4_path, tmp_path / "refused", "float32", "--load",
                           "stream")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"main.py: error: --load stream cannot stream .*tiny-bin: the weights are not "
                                          r"safetensors \(pytorch_model.bin\).*; use --load in_memory", err[0])
    assert not (tmp_path / "refused").exists()


def test_reasons_to_load_into_memory(tmp_path, tokenizer_dir):
    model = save_model(tiny_mixtral_config(), tmp_path / "tiny", tokenizer_dir)
    config = AutoConfig.from_pretrained(model)
    cfg = main.parse_args(["--method", "reap_pruning", "--r", "6", "--calib_set", "c4", "--model_path", str(model)])
    assert main.plan_stream(cfg, model, config) == (None, "reap_pruning prunes the layers after its layer walk")
    cfg = main.parse_args(["--method", "layerwise_pruning", "--r", "6", "--calib_set", "self", "--model_path",
                           str(model)])
    assert main.plan_stream(cfg, model, config)[1] == "--calib_set self samples the calibration text from the " \
                                                      "whole model"
    cfg.calib_set = "c4"
    assert isinstance(main.plan_stream(cfg, model, config)[0], LayerStream)

    # A checkpoint that lacks a weight of the model (from_pretrained would initialise it at random).
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotStreamable, match=r"the checkpoint lacks 1 weights of the model .*, e.g. "
                                            r"model.layers.1.post_attention_layernorm.weight"):
        LayerStream.plan(model, config, torch.float32)
    config.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(NotStreamable, match=r"the checkpoint is quantized \(fp8\)"):
        LayerStream.plan(model, config, torch.float32)


def test_a_layer_changed_after_the_walk_is_not_written_stale(tmp_path, c4_path, tokenizer_dir):
    """frequency_pruning prunes after its walk (so it loads in memory); forced to stream, the save refuses."""
    model = save_model(tiny_mixtral_config(), tmp_path / "tiny", tokenizer_dir)
    cfg = main.parse_args(_args("frequency_pruning", model, c4_path, tmp_path / "out", "float32"))
    loader = make_loader(torch.randint(3, 500, (4, 16)), 2, 0)
    with LayerStream.plan(model, AutoConfig.from_pretrained(model), torch.float32).open(tmp_path / "result",
                                                                                       2**30) as stream:
        pruned, _ = METHODS["frequency_pruning"](stream.model, loader, cfg)
        with pytest.raises(RuntimeError, match="layer 0 changed after it was written out"):
            stream.save_weights(pruned, tmp_path / "result")
        runner = LayerRunner(stream.model, "cpu", progress=False)
        with pytest.raises(RuntimeError, match="layer 0 was already written out: a streamed model is walked once"):
            next(runner.iter_layers("again"))


@pytest.mark.parametrize("family", ["demo", *FAMILIES])
def test_direct_expert_read_equals_the_library_loader(family, tmp_path, tokenizer_dir, monkeypatch):
    """The fast path (per-expert tensors read straight into their slices of the fused tensor) loads exactly what
    transformers' own stack + concatenate gives, in the checkpoint's dtype and cast to another; families whose
    checkpoint stores per-expert tensors do take it (GPT-OSS stores the fused names: nothing to fuse)."""
    import model.streaming as streaming

    folder = _family_model(family, tmp_path, tokenizer_dir)
    config = AutoConfig.from_pretrained(folder)
    for dtype in (torch.bfloat16, torch.float32):
        loaded, fused = {}, {}
        for fast in (True, False):
            monkeypatch.setattr(streaming, "FAST_EXPERT_READ", fast)
            stream = LayerStream.plan(folder, config, dtype)
            stream.open(tmp_path / f"out-{fast}-{dtype}", 1 << 30)
            last = len(stream.layers) - 1  # DeepSeek's layer 0 is dense: the last layer is an MoE layer
            fused[fast] = sorted(stream._fused_targets(stream.units[last])[0])
            stream.load(last)
            loaded[fast] = stream.layers[last].state_dict()
        assert loaded[True].keys() == loaded[False].keys()
        for key, ref in loaded[False].items():
            got = loaded[True][key]
            assert got.dtype == ref.dtype and torch.equal(got, ref), key  # same bytes: exact
        assert all(loaded[True][k[len(f'model.layers.{last}.'):]].dtype == dtype for k in fused[True])
        if family == "gpt_oss":
            assert fused[True] == []
        else:
            assert any(k.endswith(("gate_up_proj", "down_proj")) for k in fused[True]), fused[True]


def test_bench_layer_read_times_both_paths(tmp_path, tokenizer_dir):
    folder = _family_model("mixtral", tmp_path, tokenizer_dir)
    out = tmp_path / "read.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_layer_read.py"), "--model_path", str(folder),
                    "--repeats", "1", "--output", str(out)], check=True, capture_output=True, text=True, cwd=REPO)
    result = json.loads(out.read_text())
    for name in ("direct", "library"):
        assert [r["layer"] for r in result["runs"][name]] == [0, 1, 2]
        assert all(r["bytes"] > 0 and r["seconds"] > 0 for r in result["runs"][name])
