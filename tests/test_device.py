"""Merging on a device other than the CPU, checked without a GPU.

These machines have no GPU, so torch's meta device stands in for one: its tensors hold no data, but
every op checks devices exactly as on CUDA, so a tensor made on the CPU and mixed into a device
merge, or a numpy view of a device tensor, fails here as it would on a GPU. Reads of a value (which
a GPU allows: `float(t)`, `.item()`, `.tolist()`) return a placeholder, and copies back to the CPU
return zeros of the right shape, so the whole path runs. The values of GPU merges (equal to the
CPU's within float32 rounding) need a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from merging.config import MergeConfig
from merging.engine import iter_merged_blocks
from merging.errors import MergeError
from merging.plan import plan_from_config
from merging.registry import AGGREGATORS
from merging.sparsify import band_mask, topk_mask
from tests.conftest import tiny_models

META = torch.device("meta")
_READS = {"item": 0.5, "__float__": 0.5, "__int__": 1, "__bool__": False}


class DeviceStandIn(TorchFunctionMode):
    """Let code written for a GPU run on meta tensors: value reads give placeholders, copies to the
    CPU give zeros. Everything else (the device checks included) is torch's own."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is not None and t.is_meta:
            name = getattr(func, "__name__", "")
            if name == "tolist":
                return [0.5] * t.numel() if t.dim() else 0.5
            if name in _READS:
                return _READS[name]
            if name == "cpu" or (name == "to" and _to_cpu(args[1:], kwargs)):
                dtype = next((a for a in (*args[1:], kwargs.get("dtype")) if isinstance(a, torch.dtype)), t.dtype)
                return torch.zeros(t.shape, dtype=dtype)
        return func(*args, **kwargs)


def _to_cpu(args, kwargs) -> bool:
    targets = (*args, kwargs.get("device"))
    return any(a == "cpu" or (isinstance(a, torch.device) and a.type == "cpu") for a in targets)


def _settings(agg, k: int):
    """Each hyperparameter at its default and at one other value (both booleans, every choice)."""
    yield {}
    for p in agg.params:
        if p.type is bool:
            values = [True, False]
        elif p.choices:
            values = list(p.choices)
        elif p.type is str:
            continue
        else:
            lo = p.low if p.low is not None else -1.0
            hi = p.high if p.high is not None else 2.0
            values = [p.type((lo + hi) / 2) if p.type is float else max(int(lo), 1)]
        for v in values:
            yield {p.name: [v] * k if p.per_model else v}


def test_the_stand_in_catches_what_a_gpu_would():
    """The check can fail: a CPU tensor mixed into a device merge, and numpy on a device tensor, both raise."""
    x = torch.randn(4, 3, device=META)
    with DeviceStandIn(), pytest.raises(RuntimeError, match="device"):
        x * torch.ones(4, 1)
    with DeviceStandIn(), pytest.raises(TypeError, match="numpy"):
        x.numpy()
    with DeviceStandIn():
        assert float(x.sum()) == 0.5 and x.cpu().shape == (4, 3)


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_every_aggregator_merges_on_a_device(method):
    """Every method with every kind of setting keeps its work on the tensors' device (no CPU
    temporaries, no numpy selection of a device tensor): what `--device cuda` and the app need."""
    agg = AGGREGATORS[method]
    ran = 0
    for k in (1, 2, 3):
        if not agg.accepts(k):
            continue
        for setting in _settings(agg, k):
            try:
                hp = agg.check_params(setting, k)
            except MergeError:
                continue  # a setting this method refuses for k models
            for key in ("steps", "learning_rates"):
                if key in hp and hp[key] is None:
                    hp[key] = [100.0 * (i + 1) for i in range(k)]
            base, deltas = torch.randn(64, 48, device=META), torch.randn(k, 64, 48, device=META)
            with DeviceStandIn():
                out, _ = agg.merge(deltas, torch.ones(k, device=META), base, 0.7, hp, tensor="h.0.attn.c_attn.weight",
                                   update_norms=torch.ones(k, dtype=torch.float64, device=META))
            assert out.device == META and out.shape == base.shape, (method, setting)
            ran += 1
    assert ran >= 1


def test_selections_find_the_same_cut_off_a_gpu_finds():
    """Trim and band masks pick their cut-offs by numpy's partition on the CPU and by torch's kthvalue
    on a device: the same order statistics."""
    from merging import sparsify

    x = torch.randn(5000)
    a = x.abs()
    for ranks in ([0], [2499], [4999], [1000, 3999]):
        assert sparsify._order_stats(a, ranks) == [float(a.kthvalue(r + 1).values) for r in ranks]
    assert topk_mask(x, 0.2).sum() == 1000 and band_mask(x, 0.5, 0.1).sum() == 2500


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("della", {"density": 0.5, "epsilon": 0.1}),
    ("fednova", {"steps": [10, 20, 30]}), ("cclip", {}), ("fedgma", {"rho": 0.5}), ("median", {}),
    ("linear", {}), ("slerp", {"t": 0.5}), ("model_stock", {}),
])
def test_the_disk_merge_streams_through_a_device(tmp_path, method, params):
    """`--device` path of the engine: each stack moved to the device, merged there, copied back."""
    paths = tiny_models(tmp_path, 0, [1, 2, 3])
    k = 3 if AGGREGATORS[method].accepts(3) else 2
    cfg = MergeConfig.model_validate({
        "merge_method": method, "base_model": str(paths["base"]), "dtype": "float32", "parameters": params,
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in range(k)]})
    plan = plan_from_config(cfg)
    with DeviceStandIn():
        blocks = list(iter_merged_blocks(plan, device=META))
    assert {name for name, _, _ in blocks} == set(plan.tensor_names) | set(plan.passthrough_names)
    assert all(b.device.type == "cpu" for _, _, b in blocks)
