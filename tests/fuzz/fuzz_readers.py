"""Coverage-guided fuzzing of every geomreg reader with atheris (libFuzzer for Python).

One input is one file: byte 0 picks the suffix (``SUFFIXES[byte % len(SUFFIXES)]``), byte 1
the options (mass, ``as_image``, a PLY weight property, or reading it as a weights file),
the rest is the file's content, written to a temporary file under that suffix and read.

A finding, which crashes the harness (libFuzzer saves the input as ``crash-*``):

* any exception other than :class:`~geomreg.errors.InputError`;
* an InputError that only wraps an unforeseen exception (the readers' catch-all), or that
  reports running out of memory (the address space is capped at start, so an allocation
  that the file does not justify fails instead of swapping);
* a returned measure or weight vector that breaks its invariants;
* a read that runs past libFuzzer's ``-timeout``.

Usage::

    python tests/fuzz/fuzz_readers.py --seeds DIR            # write the seed corpus to DIR
    python tests/fuzz/fuzz_readers.py -max_total_time=60 NEW_DIR SEED_DIR
    python tests/fuzz/fuzz_readers.py crash-1234...          # replay one input

Seeds come from tests/corpus.py: its bad inputs and its valid files, under every option.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE.parents[1]):  # tests/ (corpus.py) and the repository root
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

#: address space the harness may use on top of what it has after start-up
EXTRA_ADDRESS_SPACE = int(os.environ.get("FUZZ_EXTRA_ADDRESS_SPACE", 3 << 30))
WEIGHT_PROPERTIES = ("weight", "w", "x", "idx")

#: option bits of byte 1
BRIGHT, AS_IMAGE, PROPERTY, WEIGHTS = 0x01, 0x02, 0x10, 0x80


class Finding(Exception):
    """A reader broke its contract on this input."""


def encode(suffix: str, body: bytes, flags: int = 0) -> bytes:
    """The fuzzer input that makes the harness read ``body`` as a ``suffix`` file."""
    from geomreg.io import SUFFIXES

    return bytes([SUFFIXES.index(suffix), flags]) + body


def make_seeds(folder: Path) -> int:
    """Write the seed corpus into ``folder``; returns the number of files."""
    from corpus import make_corpus, valid_files

    folder.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_corpus(Path(tmp)).values():
            if path.is_file():
                seeds.append(encode(path.suffix, path.read_bytes()))
    for suffix, files in valid_files().items():
        for body in files:
            seeds.append(encode(suffix, body))
            if suffix == ".npy":
                seeds.append(encode(suffix, body, AS_IMAGE))
            if suffix in (".npy", ".txt", ".csv"):
                seeds.append(encode(suffix, body, WEIGHTS | 5))
            if suffix == ".ply":
                seeds.append(encode(suffix, body, PROPERTY))
            if suffix in (".png", ".bmp", ".tif"):
                seeds.append(encode(suffix, body, BRIGHT))
    for k, data in enumerate(seeds):
        (folder / f"seed-{k:03d}").write_bytes(data)
    return len(seeds)


def check_one(data: bytes, workdir: Path) -> None:
    """Read one fuzzer input; raise :class:`Finding` (or let an exception escape) on a bug."""
    import numpy as np

    from geomreg.errors import GeomregError, InputError
    from geomreg.io import SUFFIXES, read_measure, read_weights

    if len(data) < 2:
        return
    suffix = SUFFIXES[data[0] % len(SUFFIXES)]
    flags = data[1]
    path = workdir / f"input{suffix}"
    path.write_bytes(data[2:])
    try:
        if flags & WEIGHTS and suffix in (".npy", ".txt", ".csv"):
            n = 1 + (flags & 0x0F)
            w = read_weights(path, n)
            if not (w.dtype == np.float64 and w.shape == (n,) and np.isfinite(w).all()
                    and (w >= 0).all() and 0 < w.sum() < np.inf):
                raise Finding(f"invalid weights {w!r}")
            return
        prop = None
        if suffix == ".ply" and flags & PROPERTY:
            prop = WEIGHT_PROPERTIES[(flags >> 2) & 3]
        m = read_measure(
            path,
            mass="bright" if flags & BRIGHT else "dark",
            as_image=bool(flags & AS_IMAGE) and suffix == ".npy",
            weight_property=prop,
        )
    except InputError as err:
        if not str(err).startswith(f"{path}: "):
            raise Finding(f"the message does not start with the file: {err}") from err
        cause = err.__cause__
        if cause is not None and not isinstance(cause, GeomregError):
            raise Finding(f"an unforeseen {type(cause).__name__} behind: {err}") from cause
        if isinstance(err.__context__, MemoryError):
            raise Finding(f"ran out of memory on a {len(data) - 2}-byte file: {err}") from err
        return
    p, w = m.points, m.weights
    ok = (
        p.dtype == np.float64 and p.ndim == 2 and p.shape[0] >= 1 and p.shape[1] >= 1
        and np.isfinite(p).all() and w.dtype == np.float64 and w.shape == (p.shape[0],)
        and np.isfinite(w).all() and (w >= 0).all() and 0 < w.sum() < np.inf
    )
    if m.grid is not None:
        ok = ok and m.grid.mask.shape == (p.shape[0],) and np.array_equal(m.grid.centres(m.grid.mask), p)
    if not ok:
        raise Finding(f"an invalid measure came back: points {p.shape} {p.dtype}, weights {w.shape}")


def _cap_address_space() -> None:
    with open("/proc/self/status") as fh:
        size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = size + EXTRA_ADDRESS_SPACE
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--seeds":
        print(f"{make_seeds(Path(argv[2]))} seeds written to {argv[2]}")
        return
    import atheris

    with atheris.instrument_imports(include=["geomreg", "PIL", "imageio"]):
        import imageio.v3  # noqa: F401
        from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401

        import geomreg.io  # noqa: F401
        import geomreg.io.readers  # noqa: F401
        import geomreg.measure  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))
    try:
        _cap_address_space()
    except (OSError, ValueError, StopIteration):
        pass  # no /proc or no rlimit: libFuzzer's -rss_limit_mb still applies

    def test_one(data: bytes) -> None:
        check_one(data, workdir)

    atheris.Setup(argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
