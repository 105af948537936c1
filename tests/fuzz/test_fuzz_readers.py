"""A bounded run of the readers' fuzz harness (tests/fuzz/fuzz_readers.py); `make test-all` only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_readers.py")
ROOT = HARNESS.parents[2]
SECONDS = 60


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
def test_fuzzing_the_readers_finds_nothing(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install -e '.[fuzz]')")
    seeds, found = tmp_path / "seeds", tmp_path / "corpus"
    found.mkdir()
    made = subprocess.run([sys.executable, str(HARNESS), "--seeds", str(seeds)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert len(list(seeds.iterdir())) >= 40
    proc = subprocess.run(
        [sys.executable, str(HARNESS), f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=3072",
         "-max_len=65536", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(found), str(seeds)],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 240,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, f"findings {crashes}:\n{_tail(proc.stderr)}"
    assert "Done" in proc.stderr and "stat::number_of_executed_units" in proc.stderr, _tail(proc.stderr)


def test_the_harness_flags_an_escaping_exception(tmp_path, monkeypatch):
    """check_one raises on an input whose reader lets a foreign exception out (or wraps one)."""
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import fuzz_readers
    finally:
        sys.path.remove(str(HARNESS.parent))
    from geomreg.io import readers

    good = fuzz_readers.encode(".txt", b"1 2 3\n")
    fuzz_readers.check_one(good, tmp_path)  # a valid file passes

    def broken(path):
        raise IndexError("a bug")

    monkeypatch.setattr(readers, "_read_text_points", broken)
    with pytest.raises(fuzz_readers.Finding, match="unforeseen IndexError"):
        fuzz_readers.check_one(good, tmp_path)
