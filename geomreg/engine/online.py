r"""Online backend: KeOps reductions, memory linear in N + M (no N x M matrix is stored).

Each softmin or kernel product is one KeOps symbolic reduction over ``j`` on batched
``LazyTensor`` variables ``x (B, N, 1, D)`` and ``y (B, 1, M, D)``. KeOps generates C++ for
each new *formula* and compiles it with the system compiler on first use (5-30 s; its
cache folder keeps the result for later runs). The backward formulas of autograd compile
on first use too. To keep the number of formulas small, every numeric parameter
(:math:`1/\varepsilon`, :math:`1/\sigma`) is a runtime tensor, never a constant of the
formula: a whole epsilon-schedule runs on one compiled formula.

Euclidean norms use KeOps' own square root, whose derivative is written with KeOps'
``rsqrt``, and KeOps defines ``rsqrt(0) = 0``: :math:`\sqrt{d^2}` is exactly 0 at coincident
points (squared distances are sums of squared differences, exactly 0 there) and its
(sub)gradient there is 0, not NaN. No epsilon is added under the root, so values are the
exact norms everywhere, like :func:`geomreg.engine.base.safe_norm`.

pykeops is imported lazily (never when geomreg is imported). It prints to stdout (a
warning when no CUDA is found, compilation messages): the import and every reduction run
with stdout redirected to stderr (:func:`stdout_to_stderr`), and verbosity is switched off,
so that geomreg's stdout stays pure data. Backward reductions run inside torch's autograd,
outside that redirection; with verbosity off KeOps prints nothing there.

KeOps reads a variable of shape ``(B, 1, 1, D)`` as a parameter, not as rows or columns, so
a measure of a single point is padded with a second point that contributes nothing
(a column of log-weight ``-inf`` or of weight 0; a row that is dropped from the output).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no file locks
    fcntl = None

from .._stdio import stdout_to_stderr
from ..errors import BackendUnavailable, ParameterError
from .base import Backend, Cost, Kernel
from .native import cache_folder

#: printed on stderr once per process, before the first KeOps reduction
COMPILE_NOTICE = "geomreg: KeOps compiles each new formula once (5-30 s); later runs reuse its cache"

_state: dict[str, Any] = {"lazy_tensor": None, "available": None, "notice_shown": False}


def _lazy_tensor() -> Any:
    """``pykeops.torch.LazyTensor``, importing pykeops quietly on first use."""
    if _state["lazy_tensor"] is None:
        quiet = {k: "0" for k in ("PYKEOPS_VERBOSE", "KEOPS_VERBOSE") if k not in os.environ}
        os.environ.update(quiet)  # silences the import-time warnings; restored below
        try:
            with stdout_to_stderr(), _import_lock():
                import pykeops

                # pykeops.torch reads files of the build folder that a compiling process writes
                with _folder_lock(Path(pykeops.get_build_folder())):
                    from pykeops.torch import LazyTensor

                    pykeops.set_verbose(False)
                    _lock_binders()
                atexit.register(_hold_import_lock)
        finally:
            for k in quiet:
                os.environ.pop(k, None)
        _state["lazy_tensor"] = LazyTensor
    return _state["lazy_tensor"]


@contextlib.contextmanager
def _import_lock() -> Iterator[None]:
    """An exclusive lock around the first import of pykeops in each process.

    On a fresh cache, pykeops writes files while it is imported; another process importing it
    at the same moment read one half-written ("UnpicklingError: pickle data was truncated",
    seen with three processes starting together). The lock file lives in geomreg's own cache
    folder (``$XDG_CACHE_HOME/geomreg`` or ``~/.cache/geomreg``), known before pykeops is;
    where it cannot be created, or without ``fcntl``, there is no lock.
    """
    fh = _import_lock_file()
    if fh is None:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _import_lock_file() -> Any:
    """``pykeops-import.lock`` in geomreg's cache folder, open; None without ``fcntl`` or access."""
    if fcntl is None:
        return None
    try:
        folder = cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / "pykeops-import.lock", "a")  # noqa: SIM115 - the caller closes it
    except OSError:
        return None


def _hold_import_lock() -> None:
    """At exit, take :func:`_import_lock`'s lock and keep it until the process ends.

    KeOps saves its caches' index files (pickles in the build folder) at exit, unlocked and
    in place; a process importing pykeops at that moment reads them. This handler is
    registered after pykeops' own, so it runs before them (exit handlers run last-in,
    first-out): the saves then happen under the lock that imports take, which the system
    releases when the process ends.
    """
    fh = _import_lock_file()
    if fh is not None:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _state["exit_lock"] = fh  # never closed: the lock ends with the process


