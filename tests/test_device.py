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
_READS = {"__float__": 0.5, "__int__": 0, "__bool__": False}


class DeviceStandIn(TorchFunctionMode):
    """Let code written for a GPU run on meta tensors: value reads give placeholders, copies to the
    CPU give zeros. Everything else (the device checks included) is torch's own."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is not None and t.is_meta:
            name = getattr(func, "__name__", "")
            if name in ("tolist", "item"):  # placeholders of the tensor's shape and kind
                return torch.full(t.shape, 0.5 if t.is_floating_point() else 0, dtype=t.dtype).tolist()
            if name in _READS:
                return _READS[name]
            if name == "isfinite":  # only ever read on the host (a merge's finiteness check): all finite
                return torch.ones(t.shape, dtype=torch.bool)
            if name == "cpu" or (name == "to" and _to_cpu(args[1:], kwargs)):
                dtype = next((a for a in (*args[1:], kwargs.get("dtype")) if isinstance(a, torch.dtype)), t.dtype)
                return torch.zeros(t.shape, dtype=dtype)
        if getattr(func, "__name__", "") not in _CROSS_DEVICE:
            _same_device(func, args, kwargs)
        return func(*args, **kwargs)


_CROSS_DEVICE = {"to", "copy_", "__getitem__", "__setitem__", "index_put_", "cpu", "__get__", "__set__",
                 "_has_compatible_shallow_copy_type"}


def _same_device(func, args, kwargs) -> None:
    """CUDA's rule, which meta kernels do not all apply (an embedding takes CPU ids there): the tensors
    of one op share a device, CPU scalars (0-dim) aside."""
    flat = [a for a in (*args, *kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    if any(t.is_meta for t in tensors) and any(not t.is_meta and t.dim() > 0 for t in tensors):
        raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors to be on the same device, "
                           "found tensors on the CPU and the device")


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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_disk_merge_streams_through_a_device(tmp_path, method, params, dtype):
    """`--device` path of the engine: each unit's inputs moved to the device, merged there, copied
    back; in float32 (our pipeline) and in bfloat16 (mergekit's arithmetic, the exact path)."""
    from merging.engine import uses_exact

    paths = tiny_models(tmp_path, 0, [1, 2, 3])
    k = 3 if AGGREGATORS[method].accepts(3) else 2
    cfg = MergeConfig.model_validate({
        "merge_method": method, "base_model": str(paths["base"]), "dtype": dtype, "parameters": params,
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in range(k)]})
    plan = plan_from_config(cfg)
    if dtype == "bfloat16" and method not in ("fednova", "cclip", "fedgma", "median"):  # mergekit's methods
        assert uses_exact(plan)  # the exact path, which --device now serves too
    with DeviceStandIn():
        blocks = list(iter_merged_blocks(plan, device=META))
    assert {name for name, _, _ in blocks} == set(plan.tensor_names) | set(plan.passthrough_names)
    assert all(b.device.type == "cpu" for _, _, b in blocks)
    merged = [b for name, _, b in blocks if name in plan.tensor_names]
    assert all(not b.any() for b in merged)  # each came back from the device (the stand-in's copies are zeros)


