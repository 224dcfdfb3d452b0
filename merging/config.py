"""The merge configuration: mergekit's YAML, typed, extended with our methods' hyperparameters.

Parameter values follow mergekit: a scalar, a list interpolated over layer depth (a "gradient"),
or a list of `{filter: <substring of the tensor name>, value: ...}` where the first match wins.
Per-model settings override global ones.
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MergeError, shown
from .registry import AGGREGATORS, UNIVERSAL_PARAMS

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar], None]


Setting = Union[Scalar, list[Scalar], list[Conditional], Conditional, None]

# Keys that every method accepts: the per-task coefficient and the global scale. mergekit's
# `int8_mask` only changes its mask's storage type; it is accepted and has no effect here. `embed_slerp`
# (in many published configs) is read by no code of mergekit 0.1.5, which ignores it: so do we.
UNIVERSAL = set(UNIVERSAL_PARAMS)
IGNORED = {"int8_mask", "embed_slerp"}
DTYPES = ("float32", "float16", "bfloat16")


def _has_empty_list(setting: Any) -> bool:
    if isinstance(setting, Conditional):
        return _has_empty_list(setting.value)
    return isinstance(setting, list) and (not setting or any(_has_empty_list(x) for x in setting))


def _leaves(setting: Any):
    """The scalar values inside a setting (a scalar, a gradient, or filter entries)."""
    if isinstance(setting, Conditional):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    elif setting is not None:
        yield setting


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v: Any) -> Any:
        if isinstance(v, dict) and "model" in v:  # mergekit's long form {model: {path: ...}}
            v = v["model"].get("path") if isinstance(v["model"], dict) else v["model"]
        return v


class TokenizerSpec(BaseModel):
    """mergekit's `tokenizer:` block; its `source` defaults to `union`, as in mergekit."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    tokens: dict[str, Any] | None = None  # per-token embedding sources: refused at plan time


class MergeConfig(BaseModel):
    """A merge as mergekit's YAML describes it (`slices` are read into `models` by parse_config).

    `dtype` is mergekit's: the models are loaded in it and the merge is computed in it. `compute_dtype`
    (FedMerge's) overrides the dtype the merge is computed in, e.g. float32 accumulation for a
    bfloat16 output. Without either, the merge is computed in float32.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    name: str | None = None
    slices: list[dict[str, Any]] | None = None  # the YAML's slices, kept for the record (merge_config.yml)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in AGGREGATORS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(AGGREGATORS)}")
        return v

    @field_validator("dtype", "out_dtype", "compute_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"{v!r} is not one of {', '.join(DTYPES)}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and v not in ("auto", "chatml") and "{" not in v:
            raise ValueError(f"{v!r} is neither a Jinja template nor one of auto, chatml")
        if v is not None and "{" in v:  # compiled as transformers compiles it, so a broken one is not written
            from jinja2 import TemplateError
            from transformers.utils.chat_template_utils import _compile_jinja_template

            try:
                _compile_jinja_template(v)
            except TemplateError as exc:
                line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
                raise ValueError(f"not a valid Jinja template: {exc.message or exc}{line}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        agg = AGGREGATORS[self.merge_method]
        ignored = IGNORED | set(agg.inert)
        known = UNIVERSAL | ignored | {p.name for p in agg.params}
        for where, params in [("parameters", self.parameters)] + [
            (f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)
        ]:
            for key, setting in params.items():
                if key not in known:
                    raise ValueError(f"{where}.{key}: {self.merge_method} has no parameter {key!r}; "
                                     f"it takes: {', '.join(sorted(known - ignored))}")
                if _has_empty_list(setting):
                    raise ValueError(f"{where}.{key}: an empty list; give a value or a list of values")
                spec = UNIVERSAL_PARAMS.get(key) or (None if key in ignored else agg.param(key))
                for leaf in _leaves(setting):
                    if spec is not None:
                        try:
                            spec.check(leaf)
                        except MergeError as exc:
                            raise ValueError(f"{where}.{key}: {str(exc).removeprefix(key + ': ')}") from None
        if not agg.base_optional and not self.base_model:
            raise ValueError(f"base_model: {self.merge_method} needs a base model")
        return self

    @property
    def tokenizer_from(self) -> str:
        """mergekit's choice of tokenizer: `tokenizer.source` (default union), else `tokenizer_source`,
        else the base model's tokenizer."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source or "base"

    @property
    def compute(self) -> str:
        return self.compute_dtype or self.dtype or "float32"

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=False, mode="json")
        if data.get("slices"):  # written as the user wrote it: slices, not the models read from them
            data.pop("models", None)
        for m in data.get("models", []):
            if not m.get("parameters"):
                m.pop("parameters", None)
        if not data.get("parameters"):
            data.pop("parameters", None)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


_TYPE_TAGS = {"bool", "int", "float", "str", "Conditional", "none", "ModelEntry", "TokenizerSpec"}
_PLAIN = {"missing": "required", "extra_forbidden": "unknown setting", "dict_type": "expected a mapping",
          "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
          "list_type": "expected a list", "string_type": "expected a string (text)",
          "int_type": "expected an integer", "int_parsing": "expected an integer",
          "int_from_float": "expected an integer", "float_type": "expected a number",
          "float_parsing": "expected a number", "bool_type": "expected true or false",
          "bool_parsing": "expected true or false", "too_short": "expected at least one entry"}


