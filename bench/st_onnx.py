"""sentence-transformers' own ONNX path, for `bench.speed`'s library arms; runs as a child process.

    python -m bench.st_onnx        # spoken to over stdin/stdout by bench.speed.LibraryArms

The library arms load the model with `SentenceTransformer(path, backend="onnx",
model_kwargs={"file_name": ...})` after exporting it with the library's helpers
(`export_optimized_onnx_model`, `export_dynamic_quantized_onnx_model`, both built on optimum).
That path needs `optimum-onnx`, whose release (0.1.0) requires transformers < 4.58, while this
project's sentence-transformers (>= 6) requires transformers >= 5: pip cannot install them together
(`pip install "sentence-transformers[onnx]>=6"` fails to resolve). So the arms run in this child, whose
PYTHONPATH starts with a folder holding sentence-transformers 5 and its optimum stack
(`bench.speed --st-onnx-site DIR`; bench/README.md says how to fill it); torch, ONNX Runtime and
numpy are the project's own. This module imports nothing from the project.

Protocol: pickled dicts, one request then one answer, on the binary stdin / the original stdout
(anything the libraries print goes to stderr). Answers are {"ok": value} or {"error": text}.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# arm -> (file the arm loads, the file it is made from, how: "export" | "O1".."O3" | a quantisation config)
# O4 is O3 in fp16, for GPUs only; avx512_vnni is the int8 configuration for a CPU with AVX512-VNNI.
ARMS: dict[str, tuple[str, str | None, str]] = {
    "st-onnx": ("onnx/model.onnx", None, "export"),
    "st-onnx-O3": ("onnx/model_O3.onnx", "onnx/model.onnx", "O3"),
    "st-onnx-qint8": ("onnx/model_qint8_avx512_vnni.onnx", "onnx/model.onnx", "avx512_vnni"),
    "st-onnx-O3-qint8": ("onnx/model_O3_qint8_avx512_vnni.onnx", "onnx/model_O3.onnx", "avx512_vnni"),
}


class Worker:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.threads = 0
        self.loaded: dict[str | None, Any] = {}  # file -> model: arms timed in turn stay warm

    def _load(self, file_name: str | None):
        import onnxruntime as ort
        from sentence_transformers import SentenceTransformer

        if file_name in self.loaded:
            return self.loaded[file_name]
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads  # the parent's thread count, as the project's encoder uses
        kwargs = {"provider": "CPUExecutionProvider", "session_options": opts}
        if file_name:  # None: no ONNX file yet, the library exports one
            kwargs["file_name"] = file_name
        model = SentenceTransformer(str(self.dir), device="cpu", backend="onnx", local_files_only=True,
                                    model_kwargs=kwargs)
        self.loaded[file_name] = model
        return model

    def setup(self, model: str, folder: str, threads: int = 0) -> dict[str, Any]:
        """Copy the model into `folder`; the arms' files are exported there on first use."""
        import sentence_transformers
        import transformers

        self.dir, self.threads = Path(folder), threads
        if not self.dir.exists():
            shutil.copytree(model, self.dir)
        return {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__}

    def prepare(self, arm: str) -> float:
        """Make the arm's ONNX file with the library's own helpers; the seconds it took (0 when cached)."""
        from sentence_transformers import export_dynamic_quantized_onnx_model, export_optimized_onnx_model

        assert self.dir is not None, "setup first"
        target, source, how = ARMS[arm]
        if (self.dir / target).exists():
            return 0.0
        t0 = time.perf_counter()
        if source and not (self.dir / source).exists():
            self.prepare(next(a for a, v in ARMS.items() if v[0] == source))
        if how == "export":  # the library exports on load (a file_name would make it look for a subfolder)
            self._load(None)
            self.loaded.pop(None).save_pretrained(str(self.dir))
        elif how.startswith("O"):
            export_optimized_onnx_model(self._load(source), how, str(self.dir))
        else:
            suffix = Path(target).stem.removeprefix(Path(source).stem + "_")
            export_dynamic_quantized_onnx_model(self._load(source), how, str(self.dir), file_suffix=suffix)
        if not (self.dir / target).exists():
            raise RuntimeError(f"the export did not write {target}: {sorted(p.name for p in (self.dir / 'onnx').iterdir())}")
        return time.perf_counter() - t0

    def encode(self, arm: str, texts: list[str], batch_size: int) -> tuple[Any, float]:
        import numpy as np

        model = self._load(ARMS[arm][0])
        t0 = time.perf_counter()
        emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(emb, dtype=np.float32), time.perf_counter() - t0


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # library prints must not corrupt the protocol
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    worker = Worker()
    while True:
        try:
            req = pickle.load(inp)
        except EOFError:
            return 0
        try:
            answer = {"ok": getattr(worker, req.pop("op"))(**req)}
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent as text
            answer = {"error": f"{type(e).__name__}: {e}"}
        pickle.dump(answer, out)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
