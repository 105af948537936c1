"""``geomreg batch MANIFEST --out RESULTS.jsonl``: many jobs, one start of Python per worker.

Jobs run on Dask distributed workers: a local cluster of ``--workers`` processes started
for the run (the default), or an existing cluster (``--scheduler tcp://HOST:PORT``). geomreg
schedules nothing itself: Dask places the jobs, streams their results back as they finish,
and re-runs a job whose worker died. Each job is the command line of its row, run through
the same ``dispatch`` as ``geomreg`` itself with ``--json``; its stdout is its result.

RESULTS gets one JSON line per job, appended and flushed as each finishes (a killed batch
leaves a valid file): ``id``, ``line``, ``command``, ``status`` (``ok`` when the command
exits 0, else ``error``), ``exit_code``, ``result`` (the command's JSON object, when it
printed one), ``error`` (its one-line message), ``time_s`` (the job's wall time, reading
and writing included), ``compute_s`` (the command's own ``time_s``: its computation alone;
null when it printed none), ``worker``, ``threads``,
``seed`` (the job's ``--seed``: its row's, else batch's ``--seed``) and ``versions``. Running
the same batch again skips the jobs RESULTS already has; ``--retry-failed`` runs the failed
ones again.

SIGTERM (or Ctrl-C) stops the batch (exit 143, or 130): the records already written stay, each
a complete line, the job that was running gets none (a rerun runs it), and the Dask client and
the local cluster are closed, its worker processes ended.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EXIT_DATA, EXIT_OK, handle_errors, uninterrupted
from .manifest import Job
from .output import dumps, err_console, print_data


def run_job(job: Job, threads: int, seed: int) -> dict[str, Any]:
    """Run one job in this process (a worker) and return its RESULTS record. Never raises."""
    import contextlib
    import io
    import socket

    import torch

    from geomreg.api import seed_everything, versions

    from .main import dispatch

    seed = job_seed(job, seed)
    argv = list(job.argv)
    if "--seed" not in argv:
        argv[-1:-1] = ["--seed", str(seed)]
    torch.set_num_threads(threads)
    seed_everything(seed)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = dispatch(argv)
        except BaseException as exc:  # noqa: BLE001 (a worker must report, whatever happened)
            code = 70
            err.write(f"Error: internal error: {type(exc).__name__}: {exc}\n")
    elapsed = time.perf_counter() - start
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    errors = [ln[len("Error: "):] for ln in err.getvalue().splitlines() if ln.startswith("Error: ")]
    return {
        "id": job.id, "line": job.line, "command": job.command,
        "status": "ok" if code == EXIT_OK else "error", "exit_code": code, "result": result,
        "error": None if code == EXIT_OK else (errors[-1] if errors else f"exit code {code}"),
        "time_s": elapsed,
        "compute_s": result.get("time_s") if isinstance(result, dict) else None,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "threads": threads,
        "seed": seed, "versions": versions(),
    }


def job_seed(job: Job, seed: int) -> int:
    """The seed a job runs with: its row's ``seed``, else the batch's ``--seed``."""
    argv = list(job.argv)
    return int(argv[argv.index("--seed") + 1]) if "--seed" in argv else seed


def recorded(path: Path) -> dict[str, str]:
    """The status of every job id already in RESULTS (the last record of an id wins)."""
    status: dict[str, str] = {}
    if not path.exists():
        return status
    with open(path, encoding="utf-8", errors="replace") as fh:
        for text in fh:
            try:
                record = json.loads(text)
                status[str(record["id"])] = str(record["status"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a killed batch: that job runs again
    return status


def batch(
    ctx: typer.Context,
    manifest: Annotated[
        Path, typer.Argument(help="CSV with a header, or JSON lines (.jsonl): one job per row.")
    ],
    out: Annotated[Path, typer.Option("--out", help="RESULTS.jsonl: one JSON line per job, appended.")],
    workers: Annotated[
        int | None, typer.Option(help="Worker processes of the local cluster (default: one per CPU core).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Run on an existing Dask cluster, e.g. tcp://host:8786 (files are "
                                 "read and written by the workers: use paths they share).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per job (default: local cores / workers; 1 on a "
                                 "cluster).")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run again the jobs RESULTS records as failed (those "
                           "recorded ok are always skipped).")
    ] = False,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="The --seed of every job whose row sets none "
                          "(Python's, numpy's and torch's generators are seeded before each job).")
    ] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Run every job of MANIFEST (distance, match, flow, register rows) and record each in RESULTS.

    Rows are validated before anything runs; a bad row is reported with its line number (exit
    1). Exit code 0 when every job succeeded, 1 when any failed; a failing job never stops the
    others. A progress bar (in a terminal) and a summary table go to stderr.
    """
    with handle_errors(debug):
        from geomreg.errors import InputError, ParameterError

        from .manifest import ManifestError, read_manifest

        if workers is not None and workers < 1:
            raise ParameterError("--workers", f"must be >= 1, got {workers}")
        if threads is not None and threads < 1:
            raise ParameterError("--threads", f"must be >= 1, got {threads}")
        if out.resolve() == manifest.resolve():
            raise ParameterError("--out", "RESULTS must not be the manifest")
        if not out.parent.is_dir():
            raise InputError(str(out), "its folder does not exist")
        try:
            jobs = read_manifest(manifest)
        except ManifestError as err:
            for problem in err.problems:
                err_console().print(f"{manifest}: {problem}", markup=False, highlight=False, soft_wrap=True)
            raise InputError(str(manifest), f"{len(err.problems)} bad row(s), nothing was run") from None
        from .reproduce import reproduction

        rerun = reproduction(ctx, seed)
        done = recorded(out)
        todo = [j for j in jobs if done.get(j.id) != "ok" and (retry_failed or j.id not in done)]
        skipped = len(jobs) - len(todo)
        n_workers = workers or os.cpu_count() or 1
        per_job = threads or (1 if scheduler else max(1, (os.cpu_count() or 1) // n_workers))
        start = time.perf_counter()
        counts = _run(todo, out, scheduler, n_workers, per_job, seed) if todo else {"ok": 0, "error": 0}
        summary = {"jobs": len(jobs), "ran": len(todo), "ok": counts["ok"], "failed": counts["error"],
                   "skipped": skipped, "wall_s": time.perf_counter() - start, "out": str(out),
                   "scheduler": scheduler or f"local, {n_workers} workers x {per_job} threads",
                   **rerun, "threads": per_job}
        _summary_table(summary)
        if json_out:
            print_data(dumps(summary))
        running = {j.id for j in todo}
        failed_before = sum(1 for j in jobs if j.id not in running and done.get(j.id) != "ok")
        if counts["error"] or failed_before:
            raise typer.Exit(EXIT_DATA)


def local_cluster(workers: int) -> Any:
    """A Dask ``LocalCluster`` of ``workers`` processes, one job at a time each.

    Dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which hands torch's
    matrices back to the system after every operation: a 1000-point Sinkhorn solve took 0.55 s
    in such a worker against 0.27 s without it (measured here). geomreg's own cluster leaves
    it unset; the thread limits Dask also sets (1 per worker) are kept.

    No dashboard. The scheduler still serves its health routes over HTTP: on a free port of
    the loopback interface, so that two batches at once do not contend for Dask's default
    port 8787 (the second printed "Port 8787 is already in use" on stderr).
    """
    import logging

    import dask
    from distributed import LocalCluster

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=None, silence_logs=logging.ERROR,
                            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


def _run(jobs: list[Job], out: Path, scheduler: str | None, workers: int, threads: int, seed: int) -> dict:
    """Submit the jobs, append each record to ``out`` as it arrives; counts of ok and error."""
    from distributed import Client, as_completed

    from geomreg.errors import InputError

    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="20s")
        else:
            cluster = local_cluster(workers)
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        where = scheduler or "local cluster"
        raise InputError(where, f"cannot start or reach the Dask scheduler: {err}") from None
    counts = {"ok": 0, "error": 0}
    try:
        futures = {client.submit(run_job, job, threads, seed, key=f"geomreg-{job.id}", pure=False): job
                   for job in jobs}
        with open(out, "a+", encoding="utf-8") as fh, _progress(len(jobs)) as advance:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:  # a line cut short by a killed batch must not swallow the next one
                fh.seek(fh.tell() - 1)
                if fh.read(1) != "\n":
                    fh.write("\n")
            for future in as_completed(futures):
                job = futures[future]
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 (the worker died too often, ...)
                    record = {"id": job.id, "line": job.line, "command": job.command, "status": "error",
                              "exit_code": None, "result": None, "error": f"{type(exc).__name__}: {exc}",
                              "time_s": None, "compute_s": None, "worker": None, "threads": threads,
                              "seed": job_seed(job, seed)}
                with uninterrupted():  # a record is one whole line
                    fh.write(dumps(record) + "\n")
                    fh.flush()
                counts[record["status"]] += 1
                advance(record["status"] == "ok")
    except BaseException:  # SIGTERM, Ctrl-C, a failure: shut down, and say why we stopped
        _shut_down(client, cluster, quiet=True)
        raise
    _shut_down(client, cluster)
    return counts


def _shut_down(client: Any, cluster: Any, quiet: bool = False) -> None:
    """Close the Dask client, then the local cluster (its nannies end their workers).

    ``quiet``: the batch is stopping because of an exception (an interruption): a failure to
    close is then ignored, so that it never replaces the reason the batch stopped.
    """
    error = None
    for close in (client.close, None if cluster is None else cluster.close):
        try:
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 (the cluster is closed even if the client is not)
            error = error or exc
    if error is not None and not quiet:
        raise error


def _progress(total: int):
    """A context giving ``advance(ok)``: a rich progress bar on stderr when it is a terminal."""
    import contextlib

    console = err_console()

    @contextlib.contextmanager
    def bar():
        if not console.is_terminal:
            yield lambda ok: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        failed = 0
        with Progress(TextColumn("jobs {task.completed}/{task.total}"), BarColumn(),
                      TextColumn("failed {task.fields[failed]}"), TextColumn("{task.speed} jobs/s"),
                      TimeRemainingColumn(), console=console) as progress:
            task = progress.add_task("batch", total=total, failed=0)

            def advance(ok: bool) -> None:
                nonlocal failed
                failed += not ok
                progress.update(task, advance=1, failed=failed)

            yield advance

    return bar()


def _summary_table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="geomreg batch", show_header=False)
    rate = summary["ran"] / summary["wall_s"] if summary["wall_s"] > 0 else 0.0
    for key, value in (("jobs in the manifest", summary["jobs"]), ("run now", summary["ran"]),
                       ("ok", summary["ok"]), ("failed", summary["failed"]),
                       ("skipped (already in RESULTS)", summary["skipped"]),
                       ("wall time", f"{summary['wall_s']:.1f} s ({rate:.2f} jobs/s)"),
                       ("ran on", summary["scheduler"]), ("results", summary["out"])):
        table.add_row(key, str(value))
    err_console().print(table)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("batch")(batch)
