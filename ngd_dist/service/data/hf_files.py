"""Hugging Face ``datasets`` read from local files: json (JSON lines too), csv, parquet and text.

``data: {name: hf_files, args: {...}}`` (:func:`hf_files`) reads the files with
``datasets.load_dataset(format, data_files=...)`` (the ``datasets`` extra), which converts them
once into Arrow files in its cache (``cache_dir``, default ``~/.cache/huggingface/datasets``) and
memory-maps those: rows are read one at a time, in the DataLoader's workers when
``data.num_workers`` > 0, so the data need not fit in memory. Nothing is ever downloaded: the files
must be local paths (a URL is refused), and ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set
to 1 unless the environment sets them.

Items, from the columns (numbers, or lists of numbers of the same length in every row; float
columns become float32 tensors, integer columns int64):

- **dict items** (the default): every column, or those listed in ``columns``, by name; the targets
  are the column ``labels``, or the one named by ``label`` (renamed ``labels``);
- **tuple items** ``(input, label)`` with ``input`` and ``label``: ``input`` names one column (its
  tensor as it is) or a list of columns (numbers, stacked into a float32 vector: the tokenizer-free
  path for a csv of features);
- **text** (``format: text``): the files' bytes, concatenated, cut into consecutive blocks of
  ``block_size`` bytes (vocabulary 256; the last, shorter block dropped), as dict items
  ``{"input_ids", "attention_mask", "labels"}`` with ``labels`` equal to ``input_ids`` (the
  Hugging Face causal-LM convention).

:func:`check_args` checks the arguments and that the files exist without reading them (what
``ngd-dist validate`` runs); every problem is a ``ValueError`` of one line naming
``data.args.<arg>``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

FORMATS = ("json", "csv", "parquet", "text")
"""``data.args.format`` of :func:`hf_files`: the ``datasets`` builders for local files."""

SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
"""File name endings :func:`hf_files` infers ``format`` from."""

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
"""Compression endings ``datasets`` reads through (``train.jsonl.gz`` is json)."""

EXTRA = "data.name: hf_files needs the 'datasets' extra: pip install 'ngd_dist[datasets]'"

_GLOB = set("*?[")
_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class Plan:
    """The checked arguments of :func:`hf_files`: what to read and how to make items of it."""

    format: str
    data_files: dict[str, list[str]]
    split: str
    input: list[str] | str | None
    label: str | None
    columns: list[str] | None
    block_size: int
    cache_dir: str | None

    @property
    def files(self) -> list[str]:
        """The paths (or glob patterns) of the split read."""
        return self.data_files[self.split.split("[", 1)[0]]

    def describe(self) -> str:
        """The files of the split, for messages: ``'/data/a.jsonl'`` or ``'/data/a.jsonl' (+2 more)``."""
        more = f" (+{len(self.files) - 1} more)" if len(self.files) > 1 else ""
        return f"{self.files[0]!r}{more}"


def _is_url(path: str) -> bool:
    return "://" in path


def _path_list(value: Any) -> list[str] | None:
    """A path or a non-empty list of paths as a list of strings; None when it is neither."""
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return [os.fspath(value)]
    listed = isinstance(value, Sequence) and not isinstance(value, str) and value
    if listed and all(isinstance(v, (str, os.PathLike)) and os.fspath(v) for v in value):
        return [os.fspath(v) for v in value]
    return None


def _data_files(files: Any) -> dict[str, list[str]]:
    """``files`` as ``{split: [path, ...]}`` (a path or a list of paths is the split ``train``)."""
    if files is None:
        raise ValueError(
            "data.args.files: required by 'hf_files': a local file, a list of files (glob patterns "
            "allowed), or a mapping of split names to them"
        )
    plain = _path_list(files)
    if plain is not None:
        return {"train": plain}
    if isinstance(files, Mapping) and files:
        out = {split: _path_list(paths) for split, paths in files.items()}
        if all(isinstance(split, str) for split in out) and all(v is not None for v in out.values()):
            return {split: paths for split, paths in out.items() if paths is not None}
    raise ValueError(
        f"data.args.files: got {files!r}; expected a local file, a list of files (glob patterns allowed), "
        "or a mapping of split names to them"
    )


def _check_exists(path: str) -> None:
    if _is_url(path):
        raise ValueError(
            f"data.args.files: {path!r} is a URL; hf_files reads local files only (nothing is downloaded)"
        )
    if _GLOB & set(path):
        if not any(Path(p).is_file() for p in glob.glob(path, recursive=True)):
            raise ValueError(f"data.args.files: {path!r} matches no file")
        return
    where = Path(path)
    if where.is_dir():
        raise ValueError(
            f"data.args.files: {path!r} is a directory; expected files (a glob pattern such as "
            f"{os.path.join(path, '*.jsonl')!r} reads all of one kind)"
        )
    if not where.is_file():
        raise ValueError(f"data.args.files: {path!r} does not exist")


def _format_of(path: str) -> str | None:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return SUFFIXES.get(suffixes[-1]) if suffixes else None


def _names(value: Any, arg: str, *, single: bool) -> list[str] | str | None:
    """A column name (when ``single`` allows one) or a non-empty list of them; None when unset."""
    if value is None:
        return None
    if single and isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    expected = "a column name or a list of column names" if single else "a list of column names"
    raise ValueError(f"data.args.{arg}: got {value!r}; expected {expected}")


def check_args(
    files: Any = None,
    format: Any = None,
    split: Any = "train",
    input: Any = None,
    label: Any = None,
    columns: Any = None,
    block_size: Any = 64,
    cache_dir: Any = None,
) -> Plan:
    """Check :func:`hf_files`'s arguments and that its files exist, reading none of them.

    Returns the :class:`Plan`; raises a one-line ``ValueError`` naming ``data.args.<arg>``.
    """
    data_files = _data_files(files)
    if not isinstance(split, str) or not split:
        raise ValueError(f"data.args.split: got {split!r}; expected a split name such as 'train'")
    base = split.split("[", 1)[0]
    if base not in data_files:
        given = "has only the split(s) " + ", ".join(data_files)
        raise ValueError(
            f"data.args.split: got {split!r}, but data.args.files {given} (give files as a mapping of "
            "split names to files to read another)"
        )
    chosen = data_files[base]
    for path in chosen:
        _check_exists(path)
    if format is None:
        found = {_format_of(p) for p in chosen}
        if len(found) != 1 or None in found:
            odd = next((p for p in chosen if _format_of(p) is None), chosen[0])
            raise ValueError(
                f"data.args.format: cannot tell the format of {odd!r} from its name; set data.args.format "
                f"to one of {', '.join(FORMATS)}"
            )
        format = found.pop()
    if format not in FORMATS:
        raise ValueError(f"data.args.format: got {format!r}; expected one of {', '.join(FORMATS)}")
    inputs = _names(input, "input", single=True)
    if label is not None and (not isinstance(label, str) or not label):
        raise ValueError(f"data.args.label: got {label!r}; expected a column name")
    kept = _names(columns, "columns", single=False)
    assert not isinstance(kept, str)
    if inputs is not None and label is None:
        raise ValueError(
            "data.args.input: needs data.args.label (the target column of (input, label) items); "
            f"got input {input!r}"
        )
    if inputs is not None and kept is not None:
        raise ValueError(
            "data.args.columns: not with data.args.input (columns picks the keys of dict items; input and "
            "label make (input, label) items)"
        )
    if format == "text":
        for arg, value in (("input", input), ("label", label), ("columns", columns)):
            if value is not None:
                raise ValueError(
                    f"data.args.{arg}: not with format text (its items are byte-level blocks of block_size)"
                )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"data.args.block_size: got {block_size!r}; expected a positive integer")
    if cache_dir is not None and not (isinstance(cache_dir, (str, os.PathLike)) and os.fspath(cache_dir)):
        raise ValueError(f"data.args.cache_dir: got {cache_dir!r}; expected a directory path or null")
    return Plan(
        format=format,
        data_files=data_files,
        split=split,
        input=inputs,
        label=label,
        columns=kept,
        block_size=block_size,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
    )


def _datasets() -> Any:
    """The ``datasets`` module, with downloads and its progress bars switched off."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ValueError(EXTRA) from None
    disable = getattr(datasets, "disable_progress_bars", None)
    if callable(disable):
        disable()  # they would break the trainer's own progress bar
    return datasets


