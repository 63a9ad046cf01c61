"""Virtual gates and injected dropout on the units whose importance is estimated, and the KL robustness proxy.

Gates (all ones) act through hooks on stock transformers modules, for every architecture in
`architectures.ARCHITECTURES`:

- heads `[layers, num_heads]`: the input of the attention output projection, viewed `[..., heads, head_dim]`;
- intermediate `[layers, intermediate_size]`: the input of the FFN down projection;
- output `[layers, hidden_size]`: the output of the FFN down projection.

Where the noise comes from. The authors inject dropout p=0.003 on the attention probabilities and the FFN output of
LLaMA, which has no dropout of its own. Attention probabilities are not reachable with SDPA or flash attention, so the
attention dropout here acts on the per-head attention output (the input of the output projection, where the head gates
sit), and the FFN dropout on the down projection's output, for every architecture alike. The model runs in *eval*
mode: its own dropout (0.1 in GPT-2 and OPT, none in LLaMA) is off, so the injected dropout is the only noise
everywhere, which is what train mode gives on LLaMA. The two passes are one forward of the batch stacked twice.
`estimate_importance(..., attention_dropout="probabilities")` moves the attention dropout onto the attention
probabilities, as the authors have it, under eager attention (`attention.py`); the head gates stay where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import ArchSpec, dims_of, layer_modules
from ..errors import CoFiTuneError


class _Gates:
    """Virtual gates and injected dropout, added to a model with hooks; `remove()` takes every hook off again."""

    def __init__(
        self, model: nn.Module, spec: ArchSpec, parts: Sequence[str], dropout: float, head_output_dropout: bool = True
    ):
        dims = dims_of(model, spec)
        attn, down = _modules_by_layer(model, spec, dims.num_layers)
        self.dims, self.dropout = dims, dropout
        # False when the attention dropout sits on the attention probabilities instead (`attention.py`).
        self.head_output_dropout = head_output_dropout
        self.gates: dict[str, list[torch.Tensor]] = {p: [] for p in parts}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0
        sizes = {"heads": dims.num_heads, "intermediate": dims.intermediate, "output": dims.hidden}
        for layer in range(dims.num_layers):
            for part in parts:
                weight = (attn if part == "heads" else down)[layer].weight
                gate = torch.ones(sizes[part], device=weight.device, dtype=torch.float32, requires_grad=True)
                self.gates[part].append(gate)
            heads = self.gates["heads"][layer] if "heads" in parts else None
            inter = self.gates["intermediate"][layer] if "intermediate" in parts else None
            out = self.gates["output"][layer] if "output" in parts else None
            self.handles.append(attn[layer].register_forward_pre_hook(self._attn_hook(heads)))
            if inter is not None:
                self.handles.append(down[layer].register_forward_pre_hook(self._down_in_hook(inter)))
            self.handles.append(down[layer].register_forward_hook(self._down_out_hook(out)))

    def flat(self) -> list[torch.Tensor]:
        return [g for part in self.gates.values() for g in part]

    def reseed(self, seed: int) -> None:
        self._seed = seed
        for gen in self._generators.values():
            gen.manual_seed(seed)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout == 0:
            return x
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self._seed)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.dropout, generator=gen)
        return x * keep / (1.0 - self.dropout)

    def _attn_hook(self, gate: torch.Tensor | None):
        heads, head_dim = self.dims.num_heads, self.dims.head_dim

        def hook(module, args):
            x = args[0]  # [batch, seq, heads * head_dim]
            if gate is not None:
                x = (x.unflatten(-1, (heads, head_dim)) * gate.to(x.dtype)[:, None]).flatten(-2)
            return (self._drop(x) if self.head_output_dropout else x, *args[1:])

        return hook

    @staticmethod
    def _down_in_hook(gate: torch.Tensor):
        def hook(module, args):
            return (args[0] * gate.to(args[0].dtype), *args[1:])  # [batch, seq, intermediate]

        return hook

    def _down_out_hook(self, gate: torch.Tensor | None):
        def hook(module, args, output):
            if gate is not None:
                output = output * gate.to(output.dtype)  # [batch, seq, hidden]
            return self._drop(output)

        return hook


def _modules_by_layer(model: nn.Module, spec: ArchSpec, num_layers: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """The attention output and FFN down projections of each decoder layer (base layers of PEFT tuner layers)."""
    found: dict[str, dict[int, nn.Module]] = {spec.attn_out: {}, spec.ffn_down: {}}
    for _key, layer, inner, module in layer_modules(model, spec.layers_pattern):
        if inner not in found:
            continue
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        found[inner][layer] = module
    for name, by_layer in found.items():
        if sorted(by_layer) != list(range(num_layers)):
            raise CoFiTuneError(
                f"expected a `{name}` module in each of the {num_layers} decoder layers "
                f"(`{spec.layers_pattern}.<i>.{name}`) but found it in layers {sorted(by_layer)}; "
                "importance estimation needs the stock transformers module layout."
            )
        for module in by_layer.values():
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise CoFiTuneError(f"`{name}` is a {type(module).__name__} without a weight; cannot gate it.")
    return [found[spec.attn_out][i] for i in range(num_layers)], [found[spec.ffn_down][i] for i in range(num_layers)]


def _kl_proxy(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, all_positions: bool = False
) -> torch.Tensor:
    """`KL(softmax(logits_2) || softmax(logits_1))` summed over non-padding tokens (over every position, padding
    included, with `all_positions`, as the authors' code does); both passes in one forward."""
    batch = input_ids.shape[0]
    logits = model(
        input_ids=input_ids.repeat(2, 1), attention_mask=attention_mask.repeat(2, 1), use_cache=False
    ).logits  # [2 * batch, seq, vocab]
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(logp[:batch], logp[batch:], log_target=True, reduction="none").sum(-1)  # [batch, seq]
    return kl.sum() if all_positions else (kl * attention_mask.to(kl.dtype)).sum()


def _lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The language-model cross-entropy, summed over predicted non-padding tokens (for the Fisher signal)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [batch, seq, vocab]
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
