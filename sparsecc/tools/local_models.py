"""Models, tokenizers and text from local folders, for the command line. Nothing is downloaded
and no code from a model folder is run (transformers classes only, safetensors only)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.checkpoint import META, _from_pretrained, load_pruned
from ..errors import CalibrationError, PlanError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_local_model(model_dir, tokenizer_dir=None):
    """(model in eval mode, tokenizer) from a save_pretrained folder or a sparsecc checkpoint."""
    path = check_model_dir(model_dir)
    model = load_pruned(path)[0] if (path / META).is_file() else _from_pretrained(path).eval()
    return model, load_tokenizer(tokenizer_dir or path)


def check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist; give a folder written by "
                                "save_pretrained (models are never fetched from a hub)")
    return path


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise PlanError(f"{str(folder)!r} holds no tokenizer; pass --tokenizer FOLDER (the model's own tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot load the tokenizer in {str(folder)!r}: {e}") from None


def read_text(path) -> str:
    """A text file, or every .txt file of a folder (sorted by name) joined by blank lines."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"folder {str(path)!r} has no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text {str(path)!r} does not exist")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise CalibrationError(f"text in {str(path)!r} is not UTF-8: {e}") from None


def tokenize(tokenizer, text: str, what: str = "text") -> torch.Tensor:
    """One 1-D LongTensor of token ids for `text` (no special tokens added)."""
    from ..zoo.tokenizer import encode_text
    if not text.strip():
        raise CalibrationError(f"{what} is empty")
    if hasattr(tokenizer, "backend_tokenizer"):
        return encode_text(tokenizer, text)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
