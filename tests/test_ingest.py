"""Ingestion: chunking, readers, the document->passage map, pairs and queries, and bad input.

Every import runs against a real workspace (DuckDB file + embedded Chroma) whose model is the
FakeEmbedder (max_seq_length 64: passages of at most 62 tokens, overlap 31).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from loop.errors import InputError
from loop.ingest import chunk_text, hf_offsets
from loop.readers import Fields, read_documents
from loop.records import Pair, content_hash
from loop.workspace import Workspace
from tests.fakes import FakeEmbedder, FakeTokenizer

TOKENIZE = hf_offsets(FakeTokenizer())


# Helpers -------------------------------------------------------------------------------------
def minimal_pdf(text: str, title: str | None = None) -> bytes:
    """A one-page PDF with `text` in a Helvetica text stream (correct xref offsets)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if title:
        objs.append(f"<< /Title ({title}) >>".encode("latin-1"))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    info = b" /Info %d 0 R" % len(objs) if title else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, info, xref)
    return bytes(out)


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


CORPUS = [
    {"_id": f"d{i}", "title": title, "text": text}
    for i, (title, text) in enumerate([
        ("Wing lift", "Lift on a swept wing increases with the angle of attack until the flow separates."),
        ("Boundary layer", "A turbulent boundary layer thickens downstream and resists separation better."),
        ("Shock waves", "Normal shock waves form ahead of blunt bodies moving at supersonic speed."),
        ("Heat transfer", "Heat transfer to the nose cone peaks near the stagnation point during reentry."),
        ("Buckling", "Thin cylindrical shells buckle under axial compression below the classical prediction."),
        ("Flutter", "Panel flutter appears when aerodynamic pressure couples with bending modes of the plate."),
    ], start=1)
]
QUERIES = [
    {"_id": "q1", "text": "how does angle of attack change wing lift"},
    {"_id": "q2", "text": "turbulent versus laminar boundary layer separation"},
    {"_id": "q3", "text": "shock standoff ahead of blunt bodies"},
    {"_id": "q4", "text": "stagnation point heating on reentry"},
    {"_id": "q5", "text": "why do shells buckle early"},
    {"_id": "q6", "text": "panel flutter onset"},
]
QRELS = {
    "train": [("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d3", 1), ("q3", "d1", 0)],
    "test": [("q4", "d4", 1), ("q5", "d5", 1), ("q6", "d6", 1), ("q6", "d2", 1)],
}