def _show_notice() -> None:
    """Print :data:`COMPILE_NOTICE` on stderr, once per process."""
    if not _state["notice_shown"]:
        _state["notice_shown"] = True
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)


def _reduce(key: tuple, reduction: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run one KeOps reduction with stdout redirected; the compile notice comes first, once."""
    _show_notice()
    with stdout_to_stderr():
        out = reduction()
    _seen_formulas.add(key)
    return out


#: formula keys already run (hence compiled or loaded) by this process
_seen_formulas: set[tuple] = set()


class _LockedBinder:
    """One of KeOps' binders, whose first load of each formula holds the build folder's lock.

    A binder (``pykeops.common.keops_io.keops_binder[...]``) is KeOps' per-process cache of
    loaded formulas: on a formula's first use it compiles the formula's shared library unless
    the file exists, then imports it. A process that finds the file while another one is still
    writing it imports a half-written library ("ImportError: ... file too short", seen with two
    test workers sharing a fresh cache; KeOps issue 168). Every reduction goes through a
    binder, the forward ones geomreg runs and the backward ones torch's autograd runs, so the
    lock here covers both; each formula takes it once per process, later calls take no lock.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.loaded: set[str] = set()

    def __call__(self, *args: Any) -> Any:
        key = "".join(map(str, args))
        if key in self.loaded:
            return self.inner(*args)
        import pykeops

        with _folder_lock(Path(pykeops.get_build_folder())):
            out = self.inner(*args)
        self.loaded.add(key)
        return out

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """KeOps' reset (a new build folder): formulas load again, under the lock."""
        self.loaded.clear()
        self.inner.reset(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _lock_binders() -> None:
    """Wrap each of KeOps' binders in a :class:`_LockedBinder` (once per process)."""
    from pykeops.common.keops_io import keops_binder

    for name, binder in list(keops_binder.items()):
        if not isinstance(binder, _LockedBinder):
            keops_binder[name] = _LockedBinder(binder)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """The exclusive file lock ``.geomreg-compile.lock`` of a KeOps build folder (not reentrant)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".geomreg-compile.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def keops_available() -> tuple[bool, str]:
    """Whether the online backend can run here, and why (or why not); cached per process.

    pykeops must import, find a C++ compiler, and compile and run a small softmin (float32,
    D = 3: the most common formula, which is then in KeOps' cache) with the right value.
    The test runs in a child Python process first: on some GPU set-ups KeOps' CUDA compiler
    crashes the process (a segmentation fault), which must not take geomreg down with it.
    This costs a Python start-up (3.5 s on a 2-core CPU) once per process that asks.
    """
    if _state["available"] is None:
        ok, reason = _probe_in_subprocess()
        if ok:
            try:
                _lazy_tensor()
            except Exception as err:  # noqa: BLE001 - any failure of a third-party import
                ok, reason = False, f"pykeops failed to import ({type(err).__name__}: {_first_line(err)})"
        _state["available"] = (ok, reason)
    return _state["available"]


#: what the child process of :func:`keops_available` runs; its last stdout line is the answer
_PROBE_CODE = (
    "import json, sys\n"
    "from geomreg.engine.online import _probe_here\n"
    "sys.stdout.write(json.dumps(_probe_here()) + '\\n')\n"
)
#: seconds allowed to that child (one compilation takes 5-30 s)
_PROBE_TIMEOUT_S = 300


def _probe_in_subprocess() -> tuple[bool, str]:
    """Run :func:`_probe_here` in a child Python process; a crash there is an answer."""
    if importlib.util.find_spec("pykeops") is None:
        return False, "pykeops is not installed; pip install 'pykeops>=2.2'"
    if not sys.executable:
        return _probe_here()
    _show_notice()  # the child may compile the test formula
    root = str(Path(__file__).resolve().parents[2])  # the folder holding geomreg/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        run = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return False, f"KeOps' test formula did not compile and run within {_PROBE_TIMEOUT_S} s"
    except OSError as err:
        return False, f"could not start Python to test KeOps ({err})"
    if run.returncode < 0:
        try:
            what = signal.Signals(-run.returncode).name
        except ValueError:
            what = f"signal {-run.returncode}"
        return False, f"KeOps crashed ({what}) while compiling and running a test formula"
    try:
        ok, reason = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError, TypeError):
        err_lines = run.stderr.strip().splitlines()
        detail = err_lines[-1] if err_lines else "no output"
        return False, f"KeOps' test process failed (exit {run.returncode}: {detail})"
    return bool(ok), str(reason)


def _probe_here() -> tuple[bool, str]:
    """Import pykeops, find a compiler, compile and check a small softmin, in this process."""
    try:
        _lazy_tensor()
    except ImportError as err:
        return False, f"pykeops is not installed ({err}); pip install 'pykeops>=2.2'"
    except Exception as err:  # noqa: BLE001 - any failure of a third-party import
        return False, f"pykeops failed to import ({type(err).__name__}: {_first_line(err)})"
    import pykeops

    compiler = pykeops.config.pykeops_base.get_cxx_compiler()
    if not compiler:
        return False, "no C++ compiler found (install g++ or set CXX)"
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(1, 4, 3, generator=g), torch.rand(1, 5, 3, generator=g)
        h = torch.rand(1, 5, generator=g)
        backend = OnlineBackend()
        got = backend.softmin(0.5, backend.pair(x, y, Cost(2)), h)
        c = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / 2
        want = -0.5 * torch.logsumexp(h[:, None, :] - c / 0.5, dim=2)
    except Exception as err:  # noqa: BLE001 - compilation errors come in many types
        return False, (
            f"KeOps could not compile a test formula with {compiler} "
            f"({type(err).__name__}: {_first_line(err)})"
        )
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return False, "KeOps' test formula returned wrong values"
    return True, f"pykeops {pykeops.__version__}, compiler {compiler}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


@dataclass
class OnlinePair:
    """Contiguous rows ``x (B, N, D)``, columns ``y (B, M, D)`` and their pair function."""

    x: torch.Tensor
    y: torch.Tensor
    fn: Cost | Kernel


def _param(value: float, like: torch.Tensor) -> Any:
    """A KeOps parameter holding ``value`` at runtime (not compiled into the formula)."""
    return _lazy_tensor()(torch.tensor([value], dtype=like.dtype, device=like.device))


def _padded(pair: OnlinePair, col: torch.Tensor, fill: float):
    """Rows, columns and the per-column vector, padded to at least 2 points each (see notes)."""
    x, y = pair.x, pair.y
    if x.shape[1] == 1:
        x = torch.cat([x, x], dim=1)
    if y.shape[1] == 1:
        y = torch.cat([y, y], dim=1)
        col = torch.cat([col, torch.full_like(col, fill)], dim=1)
    return x, y, col.contiguous()


def _symbolic(pair: OnlinePair, col: torch.Tensor, fill: float):
    """LazyTensors ``x_i (B,N,1,D)``, ``y_j (B,1,M,D)``, ``col_j (B,1,M,1)`` and ``|x_i-y_j|^2``."""
    lazy = _lazy_tensor()
    x, y, col = _padded(pair, col, fill)
    x_i = lazy(x[:, :, None, :])
    y_j = lazy(y[:, None, :, :])
    c_j = lazy(col[:, None, :, None])
    return x_i, y_j, c_j, x_i.sqdist(y_j)


class OnlineBackend(Backend):
    """KeOps map-reduce on the fly: memory O(N + M), on the CPU or a CUDA GPU."""

    name = "online"

    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel) -> OnlinePair:
        """Keep the clouds (contiguous) and the pair function; nothing is evaluated yet."""
        if x.is_cuda:
            _lazy_tensor()
            import pykeops

            if not pykeops.config.gpu_available:
                raise BackendUnavailable(
                    "device", "the online backend's pykeops has no CUDA support here; use --device cpu"
                )
        return OnlinePair(x.contiguous(), y.contiguous(), fn)

    def softmin(self, eps: float, pair: OnlinePair, h: torch.Tensor) -> torch.Tensor:
        r"""``-eps * logsumexp_j(h_j - C(x_i, y_j) / eps)``, one KeOps reduction."""
        if pair.fn.formula is not None:
            return _formula_softmin(eps, pair, h)
        n = pair.x.shape[1]
        _, _, h_j, d2 = _symbolic(pair, h, -float("inf"))
        if pair.fn.p == 2:
            z = h_j - _param(0.5 / eps, h) * d2
        else:
            z = h_j - _param(1.0 / eps, h) * d2.sqrt()
        key = ("softmin", pair.fn.p, pair.x.shape[-1], str(h.dtype), h.device.type)
        lse = _reduce(key, lambda: z.logsumexp(dim=2))
        return -eps * lse[:, :n, 0]

    def kernel_sum(self, pair: OnlinePair, w: torch.Tensor) -> torch.Tensor:
        r"""``sum_j k(x_i, y_j) w_j``, one KeOps sum reduction."""
        n, kernel = pair.x.shape[1], pair.fn
        _, _, w_j, d2 = _symbolic(pair, w, 0.0)
        if kernel.name == "gaussian":
            k = (_param(-0.5 / kernel.sigma**2, w) * d2).exp()
        elif kernel.name == "laplacian":
            k = (_param(-1.0 / kernel.sigma, w) * d2.sqrt()).exp()
        elif kernel.name == "energy":
            k = -d2.sqrt()
        else:
            raise ValueError(f"unknown kernel {kernel.name!r}")
        key = ("kernel", kernel.name, pair.x.shape[-1], str(w.dtype), w.device.type)
        out = _reduce(key, lambda: (k * w_j).sum(dim=2))
        return out[:, :n, 0]


def _formula_softmin(eps: float, pair: OnlinePair, h: torch.Tensor) -> torch.Tensor:
    """Softmin for a cost given as a KeOps formula in X and Y (one Genred per formula)."""
    _lazy_tensor()  # pykeops imported quietly
    from pykeops.torch import Genred

    dim, formula = pair.x.shape[-1], pair.fn.formula
    key = ("formula-softmin", formula, dim, str(h.dtype), h.device.type)
    routine = _genred_cache.get(key)
    if routine is None:
        with stdout_to_stderr():
            routine = Genred(
                f"H - E * ({formula})",
                [f"X = Vi({dim})", f"Y = Vj({dim})", "H = Vj(1)", "E = Pm(1)"],
                reduction_op="LogSumExp",
                axis=1,
            )
        _genred_cache[key] = routine
    inv_eps = torch.tensor([1.0 / eps], dtype=h.dtype, device=h.device)
    try:
        rows = [
            _reduce(key, lambda b=b: routine(pair.x[b], pair.y[b], h[b][:, None], inv_eps))[:, 0]
            for b in range(pair.x.shape[0])
        ]
    except Exception as exc:  # KeOps rejects the formula (syntax, unknown operation, ...)
        if key in _seen_formulas:
            raise
        _genred_cache.pop(key, None)
        message = " ".join(str(exc).split())[:160]
        raise ParameterError("cost", f"KeOps cannot use the formula {formula!r}: {message}") from None
    return -eps * torch.stack(rows)


#: compiled Genred routines for formula costs, by (kind, formula, D, dtype, device)
_genred_cache: dict[tuple, Any] = {}


def warmup(
    *,
    losses: tuple[str, ...] = ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian"),
    ps: tuple[int, ...] = (1, 2),
    dim: int = 3,
    dtypes: tuple[str, ...] = ("float32",),
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Compile, once, the KeOps formulas that runs with these settings will need.

    Each configuration runs :func:`geomreg.divergence` with ``backend="online"`` on two tiny
    clouds, with gradients with respect to points and weights, so that the forward and the
    backward formulas are both in KeOps' cache afterwards (for batch scripts and CI: start
    parallel workers after ``geomreg warmup``). ``p`` only matters for sinkhorn and
    hausdorff; kernels are warmed once per dtype.

    Returns:
        One dict per configuration: loss, p (or None), dim, dtype, device, seconds.
    """
    from ..api import divergence

    done = []
    for dtype in dtypes:
        for loss in losses:
            for p in ps if loss in ("sinkhorn", "hausdorff") else (None,):
                gen = torch.Generator().manual_seed(0)
                tdt = getattr(torch, dtype)
                x = torch.rand(5, dim, generator=gen, dtype=tdt).to(device).requires_grad_(True)
                y = torch.rand(4, dim, generator=gen, dtype=tdt).to(device).requires_grad_(True)
                a = torch.full((5,), 0.2, dtype=tdt, device=device, requires_grad=True)
                b = torch.full((4,), 0.25, dtype=tdt, device=device, requires_grad=True)
                start = time.perf_counter()
                r = divergence(
                    x, y, a=a, b=b, loss=loss, p=p or 2, backend="online", normalize=False, tol=float("inf")
                )
                r.value.backward()
                done.append(
                    {
                        "loss": loss,
                        "p": p,
                        "dim": dim,
                        "dtype": dtype,
                        "device": device,
                        "seconds": time.perf_counter() - start,
                    }
                )
    return done
