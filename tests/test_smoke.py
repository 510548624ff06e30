from loop.records import content_hash


def test_workspace_roundtrip(workspace, tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("Indemnification clauses allocate losses between the parties.\n", encoding="utf-8")
    [report] = workspace.ingest([doc])
    assert report.documents_added == 1 and report.passages_added == 1 and report.indexed == 1
    hits = workspace.search("indemnification losses", k=3)
    assert hits[0].doc_ids == ["a.txt"]
    assert hits[0].passage_id == content_hash(hits[0].text)
    again = workspace.ingest([doc])[0]
    assert (again.documents_added, again.passages_added, again.indexed) == (0, 0, 0)