def make_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write(root / "corpus.jsonl", jsonl(*corpus))
    write(root / "queries.jsonl", jsonl(*queries))
    for split, rows in (qrels or {}).items():
        write(root / "qrels" / f"{split}.tsv",
              "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in rows))
    return root


def snapshot(ws: Workspace) -> tuple[dict, int | None]:
    active = ws.store.pointer("active_index")
    return ws.store.counts(), (ws.index.count(active) if active else None)


def passage_of(ws: Workspace, doc_id: str) -> tuple[str, str]:
    pid = ws.store.first_passage_of_docs([doc_id])[doc_id]
    return pid, ws.store.passages([pid])[pid]


@pytest.fixture
def beir(tmp_path) -> Path:
    return make_beir(tmp_path / "beir")


@pytest.fixture
def seeded(workspace, beir) -> Workspace:
    """The workspace with the 6-document BEIR corpus ingested (one passage per document)."""
    workspace.ingest([beir])
    assert workspace.store.counts()["passages"] == 6
    return workspace


# Chunking ------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return [text[a:b] for a, b in TOKENIZE(text)]


def test_chunk_short_text_is_one_chunk():
    text = "Lift rises with the angle of attack."
    assert chunk_text(text, TOKENIZE, max_tokens=50, overlap=10) == [(text, len(_tokens(text)))]


def test_chunk_empty_or_blank_text_gives_no_chunks():
    assert chunk_text("", TOKENIZE, 10, 2) == []
    assert chunk_text("  \n\t ", TOKENIZE, 10, 2) == []


def test_chunk_long_text_windows_overlap_and_cover_everything():
    rng = random.Random(7)
    words = [f"w{rng.randrange(1000)}" for _ in range(500)]
    text = " ".join(words)  # no sentence ends: windows are exactly max_tokens long
    chunks = chunk_text(text, TOKENIZE, max_tokens=40, overlap=10)
    assert len(chunks) > 10
    toks = [_tokens(c) for c, _ in chunks]
    for (c, n), t in zip(chunks, toks, strict=True):
        assert c and c == c.strip()
        assert n == len(t) <= 40
        assert c in text
    for a, b in zip(toks, toks[1:]):
        assert a[-10:] == b[:10], "consecutive chunks share `overlap` tokens"
    # Dropping each overlap reproduces the text's token sequence: nothing is lost.
    rebuilt = toks[0] + [tok for t in toks[1:] for tok in t[10:]]
    assert rebuilt == _tokens(text)


def test_chunk_prefers_ending_at_a_sentence_end():
    rng = random.Random(1)
    sentences = [" ".join(f"w{rng.randrange(100)}" for _ in range(4)) + "." for _ in range(60)]
    text = " ".join(sentences)  # 5 tokens a sentence: one always ends in a window's last quarter
    chunks = chunk_text(text, TOKENIZE, max_tokens=32, overlap=6)
    assert len(chunks) > 5
    for c, n in chunks[:-1]:
        assert c.endswith("."), c
        assert 24 < n <= 32
    toks = [_tokens(c) for c, _ in chunks]
    for a, b in zip(toks, toks[1:]):
        assert a[-6:] == b[:6]


def test_chunk_newlines_and_spaces_never_make_empty_chunks():
    text = "\n\n".join(f"Paragraph {i} has some words in it.\n\n\n   " for i in range(80))
    chunks = chunk_text(text, TOKENIZE, max_tokens=20, overlap=5)
    assert chunks and all(c.strip() == c and c for c, _ in chunks)
    assert all(n <= 20 for _, n in chunks)


def test_chunk_overlap_is_clamped_and_bad_max_rejected():
    text = " ".join(f"t{i}" for i in range(100))
    chunks = chunk_text(text, TOKENIZE, max_tokens=10, overlap=100)  # clamped to 5: still terminates
    assert all(n <= 10 for _, n in chunks) and len(chunks) == 19
    with pytest.raises(ValueError):
        chunk_text(text, TOKENIZE, max_tokens=0, overlap=0)


# Readers -------------------------------------------------------------------------------------
HTML = """<!doctype html><html><head><title>  Rotor   Noise </title>
<style>body { color: red; }</style><script>var secret = "drop me";</script></head>
<body><h1>Blade vortex interaction</h1><p>Helicopter rotors radiate impulsive noise &amp; vibration.</p>
<noscript>enable js</noscript></body></html>"""


@pytest.fixture
def doc_folder(tmp_path) -> Path:
    d = tmp_path / "docs"
    write(d / "a.txt", "Fatigue cracks grow from rivet holes in aluminium skins.\n")
    write(d / "b.md", "# Composite Repair\n\nBonded patches restore the stiffness of damaged laminates.\n")
    write(d / "c.html", HTML)
    write(d / "d.pdf", minimal_pdf("Icing on the leading edge reduces maximum lift.", title="Icing Report"))
    write(d / "sub" / "e.txt", "Landing gear loads peak at touchdown.")
    write(d / ".hidden" / "x.txt", "hidden folders are skipped")
    write(d / "notes.json", '{"not": "a document"}')
    return d


def test_pypdf_extracts_the_hand_written_pdf(tmp_path):
    from pypdf import PdfReader

    p = write(tmp_path / "x.pdf", minimal_pdf("Icing on the leading edge reduces maximum lift.", "Icing Report"))
    reader = PdfReader(str(p))
    assert reader.pages[0].extract_text().strip() == "Icing on the leading edge reduces maximum lift."
    assert reader.metadata["/Title"] == "Icing Report"


def test_read_folder_of_txt_md_html_pdf(doc_folder):
    docs = {d.doc_id: d for d in read_documents(doc_folder)}
    assert sorted(docs) == ["a.txt", "b.md", "c.html", "d.pdf", "sub/e.txt"]
    assert docs["a.txt"].title == "a" and docs["a.txt"].text.startswith("Fatigue cracks")
    assert docs["b.md"].title == "Composite Repair"
    assert docs["d.pdf"].title == "Icing Report"
    assert docs["d.pdf"].text == "Icing on the leading edge reduces maximum lift."
    assert all(d.source.endswith(d.doc_id) for d in docs.values())


def test_html_drops_script_and_style_and_takes_title(doc_folder):
    [doc] = read_documents(doc_folder / "c.html")
    assert doc.title == "Rotor Noise"
    assert "Blade vortex interaction" in doc.text
    assert "noise & vibration" in doc.text
    for gone in ("secret", "drop me", "color", "enable js", "Rotor Noise"):
        assert gone not in doc.text


def test_ingest_folder_into_workspace(workspace, doc_folder):
    [report] = workspace.ingest([doc_folder])
    assert report.documents_added == 5 and report.passages_added == 5 and report.indexed == 5
    counts, indexed = snapshot(workspace)
    assert counts["documents"] == 5 and counts["passages"] == 5 and indexed == 5
    hits = workspace.search("icing leading edge lift", k=1)
    assert hits[0].doc_ids == ["docs/d.pdf"]  # <folder>/<path inside it>


def test_jsonl_and_csv_with_configurable_fields(tmp_path):
    fields = Fields(id="key", title="heading", text="body")
    j = write(tmp_path / "docs.jsonl", jsonl(
        {"key": 1, "heading": "Spin", "body": "Spin recovery needs opposite rudder.", "extra": "ignored"},
        {"key": "k2", "body": "Stall warning comes from a vane."},
    ) + "\n")
    c = write(tmp_path / "docs.csv", "key,heading,body\nc1,Trim,Trim tabs relieve stick forces.\nc2,,\"Yaw, roll\"\n")
    jd = read_documents(j, fields)
    assert [(d.doc_id, d.title, d.text) for d in jd] == [
        ("1", "Spin", "Spin recovery needs opposite rudder."), ("k2", "", "Stall warning comes from a vane.")
    ]
    cd = read_documents(c, fields)
    assert [(d.doc_id, d.title, d.text) for d in cd] == [("c1", "Trim", "Trim tabs relieve stick forces."),
                                                           ("c2", "", "Yaw, roll")]


def test_default_fields_accept_id_as_well_as__id(tmp_path):
    j = write(tmp_path / "a.jsonl", jsonl({"id": "x1", "text": "first"}, {"_id": "x2", "text": "second"}))
    assert [d.doc_id for d in read_documents(j)] == ["x1", "x2"]
    c = write(tmp_path / "a.csv", "id,title,text\ny1,T,first row\n")
    assert [(d.doc_id, d.title) for d in read_documents(c)] == [("y1", "T")]


def test_jsonl_text_with_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw: still one record a line.
    text = "first line\u2028second\u2029third\x85fourth"
    p = write(tmp_path / "u.jsonl", "".join(
        json.dumps({"_id": f"u{i}", "text": text}, ensure_ascii=False) + "\n" for i in range(2)
    ))
    docs = read_documents(p)
    assert [d.doc_id for d in docs] == ["u0", "u1"]
    assert "second" in docs[0].text and "fourth" in docs[0].text
    crlf_text = jsonl({"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}).replace("\n", "\r\n")
    crlf = write(tmp_path / "crlf.jsonl", crlf_text)
    assert [d.doc_id for d in read_documents(crlf)] == ["a", "b"]


def test_csv_with_a_long_text_field(tmp_path):
    long_text = "word " * 40_000  # 200 KB in one field: over the csv module's default limit
    p = write(tmp_path / "long.csv", f"_id,text\nbig,{long_text}\n")
    [doc] = read_documents(p)
    assert doc.doc_id == "big" and len(doc.text) == len(long_text.strip())


def test_beir_folder_ingests_its_corpus(workspace, beir):
    [report] = workspace.ingest([beir])
    assert report.documents_added == 6 and report.passages_added == 6
    rows = workspace.store.rows("SELECT doc_id, title, source FROM documents ORDER BY doc_id")
    assert [r["doc_id"] for r in rows] == ["d1", "d2", "d3", "d4", "d5", "d6"]
    assert rows[0]["title"] == "Wing lift" and rows[0]["source"].endswith("corpus.jsonl")
    assert workspace.store.counts()["queries"] == 0  # ingest takes documents only


def test_document_passage_map_and_shared_passages(workspace, tmp_path):
    long = " ".join(f"Sentence {i} describes wake vortex decay behind heavy aircraft." for i in range(30))
    write(tmp_path / "c" / "long.txt", long)
    write(tmp_path / "c" / "copy.txt", long)
    [report] = workspace.ingest([tmp_path / "c"])
    assert report.documents_added == 2
    store = workspace.store
    m = store.rows("SELECT doc_id, ordinal, passage_id FROM doc_passages ORDER BY doc_id, ordinal")
    by_doc: dict[str, list[str]] = {}
    for r in m:
        by_doc.setdefault(r["doc_id"], []).append(r["passage_id"])
    assert len(by_doc["c/long.txt"]) > 3
    assert [r["ordinal"] for r in m if r["doc_id"] == "c/long.txt"] == list(range(len(by_doc["c/long.txt"])))
    # The first window holds the title (the file name) and differs; the rest are the same text.
    assert by_doc["c/long.txt"][0] != by_doc["c/copy.txt"][0]
    assert by_doc["c/long.txt"][1:] == by_doc["c/copy.txt"][1:]
    n_passages = len(set(by_doc["c/long.txt"]) | set(by_doc["c/copy.txt"]))
    assert store.counts()["passages"] == n_passages == len(by_doc["c/long.txt"]) + 1
    shared_pid = by_doc["c/long.txt"][1]
    assert store.docs_of_passages([shared_pid]) == {shared_pid: ["c/copy.txt", "c/long.txt"]}

    shared = "Bird strikes damage engine fan blades.\n"
    j = write(tmp_path / "same.jsonl", jsonl({"_id": "s1", "text": shared}, {"_id": "s2", "text": shared}))
    [r2] = workspace.ingest([j])
    assert r2.documents_added == 2 and r2.passages_added == 1
    assert store.counts()["passages"] == n_passages + 1
    pid = content_hash(shared)
    assert store.docs_of_passages([pid]) == {pid: ["s1", "s2"]}
    counts, indexed = snapshot(workspace)
    assert indexed == counts["passages"]
    hits = workspace.search("bird strikes engine fan blades", k=1)
    assert hits[0].passage_id == pid and hits[0].doc_ids == ["s1", "s2"]


def test_reimport_changes_no_count(workspace, doc_folder, beir):
    workspace.ingest([doc_folder, beir])
    before = snapshot(workspace)
    reports = workspace.ingest([doc_folder, beir])
    assert all((r.documents_added, r.documents_updated, r.passages_added, r.indexed) == (0, 0, 0, 0) for r in reports)
    assert sum(r.documents_unchanged for r in reports) == 11
    assert snapshot(workspace) == before


def test_changed_document_replaces_its_passages(workspace, tmp_path):
    p = write(tmp_path / "d" / "a.txt", "Original text about propeller efficiency.")
    workspace.ingest([tmp_path / "d"])
    old_pid, _ = passage_of(workspace, "d/a.txt")
    write(p, "Revised text about rotor tip speed.")
    [r] = workspace.ingest([tmp_path / "d"])
    assert (r.documents_added, r.documents_updated, r.passages_added) == (0, 1, 1)
    counts, indexed = snapshot(workspace)
    assert counts["documents"] == 1 and counts["passages"] == 1 and indexed == 1
    assert workspace.store.passages([old_pid]) == {}


# Bad input: one table ------------------------------------------------------------------------
def _file(name: str, data: str | bytes):
    return lambda d: write(d / name, data)


def _folder(name: str, files: dict[str, str | bytes]):
    def build(d: Path) -> Path:
        for rel, data in files.items():
            write(d / name / rel, data)
        (d / name).mkdir(parents=True, exist_ok=True)
        return d / name
    return build


def _beir_dir(name: str, **kw):
    return lambda d: make_beir(d / name, **kw)


def _encrypted_pdf(d: Path) -> Path:
    from pypdf import PdfWriter

    src = write(d / "plain.pdf", minimal_pdf("secret wind tunnel data"))
    w = PdfWriter()
    w.append(str(src))
    w.encrypt("pw")
    out = d / "locked.pdf"
    with out.open("wb") as fh:
        w.write(fh)
    src.unlink()
    return out


def _blank_pdf(d: Path) -> Path:
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(612, 792)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "scan.pdf"
    with out.open("wb") as fh:
        w.write(fh)
    return out


GOOD_DOC = {"_id": "g1", "text": "A good record."}

BAD_INPUT = [
    # action, builder, expected_error, culprit (name in the message), line, workspace overrides
    pytest.param("ingest", lambda d: d / "missing.txt", "no such file or folder", "missing.txt", None, {},
                 id="nonexistent-path"),
    pytest.param("ingest", _file("empty.txt", b""), "empty (0 bytes)", "empty.txt", None, {}, id="empty-file"),
    pytest.param("ingest", _file("blank.md", "  \n\t\n  \n"), "only whitespace", "blank.md", None, {},
                 id="whitespace-only"),
    pytest.param("ingest", _file("blob.txt", b"GIF89a\x00\x01\x02\x00binary"), "binary file", "blob.txt", None, {},
                 id="binary-nul-bytes"),
    pytest.param("ingest", _file("latin.txt", "first line\nCaf\xe9 cr\xe8me\n".encode("latin-1")), "not valid UTF-8",
                 "latin.txt", 2, {}, id="latin-1-bytes"),
    pytest.param("ingest", _file("big.txt", "lift and drag " * 300), "over the limit", "big.txt", None,
                 {"max_file_mb": 0.001}, id="over-size-limit"),
    pytest.param("ingest", _file("docs.jsonl", jsonl(GOOD_DOC) + '{"_id": "g2", "text": \n'), "malformed JSON",
                 "docs.jsonl", 2, {}, id="jsonl-malformed-line"),
    pytest.param("ingest", _file("docs.jsonl", json.dumps({"_id": "u", "text": "a\u2028b"}, ensure_ascii=False)
                                  + "\r\n\r\n{bad\r\n"), "malformed JSON", "docs.jsonl", 3, {},
                 id="jsonl-malformed-after-raw-u2028"),
    pytest.param("ingest", _file("docs.jsonl", jsonl(GOOD_DOC, ["g2", "text"])), "expected a JSON object, got list",
                 "docs.jsonl", 2, {}, id="jsonl-line-is-a-list"),
    pytest.param("ingest", _file("docs.jsonl", jsonl(GOOD_DOC, {"_id": "g2", "body": "x"})), "missing or empty text",
                 "docs.jsonl", 2, {}, id="jsonl-missing-text"),
    pytest.param("ingest", _file("docs.jsonl", jsonl({"_id": "a", "text": " "}, {"_id": "b", "title": "", "text": ""})),
                 "no records with text", "docs.jsonl", None, {}, id="jsonl-only-blank-records"),
    pytest.param("ingest", _file("docs.csv", "_id,title,body\n1,T,some text\n"), "missing column(s) text",
                 "docs.csv", 1, {}, id="csv-missing-text-column"),
    pytest.param("ingest", _file("docs.csv", "title,text\nT,some text\n"), "missing column(s) _id",
                 "docs.csv", 1, {}, id="csv-missing-id-column"),
    pytest.param("ingest", _file("docs.csv", "_id,text\n1,some text\n,more text\n"), "missing the id field",
                 "docs.csv", 3, {}, id="csv-empty-id"),
    pytest.param("ingest", _file("docs.jsonl", jsonl(GOOD_DOC, {"_id": "g2", "text": "b"}, {"_id": "g1", "text": "c"})),
                 "duplicate id 'g1' (first on line 1)", "docs.jsonl", 3, {}, id="duplicate-ids"),
    pytest.param("ingest", _file("report.docx", "PK fake office file"), "unsupported file type .docx",
                 "report.docx", None, {}, id="unsupported-extension"),
    pytest.param("ingest", _folder("nodocs", {"data.json": "{}", "sheet.xlsx": "x"}), "no documents",
                 "nodocs", None, {}, id="folder-without-documents"),
    pytest.param("ingest", _folder("mixed", {"ok.txt": "Fine text.", "bad.txt": b"\x00\x00"}), "binary file",
                 "bad.txt", None, {}, id="folder-with-one-bad-file"),
    pytest.param("ingest", _file("garbage.pdf", b"%PDF-1.4\nthis is not really a pdf \x00\x01"), "cannot read this PDF",
                 "garbage.pdf", None, {}, id="garbage-pdf"),
    pytest.param("ingest", _encrypted_pdf, "encrypted", "locked.pdf", None, {}, id="encrypted-pdf"),
    pytest.param("ingest", _blank_pdf, "no extractable text", "scan.pdf", None, {}, id="pdf-without-text"),
    # Pairs (the corpus d1..d6 is ingested first).
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"anchor": "q", "positive_id": "d1"},
                                                     {"anchor": "  ", "positive": "x y"})),
                 "anchor is empty", "pairs.jsonl", 2, {}, id="pairs-empty-anchor"),
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"positive": "x y"})), "anchor: Field required",
                 "pairs.jsonl", 1, {}, id="pairs-missing-anchor"),
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"anchor": "q"})), "missing positive",
                 "pairs.jsonl", 1, {}, id="pairs-missing-positive"),
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"anchor": "q", "positive_id": "d1"},
                                                     {"anchor": "r", "positive_id": "d99"})),
                 "positive_id 'd99' is neither a passage id nor a document id", "pairs.jsonl", 2, {},
                 id="pairs-unknown-positive-id"),
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"anchor": "q", "positive": "same words",
                                                      "negative": "same words"})),
                 "negative is the same passage as positive", "pairs.jsonl", 1, {}, id="pairs-negative-equals-positive"),
    pytest.param("pairs", _file("pairs.csv", "anchor,positive_id,negative\nq,d1,d1\n"),
                 "negative is the same passage as positive", "pairs.csv", 2, {},
                 id="pairs-negative-equals-positive-by-id"),
    pytest.param("pairs", _file("pairs.jsonl", jsonl({"anchor": "q", "positive_id": "d1", "score": 1.5})),
                 "less than or equal to 1", "pairs.jsonl", 1, {}, id="pairs-score-out-of-range"),
    pytest.param("pairs", _file("pairs.csv", "anchor,positive_id,score\nq,d1,0.5\nr,d2,high\n"),
                 "score 'high' is not a number", "pairs.csv", 3, {}, id="pairs-score-not-a-number"),
    pytest.param("pairs", _file("pairs.csv", "anchor,positive,negative,score\n"), "no pairs in this file",
                 "pairs.csv", None, {}, id="pairs-file-without-pairs"),
    pytest.param("pairs", _file("pairs.txt", "q\td1\n"), "pairs must be a .jsonl or .csv file",
                 "pairs.txt", None, {}, id="pairs-txt-extension"),
    pytest.param("pairs", _beir_dir("noqrels", qrels=None), "no qrels/train.tsv", "noqrels", None, {},
                 id="pairs-beir-without-qrels"),
    pytest.param("pairs:test", _beir_dir("trainonly", qrels={"train": QRELS["train"]}), "no qrels/test.tsv",
                 "trainonly", None, {}, id="pairs-beir-without-test-qrels"),
    pytest.param("pairs", _beir_dir("badq", qrels={"train": [("q1", "d1", 1), ("q42", "d2", 1)]}),
                 "query id 'q42' is not in queries.jsonl", "train.tsv", 3, {}, id="qrels-unknown-query-id"),
    pytest.param("pairs", _beir_dir("badc", qrels={"train": [("q1", "d1", 1), ("q2", "nope", 1)]}),
                 "positive_id 'nope' is neither", "train.tsv", 3, {}, id="qrels-unknown-corpus-id"),
    pytest.param("pairs", lambda d: d / "missing.jsonl", "no such file or folder", "missing.jsonl", None, {},
                 id="pairs-nonexistent"),
    # Queries.
    pytest.param("queries", _file("queries.txt", b""), "empty (0 bytes)", "queries.txt", None, {},
                 id="queries-empty-file"),
    pytest.param("queries", _file("queries.jsonl", jsonl({"_id": "a", "text": "ok"}, {"_id": "b"})),
                 "non-empty `text`", "queries.jsonl", 2, {}, id="queries-jsonl-without-text"),
    pytest.param("queries", _file("queries.csv", "id,query\n1,fine\n2,\n"), "empty 'query'", "queries.csv", 3, {},
                 id="queries-csv-empty-query"),
    pytest.param("queries", _file("queries.tsv", "a query\n"), "a query log must be", "queries.tsv", None, {},
                 id="queries-unsupported-extension"),
    pytest.param("queries:train", _beir_dir("qnoqrels", qrels=None), "no qrels/train.tsv", "qnoqrels", None, {},
                 id="queries-beir-split-without-qrels"),
    pytest.param("queries", _beir_dir("qbad", queries=[{"_id": "q1", "text": "ok"}, {"_id": "q2", "text": " "}]),
                 "non-empty `text`", "queries.jsonl", 2, {}, id="queries-beir-empty-text"),
]


