"""The methods a comparison trains: a registry of builders `name -> build(base_model, settings) -> trainable model`.

Each method is built with the library that owns it: CoFiTune variants with `CoFiTuneConfig`, LoRA, CorDA and OSF with
PEFT, full fine-tuning and its L1/L2-to-base variants with plain PyTorch. WiSE-FT trains nothing: it interpolates the
base and full fine-tuning weights. It is a *derived* method: it names a parent (`derived_from="full"`), post-hoc
values (its grid) and `derive(trained, base_state, value) -> model to score`, and the comparison scores each value right
after each parent run trains. `cofitune_alpha` and `cofitune_mask_alpha` derive the same way from the CoFiTune runs, with
`set_strength(alpha)`: `W = W0 + alpha * s * Delta`. Variants of the update mask are `MaskedCoFiTune` builders: each may
estimate its own importance (`importance_spec`), cut it to a hard mask (`top_fraction`) or change the config
(`mask_budget`). Add a method with `register_method(Method(...))`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from cofitune_peft import CoFiTuneConfig, CoFiTuneError
from cofitune_peft.estimation import RECIPES

from ..fingerprint import fingerprint
from ..state_file import legacy_pickle_error, load_state, save_state
from .penalties import PenaltyToBase

logger = logging.getLogger(__name__)

# Families colour the plot: CoFiTune variants in one colour family, baselines in greys and others.
FAMILIES = ("reference", "cofitune", "baseline")


@dataclass
class MethodSettings:
    """What a builder may read; one object per comparison, the same for every method.

    Args:
        tokenizer: the base model's tokenizer (CorDA runs general texts through the model).
        general_texts (`Sequence[str]`): general prose for importance estimation and CorDA's covariance (not an eval
            split).
        layers (`tuple[int, int]`, *optional*): CoFiTune's window; `None` is `CoFiTuneConfig`'s default `(N//4, N//2)`.
        target_modules (`str`, *optional*, defaults to `"ffn"`): CoFiTune's modules.
        lora_rank (`int`, *optional*, defaults to 16): rank of LoRA and CorDA (alpha = 2 * rank).
        penalty_strengths (`dict[str, float]`): `{"l1": lambda, "l2": lambda}` of the penalty toward the base
            weights: `lambda * sum |W - W0|` and `lambda / 2 * sum (W - W0)^2` (summed over every weight, as L2-SP).
        corda_samples (`int`, *optional*, defaults to 32): general texts CorDA's covariance is built from.
        max_length (`int`, *optional*, defaults to 256): tokens per text for CorDA.
        micro_batches (`int`, *optional*, defaults to 1): micro-batches per optimizer step (the penalty's gradient is
            spread over them so that it enters once per step).
        cache_dir (`str`, *optional*): where builders cache data-driven steps (CorDA's decomposition).
        importance (`Importance`, *optional*): set by the comparison for methods with `needs_importance`.
        importance_kwargs (`dict[str, Any]`): `estimate_importance` arguments for the methods that estimate an
            importance of their own (`MaskedCoFiTune` with an `importance_spec`); their spec overrides these. Arguments
            missing here are taken from the shared `importance`'s metadata where it records them (`num_samples`,
            `dropout`, `accumulate`, `seed`), else `estimate_importance`'s defaults.
        replay_examples (`Sequence[dict]`): the general examples replay methods mix into the training data
            (`ReplayMix`; the comparison's are `task_replay`'s).
        pull_strength (`float`, *optional*, defaults to 300): the decoupled decay of `cofitune_pull`: after each
            optimizer step every delta row shrinks by `lr * pull_strength * I` (`ImportancePull`).
        restraint_rate (`float`, *optional*, defaults to 0.2): the step of `cofitune_restrained` outside the window,
            relative to the window's: `restraint_rate * (1 - I)` (`restrained_importance`).
    """

    tokenizer: Any = None
    general_texts: Sequence[str] = ()
    layers: tuple[int, int] | None = None
    target_modules: str = "ffn"
    lora_rank: int = 16
    penalty_strengths: dict[str, float] = field(default_factory=lambda: {"l1": 1e-5, "l2": 1.0})
    corda_samples: int = 32
    max_length: int = 256
    micro_batches: int = 1
    cache_dir: str | None = None
    importance: Any = None
    importance_kwargs: dict[str, Any] = field(default_factory=dict)
    replay_examples: Sequence[Mapping[str, Any]] = ()
    pull_strength: float = 300.0
    restraint_rate: float = 0.2

    def describe(self) -> dict[str, Any]:
        """The settings that change what builders build (for the comparison's cache key)."""
        return {
            "general_texts": fingerprint(list(self.general_texts)),
            "layers": list(self.layers) if self.layers else None,
            "target_modules": self.target_modules,
            "lora_rank": self.lora_rank,
            "penalty_strengths": dict(sorted(self.penalty_strengths.items())),
            "corda_samples": self.corda_samples,
            "max_length": self.max_length,
            "micro_batches": self.micro_batches,
            "replay_examples": fingerprint([dict(x) for x in self.replay_examples]) if self.replay_examples else None,
            "pull_strength": self.pull_strength,
            "restraint_rate": self.restraint_rate,
        }


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Args:
        name (`str`): the key (`"lora"`).
        build (`Callable[[nn.Module, MethodSettings], nn.Module] | None`): turns a fresh base model into the model
            to train (in place or wrapped); `None` for methods that train nothing (`base`, derived methods).
        learning_rates (`tuple[float, ...]`): the default grid (log-spaced); for a derived method, its post-hoc
            values (`alpha`; the learning rates are its parent's).
        label (`str`): the name in tables and plots.
        family (`str`): `"cofitune"`, `"baseline"` or `"reference"` (base, full fine-tuning).
        needs_importance (`bool`): the builder reads `settings.importance`.
        derived_from (`str`, *optional*): the parent method whose trained models this one reuses without training
            (`wiseft`: `"full"`); comparing a derived method compares its parent too.
        derive (`Callable[[nn.Module, Mapping[str, torch.Tensor], float], nn.Module]`, *optional*): a derived method's
            `derive(trained, base_state, value) -> model to score`. `trained` is the parent's trained model,
            `base_state` the base model's floating-point weights (on the CPU) from before the parent was built. It may
            return a changed copy of `trained` (`interpolate_weights`) or change `trained` in place with an absolute
            setting, one that the next call replaces (`scale_strength`): the parent's own point is scored first, then
            each value in turn.
        max_value (`float`, *optional*): the largest post-hoc value that means something (`wiseft`: 1, an
            interpolation); values lie in `[0, max_value]`.
        train_data (`Callable[[Sequence[dict], MethodSettings], list[dict]]`, *optional*): the training data this
            method trains on, from the comparison's (`ReplayMix`: mixed with replay examples); `None`: the same.
    """

    name: str
    build: Callable[[nn.Module, MethodSettings], nn.Module] | None
    learning_rates: tuple[float, ...]
    label: str
    family: str = "baseline"
    needs_importance: bool = False
    derived_from: str | None = None
    derive: Callable[[nn.Module, Mapping[str, torch.Tensor], float], nn.Module] | None = None
    max_value: float = math.inf
    train_data: Callable[[Sequence[Mapping[str, Any]], MethodSettings], list[dict]] | None = None

    @property
    def trains(self) -> bool:
        return self.build is not None

    def value_problems(self, values: Sequence[float]) -> list[str]:
        """What is wrong with `values` as this method's grid (empty when nothing)."""
        if not values:
            return [f"the grid of {self.name!r} is empty."]
        if self.derived_from is None:
            if any(not v > 0 or not math.isfinite(v) for v in values):
                return [f"the learning rates of {self.name!r} must be positive values, got {tuple(values)}."]
            return []
        if any(not 0 <= v <= self.max_value for v in values):
            return [f"the post-hoc values of {self.name!r} must lie in [0, {self.max_value:g}], got {tuple(values)}."]
        return []


# -- builders


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct names (last component) of the `nn.Linear` modules inside the decoder, without the LM head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output and "." in name
    }
    return sorted(names)


def _num_layers(model: nn.Module) -> int:
    from cofitune_peft.architectures import find_decoder_layers, text_config

    try:
        found = len(find_decoder_layers(model)[1])
        if found:
            return int(found)
    except CoFiTuneError:
        pass
    return int(text_config(model.config).num_hidden_layers)


def _need_importance(settings: MethodSettings, name: str):
    if settings.importance is None:
        raise CoFiTuneError(f"method {name!r} needs `settings.importance`; estimate one with `estimate_importance`.")
    return settings.importance


def build_full(model: nn.Module, settings: MethodSettings) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def build_lora(model: nn.Module, settings: MethodSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    r = settings.lora_rank
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))


