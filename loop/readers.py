"""Pure file readers: documents, pairs, queries and qrels from files, folders and BEIR zips.

Nothing here touches the store: every reader returns records or raises an `InputError` that
names the file (and line) at fault. loop/ingest.py writes what these read.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any

from loop.errors import InputError
from loop.records import Document, content_hash

DOC_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}
TABLE_SUFFIXES = {".jsonl", ".csv"}
_SPLIT_NAME = re.compile(r"[\w.-]+")
_ZIP_MAX_MEMBERS = 10_000
_ZIP_MAX_RATIO = 200  # uncompressed / compressed: beyond this a member is a zip bomb


@dataclass(frozen=True)
class Fields:
    """Column names of a .jsonl / .csv document file."""

    id: str = "_id"
    title: str = "title"
    text: str = "text"

    def id_of(self, rec: dict[str, Any]) -> Any:
        # `_id` (BEIR) and `id` are both common: accept either when the default is in use.
        if self.id == "_id" and "_id" not in rec:
            return rec.get("id")
        return rec.get(self.id)


# File reading ------------------------------------------------------------------------------
def _check_file(path: Path, max_bytes: int) -> None:
    if not path.exists():
        raise InputError("no such file or folder", path)
    if not path.is_file():
        raise InputError("not a regular file", path)
    size = path.stat().st_size
    if size == 0:
        raise InputError("the file is empty (0 bytes)", path)
    if size > max_bytes:
        raise InputError(
            f"the file is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB "
            f"(setting max_file_mb)", path
        )


def read_text(path: Path, max_bytes: int) -> str:
    """A text file's content as str: UTF-8 (with or without BOM), refusing binary data."""
    _check_file(path, max_bytes)
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise InputError("looks like a binary file (it contains NUL bytes), not text", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert the file to UTF-8",
            path, line,
        ) from None
    if not text.strip():
        raise InputError("the file holds only whitespace", path)
    return text


def iter_jsonl(path: Path, max_bytes: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an InputError."""
    # Split on \n, \r\n and \r only: str.splitlines() also splits on U+2028/U+2029/U+0085, which
    # JSON strings may hold unescaped (json.dumps(ensure_ascii=False) writes them raw).
    text = read_text(path, max_bytes).replace("\r\n", "\n").replace("\r", "\n")
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", path, n) from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, n)
        yield n, obj


def iter_csv(path: Path, max_bytes: int, required: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV with a header row that has every `required` column."""
    text = read_text(path, max_bytes)
    # A long document in one cell is legitimate: allow fields up to the file size limit.
    csv.field_size_limit(max(csv.field_size_limit(), min(max_bytes, 2**31 - 1)))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
    except csv.Error as e:
        raise InputError(f"malformed CSV header ({e})", path, 1) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"missing column(s) {', '.join(missing)}; the header has: {', '.join(header) or '(nothing)'}", path, 1
        )
    try:
        for row in reader:
            if None in row:
                raise InputError("more fields than the header has", path, reader.line_num)
            yield reader.line_num, row
    except csv.Error as e:
        raise InputError(f"malformed CSV ({e})", path, reader.line_num) from None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page (script/style dropped) and its <title>."""

    _SKIP = {"script", "style", "noscript", "template"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _clean(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def read_document_file(path: Path, doc_id: str, max_bytes: int) -> Document:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        _check_file(path, max_bytes)
        try:
            from pypdf import PdfReader

            reader = PdfReader(str(path))
            if reader.is_encrypted:
                raise InputError("the PDF is encrypted; decrypt it first", path)
            text = "\n".join(page.extract_text() or "" for page in reader.pages)
            title = str((reader.metadata or {}).get("/Title") or "") if reader.metadata else ""
        except InputError:
            raise
        except Exception as e:  # pypdf raises many types on damaged files
            raise InputError(f"cannot read this PDF ({type(e).__name__}: {e})", path) from None
        text = _clean(text)
        if not text:
            raise InputError("the PDF has no extractable text (scanned images need OCR first)", path)
        return Document(doc_id=doc_id, title=title.strip() or path.stem, text=text, source=str(path))
    raw = read_text(path, max_bytes)
    if suffix in {".html", ".htm"}:
        parser = _HTMLText()
        parser.feed(raw)
        text, title = _clean("".join(parser.parts)), _clean(parser.title) or path.stem
    else:
        text, title = _clean(raw), path.stem
        if suffix in {".md", ".markdown"}:
            first = next((ln for ln in raw.splitlines() if ln.strip()), "")
            if first.startswith("# "):
                # The heading becomes the title; keep it out of the text, or passages repeat it.
                title = first[2:].strip()
                text = _clean(raw.replace(first, "", 1))
    if not text:
        raise InputError("no text in this document", path)
    return Document(doc_id=doc_id, title=title, text=text, source=str(path))


def read_table_documents(path: Path, fields: Fields, max_bytes: int) -> list[Document]:
    """Documents of a .jsonl or .csv file (BEIR corpus.jsonl included).

    A record whose text field is present but blank is kept as a document without passages
    (real corpora have a few, e.g. Cranfield 471; their judgements must still resolve); a
    record without the text field is an error."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = iter_jsonl(path, max_bytes)
    else:
        id_col = fields.id
        if id_col == "_id":  # accept `id` too, as Fields.id_of does
            try:
                header = next(csv.reader(io.StringIO(read_text(path, max_bytes), newline="")), [])
            except csv.Error:
                header = []  # iter_csv reports it
            id_col = "id" if "_id" not in header and "id" in header else "_id"
        records = iter_csv(path, max_bytes, [id_col, fields.text])
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for n, rec in records:
        doc_id, text = fields.id_of(rec), rec.get(fields.text)
        if doc_id is None or str(doc_id).strip() == "":
            raise InputError(f"missing the id field {fields.id!r}", path, n)
        title = str(rec.get(fields.title) or "").strip()
        if not isinstance(text, str):
            raise InputError(f"missing or empty text field {fields.text!r}", path, n)
        doc_id = str(doc_id).strip()
        if doc_id in seen:
            raise InputError(f"duplicate id {doc_id!r} (first on line {seen[doc_id]})", path, n)
        seen[doc_id] = n
        docs.append(Document(doc_id=doc_id, title=title, text=_clean(text), source=str(path)))
    if not any(d.full_text.strip() for d in docs):
        raise InputError("no records with text in this file", path)
    return docs


