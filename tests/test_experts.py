"""Mixture-of-experts layers: a delta per expert on the fused expert weights, the soft mask and importance per expert
unit, save/load in a fresh process, merge, `delta_dtype`, the memory model (optimizer terms included), the authors'
estimator recipe on MoE and hybrid layers, and the refusals where a LoRA cannot express them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from families import tiny_config
from peft import get_peft_model
from sweep import _loader, _model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance, estimate_importance, set_importance
from cofitune_peft.architectures import model_layout
from cofitune_peft.experts import ExpertsLayer

HERE = os.path.dirname(__file__)
IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _train(pm, steps=2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    pm.train()
    for _ in range(steps):
        logits = pm(input_ids=IDS).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    return pm


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_each_expert_trains_its_own_delta_masked_per_expert_unit(family):
    base = _model(family)
    layout = model_layout(base)
    experts, units = layout.experts(), layout.widths()["expert_intermediate"]
    # an importance that protects expert 1's first intermediate unit in every layer, and nothing else
    inter = torch.zeros(layout.num_layers, experts, units)
    inter[:, 1, 0] = 1.0
    imp = Importance(
        expert_intermediate=inter, expert_output=torch.zeros(layout.num_layers, experts, 64), normalized=True
    )
    pm = get_peft_model(base, CoFiTuneConfig(parts="ffn", layers=(0, 4), importance=imp))
    layer = next(m for m in pm.modules() if isinstance(m, ExpertsLayer))
    gate_up = layer.params("default")[0] if "gate_up" in layer.params("default")[0] else layer.params("default")[1]
    scale = layer.cofitune_scale["default"].get(gate_up)  # [experts, rows]
    rows = layer.cofitune_rows["default"].get(gate_up)
    assert scale.shape[0] == experts and torch.equal(rows[0], rows[1])  # the same rows train in every expert
    assert (scale[1][rows[1] > 0] == 0).sum() == 1 and scale[0].min() == 1  # only expert 1's unit 0 is frozen
    delta = layer.cofitune_delta["default"]
    before = {k: d.weight.detach().clone() for k, d in delta.items()}
    _train(pm)
    moved = [int((d.weight != before[k]).flatten(1).any(1).sum()) for k, d in delta.items()]
    assert all(m > 0 for m in moved)  # experts that saw tokens moved, each with its own delta


def test_moe_adapter_saved_loads_in_a_fresh_process_with_the_same_logits_and_merges(tmp_path):
    base = _model("gpt_oss")  # transposed, interleaved gate/up experts
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(base, CoFiTuneConfig(parts="ffn+mha", layers=(1, 3)))
    _train(pm)
    set_importance(pm, estimate_importance(pm, _loader(IDS), num_samples=2, progress=False))
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert keys["parts"] == "ffn+mha" and "mlp.experts" in keys["target_modules"]
    out = tmp_path / "logits.pt"
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        import cofitune_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}), {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            torch.save(torch.stack([model(input_ids=ids).logits, model.merge_and_unload()(input_ids=ids).logits]), {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    loaded, merged = torch.load(out)
    assert torch.equal(loaded, expected)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_round_trip_and_disable_on_experts():
    pm = get_peft_model(_model("mixtral"), CoFiTuneConfig(layers=(0, 4), init_weights=False))
    with torch.no_grad():
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = pm(input_ids=IDS).logits
        adapted = pm(input_ids=IDS).logits
        assert not torch.allclose(plain, adapted)
        weights = [p.detach().clone() for n, p in base.named_parameters() if "experts" in n and "cofitune" not in n]
        pm.merge_adapter()
        torch.testing.assert_close(pm(input_ids=IDS).logits, adapted, rtol=1e-4, atol=1e-5)
        pm.unmerge_adapter()
        after = [p for n, p in base.named_parameters() if "experts" in n and "cofitune" not in n]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, after))
        assert torch.equal(pm(input_ids=IDS).logits, adapted)


def _never_route_expert_3(self, hidden_states):
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    logits = logits.masked_fill(torch.arange(logits.shape[-1]) == 3, float("-inf"))
    top, index = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), index


def test_expert_importance_comes_only_through_the_tokens_routed_to_the_expert():
    import types

    model = _model("mixtral")
    for layer in model.model.layers:  # expert 3 is never routed
        layer.mlp.gate.forward = types.MethodType(_never_route_expert_3, layer.mlp.gate)
    imp = estimate_importance(model, _loader(IDS), num_samples=2, progress=False, normalization="abs_tanh")
    assert imp.expert_intermediate.shape == (4, 4, 96)
    assert torch.equal(imp.expert_intermediate[:, 3], torch.zeros(4, 96))  # no gradient, no ranking
    assert (imp.expert_intermediate[:, :3].amax(-1) > 0).all()


def test_lora_export_of_expert_deltas_is_refused_by_name():
    from cofitune_peft.model import convert_to_lora

    pm = get_peft_model(_model("qwen3_moe"), CoFiTuneConfig(layers=(0, 2)))
    with pytest.raises(CoFiTuneError, match=r"fused expert parameters .* `--to merged`"):
        convert_to_lora(pm, 4)
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert

    with pytest.raises(TypeError, match="ExpertsLayer"):
        peft_convert(pm, 4)
    with pytest.raises(CoFiTuneError, match=r"mixed-adapter batch|cannot route"):
        pm.eval()
        pm(input_ids=IDS, adapter_names=["default", "__base__"])


def test_mha_on_a_moe_family_trains_only_attention():
    pm = get_peft_model(_model("deepseek_v3"), CoFiTuneConfig(parts="mha", layers=(0, 4)))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("self_attn" in n for n in trainable)
    assert not any(isinstance(m, ExpertsLayer) for m in pm.modules())


def test_memory_model_counts_every_expert():
    from cofitune_peft.kit.memory import estimate_training_memory

    config = tiny_config("mixtral")
    est = estimate_training_memory(config, "cofitune", layers=(0, 4), target_modules="ffn", dtype="float32")
    model = _model("mixtral")
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert est.trainable_params == expert  # every expert's gate_up and down, full size
    assert est.components["buffers"] > 0


def test_memory_model_takes_a_unit_map():
    from cofitune_peft.kit.memory import estimate_training_memory

    config = tiny_config("llama")
    unit_map = {"mlp.up_proj": "intermediate", "mlp.down_proj": "output"}
    mapped = estimate_training_memory(config, "cofitune", layers=(1, 3), unit_map=unit_map, dtype="float32")
    read = estimate_training_memory(config, "cofitune", layers=(1, 3), dtype="float32")
    assert mapped.trainable_params == read.trainable_params == 2 * 2 * 64 * 96


class _ExpertMLP(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _PerExpertMoE(torch.nn.Module):
    """A mixture of experts kept as one module per expert (as remote-code models still do), top-1 routing."""

    def __init__(self, hidden, inter, experts=3):
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(_ExpertMLP(hidden, inter) for _ in range(experts))

    def forward(self, x):
        choice = self.router(x).argmax(-1)  # [batch, seq]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            routed = choice == e
            if routed.any():
                out[routed] = expert(x[routed])
        return out


def test_per_expert_modules_train_and_are_estimated_like_dense_ffns():
    from tiny_models import tiny_model

    model = tiny_model(num_layers=4)
    for layer in model.model.layers:
        layer.mlp = _PerExpertMoE(32, 16)
    pm = get_peft_model(model, CoFiTuneConfig(parts="ffn", layers=(0, 4)))
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trained) == 4 * 3 * 2 and all(".mlp.experts." in n for n in trained)  # up and down of each expert
    imp = estimate_importance(pm, _loader(IDS), num_samples=2, progress=False)
    assert tuple(imp.intermediate.shape) == (4, 3 * 16)  # each expert's units, one after the other
    set_importance(pm, imp)
    _train(pm)


def test_expert_deltas_follow_delta_dtype_and_peft_autocast(tmp_path):
    # `delta_dtype` applies to the expert deltas as to every other (one creation path, `DeltaWeight.for_base`)
    pm = get_peft_model(_model("mixtral"), CoFiTuneConfig(layers=(0, 4), delta_dtype="bfloat16"))
    layer = next(m for m in pm.modules() if isinstance(m, ExpertsLayer))
    assert {d.weight.dtype for d in layer.cofitune_delta["default"].values()} == {torch.bfloat16}
    _train(pm)
    pm.save_pretrained(tmp_path)
    trained = {k: d.weight.detach().clone() for k, d in layer.cofitune_delta["default"].items()}
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_model("mixtral"), tmp_path)
    layer = next(m for m in loaded.modules() if isinstance(m, ExpertsLayer))
    assert all(torch.equal(d.weight, trained[k]) for k, d in layer.cofitune_delta["default"].items())
    # without it, PEFT's default autocast upcasts a bf16 base's expert deltas to float32, as for LoRA
    pm = get_peft_model(_model("mixtral").to(torch.bfloat16), CoFiTuneConfig(layers=(0, 4)))
    layer = next(m for m in pm.modules() if isinstance(m, ExpertsLayer))
    assert {d.weight.dtype for d in layer.cofitune_delta["default"].values()} == {torch.float32}
    with torch.no_grad():
        assert pm(input_ids=IDS).logits.dtype == torch.bfloat16


def test_memory_model_optimizer_terms_count_each_expert_delta_as_one_tensor():
    from cofitune_peft.kit.memory import estimate_training_memory

    pm = get_peft_model(_model("mixtral"), CoFiTuneConfig(layers=(0, 4)))
    trained = [p for p in pm.parameters() if p.requires_grad]
    config = tiny_config("mixtral")
    kwargs = {"layers": (0, 4), "dtype": "float32", "optimizer": "cofitune_adamw", "device": "cpu"}
    fused = estimate_training_memory(config, "cofitune", fused_step=True, **kwargs)
    assert fused.components["gradients"] == 4 * max(p.numel() for p in trained)  # a whole expert delta
    factored = estimate_training_memory(config, "cofitune", second_moment="factored", momentum=False, **kwargs)
    # Adafactor's row and column statistics of each delta, viewed [shape[0], numel / shape[0]] as the optimizer does
    rows_cols = [(p.shape[0], p.numel() // p.shape[0]) for p in trained]
    assert factored.components["optimizer_states"] == sum(4 * (r + c) for r, c in rows_cols)


@pytest.mark.parametrize("family", ["mixtral", "jamba"])
def test_the_authors_recipe_puts_dropout_on_the_attention_layers_a_moe_or_hybrid_model_has(family):
    model = _model(family)
    kernel = model.config._attn_implementation
    heads = [any(g.kind == "heads" for g in layer.gates) for layer in model_layout(model).layers]
    assert all(heads) == (family == "mixtral")  # Jamba's Mamba layers have no attention to put dropout on
    imp = estimate_importance(model, _loader(IDS), num_samples=2, progress=False, recipe="authors")
    assert imp.metadata["attention_dropout"] == "probabilities" and imp.metadata["attn_implementation"] == "eager"
    assert model.config._attn_implementation == kernel  # switched for the estimate and back
    assert imp.heads[torch.tensor(heads)].abs().sum() > 0 and imp.expert_intermediate.abs().sum() > 0


def test_probability_dropout_on_a_model_without_readable_attention_is_refused_and_the_advice_works():
    model = _model("rwkv")  # time mixing, no attention heads
    with pytest.raises(CoFiTuneError, match=r"no attention CoFiTune can read; pass `attention_dropout='head_output'`"):
        estimate_importance(model, _loader(IDS), num_samples=2, progress=False, recipe="authors")
    imp = estimate_importance(
        model, _loader(IDS), num_samples=2, progress=False, recipe="authors", attention_dropout="head_output"
    )
    assert imp.intermediate.abs().sum() > 0
