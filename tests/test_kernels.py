"""The prepacked kernel path (kernels.py): the same maths as each module's own forward, on every
supported architecture; token ids equal to generate() on it; and the fallbacks that keep the
user's model in charge (hooks, wrapped projections, edited weights, eager)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import UsageError
from specbound_runtime.kernels import Kernels
from specbound_runtime.policy import ExitPolicy
from tiny_models import ARCHITECTURES, ScriptedDrafter, greedy_reference, tiny_model

PROMPT = [5, 9, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12]
FAST = ("llama", "qwen2", "qwen2-sliding", "qwen3", "mistral")  # the families with a compact forward


def _layer_outputs(lm: HFCausalLM, ids: list[int], extra: list[int]) -> list[torch.Tensor]:
    """Every layer's output over a prefill, then over a 3-position pass on top of it (a verification)."""
    outs = []
    with torch.inference_mode():
        cache = lm.new_cache(len(ids) + len(extra))
        for start, chunk in ((0, ids), (len(ids), extra)):
            hidden = lm.embed(chunk)
            for layer in range(lm.num_layers):
                hidden = lm.run_layer(layer, hidden, start, cache)
                outs.append(hidden.clone())
        outs.append(lm.final_logits(hidden))
    return outs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_forward_computes_what_each_module_computes(arch, one_thread):
    model = tiny_model(arch)
    kernels = Kernels(model, "onednn")
    expect_fast = arch in FAST
    assert kernels.report.fast_layers == (kernels.report.num_layers if expect_fast else 0)
    assert kernels.report.fast_head and kernels.report.extra_bytes > 0
    plain = _layer_outputs(HFCausalLM(model), PROMPT, [3, 4, 8])
    fast = _layer_outputs(HFCausalLM(model, kernels=kernels), PROMPT, [3, 4, 8])
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # rounding, not maths: a wrong step moves values by O(1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokens_on_the_fast_path_equal_generate(arch, one_thread):
    model = tiny_model(arch)
    lm = HFCausalLM(model, kernels=Kernels(model, "onednn"))
    ref = greedy_reference(model, PROMPT, 30, eos_token_id=None)
    assert list(generate(lm, PROMPT, 30, NoDrafter()).token_ids) == ref
    for right_rate in (1.0, 0.0, 0.5):
        drafter = ScriptedDrafter(ref, len(PROMPT), right_rate, width=4, seed=1)
        assert list(generate(lm, PROMPT, 30, drafter).token_ids) == ref, right_rate
    policy = ExitPolicy(lm.num_layers, (1, 2), (1.0, 1.0), (0.0, 0.0), lm.num_layers, 4)
    assert list(generate(lm, PROMPT, 30, Speculator.for_policy(policy)).token_ids) == ref


def test_a_hooked_module_runs_its_own_forward(one_thread):
    model = tiny_model("llama")
    calls = []
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: calls.append(1))
    kernels = Kernels(model, "onednn")
    assert kernels.layer(1) is None and kernels.layer(0) is not None
    generate(HFCausalLM(model, kernels=kernels), PROMPT, 3, NoDrafter())
    assert calls, "the hook must fire: that layer runs the module's own forward"


def test_a_hook_added_after_load_is_honoured(one_thread):
    model = tiny_model("llama")
    kernels = Kernels(model, "onednn")
    lm = HFCausalLM(model, kernels=kernels)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    generate(lm, PROMPT, 2, NoDrafter())
    assert calls and kernels.head is None


def test_a_wrapped_projection_runs_its_own_forward(one_thread):
    class Scaled(nn.Linear):  # what a PEFT or quantization wrapper looks like to the adapter
        def forward(self, x):
            return super().forward(x) * 2.0

    model = tiny_model("llama")
    old = model.model.layers[0].self_attn.o_proj
    wrapped = Scaled(old.in_features, old.out_features, bias=False)
    wrapped.load_state_dict(old.state_dict())
    model.model.layers[0].self_attn.o_proj = wrapped
    kernels = Kernels(model, "onednn")
    assert kernels.layer(0) is None
    ref = greedy_reference(model, PROMPT, 12, eos_token_id=None)
    assert list(generate(HFCausalLM(model, kernels=kernels), PROMPT, 12, NoDrafter()).token_ids) == ref


def test_weights_edited_after_load_are_used(one_thread):
    model = tiny_model("llama")
    lm = HFCausalLM(model, kernels=Kernels(model, "onednn"))
    before = list(generate(lm, PROMPT, 12, NoDrafter()).token_ids)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # in place
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().flip(0))  # replaced
    ref = greedy_reference(model, PROMPT, 12, eos_token_id=None)
    assert ref != before, "the edit must change the answer, or this test shows nothing"
    assert list(generate(lm, PROMPT, 12, NoDrafter()).token_ids) == ref


def test_eager_and_unsupported_settings_build_no_copies():
    model = tiny_model("llama")
    assert Kernels(model, "eager").report.extra_bytes == 0
    assert Kernels(model, "eager").layer(0) is None
    half = tiny_model("llama").to(torch.bfloat16)
    report = Kernels(half, "onednn").report
    assert report.path == "eager" and "bfloat16" in report.reason
    with pytest.raises(UsageError, match="unknown kernels 'fast'"):
        Kernels(model, "fast")


def test_auto_keeps_the_prepacked_copies_only_where_they_clearly_save_time():
    """A near tie goes to eager: the copies double the weights' memory, and a choice that timing
    noise flips would re-key the cost cache (a rerun would tune another artifact)."""
    from specbound_runtime.kernels import keep_prepacked

    assert keep_prepacked(0.0575, 0.1483)  # SmolLM2 on a 2-core CPU: 2.6x
    assert not keep_prepacked(0.0950, 0.1000)  # 5%: within noise
    assert not keep_prepacked(0.00005, 0.00010)  # a tiny model: half the time, but 0.05 ms
    assert not keep_prepacked(0.0012, 0.0010)  # slower
    assert keep_prepacked(0.0030, 0.0040)  # 25% and 1 ms


def test_auto_runs_a_tiny_model_eagerly(one_thread):
    model = tiny_model("llama")
    kernels = Kernels(model, "auto")
    assert kernels.path == "eager" and kernels.report.reason.startswith("eager: prepacked not clearly faster here")
