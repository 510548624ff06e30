"""The demo corpus: the Python Language Reference topics that ship with every CPython.

`pydoc_data.topics` is the text `help('TOPIC')` shows (assignment, for, with, classes, ...),
written by the Python documentation team and installed with the interpreter, so the app's
embedded default has a real corpus on any machine, offline.
"""

from __future__ import annotations

from loop.records import Document

DEMO_SOURCE = "python-docs:pydoc_data.topics"


def demo_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(doc_id=f"pydoc/{name}", title=name.replace("-", " "), text=text.strip(), source=DEMO_SOURCE)
        for name, text in sorted(topics.items())
        if text.strip()
    ]
