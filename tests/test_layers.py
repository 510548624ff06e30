"""The layers import only downwards: storage/ knows nothing of loop/, loop/llm.py nothing of
storage/, ui/ reaches the engine without its trainer, LLM transport or storage, the training
parent (loop/train.py) imports neither torch nor the trainer process's modules, and the job runner
nothing of training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("loop.train", "loop.train_config", "loop.trainer", "loop.train_batching", "loop.train_hooks",
            "loop.train_loss", "loop.train_monitor")
CHILD = ("torch", "transformers", "sentence_transformers", "datasets") + TRAINING[2:]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from loop import train`
    counts as loop.train)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def offending(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{f.relative_to(ROOT)}: {m}" for f in files for m in imported_modules(f)
        if any(m == b or m.startswith(b + ".") for b in banned)
    )


@pytest.mark.parametrize(("files", "banned"), [
    pytest.param(sorted((ROOT / "storage").glob("*.py")), ("loop",), id="storage-imports-no-loop"),
    pytest.param([ROOT / "loop" / "llm.py", ROOT / "loop" / "llm_types.py"], ("storage",), id="llm-imports-no-storage"),
    pytest.param(sorted((ROOT / "ui").glob("*.py")) + [ROOT / "app.py"], (*TRAINING, "loop.llm", "storage"),
                 id="ui-imports-the-engine-face"),
    pytest.param([ROOT / "loop" / "train.py", ROOT / "loop" / "train_config.py"], CHILD,
                 id="training-parent-imports-no-trainer"),
    pytest.param([ROOT / "loop" / "jobs.py", ROOT / "loop" / "procs.py"], TRAINING, id="jobs-import-no-training"),
])
def test_layers_import_only_downwards(files, banned):
    assert files
    assert offending(files, banned) == []