def test_a_session_merges_decodes_and_searches_on_a_device(tmp_path_factory):
    """The app's path (FEDMERGE_DEVICE): the shared stack and the session's models on the device, every
    model input moved there, decoding's bookkeeping on the CPU, searches in this process (no fork)."""
    from evaluation.distributed import fork_workers
    from evaluation.search import search
    from evaluation.session import Session
    from merging.cache import StackCache
    from tests.conftest import build_tiny_zoo

    zoo = build_tiny_zoo(tmp_path_factory)
    with DeviceStandIn():
        session = Session(cache=StackCache(2 ** 30, device=META), zoo=zoo, allow_hub=False).load_zoo()
        k = len(session.selected)
        res = session.live("task_arithmetic", [1.0] * k, 0.3, {}, ["reverse: abc=", "free text"])
        session.live("ties", [1.0] * k, 0.5, {"density": 0.5}, [])
        sim = session.similarity_live()
        found = search(session, "task_arithmetic", lambdas=[0.3, 0.6], n_val=4, n_test=4)
        session.apply("ties", [1.0] * k, 0.5, {"density": 0.5})
        folder = session.write_merged(tmp_path_factory.mktemp("export") / "merged")  # the export, like --device
    from safetensors.torch import load_file

    written = load_file(str(folder / "model.safetensors"))
    assert written and [n for n, t in written.items() if t.any()] == []  # merged on the device: zeros
    assert session.device == META and fork_workers(session, 8, 2) == 1
    assert all(p.device == META for p in session.merge.model.parameters())
    assert all(t.device == META for t in session.stack.deltas.values())
    assert len(res.rows) == 2 and set(res.accuracy["merged"]) == set(session.tasks)
    assert sim.names[-1] == "merged" and found.best_lambda in (0.3, 0.6)


def test_a_device_that_is_not_there_is_one_line_at_start(monkeypatch):
    """FEDMERGE_DEVICE naming a device that is not there stops `python app.py` before it serves, in one
    line (the cache resolves it once: a typo, or cuda on a machine without a GPU, is a MergeError;
    `SystemExit` with a message prints it to stderr and exits 1)."""
    from merging.cache import StackCache

    monkeypatch.setenv("FEDMERGE_DEVICE", "tpu")
    with pytest.raises(MergeError, match="unknown device 'tpu'"):
        StackCache().device
    if not torch.cuda.is_available():
        monkeypatch.setenv("FEDMERGE_DEVICE", "cuda")
        with pytest.raises(MergeError, match="no CUDA GPU"):
            StackCache().device
    monkeypatch.setenv("FEDMERGE_DEVICE", "auto")
    assert StackCache().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    import app
    from merging.cache import CACHE

    monkeypatch.setenv("FEDMERGE_DEVICE", "cuda:7x")
    monkeypatch.setattr(CACHE, "_device", None)  # as at start-up: not resolved yet
    with pytest.raises(SystemExit) as stop:
        app.main()  # stops before building or serving anything
    text = str(stop.value.code)
    assert text.startswith("app.py: FEDMERGE_DEVICE: ") and "cuda:7x" in text and "\n" not in text


def test_the_gpu_check_runs(capsys):
    """bench/gpu_check.py, the one script a GPU session runs, works end to end (here the CPU against itself)."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick", "--no-record"]) == 0
    out = capsys.readouterr().out
    for section in ("## live merges", "## scoring", "## searches", "## disk merges (CLI)"):
        assert section in out
    assert "FAILED" not in out and "NO" not in out.split() and "0 of 70 predictions differ" in out
    assert out.count("max |Δ| / max|θ| 0.00e+00  ok") == 1 and "float32  cpu" in out
    assert "same choice and scores: True" in out


def test_a_full_gpu_is_one_line_for_the_user():
    """torch's OutOfMemoryError (what a GPU raises when a selection does not fit) reaches the user as
    a sentence naming the GPU and what to do, never its allocator text."""
    from evaluation.limits import user_message

    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.8 GiB total)")
    text = user_message(exc, action="live")
    assert text.startswith("the GPU ran out of memory in live") and "FEDMERGE_DEVICE=cpu" in text
    assert "Tried to allocate" not in text and "\n" not in text


def test_the_device_is_chosen_before_models_load(tiny_zoo):
    """`python -m evaluation ... --device`: the cache takes a device while empty; once stacks are
    loaded another device is refused (they are not moved), the same one is fine."""
    from merging.cache import StackCache

    cache = StackCache(2 ** 30)
    cache.use_device(META)
    assert cache.device == META
    cache.use_device("cpu")
    cache.get_stack(str(tiny_zoo["base"]), [str(tiny_zoo["ft0"])], allow_hub=False)
    cache.use_device("cpu")
    with pytest.raises(MergeError, match="already loaded on cpu"):
        cache.use_device(META)
