"""SIGTERM and Ctrl-C (SIGINT) during a computation, on real ``python -m cli`` processes.

Each command is started on inputs it cannot finish quickly (a Sinkhorn tolerance it never
reaches, a flow with a tiny step, more register levels than it could run), the test waits
until the computation is observably under way, then signals the process. Readiness is never a
fixed sleep: the first frames of a flow, the first record of a batch, or the status line that
``distance``, ``match`` and ``register`` show in a terminal (``FORCE_COLOR=1`` makes rich treat the
captured stderr as one). Expected: exit 143 (SIGTERM) or 130 (SIGINT), one ``Error:`` line,
nothing in the output folder (no output, no temporary file), complete flow frames only, a
batch's RESULTS made of complete records with its Dask worker processes gone, inputs
unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: how long a loaded machine may take to start Python, import torch and begin computing
READY_S = 240
#: how long the clean-up after the signal may take (a batch closes its Dask cluster)
EXIT_S = 120
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: a Sinkhorn solve that never meets its tolerance: it only ends by a signal
ENDLESS = ["--blur", "0.001", "--tol", "1e-12", "--max-iter", "100000000"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def work(tmp_path):
    """``in/`` with two clouds (3-D, 700 and 600 points), an empty ``out/``; checks ``in/`` after."""
    g = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "in" / "a.npy", g.random((700, 3)))
    np.save(tmp_path / "in" / "b.npy", g.random((600, 3)) * [1.0, 0.7, 0.5] + 0.2)
    before = _digest(tmp_path / "in")
    yield tmp_path
    assert _digest(tmp_path / "in") == before  # the inputs are untouched


class Command:
    """``python -m cli ARGS`` with stdout and stderr going to files in ``folder``."""

    def __init__(self, folder: Path, args: list, terminal: bool = False):
        env = dict(os.environ)
        env.pop("FORCE_COLOR", None)
        if terminal:  # rich draws its status line as in a terminal
            env.update(FORCE_COLOR="1", TERM="xterm", COLUMNS="200")
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=env, stdout=out,
                stderr=err, stdin=subprocess.DEVNULL,
                # as in a terminal, whatever the disposition the test runner was started with
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_S
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {what}: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no sign of {what} after {READY_S} s")
            time.sleep(0.05)

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=EXIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def started():
    """Start commands with ``started(folder, args, ...)``; any still running is killed after."""
    commands: list[Command] = []

    def start(folder, args, terminal=False):
        commands.append(Command(folder, args, terminal))
        return commands[-1]

    yield start
    for c in commands:
        c.kill()


def _visible(text: str) -> list[str]:
    """What a terminal shows of ``text``: escape sequences dropped, each line as last redrawn."""
    lines = [ln.split("\r")[-1] for ln in ANSI.sub("", text).split("\n")]
    return [ln for ln in lines if ln.strip()]


SOLVE_OUTPUTS = {
    "distance": lambda out: ["--log", out / "log.jsonl", "--field", out / "v.npy",
                             "--potentials", out / "pot"],
    "match": lambda out: ["--out", out / "reg.ply", "--field", out / "v.npy", "--matches",
                          out / "m.csv", "--log", out / "log.jsonl"],
}


@pytest.mark.parametrize("command", sorted(SOLVE_OUTPUTS))
def test_sinkhorn_commands_exit_143_on_sigterm_and_write_nothing(work, started, command):
    out = work / "out"
    cmd = started(work, [command, work / "in/a.npy", work / "in/b.npy", *ENDLESS, "--json",
                         *SOLVE_OUTPUTS[command](out)], terminal=True)
    cmd.wait_until(lambda: f"{command}: Sinkhorn step" in cmd.stderr(), "Sinkhorn steps")
    assert cmd.signal(signal.SIGTERM) == 143, cmd.stderr()[-2000:]
    err = cmd.stderr()
    assert err.count("Error:") == 1 and _visible(err)[-1] == "Error: terminated", err[-500:]
    assert cmd.out.read_text() == ""
    assert sorted(os.listdir(out)) == []


def test_register_sigterm_exits_143_and_writes_nothing(work, started):
    out = work / "out"
    cmd = started(work, ["register", work / "in/a.npy", work / "in/b.npy", "--levels", "100000",
                         "--out", out / "reg.ply", "--transform", out / "T.txt", "--plot",
                         out / "r.png", "--json"], terminal=True)
    cmd.wait_until(lambda: "register: Sinkhorn step" in cmd.stderr(), "Sinkhorn steps")
    assert cmd.signal(signal.SIGTERM) == 143, cmd.stderr()[-2000:]
    err = cmd.stderr()
    assert err.count("Error:") == 1 and _visible(err)[-1] == "Error: terminated", err[-500:]
    assert cmd.out.read_text() == ""
    assert sorted(os.listdir(out)) == []


@pytest.mark.parametrize(("sig", "code", "message"), [(signal.SIGTERM, 143, "terminated"),
                                                       (signal.SIGINT, 130, "interrupted")])
def test_flow_signal_keeps_complete_frames_only(work, started, sig, code, message):
    out, frames = work / "out", work / "frames"
    frames.mkdir()
    cmd = started(work, ["flow", work / "in/a.npy", work / "in/b.npy", "--out", out / "end.ply",
                         "--field", out / "v.npy", "--log", out / "flow.jsonl", "--plot", out / "f.png",
                         "--frames", frames, "--blur", "0.3", "--lr", "0.01", "--steps", "1000000",
                         "--tol", "0"])
    # the signal goes as soon as a second file shows up: often while that frame is being
    # written, which must then be finished first (or never started)
    cmd.wait_until(lambda: len(os.listdir(frames)) >= 2, "two frames")
    assert cmd.signal(sig) == code, cmd.stderr()[-2000:]
    assert cmd.stderr() == f"Error: {message}\n"  # one line, nothing else
    assert cmd.out.read_text() == ""
    assert sorted(os.listdir(out)) == []
    names = sorted(os.listdir(frames))
    assert names == [f"step_{k:05d}.npy" for k in range(len(names))]  # no temporary file
    assert all(np.load(frames / n).shape == (700, 3) for n in names)  # each one complete


def test_batch_sigterm_closes_the_cluster_and_keeps_complete_records(work, started):
    psutil = pytest.importorskip("psutil")
    from cli.batch import recorded
    from cli.manifest import read_manifest

    (work / "jobs").mkdir()
    manifest = work / "jobs" / "jobs.csv"  # paths relative to the manifest's folder
    manifest.write_text("id,command,a,b,blur,tol,max-iter\n"
                        "quick,distance,../in/a.npy,../in/b.npy,0.1,,\n"
                        "endless,distance,../in/a.npy,../in/b.npy,0.001,1e-12,100000000\n")
    listed = _digest(work / "jobs")
    results = work / "out" / "results.jsonl"
    cmd = started(work, ["batch", manifest, "--out", results, "--workers", "1", "--threads", "1"])
    cmd.wait_until(lambda: results.is_file() and results.read_text().endswith("\n"), "a first record")
    children = psutil.Process(cmd.proc.pid).children(recursive=True)
    assert children  # the local cluster's nanny and worker processes
    assert cmd.signal(signal.SIGTERM) == 143, cmd.stderr()
    assert cmd.stderr() == "Error: terminated\n"
    _, alive = psutil.wait_procs(children, timeout=60)
    assert alive == []  # the cluster was shut down, no worker process is left behind
    text = results.read_text()
    assert text.endswith("\n"), text
    records = [json.loads(line) for line in text.splitlines()]  # complete lines only
    assert [(r["id"], r["status"]) for r in records] == [("quick", "ok")], text
    assert sorted(os.listdir(work / "out")) == ["results.jsonl"]
    assert _digest(work / "jobs") == listed
    # a second run would skip what is recorded and run the job that was cut off
    done = recorded(results)
    assert [j.id for j in read_manifest(manifest) if done.get(j.id) != "ok"] == ["endless"]


# --------------------------------------------------------------------------- in-process


@pytest.fixture()
def handlers(monkeypatch):
    """The command line's signal handlers, installed in this process for one test."""
    import cli.errors as errors

    monkeypatch.setattr(errors, "_terminated", False)
    monkeypatch.setattr(errors, "_pending", None)
    with errors.signal_handlers():
        yield errors