def _run(ws: Workspace, action: str, path: Path) -> object:
    kind, _, arg = action.partition(":")
    if kind == "ingest":
        return ws.ingest([path])
    if kind == "pairs":
        return ws.import_pairs(path, split=arg or "train")
    return ws.import_queries(path, split=arg or None)


class _SharedWorkspace:
    """One seeded workspace for the whole bad-input table: no row may change it, so sharing it
    is both faster and a stronger check (every row runs against the state the others left)."""

    def __init__(self, root: Path):
        self.root = root / "ws"
        self.ws = self.open()
        self.ws.ingest([make_beir(root / "beir")])

    def open(self, **overrides: object) -> Workspace:
        ws = Workspace.open(self.root, **overrides)
        ws._embedders[ws.active_model] = FakeEmbedder(ws.active_model)
        return ws

    def reopen(self, **overrides: object) -> Workspace:
        self.ws.close()
        self.ws = self.open(**overrides)
        return self.ws


@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the same isolation as conftest's autouse fixture
        for name in [n for n in os.environ if n.startswith("EMBEDLOOP_")] + ["OPENAI_API_KEY"]:
            mp.delenv(name, raising=False)
        shared = _SharedWorkspace(tmp_path_factory.mktemp("bad-input"))
    assert shared.ws.store.counts()["passages"] == 6
    yield shared
    shared.ws.close()


