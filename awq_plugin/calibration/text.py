"""Calibration and evaluation text: built-in sets, user files, tokenized windows.

Built-in sets need no network. They are read as data from wheels the project
already depends on:

===================  ==============================================================
``enwiki``           ~85 Wikipedia articles from the ``gensim`` wheel's test data
                     (the calibration pool)
``enwiki-heldout``   the other ~21 articles of that dump (every 5th article):
                     disjoint from ``enwiki`` by article, used for perplexity
``news``             300 news articles (``lee_background.cor``, also from gensim)
``pydoc``            the topics of Python's own help system (``pydoc_data.topics``)
===================  ==============================================================

A source can also be a path to a ``.txt`` file (documents separated by blank
lines), a ``.jsonl`` file (one object per line with a ``"text"`` field), or a
list of strings.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from awq_plugin.calibration.settings import DEFAULTS
from awq_plugin.errors import CalibrationError

#: A built-in set name, a text file, documents, or token ids ``[n_samples, seq_len]`` (integers).
CalibSource = str | Path | Sequence[str] | torch.Tensor

BUILTIN_SOURCES = ("enwiki", "enwiki-heldout", "news", "pydoc")
HELDOUT_EVERY = 5  # article i is held out when i % HELDOUT_EVERY == 0

_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"


def _gensim_test_data(name: str) -> Path:
    # Locate the data without importing gensim (its import pulls scipy and is slow).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(
            "the built-in text sets are read from the 'gensim' wheel, which is not installed "
            "(pip install gensim), or pass a text file / list of strings instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise CalibrationError(f"gensim's test data file {path} is missing")
    return path


def _clean_wiki_markup(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki  # strips links, templates, tables, refs

    text = filter_wiki(markup)
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)  # == Heading == -> Heading
    text = re.sub(r"^[*#:;]+\s*$", "", text, flags=re.MULTILINE)  # bullets left empty by the filter
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    """All non-redirect articles of the dump, in dump order, as plain text."""
    articles = []
    with bz2.open(_gensim_test_data(_WIKI_DUMP)) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            markup = element.findtext(".//{*}text") or ""
            if not markup.lstrip().upper().startswith("#REDIRECT"):
                text = _clean_wiki_markup(markup)
                if len(text) > 200:
                    articles.append(text)
            element.clear()
    return tuple(articles)


def _news_articles() -> list[str]:
    lines = _gensim_test_data(_NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def _read_text_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f"{path}:{number}: expected an object with a string field 'text'")
            docs.append(record["text"])
        return docs
    text = path.read_text(encoding="utf-8", errors="replace")
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def load_documents(source: str | Path | Sequence[str]) -> list[str]:
    """The documents of a built-in set name, a .txt/.jsonl path, or a list of strings."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(doc, str) for doc in source):
            raise CalibrationError("a list of calibration texts must contain only strings")
        docs = [doc for doc in source if doc.strip()]
    elif isinstance(source, str) and source in BUILTIN_SOURCES:
        if source == "news":
            docs = _news_articles()
        elif source == "pydoc":
            docs = _pydoc_topics()
        else:
            articles = _wiki_articles()
            heldout = source == "enwiki-heldout"
            docs = [a for i, a in enumerate(articles) if (i % HELDOUT_EVERY == 0) == heldout]
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(
                f"text source {str(source)!r} is neither a built-in set {list(BUILTIN_SOURCES)} nor a file"
            )
        docs = _read_text_file(path)
    else:
        raise CalibrationError(f"unsupported text source of type {type(source).__name__}")
    if not docs:
        raise CalibrationError(f"text source {_describe(source)} holds no text")
    return docs


def _describe(source: str | Path | Sequence[str]) -> str:
    if isinstance(source, (list, tuple)):
        return f"<list of {len(source)} strings>"
    return repr(str(source))


def tokenize_stream(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """Token ids of all documents, concatenated with the EOS token between them: ``[T]``."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


#: Tokenized built-in sets, keyed by the set and the tokenizer's identity (class, source folder,
#: vocabulary size, EOS id): one quantize run tokenizes its calibration text twice (calibration
#: windows and the guard's held-out windows), and a test session does it for many runs.
_STREAMS: dict[tuple[Any, ...], torch.Tensor] = {}
_MAX_STREAMS = 4


def source_stream(tokenizer: Any, source: str | Path | Sequence[str]) -> torch.Tensor:
    """:func:`tokenize_stream` of :func:`load_documents` (``[T]``, a fresh tensor); built-in sets are
    tokenized once per tokenizer (a tokenizer without a folder name is never cached)."""
    name = getattr(tokenizer, "name_or_path", "")
    if not (isinstance(source, str) and source in BUILTIN_SOURCES and isinstance(name, str) and name):
        return tokenize_stream(tokenizer, load_documents(source))
    key = (source, type(tokenizer).__name__, name, len(tokenizer), tokenizer.eos_token_id)
    if key not in _STREAMS:
        if len(_STREAMS) >= _MAX_STREAMS:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = tokenize_stream(tokenizer, load_documents(source))
    return _STREAMS[key].clone()


def _windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)  # (n_windows, seq_len)


def calibration_windows(
    tokenizer: Any,
    source: str | Path | Sequence[str] = DEFAULTS.source,
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` random non-overlapping windows of ``seq_len`` tokens: ``[n_samples, seq_len]``.

    Documents are concatenated (EOS-separated) and cut into windows, as the AWQ
    reference does with its calibration set; the draw is seeded, so the same
    arguments always give the same tensor.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    windows = _windows(source_stream(tokenizer, source), seq_len)
    if windows.shape[0] < n_samples:
        raise CalibrationError(
            f"calibration text {_describe(source)} gives only {windows.shape[0]} windows of {seq_len} "
            f"tokens, fewer than the {n_samples} samples asked for; lower n_samples or seq_len, "
            "or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.shape[0], generator=generator)[:n_samples].sort().values
    return windows[pick].contiguous()


def evaluation_windows(
    tokenizer: Any,
    source: str | Path | Sequence[str] = "enwiki-heldout",
    n_windows: int | None = None,
    seq_len: int = 512,
) -> torch.Tensor:
    """The first ``n_windows`` consecutive windows of the text (all of them when None)."""
    windows = _windows(source_stream(tokenizer, source), seq_len)
    if windows.shape[0] == 0 or (n_windows is not None and windows.shape[0] < n_windows):
        raise CalibrationError(
            f"evaluation text {_describe(source)} gives {windows.shape[0]} windows of {seq_len} tokens; "
            f"{n_windows or 1} needed"
        )
    return windows if n_windows is None else windows[:n_windows]


def check_token_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids given directly as calibration data: an integer tensor ``[n_samples, seq_len]``."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise CalibrationError(f"calibration token ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CalibrationError(
            f"calibration token ids must be [n_samples >= 1, seq_len >= 2], got shape {list(ids.shape)}"
        )
    return ids.long()


def calibration_ids(
    source: CalibSource,
    tokenizer: Any,
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    seed: int = 0,
) -> torch.Tensor:
    """Calibration token ids ``[n_samples, seq_len]``: given ids as they are, else windows of text."""
    if isinstance(source, torch.Tensor):
        return check_token_ids(source)
    if tokenizer is None:
        raise CalibrationError(
            "calibration text needs a tokenizer: pass tokenizer=..., or token ids as a tensor"
        )
    return calibration_windows(tokenizer, source, n_samples, seq_len, seed)
