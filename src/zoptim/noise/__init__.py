"""Seeded, regenerable noise: the memory trick every method rests on.

A perturbation is never stored. Its values are a pure function of a 64-bit key and of each
element's index, computed by a counter-based hash, so the same tensor can be regenerated at
any time, on any device, in any chunking, and a step can be replayed from seeds alone.

Two kinds of noise:

- ``"gaussian"``: standard normal, by the Box-Muller transform of two hashed 24-bit
  uniforms (tails reach about 5.6 standard deviations).
- ``"rademacher"``: +-1 with equal probability, one hash bit per element.

``add_noise_(x, key, alpha)`` adds ``alpha * z(key)`` to ``x`` in place, with the hash, the
transform and the add in one kernel and no temporary tensor:

- on an NVIDIA GPU with Triton, ``perturb_triton``'s kernel, which also moves many tensors
  in one launch (``add_noise_many_``), as a step on a GPU is otherwise bound by launches;
- elsewhere, where ``torch.compile`` works, inductor's fused kernel;
- otherwise (and for single-element tensors) the same arithmetic eagerly over fixed-size
  chunks, so the extra memory is one chunk.

``noise_stacks`` draws many tensors' noise in one compiled kernel per tensor size on a CPU
(batched queries draw every parameter's coordinates for a step that way).

Rademacher noise is bit-identical between the paths. Gaussian noise agrees to a few float32
ulps between the CPU paths and to about 1e-6 on the GPU, whose kernel uses the hardware's
approximate logarithm and cosine; a given tensor always takes the same path, so a
perturbation is always undone exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict

import torch

NOISE_KINDS = ("gaussian", "rademacher")

# Chunk of the eager path: bounds its temporaries to a few MiB whatever the tensor size.
EAGER_CHUNK = 1 << 16
# Small tensors' noise is drawn together on a CPU, in float32 buffers of at most this many
# elements (128 KiB, freed before the forward pass: less than its activations).
SMALL_NUMEL = 1 << 15
_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """Combine integers into one well-scrambled 64-bit key (splitmix64 finalizer chain)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def _as_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (C. Wellons' "lowbias32"), in int32 arithmetic."""
    x = x ^ _srl(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _srl(x, 15)
    x = x * _as_int32(0x846CA68B)
    return x ^ _srl(x, 16)


def _uniform_bits(idx: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return _hash32(_hash32(idx ^ keys[0]) + keys[1])


def _gaussian(idx: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    h = _uniform_bits(idx, keys)
    h2 = _hash32(h ^ 0x5BD1E995)
    u1 = (_srl(h, 8).to(torch.float32) + 1.0) * (1.0 / 16777216.0)  # (0, 1]
    u2 = _srl(h2, 8).to(torch.float32) * (1.0 / 16777216.0)  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def _rademacher(idx: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * (_srl(_uniform_bits(idx, keys), 13) & 1).to(torch.float32)


# One function per kind: each is compiled on its own, so its dtype and device variants stay
# within dynamo's per-function recompile limit.
def _add_gaussian(flat, keys, alpha, offset):
    idx = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device) + offset
    flat.add_(_gaussian(idx, keys) * alpha)


def _add_rademacher(flat, keys, alpha, offset):
    idx = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device) + offset
    flat.add_(_rademacher(idx, keys) * alpha)


def _fill_gaussian_rows(rows, k0, k1, alpha):
    # row j of ``rows`` (k, n) is set to the noise of key j: the keys broadcast along the rows
    idx = torch.arange(rows.shape[1], dtype=torch.int32, device=rows.device)
    rows.copy_(_gaussian(idx, (k0, k1)) * alpha)


def _fill_rademacher_rows(rows, k0, k1, alpha):
    idx = torch.arange(rows.shape[1], dtype=torch.int32, device=rows.device)
    rows.copy_(_rademacher(idx, (k0, k1)) * alpha)


_KERNELS = {"gaussian": _add_gaussian, "rademacher": _add_rademacher,
            "gaussian-rows": _fill_gaussian_rows, "rademacher-rows": _fill_rademacher_rows}
# Single elements take the eager path: dynamo specializes sizes 0 and 1, and a kernel per
# such size would eat into its recompile limit.
FUSED_MIN_NUMEL = 2

_compiled: dict[str, object] = {}
# (kind, dtype, device type) whose kernel failed to compile: those alone take the eager path,
# every variant compiled before keeps its kernel
_eager_variants: set[tuple] = set()
_backend = os.environ.get("ZOPTIM_NOISE_BACKEND", "auto")
_triton = None  # perturb_triton once imported, False where it cannot be


def set_backend(name: str) -> None:
    """Choose how noise is generated: ``"auto"`` (fused kernel, eager if compiling fails),
    ``"compiled"`` (fused kernel, errors propagate) or ``"eager"`` (chunked torch ops)."""
    global _backend
    if name not in ("auto", "compiled", "eager"):
        raise ValueError(f"noise backend must be 'auto', 'compiled' or 'eager', got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def compiles() -> bool:
    """Whether the next fused noise draw of this process compiles its kernel first (on a
    fresh machine that takes up to a minute; inductor caches it on disk afterwards)."""
    return _backend != "eager" and not _compiled


def _triton_for(tensors) -> object | None:
    """The Triton kernel module if it can take every one of ``tensors``, else None."""
    global _triton
    if _backend == "eager" or not tensors or not tensors[0].is_cuda:
        return None
    if _triton is None:
        try:
            from zoptim.noise import triton as perturb_triton
            _triton = perturb_triton
        except ImportError:
            _triton = False
    if _triton is False or not all(_triton.supported(t) for t in tensors):
        return None
    return _triton


def _launch_triton(kernel, *args) -> bool:
    global _triton
    try:
        kernel(*args)
        return True
    except Exception as err:  # a Triton or driver version that cannot build the kernel
        if _backend == "compiled":
            raise
        warnings.warn(f"zoptim: Triton noise kernel unavailable ({type(err).__name__}: {err}); "
                      "using the per-tensor path", RuntimeWarning, stacklevel=3)
        _triton = False
        return False


def _fused(kind: str):
    if kind not in _compiled:
        # Four float dtypes on two kinds of device are eight variants of each kernel, and a
        # process that trains many models (a test suite, a benchmark) meets more of them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[kind] = torch.compile(_KERNELS[kind], dynamic=True, fullgraph=True)
    return _compiled[kind]


def _run_fused(kind: str, flat: torch.Tensor, *args) -> bool:
    """Run the compiled kernel of ``kind`` on ``flat``; False where the eager path must do it."""
    variant = (kind, flat.dtype, flat.device.type)
    if _backend == "eager" or flat.numel() < FUSED_MIN_NUMEL or variant in _eager_variants:
        return False
    try:
        _fused(kind)(flat, *args)
        return True
    except Exception as err:  # a missing compiler, an unsupported device or dtype
        if _backend == "compiled":
            raise
        warnings.warn(f"zoptim: fused noise kernel unavailable for {kind} noise on "
                      f"{flat.dtype} {flat.device.type} tensors ({type(err).__name__}: {err}); "
                      "using the eager path for them", RuntimeWarning, stacklevel=3)
        _eager_variants.add(variant)
        return False


def _key_halves(keys: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([_as_int32(k) for k in keys], dtype=torch.int32, device=device),
            torch.tensor([_as_int32(k >> 32) for k in keys], dtype=torch.int32, device=device))


def _check(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")


def add_noise_(x: torch.Tensor, key: int, alpha: float, kind: str = "gaussian") -> torch.Tensor:
    """Add ``alpha * z`` to ``x`` in place, where ``z`` is the noise of ``key`` shaped like ``x``."""
    _check(kind)
    if x.numel() >= 1 << 31:
        raise ValueError("tensors of 2**31 elements or more are not supported; split the parameter")
    if not x.is_contiguous():
        raise ValueError("add_noise_ needs a contiguous tensor")
    if alpha == 0 or x.numel() == 0:
        return x
    module = _triton_for([x])
    if module is not None and _launch_triton(module.add_noise_, x, key, alpha, kind == "gaussian"):
        return x
    flat = x.view(-1)
    dev = x.device
    keys = torch.tensor([_as_int32(key), _as_int32(key >> 32)], dtype=torch.int32, device=dev)
    a = torch.tensor(alpha, dtype=torch.float32, device=dev)
    if _run_fused(kind, flat, keys, a, torch.zeros((), dtype=torch.int32, device=dev)):
        return x
    kernel = _KERNELS[kind]
    for start in range(0, flat.numel(), EAGER_CHUNK):
        off = torch.tensor(start, dtype=torch.int32, device=dev)
        kernel(flat[start:start + EAGER_CHUNK], keys, a, off)
    return x


def fill_rows_(rows: torch.Tensor, keys: list[int], alpha: float, kind: str) -> None:
    """Set each row of ``rows`` (k, n) to ``alpha`` times the noise of its key (``keys[i]``
    for row ``i``), as ``add_noise_`` would add it to zeros: in one compiled kernel where
    there is one (on a GPU too: one launch for every row, where a launch per row would make
    a step's launches grow with the model's depth). On a CPU the values equal
    ``add_noise_``'s bit for bit; on a GPU, whose ``add_noise_`` is a Triton kernel with the
    hardware's approximate functions, to about 1e-6 (the rows are a step's held coordinates,
    always drawn this way, so the step stays self-consistent)."""
    k, n = rows.shape
    if n >= 1 << 31:
        raise ValueError("tensors of 2**31 elements or more are not supported; split the parameter")
    dev = rows.device
    # one row, or rows of one element, would each be a specialized variant of the kernel
    if k > 1 and n >= FUSED_MIN_NUMEL:
        k0, k1 = _key_halves(keys, dev)
        a = torch.tensor(alpha, dtype=torch.float32, device=dev)
        if _run_fused(f"{kind}-rows", rows, k0.view(k, 1), k1.view(k, 1), a):
            return
    for row, key in zip(rows, keys):
        add_noise_(row.zero_(), key, alpha, kind)


def _noise_by_size(keys: list[list[int]], sizes: list[int], kind: str, dtype, device,
                   alpha: float = 1.0) -> list[torch.Tensor]:
    """For each ``j``, ``(len(keys[j]), sizes[j])`` holding ``alpha`` times the noise of each
    key of ``keys[j]``: blocks of one buffer per size, each buffer drawn by ``fill_rows_``."""
    by_size = defaultdict(list)
    for j, n in enumerate(sizes):
        by_size[n].append(j)
    blocks: list = [None] * len(sizes)
    for n, members in by_size.items():
        counts = [len(keys[j]) for j in members]
        rows = torch.empty((sum(counts), n), dtype=dtype, device=device)
        fill_rows_(rows, [k for j in members for k in keys[j]], alpha, kind)
        for j, block in zip(members, rows.split(counts)):
            blocks[j] = block
    return blocks


def add_noise_many_(tensors: list[torch.Tensor], indices: list[int], seed: int, alpha: float,
                    kind: str = "gaussian") -> None:
    """``add_noise_(t_j, mix(seed, indices_j), alpha)`` for every tensor: on a GPU, one kernel
    launch per dtype whatever the number of tensors. Elsewhere small tensors (biases, norms)
    get their noise together, in float32 buffers of at most ``SMALL_NUMEL`` elements (one
    kernel per tensor size in a buffer), and the others theirs in place one by one: for a
    small tensor a call costs more than its noise, for a large one the buffer's extra pass
    costs more than the call. The buffer is small enough that a step's memory stays the
    forward pass's."""
    _check(kind)
    if alpha == 0:
        return
    module = _triton_for(tensors)
    if module is not None and _launch_triton(module.add_noise_many_, tensors, indices, mix(seed),
                                             alpha, kind == "gaussian"):
        return
    batches = defaultdict(list)  # per device, the current batch of small tensors
    filled = defaultdict(int)  # and its number of elements
    for t, i in zip(tensors, indices):
        if not (0 < t.numel() < SMALL_NUMEL and t.is_contiguous()):
            add_noise_(t, mix(seed, i), alpha, kind)
            continue
        batch = batches[t.device]
        if filled[t.device] + t.numel() > SMALL_NUMEL:
            _add_noise_batch_(batch, seed, alpha, kind)
            batch.clear()
            filled[t.device] = 0
        batch.append((t, i))
        filled[t.device] += t.numel()
    for batch in batches.values():
        _add_noise_batch_(batch, seed, alpha, kind)


def _add_noise_batch_(batch: list, seed: int, alpha: float, kind: str) -> None:
    if len(batch) == 1:
        add_noise_(batch[0][0], mix(seed, batch[0][1]), alpha, kind)
    elif batch:
        blocks = _noise_by_size([[mix(seed, i)] for _, i in batch], [t.numel() for t, _ in batch],
                                kind, torch.float32, batch[0][0].device, alpha)
        # x + (alpha * z), rounded once to x's dtype: add_noise_'s arithmetic, bit for bit
        torch._foreach_add_([t.view(-1) for t, _ in batch], [b[0] for b in blocks])


def noise_stacks(keys: list[list[int]], shapes: list, kind: str = "gaussian",
                 dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """For each ``j``, the stack ``(len(keys[j]), *shapes[j])`` of ``noise(k, shapes[j])`` for
    ``k`` in ``keys[j]``, drawn in one kernel per size of tensor where possible."""
    _check(kind)
    blocks = _noise_by_size(keys, [math.prod(shape) for shape in shapes], kind, dtype, device)
    return [block.view(len(k), *shape) for block, k, shape in zip(blocks, keys, shapes)]


def noise(key: int, shape, kind: str = "gaussian", dtype=torch.float32, device=None) -> torch.Tensor:
    """Materialize the noise of ``key``: the same values ``add_noise_`` adds."""
    out = torch.zeros(shape, dtype=dtype, device=device)
    return add_noise_(out, key, 1.0, kind)
