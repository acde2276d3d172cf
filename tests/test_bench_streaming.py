"""scripts/bench_streaming.py at a CPU size: a random-weight sharded checkpoint, main.py streamed and in memory."""

from __future__ import annotations

import json

from conftest import load_script


def test_bench_streaming_runs_main_both_ways(tmp_path):
    bench = load_script("bench_streaming")
    out = tmp_path / "report.json"
    shrink = ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2"]
    args = ["--device", "cpu", "--layers", "2", "--n_blocks", "4", "--block_size", "64", "--batch_size", "2",
            *[a for s in shrink for a in ("--set", s)], "--shard_size", "200KB", "--work_dir", str(tmp_path / "work"),
            "--output", str(out)]
    extra = ["--extra", "--num_workers", "0"]
    assert bench.main([*args, "--runs", "stream:layerwise:6", "in_memory:layerwise:6", *extra]) == 0
    report = json.loads(out.read_text())
    assert report["checkpoint"]["shards"] > 1 and report["calibration"]["synthetic"]
    stream, memory = report["runs"]
    assert stream["loading"] == {"mode": "stream"} and memory["loading"]["mode"] == "in_memory"
    for run in (stream, memory):
        assert run["returncode"] == 0 and run["seconds_per_layer"] > 0 and run["peak_host_rss_gib"] > 0
        assert set(run["timing"]["layers"]) == {"0", "1"} and run["phases_s_per_layer_mean"]["expert_outputs"] > 0
    assert stream["layers"] == memory["layers"]  # the same decisions and losses, streamed or not
    assert stream["output_bytes"] > 0 and memory["output_bytes"] > 0
    assert not (tmp_path / "work" / "out_stream_layerwise_pruning_r6").exists()  # results deleted once measured
    # A second call reuses the checkpoint (the GPU machine keeps the git-ignored work folder between calls).
    assert bench.main([*args, "--runs", "stream:progressive:4", *extra]) == 0
    report = json.loads(out.read_text())
    assert report["checkpoint"]["reused"] and report["runs"][0]["layers"]["1"]["search"] == "exhaustive"
