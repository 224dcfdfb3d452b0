"""Planning: what to merge, from which sources, with which parameters per tensor.

A plan is built from the checkpoints' headers alone (names, shapes, dtypes) and validates
everything that can be known before reading a single weight; execution lives in engine.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoints import Checkpoint
from .config import MergeConfig, evaluate_setting
from .errors import MergeError, shown
from .registry import AGGREGATORS, LAMBDA, WEIGHT, Aggregator
from .task_vectors import FullFinetune, LoraAdapter, LoraApplied, TaskVectorSource, load_source
from .validation import _vocab, check_compatible

_LAYER = re.compile(r"(.*?)\.(\d+)\.")


TRAINING_KEYS = {"steps": "steps", "learning_rates": "learning_rate"}  # hyperparameter -> training record key


def training_defaults(key: str, training: Sequence[Mapping[str, Any]]) -> list:
    """Per-model defaults of a hyperparameter from each checkpoint's training record (None where absent):
    fednova's steps and learning rates default to what the checkpoints record."""
    meta = TRAINING_KEYS.get(key)
    return [None if meta is None else t.get(meta) for t in training]


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each tensor's depth t ∈ [0, 1] for mergekit gradients: layer i of N → i/(N−1); others 0."""
    index: dict[str, tuple[str, int]] = {}
    count: dict[str, int] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            prefix, i = m.group(1), int(m.group(2))
            index[name] = (prefix, i)
            count[prefix] = max(count.get(prefix, 0), i + 1)
    out = {}
    for name in names:
        if name in index:
            prefix, i = index[name]
            n = count[prefix]
            out[name] = i / (n - 1) if n > 1 else 1.0
        else:
            out[name] = 0.0
    return out


def layer_of(name: str) -> str:
    """A tensor's layer group for per-layer reports: 'h.3' style, or 'other'."""
    m = _LAYER.match(name)
    return f"{m.group(1).split('.')[-1]}.{m.group(2)}" if m else "other"


@dataclass
class TensorParams:
    weights: torch.Tensor  # [K] float32
    lam: float
    hyper: dict[str, Any]
    weight_values: list[float] = field(default_factory=list)  # the same weights as written (Python floats)


@dataclass
class MergePlan:
    """Everything needed to merge, tensor by tensor."""

    method: Aggregator
    base: Checkpoint
    sources: list[TaskVectorSource]
    global_settings: dict[str, Any] = field(default_factory=dict)
    model_settings: list[dict[str, Any]] = field(default_factory=list)
    out_dtype: torch.dtype | None = None
    tokenizer_source: str = "base"
    config: MergeConfig | None = None
    warnings: list[str] = field(default_factory=list)
    compute_dtype: torch.dtype = torch.float32  # what the exact path computes in (mergekit's `dtype`)
    no_base: bool = False  # the YAML names no base_model: `base` is only the first model, for names and shapes
    chat_template: str | None = None

    @cached_property
    def tensor_names(self) -> list[str]:
        return [k for k in self.base.keys() if self.base.is_float(k)]

    @cached_property
    def passthrough_names(self) -> list[str]:
        """Non-float tensors (integer buffers) copied from the base unchanged."""
        return [k for k in self.base.keys() if not self.base.is_float(k)]

    @cached_property
    def positions(self) -> dict[str, float]:
        return layer_positions(self.base.keys())

    def output_dtype(self, name: str) -> torch.dtype:
        return self.out_dtype or self.base.dtype(name)

    def params_for(self, name: str) -> TensorParams:
        """Resolve weight, λ and every hyperparameter for one tensor (per model > global > default)."""
        t = self.positions.get(name, 0.0)
        k = len(self.sources)

        def setting(key: str, i: int | None):
            if i is not None and key in self.model_settings[i]:
                return evaluate_setting(self.model_settings[i][key], name, t)
            if key in self.global_settings:
                return evaluate_setting(self.global_settings[key], name, t)
            return None

        weights = []
        for i in range(k):
            w = setting("weight", i)
            weights.append(1.0 if w is None else w)
        lam = setting("lambda", None)
        values: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model:
                meta = self._default_per_model(p.name)
                per = [setting(p.name, i) for i in range(k)]
                per = [v if v is not None else meta[i] if meta[i] is not None else p.default
                       for i, v in enumerate(per)]
                missing = [self.sources[i].name for i, v in enumerate(per) if v is None]
                if missing and len(missing) < k:
                    raise MergeError(f"{self.method.name}: {p.name} is missing for {', '.join(missing)} "
                                     "(no training metadata); give it for every model")
                values[p.name] = None if missing else per
            else:
                v = setting(p.name, None)
                if v is not None:
                    values[p.name] = v
        hyper = self.method.check_params(values, k)
        checked = [WEIGHT.check(w) for w in weights]
        return TensorParams(torch.tensor(checked, dtype=torch.float32),
                            1.0 if lam is None else LAMBDA.check(lam), hyper, checked)

    def _default_per_model(self, key: str) -> list:
        return training_defaults(key, [s.training for s in self.sources])


