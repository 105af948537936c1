"""Small helpers shared by the benchmark scripts in bench/ (timing, inputs, machine facts).

Nothing here imports geomreg or GeomLoss: the scripts decide what to measure, this module
only knows how to time a call fairly and how to describe the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it is meaningful."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of ``fn()`` in seconds (perf_counter; CUDA synchronised on both sides)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float | None:
    """Median, or None for an empty list."""
    return statistics.median(xs) if xs else None


def uniform_pair(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 ``(n, 3)`` / ``(m, 3)`` clouds, uniform in the unit cube, on the CPU.

    Generated on the CPU from a fixed seed, so every device sees the very same numbers.
    """
    torch.manual_seed(seed)
    x = torch.rand(n, 3, dtype=torch.float32)
    y = torch.rand(m, 3, dtype=torch.float32)
    return x, y


def rel_err(value: float | None, ref: float) -> float | None:
    """|value / ref - 1| (None when there is no value)."""
    if value is None:
        return None
    return abs(value / ref - 1.0)


def loadavg() -> list[float] | None:
    """os.getloadavg() as a list (1, 5, 15 minutes), or None where unsupported."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Facts that timings depend on: CPU count, torch threads, versions, device name."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = _cpu_model() or info["cpu"]
        from geomreg.engine import native

        # the multiscale backend's p = 2 float32 CPU reductions: compiled, or torch blocks
        info["multiscale_kernel"] = "compiled" if native.kernel() is not None else "torch"
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def console_script(name: str) -> str | None:
    """Path of a console script installed next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def time_command(argv: list[str], repeats: int, cwd: Path = REPO_ROOT) -> dict[str, Any]:
    """Run ``argv`` ``repeats`` times end to end; wall times with time.perf_counter."""
    times: list[float] = []
    rcs: list[int] = []
    tail = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        rcs.append(proc.returncode)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
    out: dict[str, Any] = {
        "argv": argv,
        "cwd": str(cwd),
        "times_s": times,
        "median_s": median(times),
        "returncodes": rcs,
    }
    if tail:
        out["error_tail"] = tail
    return out


def fmt_s(t: float | None) -> str:
    """Seconds for a table cell: 3 significant digits, or n/a."""
    if t is None:
        return "n/a"
    if t >= 100:
        return f"{t:.0f}"
    if t >= 10:
        return f"{t:.1f}"
    if t >= 1:
        return f"{t:.2f}"
    return f"{t:.3f}"


def fmt_err(e: float | None) -> str:
    """Relative error for a table cell."""
    return "n/a" if e is None else f"{e:.1e}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    """num / den with two decimals, or n/a."""
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only the final table)."""
    print(msg, file=sys.stderr, flush=True)


def finish_report(report: dict, start: float, json_path: Path, md_path: Path,
                  render: Callable[[dict], str]) -> dict:
    """Record the end load and total time, write the JSON and the markdown; return ``report``."""
    report["load_end"] = loadavg()
    report["total_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(render(report))
    return report


def bench_main(name: str, args: Any, run: Callable[..., dict], render: Callable[[dict], str]) -> int:
    """The end of a benchmark's ``main``: check the device, run, write and print the report.

    ``run(args, device, json_path, md_path)`` measures and saves; the markdown table from
    ``render(report)`` goes to stdout, everything else (KeOps' and GeomLoss's chatter
    included) to stderr. Outputs: ``<args.out>/<name>_<device>[_quick].{json,md}``.
    """
    from geomreg._stdio import stdout_to_stderr

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build = torch.version.cuda or "none: this is a CPU-only build"
        log(f"bench_{name}.py: --device {args.device} was asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {build}). Run with --device cpu, or on a "
            "machine with a GPU and a CUDA build of torch.")
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    tag = args.device.replace(":", "") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{name}_{tag}.json", args.out / f"{name}_{tag}.md"
    with stdout_to_stderr():  # KeOps and GeomLoss print on stdout: keep it for the table
        report = run(args, dev, json_path, md_path)
    print(render(report))
    log(f"wrote {json_path} and {md_path} ({report['total_s']:.0f} s in all)")
    return 0