def _cofitune(model, settings, **overrides) -> nn.Module:
    from peft import get_peft_model

    kwargs = {"layers": settings.layers, "target_modules": settings.target_modules, **overrides}
    return get_peft_model(model, CoFiTuneConfig(**kwargs))


def build_cofitune(model: nn.Module, settings: MethodSettings) -> nn.Module:
    return _cofitune(model, settings, softmask_mode="none")


def build_cofitune_mask(model: nn.Module, settings: MethodSettings) -> nn.Module:
    return _cofitune(model, settings, importance=_need_importance(settings, "cofitune_mask"), softmask_mode="update")


def build_cofitune_gradient(model: nn.Module, settings: MethodSettings) -> nn.Module:
    importance = _need_importance(settings, "cofitune_gradient")
    return _cofitune(model, settings, importance=importance, softmask_mode="gradient")


def build_vsoftmask(model: nn.Module, settings: MethodSettings) -> nn.Module:
    importance = _need_importance(settings, "vsoftmask")
    return _cofitune(model, settings, layers=(0, _num_layers(model)), target_modules="all", importance=importance)


# Estimation settings an `Importance` from `estimate_importance` records in its metadata, with their types.
_RECORDED = {"num_samples": int, "dropout": float, "accumulate": str, "seed": int}


