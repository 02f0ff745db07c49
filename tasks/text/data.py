"""The data stage's text part: a UTF-8 corpus split by position and turned into token ids
with a vocabulary fit on the training part only (the layout: tasks/text/corpus.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import DataConfig, PipelineConfig, TextConfig
from tasks.errors import DataFileError
from tasks.prepared import SPLITS
from tasks.text.corpus import RESERVED_TOKENS, tokenizer_options
from tasks.workspace import Workspace, atomic_dir

_CHUNK_CHARS = 1 << 16  # characters tokenized per call: bounded memory for big corpora


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Token-id streams of the three splits and the vocabulary they index."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocabulary: tuple[str, ...]
    level: str

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @property
    def counts(self) -> dict[str, int]:
        return {split: int(len(self.split(split))) for split in SPLITS}


def corpus_files(path: Path) -> list[Path]:
    """The file, or every non-hidden file under the folder in name order; symbolic links
    inside a folder are skipped (in /usr/share/common-licenses they repeat a file)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not p.is_symlink()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return files
        raise DataFileError(f"data.text.path {path} is a folder without files: put text in it")
    raise DataFileError(
        f"data.text.path {path} not found: point it at a UTF-8 text file or a folder of them"
    )


def read_corpus(path: Path) -> str:
    """The corpus as one string; binary, non-UTF-8 or empty input is refused by name."""
    texts = []
    for file in corpus_files(path):
        raw = file.read_bytes()
        if (nul := raw.find(b"\0")) >= 0:
            raise DataFileError(
                f"{file} (data.text.path) is binary, not text (a NUL byte at offset {nul}): "
                "point data.text.path at UTF-8 text"
            )
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataFileError(
                f"{file} (data.text.path) is not UTF-8 (byte {error.start}: {error.reason}): "
                "convert it, e.g. `iconv -t UTF-8`"
            ) from None
    text = "\n".join(texts)
    if not text.strip():
        raise DataFileError(f"data.text.path {path} holds no text: every file is empty")
    return text


def split_by_position(text: str, val_fraction: float, test_fraction: float) -> tuple[str, ...]:
    """(train, val, test): consecutive parts of ``text`` with about these shares of its
    characters, cut after a whitespace so no word is split. Position, not random lines:
    the model is tested on text that follows what it was trained on."""
    if val_fraction + test_fraction >= 1.0:
        raise DataFileError(
            f"data.val_fraction {val_fraction} + data.text.test_fraction {test_fraction} "
            "leave no training text: keep their sum below 1"
        )
    shares = (1.0 - val_fraction - test_fraction, 1.0 - test_fraction)
    first, second = (_cut(text, round(share * len(text))) for share in shares)
    return text[:first], text[first:second], text[second:]


def _cut(text: str, position: int) -> int:
    """The first position at or after ``position`` that follows a whitespace (or the end)."""
    while position < len(text) and not text[position - 1 : position].isspace():
        position += 1
    return position


def chunks(text: str) -> list[str]:
    """``text`` in pieces of about _CHUNK_CHARS characters, each ending after a whitespace
    (or at the end), so tokenizing them one by one gives the tokens of the whole."""
    pieces, start = [], 0
    while start < len(text):
        end = _cut(text, start + _CHUNK_CHARS)
        pieces.append(text[start:end])
        start = end
    return pieces


def vectorizer(cfg: TextConfig, vocabulary: list[str] | None = None) -> Any:
    """The TextVectorization layer for ``data.text.level``; with ``vocabulary`` it encodes
    exactly as the one fit by `prepare_text` did (what the served model rebuilds)."""
    import keras

    options: dict[str, Any] = tokenizer_options(cfg.level) | {"output_mode": "int", "ragged": True}
    if vocabulary is not None:
        return keras.layers.TextVectorization(vocabulary=vocabulary[RESERVED_TOKENS:], **options)
    return keras.layers.TextVectorization(max_tokens=cfg.vocab_size, **options)


def encode(layer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` as one int32 stream."""
    if not text:
        return np.zeros(0, dtype=np.int32)
    ragged = layer(chunks(text))
    return np.asarray(ragged.flat_values, dtype=np.int32)


def prepare_text(cfg: DataConfig, root: Path) -> TextDataset:
    """Read, split by position, fit the vocabulary on train, encode the three splits."""
    text_cfg = cfg.text
    path = Path(text_cfg.path)
    text = read_corpus(path if path.is_absolute() else root / path)
    parts = split_by_position(text, cfg.val_fraction, text_cfg.test_fraction)
    layer = vectorizer(text_cfg)
    layer.adapt(chunks(parts[0]))
    vocabulary = [str(token) for token in layer.get_vocabulary()]
    if len(vocabulary) < text_cfg.vocab_size:
        distinct = len(vocabulary) - RESERVED_TOKENS
        raise DataFileError(
            f"data.text.vocab_size {text_cfg.vocab_size} is more than the training text has: "
            f"{distinct} distinct {text_cfg.level} tokens (+{RESERVED_TOKENS} for padding and "
            f"[UNK]); set data.text.vocab_size to at most {len(vocabulary)}, or use more text"
        )
    train, val, test = (encode(layer, part) for part in parts)
    for name, tokens in (("validation", val), ("test", test)):
        if len(tokens) == 0:
            raise DataFileError(
                f"the {name} split of data.text.path is empty ({len(text)} characters in all): "
                "use more text or larger data.val_fraction / data.text.test_fraction"
            )
    return TextDataset(train, val, test, tuple(vocabulary), text_cfg.level)


def build_text_meta(ds: TextDataset, cfg: DataConfig) -> dict[str, Any]:
    return {
        "modality": "text",
        "dataset": cfg.name,
        "source": cfg.source,
        "level": ds.level,
        "vocab_size": len(ds.vocabulary),
        "counts": ds.counts,
    }


def write_prepared_text(ds: TextDataset, out_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write the token streams, vocabulary.json and meta.json as a whole (atomic_dir)."""
    meta = build_text_meta(ds, cfg)
    with atomic_dir(Path(out_dir)) as staging:
        for split in SPLITS:
            np.savez(staging / f"{split}.npz", tokens=ds.split(split))
        (staging / "vocabulary.json").write_text(json.dumps(list(ds.vocabulary), indent=0) + "\n")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def prepare(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """data/prepared/ from the configured corpus; meta.json's content."""
    return write_prepared_text(prepare_text(cfg.data, ws.root), ws.prepared, cfg.data)
