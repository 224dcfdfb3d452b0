"""Executing a plan: tensor by tensor, so memory stays at a few tensors whatever the model size.

Each tensor is merged by its method (`Aggregator.merge`: θ₀ + λ·U from the stacked task vectors,
or mergekit's exact form on the models); the engine reads the stacks, ahead of time, and writes
the results. A tensor whose stack is larger than BLOCK_BYTES (a 150k-token embedding) is read,
merged and written in blocks of rows when the method is coordinate-wise, so the peak does not grow
with the largest tensor. Whole-model statistics (cclip's norms) come from a first pass.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .checkpoints import CONFIG_FILES, TOKENIZER_FILES, Checkpoint, StateDict
from .errors import MergeError
from .progress import Progress, report
from .plan import MergePlan, plan_from_objects
from .task_vectors import FullFinetune, TaskVectorSource
from .validation import check_finite
from .writer import DEFAULT_SHARD_BYTES, StreamingModelWriter



def _check_finite_fast(name: str, tensor: torch.Tensor, owner: str) -> None:
    """check_finite with a cheap first test: a finite sum means every entry is finite (NaN and
    ±inf propagate through a sum); only a non-finite sum (or an overflow) runs the full check."""
    if tensor.is_floating_point() and not math.isfinite(float(tensor.sum(dtype=torch.float32))):
        check_finite(name, tensor, owner)


def _check_range(name: str, out: torch.Tensor, what: str | None = None, option: str = "out_dtype") -> None:
    """Finite values rounded to a narrower dtype (float16's max is 65504) must stay finite: an inf
    written into the model would poison every forward pass that reads it."""
    if out.is_floating_point() and not math.isfinite(float(out.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            dtype = str(out.dtype).removeprefix("torch.")
            raise MergeError(f"{what or f'the merge result: tensor {name}'} has {bad} value(s) beyond {dtype}'s "
                             f"range (±{torch.finfo(out.dtype).max:g}); use {option} bfloat16 or float32")


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Rounding src to dst can overflow (float32 or bfloat16 to float16): only then is the range checked,
    an extra pass over the tensor that float32 ↔ bfloat16 (one exponent range: 2¹²⁸) does not need."""
    if not (src.is_floating_point and dst.is_floating_point) or src == dst:
        return False
    return math.ceil(math.log2(torch.finfo(dst).max)) < math.ceil(math.log2(torch.finfo(src).max))


_PREFETCH_BYTES = 256 * 1024**2
# A stack (base + K sources, at the compute itemsize) larger than this is merged in blocks of rows
# when the method allows it (Aggregator.row_separable): peak memory stays at a few blocks whatever
# the size of the largest tensor (a 150k-token embedding is GBs of stack).
BLOCK_BYTES = _PREFETCH_BYTES

Rows = tuple[int, int] | None  # rows [start, stop) of a tensor (dim 0), or None: all of it


def _stack_bytes(plan: MergePlan, name: str, itemsize: int = 4, rows: Rows = None) -> int:
    """Bytes of one tensor's (or its rows') base and K sources at `itemsize` (float32 unless told)."""
    shape = plan.base.shape(name)
    n = math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])
    return itemsize * (len(plan.sources) + 1) * n


