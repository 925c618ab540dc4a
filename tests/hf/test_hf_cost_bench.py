"""`bench.hf_cost --quick` runs the transformers cost benchmark end to end on tiny models (a smoke test of the
path BENCHMARKS.md Part C was measured with) and writes its tables."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_run_writes_every_method_for_both_models(tmp_path):
    from bench import hf_cost

    results = hf_cost.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "hf_cost_quick.json").read_text())
    assert saved["models"].keys() == results["models"].keys() == {"hf_blip_retrieval", "llama"}
    llama = saved["models"]["llama"]
    assert "aurora cp R=4 d=64, dropout 0" in llama["vs_floor"] and "aurora cp R=4, dropout 0.1 on z" in llama["vs_floor"]
    assert llama["trainable"]["aurora cp R=4, dropout 0"] < llama["trainable"]["lora r=8 (peft), dropout 0"]
    assert all(ratio[0] > 0 for ratio in llama["vs_lora_dropout_0"].values())
    assert "| aurora cp R=4, dropout 0.1 on z |" in (tmp_path / "hf_cost_quick.md").read_text()
