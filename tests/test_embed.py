"""Encode backends: the default (auto) on a CPU, the ONNX paths against torch, the fallback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from loop.config import load_settings
from loop.embed import Embedder, OnnxEncoder
from loop.errors import ConfigError
from tests.reliability_report import case

TEXTS = ["shock waves on a swept wing", "heat transfer in a laminar boundary layer at high mach number", "x"]


def test_auto_is_int8_onnx_on_a_cpu_and_an_explicit_backend_wins(minilm_path, monkeypatch):
    assert Embedder(minilm_path, "v", "cpu").backend == "onnx-int8"
    assert Embedder(minilm_path, "v", "cpu", backend="torch").backend == "torch"
    monkeypatch.setenv("EMBEDLOOP_ENCODE_BACKEND", "torch")
    assert Embedder(minilm_path, "v", "cpu").backend == "torch"


def test_an_unknown_backend_is_a_clear_error(minilm_path, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="onnx-int8"):
        Embedder(minilm_path, "v", "cpu", backend="tensorrt")
    monkeypatch.setenv("EMBEDLOOP_ENCODE_BACKEND", "fast")
    with pytest.raises(ConfigError, match="encode_backend"):
        load_settings(tmp_path / "ws")


def test_auto_falls_back_to_torch_when_the_onnx_path_fails(minilm_path, tmp_path, monkeypatch):
    def fail(*_a, **_k):
        raise ConfigError("this model cannot be exported")

    monkeypatch.setattr(OnnxEncoder, "for_model", classmethod(lambda cls, *a, **k: fail()))
    emb = Embedder(minilm_path, "v", "cpu", cache_dir=tmp_path)
    got = emb.encode(TEXTS)
    assert emb.backend == "torch" and got.shape == (3, 384)
    ref = Embedder(minilm_path, "v", "cpu", backend="torch").encode(TEXTS)
    assert np.allclose(got, ref, atol=1e-5)
    with pytest.raises(ConfigError, match="cannot be exported"):  # asked for by name: no silent fallback
        Embedder(minilm_path, "v", "cpu", backend="onnx-int8", cache_dir=tmp_path).encode(TEXTS)


@pytest.mark.slow
def test_onnx_backends_match_torch_embeddings_with_fused_attention(minilm_path, tmp_path):
    ref = Embedder(minilm_path, "v", "cpu", backend="torch").encode(TEXTS)
    for backend, floor in (("onnx", 0.9999), ("onnx-int8", 0.95)):
        got = Embedder(minilm_path, "v", "cpu", backend=backend, cache_dir=tmp_path / backend).encode(TEXTS)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.einsum("ij,ij->i", got, ref).min() >= floor
    (fp32,) = (tmp_path / "onnx").glob("*-fused/model.onnx")
    assert "Attention" in {n.op_type for n in onnx.load(str(fp32)).graph.node}  # the fused graph, not the fallback
    # int8 keeps only the quantised file (the fp32 export is 4x its size)
    assert [p.name for p in (tmp_path / "onnx-int8").glob("*-fused/*.onnx")] == ["model-int8-per-channel.onnx"]


@pytest.mark.slow
def test_two_processes_exporting_the_same_model_at_once_both_get_it(minilm_path, tmp_path):
    """Quantisation writes side files next to its input: each export works in a private folder."""
    import subprocess
    import sys

    code = ("import sys; from loop.embed import Embedder; "
            "e = Embedder(sys.argv[1], 'v', 'cpu', backend='onnx-int8', cache_dir=sys.argv[2]); "
            "print(e.encode(['a wing in a shock tube']).shape)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(minilm_path), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert "(1, 384)" in out
    assert [f.name for f in (tmp_path / "cache").glob("*/*")] == ["model-int8-per-channel.onnx"]


@pytest.mark.slow
@case("What a user hits", "encoding on a GPU: texts tokenised once, length-sorted, in large half-precision batches",
      "the path gives the stock embeddings, in the caller's order (checked here on a CPU in fp32, with batches "
      "small enough that sorting reorders them); on a CPU `encode` keeps the stock path")
def test_the_gpu_encode_path_gives_the_stock_embeddings_in_input_order(minilm_path):
    emb = Embedder(minilm_path, "v", "cpu", backend="torch")
    texts = [*TEXTS, "a " * 300, "wing", "turbulent flow over a flat plate " * 5, TEXTS[1]]
    ref = emb.encode(texts)  # stock SentenceTransformer.encode on a CPU
    got = emb.encode_sorted(texts, batch_size=2)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.einsum("ij,ij->i", got, ref).min() >= 0.99999
    assert Embedder(minilm_path, "v", "cuda").batch_size == 256  # the workspace's 64 is for a CPU