def method_importance(model: nn.Module, settings: MethodSettings, name: str, spec: Mapping[str, Any]):
    """The importance of a method whose estimation differs from the comparison's shared one by `spec`.

    `spec` holds `estimate_importance` arguments (`{"normalization": "one_sided"}`, `{"signal": "fisher"}`); the
    others are `settings.importance_kwargs`, else what the shared importance recorded. Estimated on `model` (the fresh
    base model the builder receives) from `settings.general_texts`, and cached in `settings.cache_dir` when set, so
    every learning rate of a method reuses one estimate. An empty `spec` is the shared importance itself.
    """
    from cofitune_peft import Importance, estimate_importance

    if not spec:
        return _need_importance(settings, name)
    texts = [t for t in settings.general_texts if t and t.strip()]
    if not texts or settings.tokenizer is None:
        raise CoFiTuneError(
            f"method {name!r} estimates its own importance ({dict(spec)}) and needs `general_texts` and a "
            "`tokenizer` in its settings."
        )
    kwargs = {}
    recorded = getattr(settings.importance, "metadata", None) or {}
    for key, kind in _RECORDED.items():
        if key in recorded:
            with contextlib.suppress(ValueError):  # a hand-written metadata value: fall back to the default
                kwargs[key] = kind(recorded[key])
    kwargs.update(settings.importance_kwargs)
    kwargs.update(spec)
    kwargs["progress"] = False
    path = None
    if settings.cache_dir:
        os.makedirs(settings.cache_dir, exist_ok=True)
        key = fingerprint(
            [texts, {k: v for k, v in sorted(kwargs.items()) if k != "progress"}, model.config.to_dict()]
        )
        path = os.path.join(settings.cache_dir, f"importance-{name}-{key}.safetensors")
        if os.path.isfile(path):
            return Importance.load(path)
    logger.info("method %s: estimating its importance with %s", name, dict(spec))
    importance = estimate_importance(model, texts, tokenizer=settings.tokenizer, **kwargs)
    if path is not None:
        importance.save(path)
    return importance