def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long: refused, naming the model, when it is read
        return str(a) == str(b)


def _exists(ref: str) -> bool:
    try:
        return Path(ref).expanduser().exists()
    except (OSError, ValueError):
        return False


def split_adapter(ref: str) -> tuple[str, str]:
    """mergekit's `model+adapter` as (model, adapter); ("model", "") without one, or for a folder whose
    own name has a '+'."""
    path, plus, adapter = ref.partition("+")
    if not plus or _exists(ref):
        return ref, ""
    if not adapter.strip():
        raise MergeError(f"{shown(ref)}: nothing after '+' (expected model+path/to/lora_adapter)")
    return path, adapter


def load_model(ref: str, *, trust_remote_code: bool = False, **opts) -> Checkpoint | LoraApplied:
    """A checkpoint, or `model+adapter`: the model with a LoRA adapter merged in (as mergekit)."""
    path, adapter = split_adapter(ref)
    ck = Checkpoint(path, trust_remote_code=trust_remote_code, **opts)
    return LoraApplied(ck, LoraAdapter(adapter, Path(adapter).name, **opts), adapter) if adapter else ck


def task_source(ref: str, base, base_ref: str | None = None, name: str | None = None, *,
                trust_remote_code: bool = False, **opts) -> TaskVectorSource:
    """One model's task vector against `base` (typed as `base_ref`): a fine-tune, an adapter folder, or
    `model+adapter`, which on the base itself is the adapter (τ = ΔW exactly), and on another model that
    model with the adapter merged in."""
    path, adapter = split_adapter(ref)
    if adapter and isinstance(base, Checkpoint) and (_same_path(path, base.path) or path == base_ref):
        return LoraAdapter(adapter, name or Path(adapter).name, **opts)
    if adapter:
        return FullFinetune(load_model(ref, trust_remote_code=trust_remote_code, **opts), name)
    return load_source(path, name, trust_remote_code=trust_remote_code, **opts)


def plan_from_config(cfg: MergeConfig, *, allow_hub: bool = True, allowed_roots=None,
                     trust_remote_code: bool = False) -> MergePlan:
    """Resolve the config's models, drop the base from the task list, validate compatibility."""
    method = AGGREGATORS[cfg.merge_method]
    opts = dict(allow_hub=allow_hub, allowed_roots=allowed_roots)
    if cfg.slices and len(cfg.slices) > 1:
        return plan_stacked(cfg, opts, trust_remote_code)
    entries = list(cfg.models)

    def model(ref: str):
        return load_model(ref, trust_remote_code=trust_remote_code, **opts)

    if cfg.base_model:
        base = model(cfg.base_model)
        if cfg.merge_method != "linear":  # mergekit: the base is not one of the task vectors
            entries = [m for m in entries if not _same_path(m.model, cfg.base_model) and m.model != cfg.base_model]
    else:  # no base (linear, nuslerp, ...): the first model gives names and shapes; its task vector is zero
        base = model(entries[0].model)
    if not base.config:  # the output's config.json is the base's: without one it could not be loaded
        role = "base model" if cfg.base_model else "first model (the base's role)"
        raise MergeError(f"{role} {shown(base.ref)}: no config.json")
    sources = [task_source(m.model, base, cfg.base_model, trust_remote_code=trust_remote_code, **opts)
               for m in entries]
    method.check_model_count(len(sources))
    dtype = cfg.out_dtype or cfg.dtype
    plan = MergePlan(
        method=method, base=base, sources=sources,
        global_settings=dict(cfg.parameters), model_settings=[dict(m.parameters) for m in entries],
        out_dtype=getattr(torch, dtype) if dtype else None, tokenizer_source=cfg.tokenizer_from, config=cfg,
        compute_dtype=getattr(torch, cfg.compute), no_base=not cfg.base_model, chat_template=cfg.chat_template,
    )
    plan.warnings.extend(check_compatible(base, sources))
    if cfg.slices:
        check_slices(cfg, plan)
    check_tokenizer(plan, opts)
    resize_vocabulary(plan, cfg)
    plan.params_for(plan.tensor_names[0])  # fail on bad hyperparameters before any work
    return plan