def is_beir(path: Path) -> bool:
    return path.is_dir() and (path / "corpus.jsonl").is_file()


def read_documents(path: str | Path, fields: Fields = Fields(), max_bytes: int = 200 * 2**20) -> list[Document]:
    """All documents under `path`: a file, a folder of files, or a BEIR folder's corpus.

    Raises:
        InputError: naming the file (and line) at fault.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    if is_beir(path):
        return read_table_documents(path / "corpus.jsonl", fields, max_bytes)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            return read_table_documents(path, fields, max_bytes)
        if suffix in DOC_SUFFIXES:
            return [read_document_file(path, path.name, max_bytes)]
        raise InputError(
            f"unsupported file type {suffix or '(none)'}; use {', '.join(sorted(DOC_SUFFIXES | TABLE_SUFFIXES))}",
            path,
        )
    root = path.resolve()  # sources are absolute: they tell folders of the same name apart (folder_prefix)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise InputError(f"no documents ({', '.join(sorted(DOC_SUFFIXES))}) in this folder", path)
    return [read_document_file(f, f.relative_to(root).as_posix(), max_bytes) for f in files]


def is_plain_folder(path: str | Path) -> bool:
    """A folder of document files (not a BEIR folder): its documents get `folder_prefix` ids."""
    return Path(path).is_dir() and not is_beir(Path(path))


# BEIR queries and qrels, query logs --------------------------------------------------------
def read_beir_queries(folder: Path, max_bytes: int) -> dict[str, str]:
    """{query id: text} of a BEIR folder's queries.jsonl."""
    qfile = folder / "queries.jsonl"
    if not qfile.is_file():
        raise InputError("a BEIR folder needs queries.jsonl", folder)
    out: dict[str, str] = {}
    for n, rec in iter_jsonl(qfile, max_bytes):
        qid, text = rec.get("_id"), rec.get("text")
        if qid is None or not isinstance(text, str) or not text.strip():
            raise InputError("each query needs `_id` and a non-empty `text`", qfile, n)
        out[str(qid)] = text.strip()
    return out


