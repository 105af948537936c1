r"""The multiscale backend's compiled log-sum-exp kernel (``lse_kernel.c``), through ctypes.

The p = 2 softmin over kept blocks is the hot loop of a large Sinkhorn solve. In torch each
block costs a matrix product and four passes over its entries (maximum, subtraction, ``exp``,
sum) through memory; ``lse_kernel.c`` fuses them into one pass over registers (two where
no shift close to each row's maximum is known beforehand). Measured on 2 CPU cores: 1.13e9
pairs/s against 4.6e8 for the torch blocks over all 20000^2 pairs (two passes,
``bench/bench_scale.py``'s throughput section), and 16.7 s of softmins against 70.7 s for a
200k-point Sinkhorn solve.

The kernel is compiled once per machine with the system's C compiler (``$CC``, else ``cc``;
about one second) into geomreg's cache folder (``$XDG_CACHE_HOME/geomreg`` or
``~/.cache/geomreg``), under a name that hashes the source, the flags, the compiler's version
and the CPU, so that a cache shared between machines never loads a build for another CPU.
The library is written to a temporary name and renamed into place: concurrent first runs
each compile and the last rename wins, and no process ever loads a half-written file.

Where no compiler works, or with ``GEOMREG_NATIVE=0`` in the environment, :func:`kernel`
returns None and the backend keeps its torch path (same values); geomreg says why once on
stderr. The kernel covers float32 on the CPU without autograd, and its two reductions
(:func:`rows_lse`, :func:`cols_lse`) float64 as well: the same source compiled a second time
with ``-DGEOMREG_DOUBLE`` (double arithmetic throughout, exp a degree-13 polynomial). The
screening (:class:`TileScreen`) and the grid's banded reduction are float32 only; gradients,
CUDA, p = 1 and kernels run in torch.

Threads: the callers run one worker per torch thread (``torch.get_num_threads()``), each a
ctypes call (which releases the GIL) taking tiles from a shared counter.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("lse_kernel.c")
#: -march=native: the cache key holds the CPU's flags. No -ffast-math: -inf must stay -inf
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC"]
#: set to 0 to keep the torch path (e.g. to compare both)
ENV_SWITCH = "GEOMREG_NATIVE"

_state: dict[str, Any] = {"lib": {}, "tried": set(), "pool": None, "pool_size": 0}
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
#: the compiler flag of each working type's build
_VARIANT = {torch.float32: [], torch.float64: ["-DGEOMREG_DOUBLE"]}


def cache_folder() -> Path:
    """The per-user cache folder (``$XDG_CACHE_HOME/geomreg`` or ``~/.cache/geomreg``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geomreg"


def _cpu_key() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and flags."""
    key = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features"))]
        key += "".join(sorted(set(lines)))
    except OSError:
        pass
    return key


def _compile(cc: str, target: Path, extra: list[str]) -> None:
    """Compile :data:`SOURCE` with the flags ``extra`` into ``target`` (a temporary file, renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(" ".join((proc.stderr or proc.stdout).split())[:300])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(dtype: torch.dtype) -> ctypes.CDLL:
    """Compile (once per machine) and load the kernel of ``dtype``; raises OSError when that fails."""
    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"no C compiler ({cc}): {exc}") from None
    extra = _VARIANT[dtype]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + extra), version,
                                    _cpu_key()]).encode())
    target = cache_folder() / "native" / f"lse-{key.hexdigest()[:16]}.so"
    if not target.exists():
        name = "" if dtype == torch.float32 else " (float64)"
        print(f"geomreg: compiling the multiscale kernel{name} once (about 1 s)", file=sys.stderr, flush=True)
        _compile(cc, target, extra)
    lib = ctypes.CDLL(str(target))
    common = [_P, _P, _P, _P, _P, _I64, _P, _P, _P, _I64,
              _F32 if dtype == torch.float32 else ctypes.c_double]
    lib.rows_lse.argtypes = [*common, _P, _P, _P]
    lib.cols_lse.argtypes = [*common, _P, _P, _I64, _I64, _I64]
    lib.rows_lse.restype = lib.cols_lse.restype = ctypes.c_int
    if dtype == torch.float32:
        lib.screen_tiles.argtypes = ([_P] * 4 + [_I64] + [_P] * 9 + [_F32, _F32, _I64, ctypes.c_int]
                                     + [_P] * 7 + [_I64, _I64, _P])
        lib.screen_tiles.restype = ctypes.c_int
    return lib


def kernel(dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The loaded kernel of ``dtype``, or None (no compiler, or ``GEOMREG_NATIVE=0``): the torch path then."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or dtype not in _VARIANT:
        return None
    if dtype not in _state["tried"]:
        _state["tried"].add(dtype)
        try:
            _state["lib"][dtype] = _load(dtype)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"geomreg: the multiscale kernel could not be built ({exc}); using its slower "
                  "torch blocks", file=sys.stderr, flush=True)
    return _state["lib"].get(dtype)