def num_layers(config: Mapping[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def plan_stacked(cfg: MergeConfig, opts: Mapping[str, Any], trust_remote_code: bool) -> MergePlan:
    """Several slices with passthrough: one virtual checkpoint of the stacked layers, copied."""
    from .slices import StackedLayers, layer_count
    from .task_vectors import FullFinetune

    parts, seen = [], {}
    for i, sl in enumerate(cfg.slices):
        src = sl["sources"][0]
        if src.get("parameters") or sl.get("parameters"):
            raise MergeError(f"slices[{i}]: parameters on stacked slices are not supported; give them globally")
        ref = str(src["model"])
        ck = seen.get(ref) or Checkpoint(ref, trust_remote_code=trust_remote_code, **opts)
        seen[ref] = ck
        a, b = src.get("layer_range") or [0, layer_count(ck.config) or 0]
        parts.append((ck, a, b))
    first = parts[0][0]
    if not first.config:
        raise MergeError(f"slices[0].sources[0] {shown(first.ref)}: no config.json")
    for ck in seen.values():  # same kind of model; the depths may differ (StackedLayers checks each layer)
        if ck.config.get("model_type") != first.config.get("model_type"):
            raise MergeError(f"{ck.ref}: architecture {ck.config.get('model_type')} does not match "
                             f"{first.ref}'s {first.config.get('model_type')}")
        if _vocab(ck.config) != _vocab(first.config):
            raise MergeError(f"{ck.ref}: vocabulary size {_vocab(ck.config)} differs from {first.ref}'s "
                             f"{_vocab(first.config)}")
    warnings: list[str] = []
    stacked = StackedLayers(parts)
    dtype = cfg.out_dtype or cfg.dtype
    plan = MergePlan(
        method=AGGREGATORS["passthrough"], base=stacked, sources=[FullFinetune(stacked, "stacked layers")],
        global_settings=dict(cfg.parameters), model_settings=[{}],
        out_dtype=getattr(torch, dtype) if dtype else None, tokenizer_source=cfg.tokenizer_from, config=cfg,
        compute_dtype=getattr(torch, cfg.compute), no_base=True, chat_template=cfg.chat_template, warnings=warnings,
    )
    check_tokenizer(plan, opts)
    resize_vocabulary(plan, cfg)
    plan.params_for(plan.tensor_names[0])
    return plan


def check_slices(cfg: MergeConfig, plan: MergePlan) -> None:
    """A single slice must cover every layer of every source: it is a plain merge (several slices
    are layer stacking: plan_stacked)."""
    n = num_layers(plan.base.config)
    for j, src in enumerate(cfg.slices[0]["sources"]):
        rng = src.get("layer_range")
        if rng is None:
            continue
        if n is None or list(rng) != [0, n]:
            raise MergeError(f"slices[0].sources[{j}].layer_range: {rng} is not the whole model ([0, {n}]); "
                             "merging part of the layers is not supported")


def _vocabulary(ck) -> tuple | None:
    """Which embedding row each token uses: (kind, token → id map with the added tokens, BPE merges),
    read from tokenizer.json or vocab.json + merges.txt, else a sentencepiece model's bytes. How the
    files are formatted (indentation, key order, merges as "a b" or [a, b]) does not count."""
    def merges(items) -> list:
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in items or []]

    if getattr(ck, "folder", None) is None:
        return None
    files = {f.name: f for f in ck.side_files(("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
                                               "added_tokens.json"))}
    try:
        if "tokenizer.json" in files:
            data = json.loads(files["tokenizer.json"].read_text())
            model = data.get("model") or {}
            vocab = model.get("vocab") or {}
            if isinstance(vocab, list):  # unigram: [token, score] in id order
                vocab = {v[0] if isinstance(v, list) else v: i for i, v in enumerate(vocab)}
            vocab = {**vocab, **{t.get("content"): t.get("id") for t in data.get("added_tokens") or []}}
            return "map", vocab, merges(model.get("merges"))
        if "vocab.json" in files:
            vocab = json.loads(files["vocab.json"].read_text())
            if "added_tokens.json" in files:
                vocab = {**vocab, **json.loads(files["added_tokens.json"].read_text())}
            lines = files["merges.txt"].read_text().splitlines() if "merges.txt" in files else []
            return "map", vocab, merges(x for x in lines if x and not x.startswith("#version"))
        if "tokenizer.model" in files:
            return "raw", files["tokenizer.model"].read_bytes()
    except (OSError, ValueError, AttributeError, TypeError):  # unreadable: compared as bytes
        return "raw", b"".join(f.read_bytes() for _, f in sorted(files.items()))
    return None


def check_tokenizer(plan: MergePlan, opts: Mapping[str, Any]) -> None:
    """tokenizer_source base / union / a model, as mergekit. All models here share one vocabulary size
    (the compatibility check), so union is the base's tokenizer when every model has the same one;
    models whose tokenizers differ would need mergekit's vocabulary permutation of the embedding rows,
    which is refused. Without a tokenizer chosen, a fine-tune whose tokenizer differs from the base's
    (tokens renamed or ids swapped) is refused too: its rows would be merged with other tokens' rows."""
    src = plan.tokenizer_source
    cfg = plan.config
    chosen = cfg is not None and (cfg.tokenizer_source is not None or cfg.tokenizer is not None)
    if src == "base" and chosen:
        return
    if src in ("base", "union"):
        mine = _vocabulary(plan.base)
        for s in plan.sources:
            ck = getattr(s, "checkpoint", None)
            other = _vocabulary(ck) if ck is not None else None
            if other is None or mine is None or other[0] != mine[0] or other == mine:
                continue
            if src == "union":
                raise MergeError(f"tokenizer_source union: {s.name}'s tokenizer differs from the base's; merging "
                                 "different vocabularies (embedding rows permuted and resized) is not supported")
            raise MergeError(f"{s.name}: its tokenizer differs from the base's (other tokens or token ids), so its "
                             "embedding rows do not line up with the base's; set tokenizer_source (e.g. base) "
                             "to merge anyway with one tokenizer")
        plan.tokenizer_source = "base"
        return
    ck = Checkpoint(src, **opts)
    vb, vt = plan.base.config.get("vocab_size"), ck.config.get("vocab_size")
    if vb is not None and vt is not None and vb != vt:
        raise MergeError(f"tokenizer_source: {src} has a vocabulary of {vt}, the merged model {vb}; resizing the "
                         "embedding rows to another vocabulary is not supported")
    plan.tokenizer_source = str(ck.path)


def resize_vocabulary(plan: MergePlan, cfg: MergeConfig) -> None:
    """With a tokenizer chosen (`tokenizer_source` or `tokenizer:`), mergekit writes one embedding row
    per token of that tokenizer (padded with the mean row to `pad_to_multiple_of`): cut or pad the
    token-indexed tensors of every input the same way (vocab.VocabView)."""
    from .checkpoints import TOKENIZER_FILES
    from .task_vectors import FullFinetune
    from .validation import _vocab
    from .vocab import VocabView, output_rows

    if cfg.tokenizer is None and cfg.tokenizer_source is None:
        return
    if cfg.tokenizer is not None and cfg.tokenizer.tokens:
        raise MergeError("tokenizer.tokens: per-token embedding sources are not supported")
    rows = _vocab(plan.base.config)
    source = plan.base if plan.tokenizer_source == "base" else Checkpoint(plan.tokenizer_source)
    if rows is None or not source.side_files(TOKENIZER_FILES):
        plan.warnings.append("tokenizer: no tokenizer files to size the embedding by; its rows are kept")
        return
    sizes = output_rows(source.folder, rows, cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer else None)
    if sizes is None:
        return
    if not all(isinstance(s, FullFinetune) for s in plan.sources):
        raise MergeError("tokenizer: resizing the embedding rows is not supported with LoRA adapters")
    n, size = sizes
    plan.base = VocabView(plan.base, rows, n, size, plan.compute_dtype)
    for s in plan.sources:
        s.checkpoint = VocabView(s.checkpoint, rows, n, size, plan.compute_dtype)
    plan.warnings.append(f"tokenizer: {n} tokens, so the embedding rows go from {rows} to {size} (as mergekit)")


def plan_from_objects(base: Checkpoint, sources: list[TaskVectorSource], method: str,
                      weights: Sequence[float] | None = None, lam: float = 1.0,
                      hyper: Mapping[str, Any] | None = None) -> MergePlan:
    """A plan for the Python API: one weight per source, global hyperparameters."""
    agg = AGGREGATORS[method]
    agg.check_model_count(len(sources))
    if weights is not None and len(weights) != len(sources):
        raise MergeError(f"weights: got {len(weights)} values for {len(sources)} fine-tuned models")
    weights = [WEIGHT.check(w) for w in weights] if weights is not None else None
    lam = LAMBDA.check(lam)
    hyper = dict(hyper or {})
    model_settings: list[dict[str, Any]] = [{} for _ in sources]
    for p in agg.params:  # per-model lists given through the Python API
        if p.per_model and isinstance(hyper.get(p.name), (list, tuple)):
            values = hyper.pop(p.name)
            if len(values) != len(sources):
                raise MergeError(f"{p.name}: got {len(values)} values for {len(sources)} fine-tuned models")
            for ms, v in zip(model_settings, values):
                ms[p.name] = v
    for key in hyper:
        agg.param(key)  # unknown names raise
    for ms, w in zip(model_settings, weights if weights is not None else [1.0] * len(sources)):
        ms["weight"] = w
    plan = MergePlan(method=agg, base=base, sources=sources,
                     global_settings={**hyper, "lambda": lam}, model_settings=model_settings)
    plan.warnings.extend(check_compatible(base, sources))
    if plan.tensor_names:
        plan.params_for(plan.tensor_names[0])
    return plan