def read_qrels(folder: Path, split: str, max_bytes: int) -> list[tuple[int, str, str, float]]:
    """(line, query id, corpus id, score) of `qrels/<split>.tsv` with score > 0."""
    if not _SPLIT_NAME.fullmatch(split) or set(split) == {"."}:
        # The split names a file inside qrels/: `../../x` would read outside the BEIR folder.
        raise InputError(f"split {split!r} is not a plain name like train, dev or test", folder)
    qrels = folder / "qrels" / f"{split}.tsv"
    if not qrels.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise InputError(f"no qrels/{split}.tsv in this BEIR folder (it has: {', '.join(have) or 'no qrels'})", folder)
    out = []
    for n, line in enumerate(read_text(qrels, max_bytes).splitlines(), start=1):
        parts = line.rstrip("\n").split("\t")
        if n == 1 and parts[0] in {"query-id", "query_id", "qid"}:
            continue
        if not line.strip():
            continue
        if len(parts) < 3:
            raise InputError("expected query-id<TAB>corpus-id<TAB>score", qrels, n)
        try:
            score = float(parts[2])
        except ValueError:
            raise InputError(f"score {parts[2]!r} is not a number", qrels, n) from None
        if score > 0:
            out.append((n, parts[0], parts[1], score))
    return out


def read_queries(path: Path, max_bytes: int, split: str | None = None) -> list[tuple[str, str]]:
    """(query id, text) from a .txt (one per line), .jsonl, .csv (column query/text) or BEIR folder."""
    if path.is_dir():
        if not (path / "queries.jsonl").is_file():
            raise InputError("a folder of queries must be a BEIR folder with queries.jsonl", path)
        queries = read_beir_queries(path, max_bytes)
        if split:
            wanted = {qid for _, qid, _, _ in read_qrels(path, split, max_bytes)}
            queries = {q: t for q, t in queries.items() if q in wanted}
        return list(queries.items())
    suffix = path.suffix.lower()
    out: list[tuple[str, str]] = []
    if suffix in {".txt", ""}:
        for line in read_text(path, max_bytes).splitlines():
            if line.strip():
                out.append((content_hash(line), line.strip()))
    elif suffix == ".jsonl":
        for n, rec in iter_jsonl(path, max_bytes):
            text = rec.get("text", rec.get("query"))
            if not isinstance(text, str) or not text.strip():
                raise InputError("each line needs a non-empty `text` (or `query`) field", path, n)
            qid = rec.get("_id", rec.get("id"))
            out.append((str(qid) if qid is not None else content_hash(text), text.strip()))
    elif suffix == ".csv":
        text_text = read_text(path, max_bytes)
        header = next(csv.reader(io.StringIO(text_text)), [])
        col = "query" if "query" in header else "text"
        for n, row in iter_csv(path, max_bytes, [col]):
            if not (row.get(col) or "").strip():
                raise InputError(f"empty {col!r}", path, n)
            qid = row.get("id") or row.get("_id")
            out.append((qid or content_hash(row[col]), row[col].strip()))
    else:
        raise InputError("a query log must be .txt (one query a line), .jsonl, .csv or a BEIR folder", path)
    if not out:
        raise InputError("no queries in this file", path)
    return out


# Uploaded BEIR zips --------------------------------------------------------------------------
def extract_beir_zip(zip_path: Path, max_file_mb: float) -> Path:
    """Unpack a BEIR folder (corpus.jsonl, queries.jsonl, qrels/*.tsv) from a zip, safely.

    Refuses members with absolute paths or `..`, links, more than 10,000 members, a member over
    max_file_mb, or an implausible compression ratio. Returns the folder holding corpus.jsonl.
    """
    dest = zip_path.with_suffix("")
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise InputError("not a zip file", zip_path.name) from None
    with zf:
        members = zf.infolist()
        if len(members) > _ZIP_MAX_MEMBERS:
            raise InputError(f"the zip holds {len(members):,} files; a BEIR folder has a handful", zip_path.name)
        for m in members:
            p = PurePosixPath(m.filename)
            if p.is_absolute() or ".." in p.parts or m.filename.startswith(("/", "\\")):
                raise InputError(f"unsafe path {m.filename!r} in the zip", zip_path.name)
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise InputError(f"the zip contains a link ({m.filename}); links are not accepted", zip_path.name)
            if m.file_size > int(max_file_mb * 2**20):
                raise InputError(f"{m.filename} is larger than max_file_mb ({max_file_mb:g} MiB)",
                                 zip_path.name)
            if m.compress_size and m.file_size / m.compress_size > _ZIP_MAX_RATIO and m.file_size > 2**20:
                raise InputError(f"{m.filename} expands {m.file_size / m.compress_size:.0f}-fold; refusing a "
                                 f"possible zip bomb", zip_path.name)
        zf.extractall(dest)
    found = sorted(p.parent for p in dest.rglob("corpus.jsonl") if "__MACOSX" not in p.parts)
    if not found:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputError("no corpus.jsonl in the zip: a BEIR folder holds corpus.jsonl, queries.jsonl and "
                         "qrels/<split>.tsv", zip_path.name)
    return found[0]