@pytest.mark.parametrize("action, build, expected_error, culprit, line, overrides", BAD_INPUT)
def test_bad_input_is_an_input_error_and_imports_nothing(
    shared_ws, tmp_path, action, build, expected_error, culprit, line, overrides
):
    path = build(tmp_path / "in")
    before = snapshot(shared_ws.ws)
    ws = shared_ws.reopen(**overrides) if overrides else shared_ws.ws
    try:
        with pytest.raises(InputError) as ei:
            _run(ws, action, path)
        msg = str(ei.value)
        assert expected_error in msg
        assert culprit in msg
        if line is not None:
            assert ei.value.line == line and f", line {line}:" in msg
        assert "\n" not in msg
        assert snapshot(ws) == before
    finally:
        if overrides:
            shared_ws.reopen()


def test_good_and_bad_file_together_import_nothing(seeded, tmp_path):
    good = write(tmp_path / "good.txt", "Wind shear on final approach needs a go-around.")
    bad = write(tmp_path / "bad.jsonl", jsonl(GOOD_DOC) + "{oops\n")
    before = snapshot(seeded)
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2"):
        seeded.ingest([good, bad])
    assert snapshot(seeded) == before
    with pytest.raises(InputError):
        seeded.ingest([bad, good])
    assert snapshot(seeded) == before


