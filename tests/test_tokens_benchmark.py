"""benchmarks/tokens.py runs at tiny sizes and writes its raw JSON (the GPU suite calls
``--part speed --arch llava --device cuda``)."""

from __future__ import annotations

import json

import pytest

from benchmarks import tokens as bench


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_speed_part_writes_json_and_prunes(arch, tmp_path):
    out = tmp_path / "speed.json"
    bench.main(["--part", "speed", "--arch", arch, "--quick", "--repeats", "1", "--warmup", "0",
                "--new-tokens", "2", "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert res["arch"] == arch and res["prompt"]["image"] == 144
    assert res["dart"]["kept_image_tokens"] == 4 + 8 * 2 and res["dart"]["tokens_after_k"] == 35 + 20 + 25
    for m in ("prefill", "total"):
        assert res["results"][m]["no_pruning_ms"] > 0 and res["results"][m]["dart_ms"] > 0
    if arch == "llava":
        assert res["vision_tower"]["model_type"] == "clip_vision_model"
