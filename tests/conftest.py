from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

from storage.db import Store  # noqa: E402
from tests.fakes import FakeEmbedder  # noqa: E402


@pytest.fixture(scope="session")
def _onnx_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path, _onnx_cache):
    """No test sees the developer's workspace, config or LLM key. ONNX exports (the default CPU
    encode path) are shared by the session, so the bundled model is exported once."""
    for name in list(os.environ):
        if name.startswith("EMBEDLOOP_") or name in {"OPENAI_API_KEY", "OPENAI_BASE_URL"}:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDLOOP_ONNX_CACHE", str(_onnx_cache))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store():
    s = Store.memory()
    yield s
    s.close()


@pytest.fixture
def workspace(tmp_path):
    """A real workspace (DuckDB file + Chroma folder) whose active model is a FakeEmbedder."""
    from loop.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    ws._embedders[ws.active_model] = FakeEmbedder(ws.active_model)
    yield ws
    ws.close()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from loop.config import bundled_model_path

    return bundled_model_path()


@pytest.fixture
def scifact() -> Path:
    if not (SHARED / "scifact" / "corpus.jsonl").exists():
        pytest.skip("../shared/datasets/scifact is not present")
    return SHARED / "scifact"


@pytest.fixture
def cranfield() -> Path:
    if not (SHARED / "cranfield" / "corpus.jsonl").exists():
        pytest.skip("../shared/datasets/cranfield is not present")
    return SHARED / "cranfield"
