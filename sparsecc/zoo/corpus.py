"""The text the zoo models are trained and evaluated on.

`load_corpus()` looks for WikiText-2 in, in order: the `data_dir` argument, `$SPARSECC_DATA`,
then `<repo root>/../shared/data`. The WikiText-2 training split is not shipped there, so we
train on the validation split (`wikitext-2/valid.txt`) and report on the test split
(`wikitext-2/test.txt`). With no data anywhere we fall back to text every Python installation
carries: the standard library's own `.py` sources, split by file, deterministically.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

ENV_DATA = "SPARSECC_DATA"
TRAIN_FILE = "wikitext-2/valid.txt"  # the validation split: the train split is not available
TEST_FILE = "wikitext-2/test.txt"

# stdlib fallback: sizes of the two splits and which files qualify
STDLIB_TRAIN_BYTES = 1_200_000
STDLIB_TEST_BYTES = 300_000
STDLIB_TEST_EVERY = 5  # every 5th qualifying file goes to the test split
STDLIB_MAX_FILE_BYTES = 64_000  # keeps one huge module from dominating a split
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Train and test text plus `source`: what they are and their sha256s."""
    train_text: str = field(repr=False)
    test_text: str = field(repr=False)
    source: dict = field(default_factory=dict)


def corpus_sha256(text: str) -> str:
    """sha256 of a text's UTF-8 bytes (for a file read by `load_corpus`, the file's sha256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shared_data_dir() -> Path:
    """`<repo root>/../shared/data`, where the project's checkouts find their data."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_corpus(data_dir: str | os.PathLike | None = None) -> Corpus:
    """Load WikiText-2 from `data_dir`, `$SPARSECC_DATA` or ../shared/data; else stdlib sources.

    Raises FileNotFoundError when a directory was given explicitly but lacks the files."""
    explicit = data_dir if data_dir is not None else (os.environ.get(ENV_DATA) or None)
    if explicit is not None:
        root = Path(explicit).expanduser()
        missing = [str(root / f) for f in (TRAIN_FILE, TEST_FILE) if not (root / f).is_file()]
        if missing:
            how = "data_dir" if data_dir is not None else f"${ENV_DATA}"
            raise FileNotFoundError(f"{how}={str(root)!r} lacks {', '.join(missing)}; expected a folder "
                                    f"holding {TRAIN_FILE} (trained on) and {TEST_FILE} (reported on)")
        return _wikitext(root)
    shared = shared_data_dir()
    if (shared / TRAIN_FILE).is_file() and (shared / TEST_FILE).is_file():
        return _wikitext(shared)
    return _stdlib_corpus()


def _wikitext(root: Path) -> Corpus:
    train_file, test_file = (root / TRAIN_FILE).resolve(), (root / TEST_FILE).resolve()
    # decode the raw bytes (no newline translation) so the hashes equal the files' sha256
    train, test = (f.read_bytes().decode("utf-8") for f in (train_file, test_file))
    source = {"name": "wikitext-2", "train_split": "valid", "test_split": "test",
              "train_file": str(train_file), "train_sha256": corpus_sha256(train),
              "test_file": str(test_file), "test_sha256": corpus_sha256(test)}
    return Corpus(train, test, source)


def _stdlib_files(root: Path) -> list[Path]:
    """Qualifying `.py` files under the stdlib root, sorted by relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]  # machine-specific
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, test, n_train, n_test = [], [], 0, 0
    qualifying = 0
    for path in _stdlib_files(root):
        if n_train >= STDLIB_TRAIN_BYTES and n_test >= STDLIB_TEST_BYTES:
            break
        try:
            if path.stat().st_size > STDLIB_MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        qualifying += 1
        to_test = qualifying % STDLIB_TEST_EVERY == 0
        if to_test and n_test < STDLIB_TEST_BYTES:
            test.append(text)
            n_test += len(data)
        elif not to_test and n_train < STDLIB_TRAIN_BYTES:
            train.append(text)
            n_train += len(data)
    if not train or not test:
        raise FileNotFoundError(f"no WikiText-2 found (pass data_dir or set ${ENV_DATA}) and too little "
                                f"Python source under {root} to fall back on")
    train_text, test_text = "\n".join(train), "\n".join(test)
    source = {"name": "python-stdlib", "stdlib": str(root), "train_files": len(train), "test_files": len(test),
              "train_sha256": corpus_sha256(train_text), "test_sha256": corpus_sha256(test_text)}
    return Corpus(train_text, test_text, source)