def usable(*tensors: torch.Tensor, double: bool = False) -> bool:
    """Whether the kernel takes these CPU tensors without autograd: float32, or float64 too (``double``).

    Only the two reductions have a float64 build; the caller says whether it wants one.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    dtype = tensors[0].dtype
    allowed = (torch.float32, torch.float64) if double else (torch.float32,)
    if dtype not in allowed or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return False
    return kernel(dtype) is not None


def points3(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` contiguous copy of ``x (N, D <= 3)`` (same dtype), padded with zeros."""
    x = x.detach()
    if x.shape[1] < 3:
        x = torch.cat([x, x.new_zeros(x.shape[0], 3 - x.shape[1])], dim=1)
    return x.contiguous()


def n_workers() -> int:
    """Worker threads per call: torch's thread count."""
    return max(1, torch.get_num_threads())


def _run(fn, args_of_worker, count: int | None = None) -> None:
    """Run ``fn(*args_of_worker(w))`` on ``count`` threads (:func:`n_workers`) and wait.

    A worker returning non-zero could not allocate its buffer: MemoryError.
    """
    n = count or n_workers()
    if _state["pool"] is None or _state["pool_size"] < n:
        _state["pool"], _state["pool_size"] = ThreadPoolExecutor(n, thread_name_prefix="geomreg-lse"), n
    futures = [_state["pool"].submit(fn, *args_of_worker(w)) for w in range(n)]
    if any(f.result() != 0 for f in futures):
        raise MemoryError("the multiscale kernel could not allocate its column buffer")


def _tile_args(p, q, h, r0, r1, ptr, lo, hi, eps) -> tuple:
    """The arguments the two reductions share; ``h`` must be contiguous (the caller keeps it)."""
    runs = (None, None, None) if lo is None else (ptr.data_ptr(), lo.data_ptr(), hi.data_ptr())
    return (p.data_ptr(), q.data_ptr(), h.data_ptr(), r0.data_ptr(), r1.data_ptr(), r0.shape[0], *runs,
            q.shape[0], eps)


def rows_lse(p: torch.Tensor, q: torch.Tensor, h: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor,
             ptr: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None, eps: float,
             out: torch.Tensor, mean: torch.Tensor | None = None) -> None:
    r"""``out[i] = log sum_j exp(h_j - |p_i - q_j|^2 / (2 eps))`` over each tile's columns.

    ``p (N, 3)``, ``q (M, 3)`` from :func:`points3`; ``h (M,)``; tile ``t`` is the rows
    ``r0[t]:r1[t]`` (int64) against the columns of the runs ``lo[k]:hi[k]`` (int32) for k in
    ``ptr[t]:ptr[t+1]`` (int64), or every column when ``lo`` is None. Rows outside the tiles
    are left as they are; a tile without columns gives -inf. ``mean (N, 3)``, the points' dtype,
    contiguous, when given: each row's barycentre :math:`\sum_j w_{ij} q_j / \sum_j w_{ij}`
    under the same terms :math:`w_{ij} = e^{h_j - |p_i - q_j|^2/2\varepsilon}`, in the same
    pass (NaN for a row without columns).
    """
    counter = torch.zeros(1, dtype=torch.int64)
    h = h.detach().contiguous()
    args = _tile_args(p, q, h, r0, r1, ptr, lo, hi, eps)
    means = None if mean is None else mean.data_ptr()
    _run(kernel(p.dtype).rows_lse, lambda w: (*args, out.data_ptr(), means, counter.data_ptr()))


def cols_lse(p: torch.Tensor, q: torch.Tensor, hp: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor,
             ptr: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None, eps: float,
             amax: torch.Tensor, asum: torch.Tensor, t_offset: int = 0) -> None:
    r"""Merge, per kept column j, :math:`\log\sum_i \exp(hp_i - |p_i - q_j|^2 / 2\varepsilon)`.

    Tiles as in :func:`rows_lse`, the sums running down the tiles' rows. ``amax (W, M)``
    (the points' dtype) and ``asum (W, M)`` float64 hold one running reference and sum per worker
    (start from -inf and 0); :func:`merge_workers` then gives the log-sum-exp of each
    column. Worker w takes the tiles t with ``(t + t_offset) % W == w``: with ``t_offset``
    the index of the call's first tile, the sums come out the same however the tiles are cut
    into calls.
    """
    hp = hp.detach().contiguous()
    args = _tile_args(p, q, hp, r0, r1, ptr, lo, hi, eps)
    n = amax.shape[0]
    fn = kernel(p.dtype).cols_lse
    _run(fn, lambda w: (*args, amax[w].data_ptr(), asum[w].data_ptr(), w, n, t_offset), n)


