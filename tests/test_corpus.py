"""Every command against every bad input of the generated corpus (tests/corpus.py).

Each must exit 1 with one line ``Error: ...`` naming the file, no traceback, no output
file, and the input left as it was.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from corpus import make_corpus
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
COMMANDS = {
    "distance": [],
    "match": ["--out", "{out}/reg.npy"],
    "flow": ["--out", "{out}/end.npy", "--steps", "1"],
    "register": ["--out", "{out}/reg.npy"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_bad_input_is_refused_cleanly(corpus, tmp_path, command):
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).random((30, 3)))
    failures = []
    for name, path in corpus.items():
        for a, b in ((path, good), (good, path)):
            out = tmp_path / "out"
            out.mkdir(exist_ok=True)
            before = _digest(path)
            extra = [w.format(out=out) for w in COMMANDS[command]]
            result = runner.invoke(app, [command, str(a), str(b), *extra])
            lines = result.stderr.strip().splitlines()
            problem = None
            if result.exit_code != 1:
                problem = f"exit code {result.exit_code}"
            elif len(lines) != 1 or not lines[0].startswith("Error: ") or "Traceback" in result.stderr:
                problem = f"stderr {result.stderr!r}"
            elif path.name not in lines[0]:
                problem = f"the message does not name the file: {lines[0]!r}"
            elif any(out.iterdir()):
                problem = f"left {sorted(p.name for p in out.iterdir())}"
            elif _digest(path) != before:
                problem = "the input changed"
            if problem:
                failures.append(f"{name} as {'A' if a == path else 'B'}: {problem}")
    assert not failures, "\n".join(failures)


def test_the_corpus_covers_the_readers(corpus):
    suffixes = {p.suffix for p in corpus.values()}
    assert {".ply", ".pcd", ".npy", ".txt", ".xyz", ".png"} <= suffixes
    assert len(corpus) >= 25


def test_unreadable_manifests_are_refused_before_anything_runs(tmp_path):
    bad = {
        "empty.csv": b"",
        "header_only.csv": b"command,a,b\n",
        "nonutf8.csv": b"command,a,b\n\xff\xfe,\x80,\x81\n",
        "extra_cells.csv": b"command,a,b\ndistance,a.npy,b.npy,oops\n",
        "not_json.jsonl": b'{"command": "distance", "a": "a.npy"\n',
        "a_list.jsonl": b'["distance", "a.npy", "b.npy"]\n',
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.csv").mkdir()
    for name in [*bad, "folder.csv"]:
        out = tmp_path / "results.jsonl"
        result = runner.invoke(app, ["batch", str(tmp_path / name), "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and name in lines[0], (name, lines)
        assert "Traceback" not in result.stderr and not out.exists(), name
