"""The noise kernel for NVIDIA GPUs: many tensors perturbed in one Triton launch.

A two-point step on a GPU is bound by launches, not by memory, when every tensor gets its own
kernel (OPT-1.3B has 390 tensors, a MeZO step writes each three times). Here one launch
covers every tensor of a dtype: a table gives each program its tensor and its tile, and
each tensor's key is derived in the kernel from the direction's seed and the tensor's index
(the same ``mix(seed, index)`` as on the host), so a pass sends no data to the device.
The noise is computed in registers and added in the same kernel: the hash, Box-Muller and
the add of ``perturb.py``, element for element, in 32-bit unsigned arithmetic.

Only imported where Triton and CUDA are present; ``perturb.add_noise_many_`` falls back to
the per-tensor path everywhere else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
ITERS = 4
TILE = BLOCK * ITERS

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _round64(h, v):
    # One round of perturb.mix (splitmix64's finalizer chain), in uint64 arithmetic.
    h = h ^ v
    h = h + 0x9E3779B97F4A7C15
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9
    h = (h ^ (h >> 27)) * 0x94D049BB133111EB
    return h ^ (h >> 31)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _approx(op: tl.constexpr, x):
    # The special-function unit's approximations (relative error about 2**-22): the precise
    # library calls would make the kernel compute-bound at several times a memory pass.
    return tl.inline_asm_elementwise(op + " $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _add_noise_tiles(base, n, start, key, alpha, DTYPE: tl.constexpr, GAUSSIAN: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr):
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = _hash32(_hash32(offs.to(tl.uint32) ^ k0) + k1)
        if GAUSSIAN:
            h2 = _hash32(h ^ 0x5BD1E995)
            u1 = ((h >> 8).to(tl.float32) + 1.0) * (1.0 / 16777216.0)
            u2 = (h2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
            # Box-Muller: sqrt(-2 ln u1) cos(2 pi u2), with ln u1 = log2(u1) * ln 2
            r = _approx("sqrt.approx.f32", -1.3862943611198906 * _approx("lg2.approx.f32", u1))
            z = r * _approx("cos.approx.f32", 6.283185307179586 * u2)
        else:
            z = 1.0 - 2.0 * ((h >> 13) & 1).to(tl.float32)
        x = tl.load(base + offs, mask=mask).to(tl.float32)
        tl.store(base + offs, (x + z * alpha).to(DTYPE), mask=mask)


@triton.jit
def _noise_many_kernel(ptrs, numels, salts, prog_tensor, prog_start, seed_state, alpha,
                       DTYPE: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr,
                       ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    # The key is mix(seed, index), whose first round (seed_state) the host computed.
    key = _round64(seed_state.to(tl.uint64), tl.load(salts + t).to(tl.uint64))
    _add_noise_tiles(base, tl.load(numels + t), tl.load(prog_start + pid), key, alpha,
                     DTYPE, GAUSSIAN, BLOCK, ITERS)


@triton.jit
def _noise_one_kernel(x, n, key, alpha, DTYPE: tl.constexpr, GAUSSIAN: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    start = tl.program_id(0) * (BLOCK * ITERS)
    _add_noise_tiles(x, n, start, key.to(tl.uint64), alpha, DTYPE, GAUSSIAN, BLOCK, ITERS)


class _Plan:
    """The launch tables of one list of tensors (same device and dtype), built once."""

    def __init__(self, tensors: list[torch.Tensor], salts: list[int]):
        dev = tensors[0].device
        numels = [t.numel() for t in tensors]
        tiles = [-(-n // TILE) for n in numels]
        self.tensors = tensors  # keeps the storage alive while the addresses are cached
        self.dtype = _TL_DTYPES[tensors[0].dtype]
        self.ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=dev)
        self.numels = torch.tensor(numels, dtype=torch.int32, device=dev)
        self.salts = torch.tensor([_signed(s) for s in salts], dtype=torch.int64, device=dev)
        self.prog_tensor = torch.repeat_interleave(
            torch.arange(len(tensors), dtype=torch.int32), torch.tensor(tiles)).to(dev)
        self.prog_start = torch.cat([torch.arange(k, dtype=torch.int32) * TILE
                                     for k in tiles]).to(dev)
        self.programs = sum(tiles)

    def launch(self, seed_state: int, alpha: float, gaussian: bool) -> None:
        if self.programs:
            _noise_many_kernel[(self.programs,)](
                self.ptrs, self.numels, self.salts, self.prog_tensor, self.prog_start,
                _signed(seed_state), alpha, DTYPE=self.dtype, GAUSSIAN=gaussian,
                BLOCK=BLOCK, ITERS=ITERS)


_plans: dict[tuple, _Plan] = {}


def _plan(tensors: list[torch.Tensor], salts: list[int]) -> _Plan:
    key = tuple((t.data_ptr(), t.numel(), t.dtype, s) for t, s in zip(tensors, salts))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 64:  # parameters were reallocated many times: start over
            _plans.clear()
        plan = _plans[key] = _Plan(tensors, salts)
    return plan


def supported(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _TL_DTYPES and t.is_contiguous() and t.numel() < 1 << 31


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 Triton and torch take (the kernel reads it back unsigned)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def add_noise_(x: torch.Tensor, key: int, alpha: float, gaussian: bool) -> None:
    """``x += alpha * noise(key)``, one launch, nothing sent to the device."""
    n = x.numel()
    if n:
        _noise_one_kernel[(-(-n // TILE),)](x, n, _signed(key), float(alpha),
                                            DTYPE=_TL_DTYPES[x.dtype], GAUSSIAN=gaussian,
                                            BLOCK=BLOCK, ITERS=ITERS)


def add_noise_many_(tensors: list[torch.Tensor], indices: list[int], seed_state: int,
                    alpha: float, gaussian: bool) -> None:
    """``t_j += alpha * noise(mix(seed, indices_j))`` for every tensor, one launch per dtype;
    ``seed_state`` is ``mix(seed)``, the first round of the key, done on the host."""
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for t, i in zip(tensors, indices):
        group = by_dtype.setdefault(t.dtype, ([], []))
        group[0].append(t)
        group[1].append(i)
    for ts, idx in by_dtype.values():
        _plan(ts, idx).launch(seed_state, float(alpha), gaussian)