def merge_workers(amax: torch.Tensor, asum: torch.Tensor) -> torch.Tensor:
    """``(M,)`` log-sum-exps from the workers' running references ``amax`` and sums ``asum`` (-inf: none).

    In ``amax``'s dtype.
    """
    top = amax.amax(0)
    safe = torch.where(top > -torch.inf, top, 0.0)
    scale = torch.where(amax > -torch.inf, (amax - safe).double().exp(), 0.0)
    total = (asum * scale).sum(0)
    return (safe.double() + total.log()).to(amax.dtype)


class TileScreen:
    r"""The point screening of a truncated p = 2 Sinkhorn pair, compiled (``screen_tiles``).

    Same rule as :meth:`geomreg.engine.multiscale.Screen.columns` (the quadratic bound; the
    floor raised to the least of the rows' best exact scores against the ``sample``
    candidates of highest bound, minus ``relative``), computed for every tile in one call:
    :attr:`counts` (kept columns per tile) and :attr:`runs` (runs of consecutive kept columns)
    at once, the runs themselves by :meth:`fill`.
    ``x``/``y`` from :func:`points3`, ``f``/``g`` sorted potentials, ``stats`` the tiles'
    ``centre``, ``beta``, ``top``, ``radius``; the cells as in ``Screen``.
    """

    def __init__(self, x, f, y, g, r0, r1, stats, cells, cell_ptr, col_starts,
                 floor: float, relative: float | None, sample: int):
        n_tiles = r0.shape[0]
        self.m = y.shape[0]
        self.keep = [x, f.float().contiguous(), y.T.contiguous(), g.float().contiguous(), r0, r1,
                     points3(stats["centre"]), points3(stats["beta"]),
                     stats["top"].float().contiguous(), stats["radius"].float().contiguous(),
                     cell_ptr.contiguous(), cells.contiguous(), col_starts.contiguous()]
        self.floor, self.relative, self.sample = floor, -1.0 if relative is None else relative, sample
        self.tile_floor = torch.empty(n_tiles, dtype=torch.float32)
        self.counts = torch.empty(n_tiles, dtype=torch.int64)
        self.runs = torch.empty(n_tiles, dtype=torch.int64)
        self.best = torch.empty(n_tiles, dtype=torch.int32)
        self._call(0, None, None, None, 0, n_tiles)

    def _call(self, mode: int, ptr, lo, hi, t0: int, t1: int) -> None:
        counter = torch.full((1,), t0, dtype=torch.int64)
        outs = [self.tile_floor, self.counts, self.runs, self.best, ptr, lo, hi]
        ptrs = [t.data_ptr() for t in self.keep]
        args = (ptrs[:4] + [self.m] + ptrs[4:] + [self.floor, self.relative, self.sample, mode]
                + [None if t is None else t.data_ptr() for t in outs] + [t0, t1, counter.data_ptr()])
        _run(kernel().screen_tiles, lambda w: args)

    def fill(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ptr, lo, hi)``: the runs of kept columns of tiles ``t0:t1``, ptr from 0 at ``t0``."""
        ptr = torch.zeros(t1 - t0 + 1, dtype=torch.int64)
        torch.cumsum(self.runs[t0:t1], 0, out=ptr[1:])
        lo = torch.empty(int(ptr[-1]), dtype=torch.int32)
        hi = torch.empty_like(lo)
        self._call(1, ptr, lo, hi, t0, t1)
        return ptr, lo, hi


def band_lse_1d(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, xbar: torch.Tensor, size: int,
                qmin: torch.Tensor, qmax: torch.Tensor, eps: float, margin: float, out: torch.Tensor) -> None:
    r"""The grid backend's banded 1-D log-sum-exp (``band_lse_1d`` in ``lse_kernel.c``), float32.

    ``out[k, j] = log sum_l exp(x[k, l] - (u[j] - v[l])^2 / (2 eps))`` over the blocks of ``size``
    columns whose bound passes (engine/grid.py, ``_log_conv_banded``). ``x (K, L)``, ``u (J,)``,
    ``v (L,)``, ``xbar (K, nB)``, ``qmin``, ``qmax (J, nB)`` and ``out (K, J)``: contiguous float32
    CPU tensors. The lines are split evenly between :func:`n_workers` threads.
    """
    lib = kernel()
    fn = lib.band_lse_1d
    if fn.argtypes is None:
        fn.argtypes = [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _P, _P, _F32, _F32, _I64, _I64, _P]
        fn.restype = ctypes.c_int
    n_k, n_l = x.shape
    n = max(1, min(n_workers(), n_k))
    cuts = [n_k * w // n for w in range(n + 1)]
    args = (x.data_ptr(), n_l, u.data_ptr(), u.shape[0], v.data_ptr(), xbar.data_ptr(), size,
            xbar.shape[1], qmin.data_ptr(), qmax.data_ptr(), 1 / (2 * eps), margin)
    _run(fn, lambda w: (*args, cuts[w], cuts[w + 1], out.data_ptr()), n)