@dataclass(frozen=True)
class MaskedCoFiTune:
    """The builder of a CoFiTune variant with a soft mask: which importance, which hard cut, which config.

    Args:
        name (`str`): the method's registry name (for messages and cache files).
        importance_spec (`dict[str, Any]`): `estimate_importance` arguments in which this method's importance differs
            from the comparison's shared one (see `method_importance`); empty: the shared importance.
        top_fraction (`float`, *optional*): turn the importance into a hard mask, `Importance.top_fraction`.
        config (`dict[str, Any]`): `CoFiTuneConfig` arguments (`softmask_mode` defaults to `"update"`).
    """

    name: str
    importance_spec: dict[str, Any] = field(default_factory=dict)
    top_fraction: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        importance = method_importance(model, settings, self.name, self.importance_spec)
        if self.top_fraction is not None:
            importance = importance.top_fraction(self.top_fraction)
        return _cofitune(model, settings, importance=importance, **{"softmask_mode": "update", **self.config})


def build_l1(model: nn.Module, settings: MethodSettings) -> nn.Module:
    return PenaltyToBase(model, "l1", settings.penalty_strengths.get("l1", 1e-5), settings.micro_batches)


def build_l2(model: nn.Module, settings: MethodSettings) -> nn.Module:
    return PenaltyToBase(model, "l2", settings.penalty_strengths.get("l2", 1.0), settings.micro_batches)


def build_corda_kpm(model: nn.Module, settings: MethodSettings) -> nn.Module:
    """PEFT's CorDA in knowledge-preserved mode: LoRA initialised from the base weights' decomposition along the
    covariance of general-text activations, so the adapter trains the directions general data uses least."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    texts = [t for t in settings.general_texts if t and t.strip()][: settings.corda_samples]
    if not texts or settings.tokenizer is None:
        raise CoFiTuneError("method 'corda_kpm' needs `general_texts` and a `tokenizer` in its settings.")
    names = linear_module_names(model)
    cache_file = None
    if settings.cache_dir:
        os.makedirs(settings.cache_dir, exist_ok=True)
        key = fingerprint([texts, names, settings.lora_rank, settings.max_length, model.config.to_dict()])
        cache_file = os.path.join(settings.cache_dir, f"corda_kpm-{key}.safetensors")
    r = settings.lora_rank
    corda = CordaConfig(corda_method="kpm")
    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names, init_lora_weights="corda", corda_config=corda
    )
    device = next(model.parameters()).device

    @torch.no_grad()
    def run_model():
        # CorDA's hooks take one sequence per forward pass (they squeeze the batch dimension).
        for text in texts:
            ids = settings.tokenizer(text, return_tensors="pt", truncation=True, max_length=settings.max_length)
            model(input_ids=ids["input_ids"].to(device))

    with _corda_cache(cache_file) as corda.cache_file:
        preprocess_corda(model, config, run_model=run_model)
    corda.cache_file = None  # the bridge file is gone; the adapter's config must not point at it
    return get_peft_model(model, config)


@contextlib.contextmanager
def _corda_cache(path: str | None):
    """A torch file for PEFT's CorDA cache (PEFT reads it with `torch.load`), filled from the safetensors cache at
    `path` and saved back to it: the cache folder may come from someone else, so PEFT only ever reads a file written
    here a moment before, and the cache itself cannot run code (`state_file`)."""
    if path is None:
        yield None
        return
    legacy = path.removesuffix(".safetensors") + ".pt"
    if os.path.isfile(legacy):
        raise legacy_pickle_error(legacy, "CorDA cache")
    with tempfile.TemporaryDirectory() as tmp:
        bridge = os.path.join(tmp, "corda.pt")
        if os.path.isfile(path):
            torch.save(load_state(path), bridge)
        yield bridge
        if not os.path.isfile(path) and os.path.isfile(bridge):
            save_state(torch.load(bridge, weights_only=True), path)


def build_osf(model: nn.Module, settings: MethodSettings) -> nn.Module:
    """PEFT's OSF (orthogonal subspace fine-tuning): the top half of each weight's singular directions stays frozen,
    the rest trains."""
    from peft import OSFConfig, get_peft_model

    return get_peft_model(model, OSFConfig(target_modules=linear_module_names(model)))


# -- derivations: the model a derived method scores, from its parent's trained model


@torch.no_grad()
def interpolate_weights(trained: nn.Module, base_state: Mapping[str, torch.Tensor], alpha: float) -> nn.Module:
    """WiSE-FT (Wortsman et al., 2022): a copy of `trained` with `(1 - alpha) * W0 + alpha * W` for every weight."""
    out = copy.deepcopy(trained)
    state = out.state_dict()
    missing = [k for k in base_state if k not in state]
    if missing:
        raise CoFiTuneError(
            f"weight interpolation needs the base model's own parameter names in the trained model; {len(missing)} "
            f"are missing (first: {missing[0]!r}). Derive it from a method that trains the weights in place ('full')."
        )
    done = set()
    for key, start in base_state.items():
        tensor = state[key]
        if tensor.data_ptr() in done:  # tied weights (embeddings and LM head): interpolate once
            continue
        done.add(tensor.data_ptr())
        tensor.copy_(torch.lerp(start.to(tensor.device, tensor.dtype), tensor, alpha))
    return out


def scale_strength(trained: nn.Module, base_state: Mapping[str, torch.Tensor], alpha: float) -> nn.Module:
    """WiSE-FT for the adapter: `trained` (a CoFiTune model) with `set_strength(alpha)`, `W = W0 + alpha * s * Delta`.

    In place: the strength is absolute, so the next value replaces this one.
    """
    tuner = getattr(trained, "base_model", None)
    if not hasattr(tuner, "set_strength"):
        raise CoFiTuneError(
            f"`scale_strength` scales a CoFiTune adapter and needs a CoFiTune model, got {type(trained).__name__}; "
            "derive it from a CoFiTune method."
        )
    tuner.set_strength(alpha)
    return trained


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add `method` to the registry (`overwrite=True` to replace an entry of the same name)."""
    problems = []
    if method.name in METHODS and not overwrite:
        problems.append(f"method {method.name!r} is registered already; pass `overwrite=True` to replace it.")
    if method.family not in FAMILIES:
        problems.append(f"`family` must be one of {FAMILIES}, got {method.family!r}.")
    if method.build is not None or method.derived_from is not None:
        problems += method.value_problems(method.learning_rates)
    if (method.derived_from is None) != (method.derive is None):
        problems.append(f"a derived method needs both `derived_from` and `derive`; {method.name!r} has only one.")
    if method.derived_from is not None and method.build is not None:
        problems.append(f"derived method {method.name!r} trains nothing: pass `build=None`.")
    if problems:
        raise CoFiTuneError("Invalid method:\n  - " + "\n  - ".join(problems))
    METHODS[method.name] = method
    return method