def test_nothing_to_ingest(workspace):
    with pytest.raises(InputError, match="nothing to ingest"):
        workspace.ingest([])


# Pairs ---------------------------------------------------------------------------------------
def _pairs(ws: Workspace) -> dict[str, dict]:
    return {r["anchor"]: r for r in ws.store.rows("SELECT * FROM pairs")}


def test_pairs_jsonl_resolves_text_passage_id_and_document_id(seeded, tmp_path):
    p1, t1 = passage_of(seeded, "d1")
    p2, t2 = passage_of(seeded, "d2")
    p3, t3 = passage_of(seeded, "d3")
    f = write(tmp_path / "pairs.jsonl", jsonl(
        {"anchor": "by text", "positive": " ".join(t1.split()), "negative": "unrelated words here", "score": 0.9},
        {"anchor": "by passage id", "positive": p2},
        {"anchor": "by document id", "positive": "d3", "negative_id": "d4"},
        {"anchor": "explicit", "positive_id": "d5", "negative": p1},
        {"anchor": "free text", "positive": "A positive that is not in the corpus."},
        {"anchor": "by text", "positive": t1},  # the same pair again: one row
    ))
    r = seeded.import_pairs(f)
    assert (r.pairs_added, r.pairs_unchanged) == (5, 0)
    rows = _pairs(seeded)
    assert rows["by text"]["positive_id"] == p1 and rows["by text"]["negative_id"] is None
    assert rows["by text"]["negative_text"] == "unrelated words here" and rows["by text"]["score"] == 0.9
    assert rows["by passage id"]["positive_id"] == p2 and rows["by passage id"]["positive_text"] == t2
    assert rows["by document id"]["positive_id"] == p3 and rows["by document id"]["positive_text"] == t3
    assert rows["by document id"]["negative_id"] == passage_of(seeded, "d4")[0]
    assert rows["explicit"]["positive_id"] == passage_of(seeded, "d5")[0] and rows["explicit"]["negative_id"] == p1
    assert rows["free text"]["positive_id"] is None
    assert rows["free text"]["positive_text"] == "A positive that is not in the corpus."
    assert {(r["source"], r["status"], r["split"], r["origin"]) for r in rows.values()} == {
        ("seed", "accepted", "train", "pairs.jsonl")
    }
    assert rows["by passage id"]["pair_id"] == Pair.make_id("by passage id", t2)
    # Stable ids: re-import adds nothing.
    again = seeded.import_pairs(f)
    assert (again.pairs_added, again.pairs_unchanged) == (0, 5)
    assert seeded.store.counts()["pairs"] == {"seed": {"accepted": 5}}