@pytest.mark.parametrize(("sig", "exc"), [(signal.SIGTERM, "Terminated"),
                                          (signal.SIGINT, "KeyboardInterrupt")])
def test_a_signal_during_writing_waits_for_the_end_of_the_block(handlers, sig, exc):
    written = []
    with pytest.raises(KeyboardInterrupt) as caught:
        with handlers.uninterrupted():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # time for Python to run the handler: it must not raise here
                written.append(len(written))
        pytest.fail("the signal held back must raise as the block ends")
    assert type(caught.value).__name__ == exc and len(written) == 1000
    assert handlers.terminated() is (sig == signal.SIGTERM)


@pytest.mark.parametrize("cleanup_fails", [False, True])
def test_sigterm_outside_a_block_raises_at_once_and_maps_to_143(handlers, tmp_path, monkeypatch, capsys,
                                                               cleanup_fails):
    import geomreg.api
    from cli.main import dispatch

    np.save(tmp_path / "a.npy", np.zeros((3, 2)))

    def killed(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler raises Terminated at the next bytecode
                pass
        finally:
            if cleanup_fails:  # what the clean-up raises must not hide the termination
                raise RuntimeError("clean-up failed")
        pytest.fail("SIGTERM did not interrupt the computation")

    monkeypatch.setattr(geomreg.api, "sinkhorn_loss", killed)
    assert dispatch(["distance", str(tmp_path / "a.npy"), str(tmp_path / "a.npy")]) == 143
    assert capsys.readouterr().err == "Error: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM would kill