def _shape(plan: MergePlan, name: str, rows: Rows) -> tuple[int, ...]:
    shape = tuple(plan.base.shape(name))
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def work_units(plan: MergePlan, itemsize: int = 4, block_bytes: int = BLOCK_BYTES) -> list[tuple[str, Rows]]:
    """(tensor, rows) in the base's order: a tensor whose stack exceeds `block_bytes` is cut into
    blocks of rows where the method allows it and every source is a full fine-tune (a LoRA update
    is made whole, from its factors)."""
    split = plan.method.row_separable and all(isinstance(s, FullFinetune) for s in plan.sources)
    units: list[tuple[str, Rows]] = []
    for name in plan.tensor_names:
        shape = plan.base.shape(name)
        total = _stack_bytes(plan, name, itemsize)
        if not split or len(shape) == 0 or shape[0] < 2 or total <= block_bytes:
            units.append((name, None))
            continue
        step = max(1, block_bytes // max(1, total // shape[0]))
        units += [(name, (a, min(a + step, shape[0]))) for a in range(0, shape[0], step)]
    return units


def _read_into(checkpoint, name: str, out: torch.Tensor, rows: Rows = None) -> bool:
    reader = getattr(checkpoint, "read_into", None)  # StateDicts (in-memory) have none
    return bool(reader and reader(name, out, rows))


def _get(checkpoint, name: str, rows: Rows = None) -> torch.Tensor:
    return checkpoint.get(name) if rows is None else checkpoint.get(name, rows)


def _carve(buffer: torch.Tensor | None, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """A float32 tensor of `shape`: a view into `buffer` at `offset` (reused memory), else new."""
    n = math.prod(shape)
    if buffer is None or buffer.numel() < offset + n:
        return torch.empty(shape, dtype=torch.float32)
    return buffer[offset:offset + n].view(shape)


def load_tensor_stack(plan: MergePlan, name: str, buffer: torch.Tensor | None = None, rows: Rows = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The base tensor and the stacked task vectors [K, ...] of one tensor (or of its `rows`, full
    fine-tunes only), float32, checked finite (in `buffer`, a reused flat float32 tensor, when it is
    large enough)."""
    shape = _shape(plan, name, rows)
    base = _carve(buffer, shape)
    if not _read_into(plan.base, name, base, rows):
        base = _get(plan.base, name, rows).float()
    _check_finite_fast(name, base, plan.base.ref)
    deltas = _carve(buffer, (len(plan.sources), *shape), math.prod(shape))
    for i, src in enumerate(plan.sources):
        if isinstance(src, FullFinetune) and src.checkpoint.dtype(name) != torch.float64:
            # θᵢ − θ₀ written straight into the stack, no temporary (f16/bf16 → f32 is exact)
            if _read_into(src.checkpoint, name, deltas[i], rows):
                deltas[i].sub_(base)
            else:
                torch.sub(_get(src.checkpoint, name, rows), base, out=deltas[i])
            _check_finite_fast(name, deltas[i], src.name)
        else:
            d = (_get(src.checkpoint, name, rows).float() - base) if rows is not None else src.delta(name, base)
            _check_finite_fast(name, d, src.name)
            deltas[i] = d
    return base, deltas


def load_model_stack(plan: MergePlan, name: str, buffer: torch.Tensor | None = None, rows: Rows = None
                     ) -> torch.Tensor:
    """The fine-tuned tensors θᵢ themselves (or their `rows`), stacked [K, ...] float32 and checked
    finite (no base)."""
    models = _carve(buffer, (len(plan.sources), *_shape(plan, name, rows)))
    for i, src in enumerate(plan.sources):
        if not _read_into(src.checkpoint, name, models[i], rows):
            models[i] = _get(src.checkpoint, name, rows)
        _check_finite_fast(name, models[i], src.name)
    return models


def affine_coefficients(plan: MergePlan, name: str, norms: torch.Tensor | None) -> torch.Tensor | None:
    """λ·cᵢ when this tensor's merge is exactly Σ λcᵢθᵢ (see Aggregator.affine_coefficients) and the
    sources are full fine-tunes: θ₀ + λΣcᵢ(θᵢ − θ₀) then needs no θ₀: one model fewer to read, no
    subtraction (mergekit's `linear` reads no base either)."""
    if not all(isinstance(s, FullFinetune) and s.checkpoint.dtype(name) != torch.float64 for s in plan.sources):
        return None
    p = plan.params_for(name)
    return plan.method.affine_coefficients(p.weights, p.hyper, p.lam, norms)


def update_norms(plan: MergePlan, progress: Progress | None = None, block_bytes: int = BLOCK_BYTES
                 ) -> torch.Tensor:
    """First pass: ‖wᵢτᵢ‖ over the whole model (weights resolved per tensor)."""
    sq = torch.zeros(len(plan.sources), dtype=torch.float64)
    units = work_units(plan, block_bytes=block_bytes)
    for j, (name, rows) in enumerate(units):
        _, deltas = load_tensor_stack(plan, name, rows=rows)
        w = plan.params_for(name).weights.double()
        sq += deltas.reshape(len(plan.sources), -1).double().pow(2).sum(1) * w.pow(2)
        report(progress, j + 1, len(units), f"norms {name}")
    return sq.sqrt()


def uses_exact(plan: MergePlan) -> bool:
    """Whether the merge runs the method's exact form (mergekit's definition, in the compute dtype;
    see Aggregator.runs_exact): full fine-tunes only (a LoRA update has no stored θᵢ to load in
    that dtype)."""
    if not all(isinstance(s, FullFinetune) for s in plan.sources):
        return False
    return plan.method.runs_exact(plan.compute_dtype, plan.global_settings.get("lambda", 1.0))


def exact_inputs(plan: MergePlan, name: str, rows: Rows = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """θ₀ (None when the exact form does not read it) and the θᵢ of one tensor (or of its rows), in
    the compute dtype."""
    dt = plan.compute_dtype
    reads_base = not plan.no_base and plan.method.exact_reads_base(plan.params_for(name).lam)
    base = _in_compute(_get(plan.base, name, rows), dt, name, plan.base.ref) if reads_base else None
    models = [_in_compute(_get(src.checkpoint, name, rows), dt, name, src.name) for src in plan.sources]
    return base, models


def _in_compute(stored: torch.Tensor, dt: torch.dtype, name: str, owner: str) -> torch.Tensor:
    """A stored tensor in the compute dtype, checked finite: a value the file holds (in bfloat16, say)
    that float16 cannot is named as such, not as a non-finite weight of the model."""
    t = stored.to(dt)
    if _narrows(stored.dtype, t.dtype) and not math.isfinite(float(t.sum(dtype=torch.float32))):
        _check_finite_fast(name, stored, owner)  # non-finite in the file itself: that message
        _check_range(name, t, f"{owner}: tensor {name}", "dtype")
    _check_finite_fast(name, t, owner)
    return t


def exact_tensor(plan: MergePlan, name: str, inputs=None) -> torch.Tensor:
    """One tensor merged by the method's exact form (inputs read here unless given)."""
    p = plan.params_for(name)
    base, models = inputs if inputs is not None else exact_inputs(plan, name)
    return plan.method.exact_merge(base, models, p.weight_values, p.lam, p.hyper, name)


Block = tuple[str, Rows, torch.Tensor]  # (tensor name, rows or None, merged values in the output dtype)


def _tensor_done(plan: MergePlan, name: str, rows: Rows) -> bool:
    """Whether this unit is a tensor's last (its whole, or its last block of rows)."""
    return rows is None or rows[1] == plan.base.shape(name)[0]


def _iter_exact(plan: MergePlan, block_bytes: int, gpu: torch.device | None = None) -> Iterator[Block]:
    """The exact path, with the next unit's inputs read on a second thread while this one merges
    (inputs over _PREFETCH_BYTES are read in turn: peak memory); on `gpu` if given."""
    itemsize = plan.compute_dtype.itemsize
    units = work_units(plan, itemsize, block_bytes)
    small = [_stack_bytes(plan, n, itemsize, r) <= _PREFETCH_BYTES for n, r in units]
    pool = ThreadPoolExecutor(1, thread_name_prefix="merge-prefetch")

    def fetch(i: int):
        return pool.submit(exact_inputs, plan, *units[i]) if i < len(units) and small[i] else None

    try:
        ahead = fetch(0)
        for j, (name, rows) in enumerate(units):
            inputs = ahead.result() if ahead is not None else exact_inputs(plan, name, rows)
            ahead = fetch(j + 1)
            if gpu:
                base, models = inputs
                inputs = (None if base is None else base.to(gpu), [m.to(gpu) for m in models])
            merged = exact_tensor(plan, name, inputs)
            del inputs
            _check_finite_fast(name, merged, "the merge result")
            out = merged.to(plan.output_dtype(name))
            if _narrows(merged.dtype, out.dtype):
                _check_range(name, out)
            yield name, rows, out.cpu() if gpu else out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_merged_blocks(plan: MergePlan, progress: Progress | None = None, device: torch.device | str | None = None,
                       block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """Yield (name, rows, merged values in the output dtype, on the CPU) in the base's tensor order;
    a tensor whose stack exceeds `block_bytes` comes as consecutive blocks of rows when the method
    allows it (see work_units), else whole (rows None).

    With a `device` other than the CPU, each unit's inputs are read on the CPU, moved there, merged
    there and the result copied back (the float32 pipeline and the exact path alike).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gpu = dev if dev.type != "cpu" else None
    if uses_exact(plan):
        blocks = _iter_exact(plan, block_bytes, gpu)
    else:
        blocks = _iter_float32(plan, gpu, block_bytes)
    done = 0
    with contextlib.closing(blocks):  # closed with this generator: its read-ahead thread is joined
        for name, rows, block in blocks:
            yield name, rows, block
            if _tensor_done(plan, name, rows):
                done += 1
                report(progress, done, len(plan.tensor_names), name)
    for name in plan.passthrough_names:
        yield name, None, plan.base.get(name)


def _iter_float32(plan: MergePlan, gpu: torch.device | None, block_bytes: int) -> Iterator[Block]:
    """The float32 pipeline: θ₀ + λ·U from each unit's stack of task vectors (or Σ λcᵢθᵢ), on `gpu` if given."""
    norms = update_norms(plan, block_bytes=block_bytes) if plan.method.needs_update_norms else None
    units = work_units(plan, 4, block_bytes)
    # Two pipeline stages on two threads: the next unit's stack is read while this one merges.
    # Stacks larger than _PREFETCH_BYTES are not read ahead (peak memory). The torch thread count
    # is the process's own: the CLI sets 1 at start-up (intra-op threads cost more than they give
    # here: one barrier per op); a server must not change it per request (it is process-wide).
    pool = ThreadPoolExecutor(1, thread_name_prefix="merge-prefetch")
    try:
        # Stacks are read into reused buffers (memory already mapped: no page fault per 4 KB, about
        # twice the read speed): one for the stacks too large to read ahead, two for the others
        # (one being merged, one being read).
        sizes = [_stack_bytes(plan, n, 4, r) // 4 for n, r in units]
        small = max([z for z in sizes if 4 * z <= _PREFETCH_BYTES], default=0)
        ring = [torch.empty(small, dtype=torch.float32) for _ in range(2)] if small else [None, None]
        big = torch.empty(max(sizes), dtype=torch.float32) if max(sizes, default=0) > small else None

        def load(name: str, rows: Rows, buffer: torch.Tensor | None):
            c = affine_coefficients(plan, name, norms)
            if c is not None:
                return c, load_model_stack(plan, name, buffer, rows)
            return None, load_tensor_stack(plan, name, buffer, rows)

        def fetch(i: int):
            if i >= len(units) or 4 * sizes[i] > _PREFETCH_BYTES:
                return None
            return pool.submit(load, *units[i], ring[i % 2])

        ahead = fetch(0)
        for j, (name, rows) in enumerate(units):
            c, data = ahead.result() if ahead is not None else load(name, rows, big)
            ahead = fetch(j + 1)
            if c is not None:  # Σ λcᵢθᵢ straight from the models
                if gpu:
                    c, data = c.to(gpu), data.to(gpu, non_blocking=True)
                merged = (c @ data.reshape(len(c), -1)).reshape(data.shape[1:])
            else:
                p = plan.params_for(name)
                base, deltas = data
                w, nrm = p.weights, norms
                if gpu:
                    base, deltas, w = base.to(gpu), deltas.to(gpu), w.to(gpu)
                    nrm = None if norms is None else norms.to(gpu)
                merged = plan.method.merge(deltas, w, base, p.lam, p.hyper, tensor=name, update_norms=nrm)[0]
            _check_finite_fast(name, merged, "the merge result")
            del data
            out = merged.to(plan.output_dtype(name))
            if _narrows(merged.dtype, out.dtype):
                _check_range(name, out)
            yield name, rows, out.cpu() if gpu else out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_merged(plan: MergePlan, progress: Progress | None = None, device: torch.device | str | None = None,
                block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the output dtype, on the CPU) in the base's tensor order (the
    blocks of `iter_merged_blocks` joined)."""
    parts: list[torch.Tensor] = []
    for name, rows, block in iter_merged_blocks(plan, progress, device, block_bytes):
        if rows is None:
            yield name, block
            continue
        parts.append(block)
        if _tensor_done(plan, name, rows):
            yield name, torch.cat(parts)
            parts = []


def merge_to_dir(plan: MergePlan, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None,
                 card: str | None = None, device: torch.device | str | None = None,
                 block_bytes: int = BLOCK_BYTES) -> Path:
    """Stream the merge into a transformers folder (atomically: all or nothing); merged on `device`,
    large tensors in blocks of rows (see work_units)."""
    specs = [(n, plan.base.shape(n), plan.output_dtype(n)) for n in plan.tensor_names]
    specs += [(n, plan.base.shape(n), plan.base.dtype(n)) for n in plan.passthrough_names]
    # the blocks close before the writer aborts: an interrupt (Ctrl-C, SIGTERM) waits for the read-ahead
    # thread, which would otherwise still read the inputs while the process exits
    with StreamingModelWriter(out_dir, specs, shard_bytes=shard_bytes, overwrite=overwrite) as writer, \
            contextlib.closing(iter_merged_blocks(plan, progress, device=device, block_bytes=block_bytes)) as blocks:
        for name, _, block in blocks:
            writer.write(name, block)
        write_side_files(plan, writer, card)
        return writer.finish()


def write_side_files(plan: MergePlan, writer: StreamingModelWriter, card: str | None) -> None:
    """config.json (dtype updated), generation config, tokenizer, merge YAML and model card."""
    from .card import model_card

    cfg = dict(plan.base.config)
    if cfg:
        out_dtype = str(plan.output_dtype(plan.tensor_names[0])).removeprefix("torch.")
        cfg["dtype"] = out_dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = out_dtype
        writer.add_file("config.json", json.dumps(cfg, indent=2) + "\n")
    writer.copy_files(f for f in plan.base.side_files(CONFIG_FILES) if f.name != "config.json")
    tok_source = plan.base if plan.tokenizer_source == "base" else Checkpoint(plan.tokenizer_source)
    writer.copy_files(tok_source.side_files(TOKENIZER_FILES))
    if plan.chat_template:
        set_chat_template(writer, plan.chat_template)
    if plan.config is not None:
        writer.add_file("merge_config.yml", plan.config.to_yaml())
    writer.add_file("README.md", card if card is not None else model_card(plan))


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def set_chat_template(writer: StreamingModelWriter, template: str) -> None:
    """mergekit's `chat_template`: a Jinja template, `chatml`, or `auto` (keep the tokenizer's own:
    every model here shares one tokenizer, so the most common template is the base's)."""
    if template == "auto":
        return
    if template == "chatml":
        template = CHATML
    elif "{" not in template:
        raise MergeError(f"chat_template: {template!r} is not a Jinja template; built in: auto, chatml")
    path = writer.tmp / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def merge_state_dicts(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                      method: str, weights: Sequence[float] | None = None, lam: float = 1.0,
                      **hyperparams: Any) -> dict[str, torch.Tensor]:
    """Merge plain dicts of tensors (notebooks, tests): returns the merged dict, base dtypes kept."""
    base_ck = StateDict(base, "base")
    sources: list[TaskVectorSource] = [FullFinetune(StateDict(sd, f"model {i}")) for i, sd in enumerate(finetuned)]
    plan = plan_from_objects(base_ck, sources, method, weights, lam, hyperparams)
    return dict(iter_merged(plan))