def _pretty(err: ValidationError) -> str:
    """pydantic's first error in our words: `models[0].model: expected a string (text)`."""
    first = err.errors()[0]
    parts = [x for x in first["loc"] if not (isinstance(x, str) and (
        x in _TYPE_TAGS or x.startswith(("function-", "list[", "union[", "dict["))))]
    union = len(parts) != len(first["loc"]) and "parameters" in parts
    loc = ""
    for x in parts:
        loc += f"[{x}]" if isinstance(x, int) else f".{x}" if loc else str(x)
    msg = _PLAIN.get(first["type"]) or first["msg"].removeprefix("Value error, ")
    if first["type"] == "greater_than_equal":
        msg = f"must be at least {first['ctx']['ge']}"
    if union and first["type"] != "value_error":
        msg = "expected a value, a list of values (a gradient) or a list of {filter, value} entries"
    return f"{loc}: {msg}" if loc else msg


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a dict (parsed YAML) into a MergeConfig; errors name the offending field."""
    if not isinstance(data, dict):
        raise MergeError(f"{source}: expected a mapping of merge settings, got {type(data).__name__}")
    if "modules" in data:
        raise MergeError(f"{source}: modules: not supported (mergekit's per-module merges); give `models` or "
                         "`slices`")
    if "slices" in data:
        data = slices_to_models(data, source)
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise MergeError(f"{source}: {_pretty(err)}") from None


def slices_to_models(data: dict, source: str = "config") -> dict:
    """mergekit's `slices:` as `models:` plus each source's layer range (checked against the models at
    plan time). One slice whose sources share one layer range is a plain merge; several slices are
    layer stacking, which only passthrough does."""
    slices = data.get("slices")
    if "models" in data:
        raise MergeError(f"{source}: give either `slices` or `models`, not both")
    if not isinstance(slices, list) or not slices or not all(isinstance(s, dict) for s in slices):
        raise MergeError(f"{source}: slices: expected a list of slices, each with `sources`")
    out = {k: v for k, v in data.items() if k != "slices"}
    out["slices"] = slices
    for i, sl in enumerate(slices):
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if extra:
            raise MergeError(f"{source}: slices[{i}]: unknown key {sorted(extra)[0]!r}")
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise MergeError(f"{source}: slices[{i}].sources: expected a list of {{model, layer_range}}")
        for j, src in enumerate(sources):
            if not isinstance(src, dict) or "model" not in src:
                raise MergeError(f"{source}: slices[{i}].sources[{j}]: expected a mapping with `model`")
            rng = src.get("layer_range")
            if rng is not None and (not isinstance(rng, list) or len(rng) != 2
                                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                                    or not 0 <= rng[0] < rng[1]):
                raise MergeError(f"{source}: slices[{i}].sources[{j}].layer_range: expected [start, end) with "
                                 "0 ≤ start < end")
            unknown = set(src) - {"model", "layer_range", "parameters"}
            if unknown:
                raise MergeError(f"{source}: slices[{i}].sources[{j}]: unknown key {sorted(unknown)[0]!r}")
    if len(slices) == 1:
        sl = slices[0]
        params = dict(data.get("parameters") or {})
        params.update(sl.get("parameters") or {})  # the slice's settings win over the global ones
        if params:
            out["parameters"] = params
        if sl.get("base_model"):
            out["base_model"] = sl["base_model"]
        out["models"] = [{"model": s["model"], **({"parameters": s["parameters"]} if s.get("parameters") else {})}
                         for s in sl["sources"]]
    else:
        if data.get("merge_method") != "passthrough":
            raise MergeError(f"{source}: slices: several slices (layer stacking) work only with passthrough; "
                             "merging slice by slice with another method is not supported")
        if any(len(sl["sources"]) != 1 for sl in slices):
            raise MergeError(f"{source}: slices: passthrough takes exactly one source per slice")
        out["models"] = [{"model": slices[0]["sources"][0]["model"]}]
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `merge_method` would quietly win). `<<:` merges may still be overridden."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 2**20


def load_config(path: str | Path) -> MergeConfig:
    """Read a mergekit-style YAML file."""
    try:
        st = Path(path).stat()
        if not stat.S_ISREG(st.st_mode):  # a folder, or a device such as /dev/zero
            raise MergeError(f"{shown(path)}: not a YAML file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise MergeError(f"{shown(path)}: {st.st_size} bytes; a merge config is at most "
                             f"{MAX_CONFIG_BYTES // 2**20} MiB")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MergeError(f"{shown(path)}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise MergeError(f"{shown(path)}: not a YAML text file (not UTF-8 at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MergeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, str(path))


# ------------------------------------------------------------------- per-tensor resolution


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """Resolve a gradient or filter list for one tensor at layer position t ∈ [0, 1]."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise MergeError(f"parameter list mixes values and filters: {setting!r}")
        if cond.filter in (None, "*") or cond.filter in tensor_name:
            return evaluate_setting(cond.value, tensor_name, t)
    return None
