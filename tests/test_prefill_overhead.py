"""benchmarks/prefill_overhead.py's mixed step (case c) runs what it claims, on e2e's tiny model
(eager, float32): its prefill rows give what those requests give prefilled alone, and its
decoding rows give what a plain decode step over their own past gives."""

import json

import pytest
import torch

from benchmarks import e2e, prefill_overhead
from mmlora_fx import zoo

from .peft_helpers import relative_error


def test_mixed_step_rows_equal_prefill_alone_and_decode_alone():
    model = e2e.build_model(e2e.TINY, torch.device("cpu"), torch.float32)
    inputs, own, rewind = prefill_overhead.case_inputs(model, e2e.TINY, "c", tiny=True, dtype=torch.float32)
    prefill, decoding = prefill_overhead.TINY_CASES["c"]
    past = prefill_overhead.TINY_PAST
    with torch.no_grad():
        rewind()
        mixed = model(**inputs).logits
        alone = e2e.prefill_batch(model, e2e.TINY, prefill)
        alone["pixel_values"] = alone["pixel_values"].float()
        expected = model(**alone, use_cache=False).logits
        assert relative_error(mixed[:prefill], expected) <= 1e-5

        # The decoding rows alone: their past copied into a cache of their own, one token each.
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=past + 1)
        ids = inputs["input_ids"][prefill:, -1:]
        step = dict(input_ids=ids, position_ids=torch.full((3, decoding, 1), past),
                    attention_mask=torch.ones(decoding, past + 1, dtype=torch.long), past_key_values=cache,
                    use_cache=True)
        model(**step)  # allocates the layers
        for mine, theirs in zip(cache.layers, inputs["past_key_values"].layers):
            mine.keys[:, :, :past] = theirs.keys[prefill:, :, :past]
            mine.values[:, :, :past] = theirs.values[prefill:, :, :past]
            mine.cumulative_length.fill_(past)
        decoded = model(**step).logits
        assert relative_error(mixed[prefill:, -1], decoded[:, -1]) <= 1e-5
    # Errors are taken where each request has its own query: all prefill positions, one decode token.
    assert own[:prefill].all() and own[prefill:, -1].all() and not own[prefill:, :-1].any()
    assert (inputs["input_ids"][prefill:, :-1] == zoo.PAD).all()


def test_merge_refuses_runs_of_different_settings(tmp_path):
    from benchmarks import prefill_runs

    def report(name, device="NVIDIA H100 80GB HBM3", **setup):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(commit=name, device=device, versions=dict(torch="2.11.0+cu130"),
                                        setup=dict(mode="reduce-overhead", fold_min_rows=512, **setup),
                                        runs=[dict(run=0, ms=1.0)])))
        return path

    flex, sdpa, flex_again = report("a", tower_attention="flex"), report("b", tower_attention="sdpa"), \
        report("c", tower_attention="flex")
    with pytest.raises(ValueError, match="tower_attention"):
        prefill_runs.merged([flex, sdpa], summarise=lambda runs: {})
    with pytest.raises(ValueError, match="device"):
        prefill_runs.merged([flex, report("d", device="NVIDIA H200", tower_attention="flex")], summarise=lambda runs: {})
    both = prefill_runs.merged([flex, flex_again], summarise=lambda runs: {"runs": len(runs)})
    assert [run["source_commit"] for run in both["runs"]] == ["a", "c"]
    assert both["summary"] == {"runs": 2}