def test_pairs_csv(seeded, tmp_path):
    p1, _ = passage_of(seeded, "d1")
    f = write(tmp_path / "pairs.csv",
              "anchor,positive,negative,score,comment\n"
              "lift question,d1,,0.75,ignored column\n"
              "\"shock, standoff\",d3,d1,,\n")
    r = seeded.import_pairs(f, split="eval")
    assert r.pairs_added == 2
    rows = _pairs(seeded)
    assert rows["lift question"]["positive_id"] == p1 and rows["lift question"]["score"] == 0.75
    assert rows["lift question"]["negative_text"] is None
    assert rows["shock, standoff"]["negative_id"] == p1 and rows["shock, standoff"]["score"] is None
    assert {r["split"] for r in rows.values()} == {"eval"}
    assert seeded.import_pairs(f, split="eval").pairs_added == 0


def test_pairs_limit_must_be_positive(seeded, tmp_path):
    f = write(tmp_path / "pairs.jsonl",
              jsonl({"anchor": "a", "positive_id": "d1"}, {"anchor": "b", "positive_id": "d2"}))
    before = snapshot(seeded)
    with pytest.raises(InputError, match="limit"):
        seeded.import_pairs(f, limit=-1)
    assert snapshot(seeded) == before


def test_pairs_bad_split(seeded, beir):
    with pytest.raises(InputError, match="split must be train, eval or test"):
        seeded.import_pairs(beir, split="dev")


def test_beir_qrels_train_and_test_splits(seeded, beir):
    r = seeded.import_pairs(beir, split="train")
    assert r.pairs_added == 3  # the score-0 judgement is not a positive
    r = seeded.import_pairs(beir, split="test")
    assert r.pairs_added == 4
    rows = seeded.store.rows("SELECT anchor, positive_id, split, origin FROM pairs ORDER BY anchor, positive_id")
    by_split = {}
    for row in rows:
        by_split.setdefault(row["split"], set()).add((row["anchor"], row["positive_id"]))
    q = {x["_id"]: x["text"] for x in QUERIES}
    pid = {d: passage_of(seeded, d)[0] for d in ("d1", "d2", "d3", "d4", "d5", "d6")}
    assert by_split["train"] == {(q[a], pid[c]) for a, c, s in QRELS["train"] if s > 0}
    assert by_split["test"] == {(q[a], pid[c]) for a, c, s in QRELS["test"]}
    assert {r["origin"] for r in rows} == {"beir/qrels/train", "beir/qrels/test"}
    assert seeded.store.counts()["pairs_by_split"] == {"test": 4, "train": 3}
    assert seeded.import_pairs(beir, split="test").pairs_added == 0


def test_beir_qrels_limit_and_seed_sample(workspace, tmp_path):
    corpus = [{"_id": f"c{i}", "title": "", "text": f"Document number {i} about topic t{i}."} for i in range(40)]
    queries = [{"_id": f"q{i}", "text": f"question {i}"} for i in range(40)]
    folder = make_beir(tmp_path / "big", corpus, queries,
                       {"train": [(f"q{i}", f"c{i}", 1) for i in range(40)], "test": [("q0", "c1", 1)]})
    workspace.ingest([folder])

    def sample(seed: int) -> set[str]:
        with workspace.store.transaction() as cur:
            cur.execute("DELETE FROM pairs")
        assert workspace.import_pairs(folder, limit=10, seed=seed).pairs_added == 10
        return {r[0] for r in workspace.store.execute("SELECT pair_id FROM pairs").fetchall()}

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    assert workspace.import_pairs(folder, limit=10, seed=2).pairs_added == 0  # same sample: nothing new
    assert workspace.import_pairs(folder, limit=100, seed=2).pairs_added == 30  # limit above the total: all
    assert workspace.store.counts()["pairs_by_split"] == {"train": 40}


