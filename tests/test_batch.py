"""geomreg batch: manifests, the local pool, Dask clusters on loopback, resume, killed workers.

Every cluster here is real: a ``LocalCluster`` of worker processes, or ``dask scheduler`` and
``dask worker`` started as separate processes on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
BIN = Path(sys.executable).parent


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def results(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture()
def folder(tmp_path):
    """Two small clouds and a manifest folder (paths in manifests are relative to it)."""
    g = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", g.random((200, 2)))
    np.save(tmp_path / "b.npy", g.random((150, 2)) + [0.3, 0.0])
    return tmp_path


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_rows_are_all_reported_with_their_line_and_nothing_runs(folder):
    manifest = write_csv(folder / "jobs.csv", [
        "id,command,a,b,blur,bogus,debias",
        "x1,distance,a.npy,b.npy,0.05,,",
        "x2,distort,a.npy,b.npy,,,",
        "x3,distance,a.npy,,,,",
        "x4,distance,a.npy,b.npy,abc,,",
        "x5,distance,a.npy,b.npy,,1,",
        "x6,distance,a.npy,b.npy,,,maybe",
        "x1,distance,b.npy,a.npy,,,",
    ])
    result = invoke("batch", manifest, "--out", folder / "res.jsonl")
    assert result.exit_code == 1
    for line, words in ((3, "distort"), (4, "'b' is empty"), (5, "--blur"), (6, "--bogus"),
                        (7, "true or false"), (8, "already used on line 2")):
        assert re.search(f"line {line}: .*{re.escape(words)}", result.stderr), (line, result.stderr)
    assert "6 bad row(s), nothing was run" in result.stderr
    assert not (folder / "res.jsonl").exists()


def test_manifest_rows_become_the_command_lines_a_user_would_type(folder):
    from cli.manifest import read_manifest

    (folder / "jobs.jsonl").write_text(
        '{"command": "match", "a": "a.npy", "b": "b.npy", "blur": 0.1, "out": "m.npy", "debias": false}\n'
        '\n{"id": "r", "command": "register", "a": "a.npy", "b": "/abs/b.npy", "no-surface": true}\n')
    jobs = read_manifest(folder / "jobs.jsonl")
    assert [j.line for j in jobs] == [1, 3]
    assert jobs[0].argv == ("match", str(folder / "a.npy"), str(folder / "b.npy"), "--blur", "0.1",
                            "--no-debias", "--out", str(folder / "m.npy"), "--json")
    assert jobs[0].outputs == (str(folder / "m.npy"),) and len(jobs[0].id) == 12
    assert jobs[0].id == read_manifest(folder / "jobs.jsonl")[0].id  # stable
    assert jobs[1].id == "r" and jobs[1].argv[2:] == ("/abs/b.npy", "--no-surface", "--json")
    write_csv(folder / "two.csv", ["command,a,b,out", "match,a.npy,b.npy,m.npy", "flow,b.npy,a.npy,m.npy"])
    result = invoke("batch", folder / "two.csv", "--out", folder / "res.jsonl")
    assert result.exit_code == 1 and "line 3:" in result.stderr and "also written by line 2" in result.stderr


def test_local_pool_runs_every_job_records_failures_and_resumes(folder):
    manifest = write_csv(folder / "jobs.csv", [
        "id,command,a,b,blur,loss,out",
        "sink,distance,a.npy,b.npy,0.05,,",
        "energy,distance,a.npy,b.npy,,energy,",
        "missing,distance,nothere.npy,b.npy,,,",
        "raises,distance,a.npy,b.npy,-1,,",
        "match,match,a.npy,b.npy,0.1,,moved.npy",
    ])
    out = folder / "res.jsonl"
    result = invoke("batch", manifest, "--out", out, "--workers", "2", "--json")
    assert result.exit_code == 1, result.stderr  # some jobs failed
    summary = json.loads(result.stdout)
    assert (summary["ran"], summary["ok"], summary["failed"]) == (5, 3, 2)
    rec = results(out)
    assert {k: r["status"] for k, r in rec.items()} == {
        "sink": "ok", "energy": "ok", "missing": "error", "raises": "error", "match": "ok"}
    assert rec["missing"]["exit_code"] == 1 and "nothere.npy" in rec["missing"]["error"]
    assert rec["raises"]["exit_code"] == 2 and "--blur" in rec["raises"]["error"]
    assert rec["sink"]["threads"] == 1 and rec["sink"]["versions"]["geomreg"]
    assert (folder / "moved.npy").exists() and rec["match"]["result"]["field_norm_mean"] > 0
    # compute time: the command's own, within the job's wall time; none for a job that failed
    match = rec["match"]
    assert 0 < match["compute_s"] == match["result"]["time_s"] <= match["time_s"]
    assert set(match["result"]["times"]) == {"transport"} and rec["missing"]["compute_s"] is None
    # the same value as the single command
    single = invoke("distance", folder / "a.npy", folder / "b.npy", "--blur", "0.05", "--json")
    assert rec["sink"]["result"]["value"] == pytest.approx(json.loads(single.stdout)["value"], rel=1e-6)
    # again: nothing runs; the failed jobs still make the exit code 1
    again = invoke("batch", manifest, "--out", out, "--json")
    assert again.exit_code == 1 and json.loads(again.stdout)["skipped"] == 5
    assert len(out.read_text().splitlines()) == 5
    # a line cut short by a killed batch is ignored, and the next record starts on its own line
    with open(out, "a") as fh:
        fh.write('{"id": "sink", "sta')
    retry = invoke("batch", manifest, "--out", out, "--retry-failed", "--json")
    assert json.loads(retry.stdout)["ran"] == 2
    lines = out.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x) for x in lines[:5] + lines[6:])
    # once the failed rows are fixed (new rows: new ids), exit code 0 for a manifest of good rows
    good = write_csv(folder / "good.csv", ["command,a,b", "distance,a.npy,b.npy"])
    ok = invoke("batch", good, "--out", folder / "good.jsonl", "--workers", "1")
    assert ok.exit_code == 0, ok.stderr


def test_usage_errors(folder):
    manifest = write_csv(folder / "jobs.csv", ["command,a,b", "distance,a.npy,b.npy"])
    assert invoke("batch", manifest, "--out", folder / "r.jsonl", "--workers", "0").exit_code == 2
    assert invoke("batch", manifest, "--out", manifest).exit_code == 2
    bad = invoke("batch", manifest, "--out", folder / "nofolder" / "r.jsonl")
    assert bad.exit_code == 1 and "folder" in bad.stderr
    gone = invoke("batch", folder / "none.csv", "--out", folder / "r.jsonl")
    assert gone.exit_code == 1 and "none.csv" in gone.stderr


def test_two_local_clusters_at_once_print_no_port_warning():
    """Two batches on one machine: the second used to print "Port 8787 is already in use"."""
    import warnings

    from cli.batch import local_cluster

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = local_cluster(1), local_cluster(1)
        try:
            ports = {first.scheduler.http_server.port, second.scheduler.http_server.port}
        finally:
            first.close(), second.close()
    assert len(ports) == 2 and 8787 not in ports
    assert not [w for w in caught if "already in use" in str(w.message)]


def test_local_cluster_given_by_address(folder):
    from distributed import LocalCluster

    manifest = write_csv(folder / "jobs.csv", ["id,command,a,b", "one,distance,a.npy,b.npy",
                                                "two,register,a.npy,b.npy"])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        result = invoke("batch", manifest, "--out", folder / "r.jsonl", "--scheduler", address)
    assert result.exit_code == 0, result.stderr
    rec = results(folder / "r.jsonl")
    assert rec["two"]["result"]["model"] == "rigid" and rec["one"]["worker"] == rec["two"]["worker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster(tmp_path):
    """``dask scheduler`` and one ``dask worker`` (with its nanny) as separate processes."""
    dask = shutil.which("dask", path=str(BIN)) or shutil.which("dask")
    if dask is None:
        pytest.skip("the dask command is not installed")
    address = f"tcp://127.0.0.1:{_free_port()}"
    logs = open(tmp_path / "dask.log", "w")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--no-dashboard"], stdout=logs, stderr=logs)]
    procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                   "--no-dashboard"], stdout=logs, stderr=logs))
    from distributed import Client

    try:
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for p in procs[::-1]:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def test_separate_scheduler_and_worker_and_a_killed_worker(folder, cluster):
    from distributed import Client

    row = f"long,flow,{SAMPLE}/spiral_a.npy,{SAMPLE}/spiral_b.npy,15,0,end.npy"
    manifest = write_csv(folder / "jobs.csv", ["id,command,a,b,steps,tol,out", row])
    out = folder / "r.jsonl"
    batch = subprocess.Popen([str(BIN / "geomreg"), "batch", str(manifest), "--out", str(out), "--scheduler",
                              cluster], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Client(cluster, timeout="30s") as client:
        deadline = time.monotonic() + 60
        while not any(client.processing().values()):  # the job has reached the worker
            assert time.monotonic() < deadline and batch.poll() is None, "the job never started"
            time.sleep(0.2)
        time.sleep(1.0)
        (killed,) = client.run(os.getpid).values()
        os.kill(killed, signal.SIGKILL)  # the nanny starts a new worker; Dask runs the job again
        _, err = batch.communicate(timeout=300)
    assert batch.returncode == 0, err
    record = results(out)["long"]
    assert record["status"] == "ok" and record["result"]["n_steps"] == 15
    assert 0 < record["compute_s"] == record["result"]["time_s"] <= record["time_s"]
    assert not record["worker"].endswith(f":{killed}")
    assert np.load(folder / "end.npy").shape == (1500, 3)
