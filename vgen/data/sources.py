"""What `prepare.source` names: a folder of media with same-named .txt captions, or a CSV/JSONL table.

Both give the same thing, a list of `SourceEntry` (absolute path + caption) sorted by path, plus the files
that cannot be samples and why (`BadFile`). Sorting by the resolved path is what makes a table of the same
files give the same shards as the folder.

Tables: a `path` and a `text` column are required; other columns (Open-Sora's num_frames, height, width,
fps, aes, ...) are accepted and ignored: prepare probes every file itself. Relative paths are resolved
against the table's folder.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vgen.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_extension
from vgen.data.shards import DataError

TABLE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class SourceEntry:
    path: str  # absolute, resolved
    caption: str


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def list_source(source: str | os.PathLike) -> tuple[list[SourceEntry], list[BadFile]]:
    """The captioned media of `source` sorted by path, and the files left out with their reasons.

    Raises:
        DataError: the source does not exist, is not a folder/.csv/.jsonl, lacks a required column, or
            holds no media at all.
    """
    path = Path(source)
    if path.is_dir():
        entries, bad = _list_folder(path)
    elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        entries, bad = _list_table(path)
    elif path.is_file():
        raise DataError(f"prepare.source={source} is a file but not a table: use a folder, a .csv or a .jsonl")
    else:
        raise DataError(f"prepare.source={source} does not exist")
    if not entries and not bad:
        raise DataError(f"prepare.source={source} holds no videos or images "
                        f"(looked for {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)})")
    return sorted(entries, key=lambda e: e.path), sorted(bad, key=lambda b: b.path)


def _list_folder(root: Path) -> tuple[list[SourceEntry], list[BadFile]]:
    """Every media file under `root` (recursively); its caption is the .txt file of the same name."""
    entries: dict[str, SourceEntry] = {}
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if media_extension(name) is None:
                continue  # captions themselves, and anything else that is not media
            link = Path(dirpath, name)
            media = str(link.resolve())  # resolved, as a table's paths are, so both give the same shards
            caption, problem = _read_caption(link.with_suffix(".txt"))
            if media in entries:
                bad.append(BadFile(str(link), f"duplicate: the same file as {media}, which is kept"))
            elif problem:
                bad.append(BadFile(media, problem))
            else:
                entries[media] = SourceEntry(media, caption)
    return list(entries.values()), bad


def _read_caption(path: Path) -> tuple[str, str | None]:
    """(caption, None) or ("", why there is none)."""
    if not path.is_file():
        return "", f"no caption: {path.name} does not exist"
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        return "", f"no caption: {path.name} cannot be read as UTF-8 text ({e})"
    return (caption, None) if caption else ("", f"no caption: {path.name} is empty")


def _list_table(table: Path) -> tuple[list[SourceEntry], list[BadFile]]:
    rows = _read_rows(table)
    entries: dict[str, SourceEntry] = {}
    bad = []
    for line, row in rows:
        raw = str(row.get("path") or "").strip()
        if not raw:
            bad.append(BadFile(f"{table}:{line}", "no path: the path column is empty"))
            continue
        media = (table.parent / raw).resolve()  # an absolute raw path stays as it is
        caption = str(row.get("text") or "").strip()
        if str(media) in entries:
            bad.append(BadFile(str(media), f"duplicate: listed again at {table.name}:{line}; the first row is kept"))
        elif media_extension(media) is None:
            bad.append(BadFile(str(media), f"unsupported extension {media.suffix!r} ({table.name}:{line})"))
        elif not media.is_file():
            bad.append(BadFile(str(media), f"missing: no such file ({table.name}:{line})"))
        elif not caption:
            bad.append(BadFile(str(media), f"no caption: the text column is empty ({table.name}:{line})"))
        else:
            entries[str(media)] = SourceEntry(str(media), caption)
    return list(entries.values()), bad


def _read_rows(table: Path) -> list[tuple[int, dict]]:
    """[(line number, row)] of a CSV or JSONL file, after checking it has `path` and `text` columns."""
    try:
        with open(table, newline="", encoding="utf-8") as f:
            if table.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
            else:
                rows = [(i + 1, json.loads(text)) for i, text in enumerate(f) if text.strip()]
                columns = sorted({k for _, row in rows if isinstance(row, dict) for k in row})
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"prepare.source={table} cannot be read as {table.suffix[1:].upper()}: {e}") from e
    if any(not isinstance(row, dict) for _, row in rows):
        raise DataError(f"prepare.source={table}: every line must be a JSON object with 'path' and 'text'")
    for column in ("path", "text"):
        if column not in columns:
            raise DataError(f"prepare.source={table} has no '{column}' column (columns: {', '.join(columns) or 'none'}); "
                            "a table needs 'path' (the media file, relative to the table's folder or absolute) "
                            "and 'text' (its caption)")
    return rows