def test_blank_records_are_kept_without_passages(workspace, tmp_path):
    folder = make_beir(tmp_path / "b", CORPUS + [{"_id": "blank", "title": "", "text": "  "}])
    [r] = workspace.ingest([folder])
    assert r.documents_added == 7 and r.documents_empty == ["blank"] and r.passages_added == 6
    counts, indexed = snapshot(workspace)
    assert counts["documents"] == 7 and counts["passages"] == indexed == 6
    assert workspace.store.first_passage_of_docs(["blank"]) == {}


def test_qrels_judging_a_blank_document_are_skipped_and_counted(workspace, tmp_path):
    folder = make_beir(tmp_path / "b", CORPUS + [{"_id": "blank", "title": "", "text": ""}],
                       qrels={"train": [("q1", "blank", 1), ("q2", "d2", 1)]})
    workspace.ingest([folder])
    r = workspace.import_pairs(folder, split="train")
    assert (r.pairs_added, r.pairs_skipped) == (1, 1)
    only_blank = make_beir(tmp_path / "c", CORPUS, qrels={"train": [("q1", "blank", 1)]})
    with pytest.raises(InputError, match="no pairs in this file .1 name documents without text"):
        workspace.import_pairs(only_blank, split="train")


def _positive_qrels(folder: Path, split: str) -> set[tuple[str, str]]:
    rows = [ln.split("\t") for ln in (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]]
    return {(q, c) for q, c, s in rows if float(s) > 0}


@pytest.mark.slow  # ~10 s: 8.8k passages through the fake embedder and Chroma
def test_cranfield_ingest_and_qrels_import(workspace, cranfield):
    t0 = time.monotonic()
    [report] = workspace.ingest([cranfield])
    # Cranfield as shipped has two blank records, kept as documents without passages.
    assert report.documents_added == 1400 and sorted(report.documents_empty) == ["471", "995"]
    counts, indexed = snapshot(workspace)
    assert indexed == counts["passages"] >= 1398
    test_qrels = _positive_qrels(cranfield, "test")
    r = workspace.import_pairs(cranfield, split="test", limit=100, seed=3)
    assert r.pairs_added == 100
    r = workspace.import_pairs(cranfield, split="test")
    # One row per (query text, first passage of the judged document); duplicates collapse.
    assert r.pairs_unchanged == 100 and 0.95 * len(test_qrels) <= r.pairs_added + 100 <= len(test_qrels)
    train_qrels = _positive_qrels(cranfield, "train")
    r = workspace.import_pairs(cranfield, split="train")
    assert r.pairs_skipped == 1  # query 125 judges blank document 995
    assert 0.95 * len(train_qrels) <= r.pairs_added <= len(train_qrels) - 1
    assert workspace.import_pairs(cranfield, split="train").pairs_added == 0
    assert workspace.import_queries(cranfield, split="train").queries_added == len({q for q, _ in train_qrels})
    print(f"cranfield ingest + qrels: {time.monotonic() - t0:.1f}s, {counts['passages']} passages")


# Queries -------------------------------------------------------------------------------------
def test_queries_txt_one_per_line(workspace, tmp_path):
    f = write(tmp_path / "log.txt", "wing stall speed\n\n   \nflap settings\nwing stall speed\n  flap settings  \n")
    r = workspace.import_queries(f)
    assert r.queries_added == 2
    rows = workspace.store.rows("SELECT query_id, text, source FROM queries ORDER BY text")
    assert [(x["text"], x["source"]) for x in rows] == [("flap settings", "log.txt"), ("wing stall speed", "log.txt")]
    assert rows[0]["query_id"] == content_hash("flap settings")
    assert workspace.import_queries(f).queries_added == 0


def test_queries_jsonl_and_csv(workspace, tmp_path):
    j = write(tmp_path / "log.jsonl", jsonl({"_id": "a", "text": "first"}, {"id": "b", "query": "second"},
                                            {"text": "third"}, {"_id": "a", "text": "first"}))
    assert workspace.import_queries(j).queries_added == 3
    c = write(tmp_path / "log.csv", "id,query,clicks\nx1,csv one,3\n,csv two,0\n")
    assert workspace.import_queries(c).queries_added == 2
    c2 = write(tmp_path / "log2.csv", "text\ncsv three\n")
    assert workspace.import_queries(c2).queries_added == 1
    ids = dict(workspace.store.execute("SELECT text, query_id FROM queries").fetchall())
    assert ids["first"] == "a" and ids["second"] == "b" and ids["csv one"] == "x1"
    assert ids["third"] == content_hash("third") and ids["csv two"] == content_hash("csv two")
    assert workspace.import_queries(j).queries_added == 0


def test_queries_beir_folder_with_split_filter(workspace, beir):
    assert workspace.import_queries(beir, split="train").queries_added == 3
    got = {r[0] for r in workspace.store.execute("SELECT query_id FROM queries").fetchall()}
    assert got == {"q1", "q2", "q3"}
    assert workspace.import_queries(beir, split="test").queries_added == 3
    assert workspace.import_queries(beir).queries_added == 0
    assert workspace.store.counts()["queries"] == 6


# Document ids of folders -----------------------------------------------------------------------
def doc_ids(ws: Workspace) -> list[str]:
    return [r[0] for r in ws.store.execute("SELECT doc_id FROM documents ORDER BY doc_id").fetchall()]


