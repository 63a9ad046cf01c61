"""Virtual gates and injected dropout on the units whose importance is estimated, and the KL robustness proxy.

Gates (all ones) act through hooks on stock transformers modules, at the points the model's layout names
(`architectures.Gate`), for every layout CoFiTune reads (inferred, from the table, or from a `unit_map`):

- heads `[layers, heads]`: the input of each attention output projection, viewed `[..., heads, head_dim]`;
- intermediate `[layers, intermediate]`: the input of each FFN down projection (shared experts included);
- output `[layers, hidden]`: the output of each FFN down projection;
- expert_intermediate `[layers, experts, units]` and expert_output `[layers, experts, hidden]`: factors on the columns
  and rows of each expert's fused down weight. A gate on a unit is the same as scaling that unit's weights, which works
  inside any fused expert kernel, and its gradient flows only through the tokens routed to that expert.

Where the noise comes from. The authors inject dropout p=0.003 on the attention probabilities and the FFN output of
LLaMA, which has no dropout of its own. Attention probabilities are not reachable with SDPA or flash attention, so the
attention dropout here acts on the per-head attention output (the input of the output projection, where the head gates
sit), and the FFN dropout on the down projection's output (on a routed-experts module's output), for every
architecture alike. The model runs in *eval* mode: its own dropout (0.1 in GPT-2 and OPT, none in LLaMA) is off, so the
injected dropout is the only noise everywhere, which is what train mode gives on LLaMA. The two passes are one forward
of the batch stacked twice. `estimate_importance(..., attention_dropout="probabilities")` moves the attention dropout
onto the attention probabilities, as the authors have it, under eager attention (`attention.py`); the head gates stay
where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..architectures import EXPERT_PARTS, ModelLayout, base_of, param_owner


class _Gates:
    """Virtual gates and injected dropout, added to a model with hooks; `remove()` takes every hook off again."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        parts: Sequence[str],
        dropout: float,
        head_output_dropout: bool = True,
    ):
        self.layout, self.dropout = layout, dropout
        widths, experts = layout.widths(), layout.experts()
        # False when the attention dropout sits on the attention probabilities instead (`attention.py`).
        self.head_output_dropout = head_output_dropout
        self.gates: dict[str, list[torch.Tensor]] = {p: [] for p in parts}
        self.handles: list = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        self.used: set[int] = set()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0
        for index, layer in enumerate(layout.layers):
            device = self._device(model, layout, index)
            for part in parts:
                shape = (experts, widths[part]) if part in EXPERT_PARTS else (widths[part],)
                self.gates[part].append(torch.ones(shape, device=device, dtype=torch.float32, requires_grad=True))
            for gate in layer.gates:
                self._install(model, index, gate, parts)

    @staticmethod
    def _device(model: nn.Module, layout: ModelLayout, index: int) -> torch.device:
        for gate in layout.layers[index].gates:
            module = base_of(model.get_submodule(layout.key(index, gate.module)))
            owner, attr = param_owner(module, gate.param or "weight")
            weight = getattr(owner, attr, None)
            if isinstance(weight, torch.Tensor):
                return weight.device
        return next(model.parameters()).device

    def _gate(self, part: str, index: int, parts) -> torch.Tensor | None:
        if part not in parts:
            return None
        gate = self.gates[part][index]
        self.used.add(id(gate))
        return gate

    def _install(self, model: nn.Module, index: int, gate, parts) -> None:
        module = base_of(model.get_submodule(self.layout.key(index, gate.module)))
        if gate.kind == "heads":
            heads = self._gate("heads", index, parts)
            sl = None if heads is None else heads[gate.first : gate.first + gate.count]
            self.handles.append(module.register_forward_pre_hook(self._attn_hook(sl, gate.count, gate.width)))
        elif gate.kind == "ffn":
            inter, out = self._gate("intermediate", index, parts), self._gate("output", index, parts)
            if inter is not None:
                sl = inter[gate.first : gate.first + gate.count]
                self.handles.append(module.register_forward_pre_hook(self._down_in_hook(sl)))
            sl = None if out is None else out[gate.output_first : gate.output_first + gate.width]
            self.handles.append(module.register_forward_hook(self._down_out_hook(sl)))
        else:  # fused experts: factors on the down weight's columns and rows, noise on the experts' output
            routed = gate.kind == "experts"
            inter = self._gate("expert_intermediate" if routed else "intermediate", index, parts)
            out = self._gate("expert_output" if routed else "output", index, parts)
            if not routed:
                inter = None if inter is None else inter[gate.first : gate.first + gate.count].unsqueeze(0)
                out = None if out is None else out[gate.output_first : gate.output_first + gate.width].unsqueeze(0)
            if inter is not None or out is not None:
                owner, attr = param_owner(module, gate.param)
                param = getattr(owner, attr)
                proxy = _ScaledWeight(inter, out, gate.out_dim, tuple(param.shape), gate.experts)
                parametrize.register_parametrization(owner, attr, proxy, unsafe=True)
                self._parametrized.append((owner, attr))
            self.handles.append(module.register_forward_hook(self._experts_out_hook(self.layout.hidden)))

    def flat(self) -> list[torch.Tensor]:
        return [g for part in self.gates.values() for g in part]

    def units(self) -> dict[str, list[int]]:
        """Real units per layer of the dense parts whose width differs between layers (see `Importance.units`)."""
        out = {}
        widths = self.layout.widths()
        for part in self.gates:
            if part in EXPERT_PARTS:
                continue
            counts = [layer.sizes.get(part, 0) for layer in self.layout.layers]
            if any(c != widths[part] for c in counts):
                out[part] = counts
        return out

    def reseed(self, seed: int) -> None:
        self._seed = seed
        for gen in self._generators.values():
            gen.manual_seed(seed)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, name in self._parametrized:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self._parametrized.clear()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout == 0:
            return x
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self._seed)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.dropout, generator=gen)
        return x * keep / (1.0 - self.dropout)

    def _attn_hook(self, gate: torch.Tensor | None, heads: int, head_dim: int):
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

    def _experts_out_hook(self, hidden: int):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.shape[-1] == hidden:
                return self._drop(output)
            return None

        return hook


class _ScaledWeight(nn.Module):
    """`W * g_out * g_in` for a fused expert down weight `[experts, a, b]` (or DBRX's folded 2-D one)."""

    def __init__(self, inter, out, out_dim: int, shape: tuple[int, ...], experts: int):
        super().__init__()
        self.inter, self.out, self.out_dim, self.shape, self.experts = inter, out, out_dim, shape, experts

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        view = self.shape if len(self.shape) == 3 else (self.experts, self.shape[0] // self.experts, self.shape[1])
        w = weight.reshape(view)
        if self.out is not None:  # [experts, hidden] along the output dim
            w = w * (self.out.unsqueeze(2) if self.out_dim == 1 else self.out.unsqueeze(1)).to(w.dtype)
        if self.inter is not None:  # [experts, units] along the other dim
            w = w * (self.inter.unsqueeze(1) if self.out_dim == 1 else self.inter.unsqueeze(2)).to(w.dtype)
        return w.reshape(self.shape)


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