def _reason(exc: BaseException) -> str:
    """The innermost cause of a ``datasets`` failure, on one line."""
    lines: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(lines) < 4:
        text = " ".join(str(seen).split())
        lines.append(f"{type(seen).__name__}: {text}" if text else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    reason = lines[1] if len(lines) > 1 else lines[0]
    return reason[:_MESSAGE_LIMIT]


def _load(plan: Plan, **options: Any) -> Any:
    """The split of the plan as a ``datasets.Dataset`` (the files converted into the cache once)."""
    datasets = _datasets()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as the one line below
    try:
        table = datasets.load_dataset(
            plan.format,
            data_files={plan.split.split("[", 1)[0]: plan.files},  # the other splits are not looked at
            split=plan.split,
            cache_dir=plan.cache_dir,
            **options,
        )
    except Exception as exc:
        raise ValueError(
            f"data.args.files: reading {plan.describe()} as {plan.format} failed: {_reason(exc)}"
        ) from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
    if table.num_rows == 0:
        raise ValueError(f"data.args.files: {plan.describe()} holds no rows")
    return table


class Rows(Dataset[Any]):
    """The rows of a ``datasets.Dataset`` as dict or ``(input, label)`` items of tensors."""

    def __init__(
        self, table: Any, keys: Mapping[str, str], inputs: list[str] | str | None, label: str | None
    ) -> None:
        """``keys``: item key -> column (dict items); ``inputs`` and ``label``: tuple items."""
        if inputs is None:
            needed = list(keys.values())
        else:
            needed = [inputs] if isinstance(inputs, str) else list(inputs)
        if inputs is not None and label is not None:
            needed.append(label)
        self.table = table.with_format("torch", columns=list(dict.fromkeys(needed)))
        self.keys, self.inputs, self.label = dict(keys), inputs, label

    def __len__(self) -> int:
        """Number of rows."""
        return int(self.table.num_rows)

    def __getitem__(self, index: int) -> Any:
        """Row ``index`` as a dict of tensors, or ``(input, label)``."""
        row = self.table[int(index)]
        if self.inputs is None:
            return {key: row[column] for key, column in self.keys.items()}
        assert self.label is not None
        if isinstance(self.inputs, str):
            return row[self.inputs], row[self.label]
        return torch.stack([row[c].to(torch.float32) for c in self.inputs]), row[self.label]


class TextBlocks(Dataset[dict[str, Tensor]]):
    """The bytes of text lines (``datasets``' text builder, line breaks kept), concatenated and cut
    into consecutive blocks of ``block_size``: block ``i`` is read from the lines it spans.
    """

    def __init__(self, lines: Any, block_size: int) -> None:
        """Index the end offset of every line (one pass, 8 bytes a line); nothing else is kept."""
        lengths = np.zeros(lines.num_rows, dtype=np.int64)
        at = 0
        for batch in lines.iter(batch_size=10_000):
            texts = batch["text"]
            lengths[at : at + len(texts)] = [len(t.encode("utf-8")) for t in texts]
            at += len(texts)
        self.ends = np.cumsum(lengths)
        self.lines, self.block_size = lines, block_size
        self.count = int(self.ends[-1]) // block_size if len(self.ends) else 0

    def __len__(self) -> int:
        """Number of whole blocks."""
        return self.count

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Block ``index`` as ``input_ids`` (int64), an all-ones ``attention_mask`` and ``labels``."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * self.block_size
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, start + self.block_size - 1, side="right"))
        text = "".join(self.lines[first : last + 1]["text"]).encode("utf-8")
        offset = start - (int(self.ends[first - 1]) if first else 0)
        ids = torch.tensor(list(text[offset : offset + self.block_size]), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _column(plan: Plan, names: list[str], column: str, arg: str) -> None:
    if column not in names:
        raise ValueError(
            f"data.args.{arg}: column {column!r} is not in {plan.describe()}; its columns: "
            + ", ".join(names)
        )


def _check_values(plan: Plan, table: Any, by_arg: Mapping[str, list[str]]) -> None:
    """Every column used holds numbers (not text) in the first row: one line naming it otherwise."""
    row = table.with_format("torch", columns=sorted({c for cs in by_arg.values() for c in cs}))[0]
    for arg, used in by_arg.items():
        for column in used:
            if not isinstance(row[column], Tensor):
                kind = type(row[column]).__name__
                raise ValueError(
                    f"data.args.{arg}: column {column!r} of {plan.describe()} holds text ({kind}), which "
                    "makes no tensor; leave it out (data.args.columns) or turn it into numbers first"
                )


def hf_files(
    files: str | list[str] | dict[str, Any] | None = None,
    format: str | None = None,
    split: str = "train",
    input: str | list[str] | None = None,
    label: str | None = None,
    columns: list[str] | None = None,
    block_size: int = 64,
    cache_dir: str | None = None,
) -> Dataset[Any]:
    """A map-style Dataset of local json, csv, parquet or text files, read with Hugging Face ``datasets``.

    ``files``: a path, a list of paths (glob patterns allowed) or a mapping of split names to them;
    ``format``: one of :data:`FORMATS` (default: from the file names); ``split``: the split read
    (``"train"``, or a key of ``files``; ``datasets``' slices such as ``"train[:90%]"`` work);
    ``input`` / ``label`` / ``columns``: how rows become items (the module docstring);
    ``block_size``: bytes per block of ``format: text``; ``cache_dir``: where ``datasets`` keeps its
    Arrow copy. Raises a one-line ``ValueError`` naming ``data.args.<arg>`` or the extra.
    """
    plan = check_args(files, format, split, input, label, columns, block_size, cache_dir)
    if plan.format == "text":
        blocks = TextBlocks(_load(plan, keep_linebreaks=True), plan.block_size)
        if len(blocks) == 0:
            raise ValueError(
                f"data.args.block_size: {plan.describe()} holds fewer than {plan.block_size} bytes: no block"
            )
        return blocks
    table = _load(plan)
    names = list(table.column_names)
    if plan.input is not None:
        assert plan.label is not None
        used = [plan.input] if isinstance(plan.input, str) else plan.input
        for column in used:
            _column(plan, names, column, "input")
        _column(plan, names, plan.label, "label")
        _check_values(plan, table, {"input": used, "label": [plan.label]})
        return Rows(table, {}, plan.input, plan.label)
    for column in plan.columns or []:
        _column(plan, names, column, "columns")
    if plan.label is not None:
        _column(plan, names, plan.label, "label")
    kept = [c for c in (plan.columns if plan.columns is not None else names) if c != plan.label]
    keys = {c: c for c in kept}
    if plan.label is not None:
        if "labels" in keys:
            raise ValueError(
                f"data.args.label: {plan.label!r} would be the items' 'labels', but the column 'labels' is "
                "kept too; leave it out with data.args.columns"
            )
        keys["labels"] = plan.label
    if "labels" not in keys:
        raise ValueError(
            f"data.args.label: dict items need their targets as 'labels'; {plan.describe()} has no column "
            f"'labels' (its columns: {', '.join(names)}): name the target column with data.args.label"
        )
    by_arg = {"columns": [c for k, c in keys.items() if k != "labels" or plan.label is None]}
    if plan.label is not None:
        by_arg["label"] = [plan.label]
    _check_values(plan, table, by_arg)
    return Rows(table, keys, None, None)