def test_same_relative_path_in_two_folders_is_two_documents(workspace, tmp_path):
    write(tmp_path / "x" / "a.txt", "Ailerons roll the aircraft about its longitudinal axis.")
    write(tmp_path / "y" / "a.txt", "Elevators pitch the nose up or down.")
    write(tmp_path / "elsewhere" / "x" / "a.txt", "Rudders yaw the aircraft about its vertical axis.")
    rx, ry = workspace.ingest([tmp_path / "x", tmp_path / "y"])
    assert (ry.documents_added, ry.documents_updated) == (1, 0)  # was: 0 added, 1 updated (x's a.txt replaced)
    [rz] = workspace.ingest([tmp_path / "elsewhere" / "x"])  # another folder named x
    assert (rz.documents_added, rz.documents_updated) == (1, 0)
    assert doc_ids(workspace) == ["x/a.txt", "x~2/a.txt", "y/a.txt"]
    assert workspace.search("ailerons roll", k=1)[0].doc_ids == ["x/a.txt"]
    assert workspace.search("rudders yaw", k=1)[0].doc_ids == ["x~2/a.txt"]
    before = snapshot(workspace)
    for folder in (tmp_path / "elsewhere" / "x", tmp_path / "y", tmp_path / "x"):  # any order: same ids
        [r] = workspace.ingest([folder])
        assert (r.documents_added, r.documents_updated, r.documents_unchanged, r.indexed) == (0, 0, 1, 0)
    assert snapshot(workspace) == before


def test_reingesting_a_folder_ingested_with_old_ids_adopts_them(workspace, tmp_path, monkeypatch):
    """Before ids named their folder, a folder's documents were named by their path inside it."""
    from loop.ingest import store_documents

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "docs" / "a.txt", "Fatigue cracks grow from rivet holes in aluminium skins.")
    write(tmp_path / "docs" / "sub" / "e.txt", "Landing gear loads peak at touchdown.")
    old = read_documents(Path("docs"))  # the old ids: a.txt, sub/e.txt; sources relative to the cwd
    assert sorted(d.doc_id for d in old) == ["a.txt", "sub/e.txt"]
    tokenize, max_tokens, overlap = workspace._chunk_args()
    store_documents(workspace.store, old, tokenize, max_tokens, overlap, "docs")
    workspace.ensure_index()
    write(tmp_path / "docs" / "sub" / "e.txt", "Landing gear loads peak at touchdown, then decay.")  # changed since
    before = snapshot(workspace)
    [r] = workspace.ingest([tmp_path / "docs"])
    assert (r.documents_added, r.documents_updated, r.documents_unchanged) == (0, 1, 1)
    assert doc_ids(workspace) == ["docs/a.txt", "docs/sub/e.txt"]
    counts, indexed = snapshot(workspace)
    assert counts["documents"] == before[0]["documents"] == 2 and counts["passages"] == 2 and indexed == 2
    m = workspace.store.rows("SELECT doc_id FROM doc_passages ORDER BY doc_id")
    assert [x["doc_id"] for x in m] == ["docs/a.txt", "docs/sub/e.txt"]
    [r] = workspace.ingest([tmp_path / "docs"])
    assert (r.documents_added, r.documents_updated, r.documents_unchanged) == (0, 0, 2)


def test_pairs_may_name_a_folder_document_by_its_path_inside_the_folder(workspace, tmp_path):
    write(tmp_path / "x" / "a.txt", "Ailerons roll the aircraft about its longitudinal axis.")
    write(tmp_path / "x" / "b.txt", "Flaps add lift at low speed.")
    workspace.ingest([tmp_path / "x"])
    pairs = write(tmp_path / "pairs.jsonl", jsonl({"anchor": "roll control", "positive": "a.txt"},  # as before prefixes
                                                  {"anchor": "more lift", "positive_id": "x/b.txt"}))
    workspace.import_pairs(pairs)
    rows = workspace.store.rows("SELECT anchor, positive_id FROM pairs ORDER BY anchor")
    assert [(r["anchor"], r["positive_id"]) for r in rows] == [
        ("more lift", passage_of(workspace, "x/b.txt")[0]), ("roll control", passage_of(workspace, "x/a.txt")[0])]
    write(tmp_path / "y" / "a.txt", "Elevators pitch the nose up or down.")
    workspace.ingest([tmp_path / "y"])
    other = write(tmp_path / "other.jsonl", jsonl({"anchor": "pitch", "positive_id": "a.txt"}))
    with pytest.raises(InputError, match=r"several folders \(x/a.txt, y/a.txt\); use the full document id"):
        workspace.import_pairs(other)


# The demo corpus and its query log ---------------------------------------------------------
def test_demo_ingest_imports_its_query_log_and_rerunning_changes_nothing(workspace):
    """The demo ships a query log (questions only, no labels), so the loop has real queries to
    mine and hold out; `embedloop ingest --demo` and the app's first start both use `ingest_demo`."""
    from loop.demo import demo_queries, ingest_demo

    queries = demo_queries()
    assert 120 <= len(queries) <= 200
    assert len({" ".join(q.lower().split()) for q in queries}) == len(queries)  # no duplicates
    docs, log = ingest_demo(workspace)
    assert docs.documents_added > 50 and log.queries_added == len(queries)
    stored = workspace.store.rows("SELECT text, source FROM queries ORDER BY text")
    assert sorted(r["text"] for r in stored) == sorted(queries)
    assert {r["source"] for r in stored} == {"demo_queries.txt"}
    assert workspace.store.scalar("SELECT count(*) FROM pairs") == 0  # a query log carries no labels
    before = workspace.store.counts()
    docs, log = ingest_demo(workspace)
    assert (docs.documents_added, docs.documents_updated, docs.indexed, log.queries_added) == (0, 0, 0, 0)
    assert workspace.store.counts() == before
