"""``kvq eval --generate``: agreement of greedy tokens with the unquantized model's.

Hand-built case: int8 scales of 1e6 round every K and V to 0, so attention adds nothing and each position's
logits depend on its own token only (no absolute positions in Llama): the quantized model is a bigram chain
``t -> g(t)``, with ``g`` read off a copy of the model whose value projection is zero. The reference is
transformers' own greedy ``generate``; agreement and the first difference are counted here by hand.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from bad_input import run_in_process, snapshot
from transformers import AutoModelForCausalLM

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.evaluation.generation import Agreement, generation_agreement
from kvq.evaluation.quant_cache import StaticQuantizer
from kvq.recipe.schema import load_recipe

N = 6


def test_agreement_counts_by_hand():
    a = Agreement()
    a.add([1, 2, 3, 4], [1, 2, 9, 4])  # 3 of 4 equal, first difference after 2 tokens
    a.add([5, 6, 7, 8], [5, 6, 7, 8])  # all equal: first difference "after 4"
    assert a.share == pytest.approx((0.75 + 1.0) / 2)
    assert a.first_difference == [2, 4]
    assert a.first_difference_mean == 3.0
    assert a.first_difference_stderr == pytest.approx(math.sqrt(((2 - 3) ** 2 + (4 - 3) ** 2) / 1 / 2))


@pytest.mark.timeout(600)
def test_destroyed_cache_flips_tokens_as_counted_by_hand(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    heads = model.config.num_key_value_heads
    coarse = LayerScales(torch.full((heads,), 1e6), torch.full((heads,), 1e6), torch.zeros(heads, dtype=torch.int32),
                         torch.zeros(heads, dtype=torch.int32))
    quantizer = StaticQuantizer(KVScales(load_recipe("int8-asym-per-head"), {i: coarse for i in range(layers)}))
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)  # (prompts, seqlen)

    result = generation_agreement(model, windows, N, 3, [quantizer])

    zero_v = copy.deepcopy(model)
    for layer in zero_v.model.layers:
        layer.self_attn.v_proj.weight.data.zero_()

    def g(t: int) -> int:
        return int(zero_v(input_ids=torch.tensor([[t]])).logits[0, -1].argmax())

    with torch.no_grad():
        for p, window in enumerate(windows):
            prompt = window[: 12 - N].unsqueeze(0)
            reference = model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                       pad_token_id=0)[0, 12 - N:].tolist()
            chain, t = [], int(prompt[0, -1])
            for _ in range(N):
                t = g(t)
                chain.append(t)
            same = [a == b for a, b in zip(reference, chain, strict=True)]
            assert result.reference[p] == reference
            assert result.rows[0].shares[p] == sum(same) / N
            assert result.rows[0].first_difference[p] == (same.index(False) if False in same else N)
    assert result.baseline.shares == [1.0, 1.0, 1.0]
    assert result.rows[0].share < 1.0  # the destroyed cache does flip tokens


@pytest.mark.timeout(600)
def test_eval_generate_table_json_and_bad_n(tiny_llama, tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = run_in_process(["eval", "--model", str(tiny_llama), "--dataset", "pydoc", "--scales",
                             str(tiny_artifacts["int8"]), "--samples", "2", "--seqlen", "16", "--generate", "4",
                             "--generate-prompts", "2", "--no-attention-error", "--json", str(out)], capsys)
    assert result.code == 0, result.stderr
    assert "same tokens / first diff (4 generated)" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["generation"]["tokens"] == 4 and doc["generation"]["prompts"] == 2
    base = doc["rows"][0]["generation"]
    assert base["agreement"] == 1.0 and base["first_difference_mean"] == 4.0
    assert 0.0 <= doc["rows"][1]["generation"]["agreement"] <= 1.0
    before = snapshot(tmp_path)
    bad = run_in_process(["eval", "--model", str(tiny_llama), "--dataset", "pydoc", "--seqlen", "16",
                          "--generate", "16"], capsys)
    assert bad.code == 2
    lines = bad.stderr.strip().splitlines()
    assert lines[0].startswith("kvq: error: --generate 16 leaves no prompt") and len(lines) <= 2
    assert snapshot(tmp_path) == before
    import kvq

    written = kvq.report(tiny_artifacts["int8"], eval_json=out, out=tmp_path / "report")
    text = next(p for p in written if p.name == "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| generation |"))
    assert "4 greedy tokens from 2 prompts" in row and "100.0% (first difference after 4.0" in row