def _masked_variant(name: str, learning_rates: tuple[float, ...], label: str, **variant) -> Method:
    """A registry entry for a variant of the update mask, built by `MaskedCoFiTune(name, **variant)`."""
    return Method(name, MaskedCoFiTune(name, **variant), learning_rates, label, "cofitune", True)


_FULL_LRS = (1e-5, 3e-5, 1e-4)
_ADAPTER_LRS = (1e-4, 3e-4, 1e-3)
_ALPHAS = (0.25, 0.5, 0.75)
for _m in (
    Method("base", None, (), "base (no training)", "reference"),
    Method("full", build_full, _FULL_LRS, "full fine-tuning", "reference"),
    Method("lora", build_lora, _ADAPTER_LRS, "LoRA r16, all linear"),
    Method("cofitune", build_cofitune, _ADAPTER_LRS, "CoFiTune coarse", "cofitune"),
    # The update mask shrinks an average row's step to ~0.46x (METHOD.md), so its grid starts twice as high.
    Method("cofitune_mask", build_cofitune_mask, (2e-4, 6e-4, 2e-3), "CoFiTune + update mask", "cofitune", True),
    Method("cofitune_gradient", build_cofitune_gradient, _ADAPTER_LRS, "CoFiTune + gradient mask", "cofitune", True),
    Method("vsoftmask", build_vsoftmask, (2e-5, 6e-5, 2e-4), "soft mask, whole model", "cofitune", True),
    # Variants of the update mask (issue 11). mean_one gives the mask the coarse run's step budget, so it shares the
    # coarse grid; one-sided protection leaves about half the units free (mean scale near 0.7); the Fisher mask is
    # normalised like the KL one (mean scale near 0.46); the hard mask trains 90% of the rows at the full rate.
    _masked_variant(
        "cofitune_mask_mean1",
        _ADAPTER_LRS,
        "CoFiTune + update mask, mean scale 1",
        config={"mask_budget": "mean_one"},
    ),
    _masked_variant(
        "cofitune_onesided",
        (1.5e-4, 4.5e-4, 1.5e-3),
        "CoFiTune + update mask, one-sided importance",
        importance_spec={"normalization": "one_sided"},
    ),
    _masked_variant(
        "cofitune_fisher",
        (2e-4, 6e-4, 2e-3),
        "CoFiTune + update mask, Fisher importance",
        importance_spec={"signal": "fisher"},
    ),
    _masked_variant("cofitune_hard", _ADAPTER_LRS, "CoFiTune, top 10% of units frozen", top_fraction=0.1),
    # The authors' literal estimator (issue 20): its |tanh| normalisation gives the update mask the default's budget.
    # In slices of 2 examples: at batch 8 its 512-token eager attention held ~21 GB on SmolLM2 (same batch gradient).
    _masked_variant(
        "cofitune_authors",
        (2e-4, 6e-4, 2e-3),
        "CoFiTune + update mask, the authors' importance estimator",
        importance_spec={"recipe": "authors", **RECIPES["authors"], "micro_batch_size": 2},
    ),
    Method("l1", build_l1, _FULL_LRS, "full FT + L1 to base"),
    Method("l2", build_l2, _FULL_LRS, "full FT + L2 to base"),
    Method(
        "wiseft",
        None,
        _ALPHAS,
        "WiSE-FT (base/full interpolation)",
        derived_from="full",
        derive=interpolate_weights,
        max_value=1.0,
    ),
    # Post-hoc strength (issue 11): one CoFiTune run traces a curve from the base model (0) to itself (1).
    Method(
        "cofitune_alpha",
        None,
        _ALPHAS,
        "CoFiTune coarse, strength alpha",
        "cofitune",
        derived_from="cofitune",
        derive=scale_strength,
    ),
    Method(
        "cofitune_mask_alpha",
        None,
        _ALPHAS,
        "CoFiTune + update mask, strength alpha",
        "cofitune",
        derived_from="cofitune_mask",
        derive=scale_strength,
    ),
    Method("corda_kpm", build_corda_kpm, _ADAPTER_LRS, "CorDA KPM r16"),
    Method("osf", build_osf, _FULL_LRS, "OSF (half the spectrum)"),
):
    register_method(_m)


