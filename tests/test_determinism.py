"""The same command twice gives bit-identical outputs on the CPU.

register's affine fit once used LAPACK's gelsy driver for its least squares, which gave
different last bits from call to call on the same 3 x 3 system; it now uses gelsd.
"""

from __future__ import annotations

import hashlib

import numpy as np
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _run_twice(tmp_path, make_args):
    digests = []
    for k in range(2):
        folder = tmp_path / f"run{k}"
        folder.mkdir(parents=True)
        result = runner.invoke(app, [str(s) for s in make_args(folder)])
        assert result.exit_code == 0, result.stderr
        files = sorted(p for p in folder.iterdir())
        digests.append([(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
                       + [("stdout", result.stdout)])
    return digests


def test_match_flow_and_register_are_bit_identical_when_run_again(tmp_path):
    g = np.random.default_rng(7)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, g.random((300, 3)))
    np.save(b, g.random((250, 3)) @ np.diag([1.0, 0.6, 0.3]) + 0.2)
    runs = {
        "match": lambda f: ["match", a, b, "--out", f / "reg.ply", "--field", f / "v.npy",
                            "--matches", f / "m.csv", "--top-k", "2"],
        "flow": lambda f: ["flow", a, b, "--out", f / "end.npy", "--steps", "3", "--tol", "0",
                           "--log", f / "log.jsonl"],
        "register": lambda f: ["register", a, b, "--out", f / "reg.npy", "--transform", f / "T.txt",
                               "--model", "affine"],
    }
    for name, make_args in runs.items():
        first, second = _run_twice(tmp_path / name, make_args)
        assert len(first) >= 2, name
        strip = [(n, d) for n, d in first if n != "log.jsonl"]  # the log records elapsed times
        assert strip == [(n, d) for n, d in second if n != "log.jsonl"], name