from . import fine_levels  # noqa: E402, F401 (registers the fine levels and the replay methods, built on the above)

# The default grid of every method (learning rates; a derived method: its post-hoc values over its parent's runs).
DEFAULT_LEARNING_RATES: dict[str, tuple[float, ...]] = {name: m.learning_rates for name, m in METHODS.items()}


def resolve_methods(names: Sequence[str], grids: Mapping[str, Sequence[float]] | None = None) -> dict[str, Method]:
    """The registry entries of `names` (with `base` and `full` added: scores are relative to them, and each derived
    method's parent before it), grids replaced."""
    names = list(dict.fromkeys(["base", "full", *names]))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise CoFiTuneError(
            f"`methods`: unknown {unknown}; registered are {sorted(METHODS)} (add one with `register_method`)."
        )
    with_parents = []
    for name in names:
        parent = METHODS[name].derived_from
        if parent is not None:
            if parent not in METHODS or not METHODS[parent].trains:
                raise CoFiTuneError(
                    f"method {name!r} derives from {parent!r}, which is not a registered trained method."
                )
            if parent not in with_parents and parent not in names:
                logger.info("method %s derives from %s: comparing %s too", name, parent, parent)
                with_parents.append(parent)
        with_parents.append(name)
    names = list(dict.fromkeys(with_parents))
    grids = dict(grids or {})
    extra = sorted(set(grids) - set(names))
    if extra:
        raise CoFiTuneError(f"`learning_rates` names methods that are not compared: {extra} (methods: {names}).")
    out = {}
    for name in names:
        method = METHODS[name]
        if name in grids:
            values = tuple(float(v) for v in grids[name])
            problems = method.value_problems(values)
            if problems:
                raise CoFiTuneError(f"`learning_rates[{name!r}]`: {problems[0]}")
            if len(values) < 3 and method.trains:
                logger.info("method %s: %d learning rates (a sweep needs >= 3 to find a best one)", name, len(values))
            method = replace(method, learning_rates=values)
        out[name] = method
    return out
