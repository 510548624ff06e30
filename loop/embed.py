"""Embedding models: loaded from local paths only, versioned by the hash of their files."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from functools import cached_property
from pathlib import Path

import numpy as np

from loop.errors import ConfigError

# Models load from local paths; nothing may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
BACKEND_ENV = "EMBEDLOOP_ENCODE_BACKEND"
ONNX_CACHE_ENV = "EMBEDLOOP_ONNX_CACHE"
_EXPORT_LOCK = threading.Lock()
FP32_FILE, INT8_FILE = "model.onnx", "model-int8-per-channel.onnx"
CUDA_BATCH = 256  # the least batch on a CUDA GPU: smaller ones leave it idle (batches are length-sorted)


def model_hash(path: str | Path) -> str:
    """SHA-256 over a model directory's weight, config and tokenizer files (names and bytes)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"Model path {root} is not a directory. Set base_model to a local model folder.")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        if "checkpoint-" in f.as_posix():
            continue
        h.update(f.relative_to(root).as_posix().encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Embedder:
    """A sentence-transformers model with its version id. Loads lazily, from a local path.

    Args:
        path: local model directory.
        version: the id queries and collections are tagged with (see `model_version_for`).
        device: auto | cpu | cuda | mps. On a CUDA GPU, `encode` runs `encode_sorted` (half
            precision, length-sorted batches of at least CUDA_BATCH texts).
        backend: auto | torch | onnx | onnx-int8 (the ONNX ones on a CPU only; see `OnnxEncoder`);
            None = the EMBEDLOOP_ENCODE_BACKEND environment variable, else auto. On a GPU the
            torch backend is always used. auto = onnx-int8 on a CPU (about 3.3x torch there, for
            NDCG@10 within 0.01: bench/README.md), falling back to torch for a model the ONNX
            path cannot take.
        cache_dir: where ONNX exports are kept (one per model hash); None = EMBEDLOOP_ONNX_CACHE,
            else ~/.cache/embedloop/onnx.
    """

    def __init__(self, path: str | Path, version: str, device: str = "auto", batch_size: int = 64,
                 backend: str | None = None, cache_dir: str | Path | None = None):
        self.path = Path(path)
        self.version = version
        self.device = resolve_device(device)
        self.batch_size = max(batch_size, CUDA_BATCH) if self.device.startswith("cuda") else batch_size
        backend = backend or os.environ.get(BACKEND_ENV) or "auto"
        if backend not in BACKENDS:
            raise ConfigError(f"encode backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
        self.auto = backend == "auto"
        if self.device != "cpu":
            backend = "torch"
        elif self.auto:
            backend = "onnx-int8" if _has_onnxruntime() else "torch"
        self.backend = backend
        self.cache_dir = Path(cache_dir or os.environ.get(ONNX_CACHE_ENV) or Path.home() / ".cache" / "embedloop" / "onnx")

    @cached_property
    def onnx(self):
        """The ONNX Runtime encoder of this model (exported once into `cache_dir`)."""
        with _EXPORT_LOCK:  # two threads' first encodes (a job and a page) export once
            return OnnxEncoder.for_model(self.model, self.path, self.cache_dir, quantize=self.backend == "onnx-int8")

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every CLI call are noise
        if not (self.path / "modules.json").exists() and not (self.path / "config.json").exists():
            raise ConfigError(f"{self.path} does not look like a sentence-transformers model folder.")
        return SentenceTransformer(
            str(self.path), device=self.device, trust_remote_code=False, local_files_only=True
        )

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend != "torch":
            try:
                return self.onnx.encode(texts, batch_size=batch_size or self.batch_size)
            except Exception as e:  # noqa: BLE001
                if not self.auto:
                    raise
                # auto: a model the ONNX path cannot take (or an ONNX Runtime failure) runs on torch
                logging.getLogger(__name__).warning("%s: ONNX encode unavailable (%s); using torch.", self.path, e)
                self.backend = "torch"
        if self.device.startswith("cuda"):
            return self.encode_sorted(texts, batch_size)
        emb = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.asarray(emb, dtype=np.float32)

    def encode_sorted(self, texts: list[str], batch_size: int | None = None, half: bool = True) -> np.ndarray:
        """The torch path on a CUDA GPU: texts tokenised once and batched longest first
        (`length_sorted_batches`, as the ONNX path does), fp16 autocast on CUDA, inference mode,
        inputs copied from pinned memory and results kept on the device until the end, so this
        path adds no wait for the GPU per batch (bench/gpu_check.sh counts them). Rows whose fp16 result is not finite (a model whose
        activations overflow fp16) are encoded again in fp32. On a CPU it runs in fp32."""
        import torch

        model = self.model.eval()
        device = torch.device(self.device)
        cuda = device.type == "cuda"

        def to_device(a: np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=device)
        batches = length_sorted_batches(self.tokenizer, texts, self.max_seq_length, batch_size or self.batch_size)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda and half):
            for idx, feeds in batches:
                emb = model({k: to_device(v) for k, v in feeds.items()})["sentence_embedding"]
                out[to_device(idx)] = emb.float()
            out = torch.nn.functional.normalize(out, dim=1)
            bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
        result = out.cpu().numpy()
        if bad and cuda and half:
            result[bad] = self.encode_sorted([texts[i] for i in bad], batch_size, half=False)
        return result


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


class OnnxEncoder:
    """The model's transformer run by ONNX Runtime (fp32, or int8 dynamic quantisation), with
    the sentence-transformers pooling and normalisation done in numpy.

    Why: on a CPU, ONNX Runtime with int8 weights encodes several times faster than torch
    fp32, for a retrieval quality within noise (bench/README.md has the figures). The export is
    done once per model hash, with torch's exporter, into `cache_dir/<hash>-fused/`, written to
    a temporary folder and moved into place (os.replace), so a crash never leaves a half export.
    Texts are tokenised once, sorted by length and padded per batch (length buckets), so padding
    costs little.

    Only the standard stack (Transformer -> Pooling mean|cls|max -> optional Normalize) is
    supported; anything else raises ConfigError (use the torch backend).

    Why not sentence-transformers' own `backend="onnx"` (optimum): its quantiser cannot take the
    fused graph, so its best CPU model (int8, avx512_vnni) measured 0.75x this one's speed and
    0.014 lower NDCG@10 on cranfield, and its optimum-onnx cannot be installed beside
    sentence-transformers >= 6 (transformers < 4.58 vs >= 5). bench/README.md has the run.
    """

    def __init__(self, onnx_path: Path, tokenizer, max_seq_length: int, pooling: str, normalize: bool, dim: int,
                 input_names: list[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            import torch

            opts.intra_op_num_threads = max(1, torch.get_num_threads())
        except ImportError:
            pass
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pooling = pooling
        self.normalize = normalize
        self.dim = dim
        self.input_names = [n for n in input_names if n in {i.name for i in self.session.get_inputs()}]

    @classmethod
    def for_model(cls, st_model, path: Path, cache_dir: Path, quantize: bool = False) -> OnnxEncoder:
        modules = list(st_model)
        names = [type(m).__name__ for m in modules]
        if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
            raise ConfigError(f"The ONNX backend supports Transformer -> Pooling [-> Normalize] models; {path} has "
                              f"{' -> '.join(names)}. Use the torch backend (EMBEDLOOP_ENCODE_BACKEND=torch).")
        pool = modules[1]
        mode = getattr(pool, "pooling_mode", None) or next(
            (m for m in ("mean", "cls", "max") if getattr(pool, f"pooling_mode_{m}_tokens", False)), None)
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(mode, mode)
        if mode not in ("mean", "cls", "max"):
            raise ConfigError(f"The ONNX backend supports mean, cls or max pooling, not {mode!r}; use the torch backend.")
        folder = Path(cache_dir) / f"{model_hash(path)[:16]}-fused"  # "-fused": older caches hold unfused exports
        target = folder / (INT8_FILE if quantize else FP32_FILE)
        if not target.exists():
            export_onnx(modules[0], folder, quantize=quantize)
        dim = int(st_model.get_embedding_dimension())
        return cls(target, st_model.tokenizer, int(st_model.max_seq_length), mode, len(names) > 2, dim,
                   ["input_ids", "attention_mask", "token_type_ids"])

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, feeds in length_sorted_batches(self.tokenizer, texts, self.max_seq_length, batch_size):
            mask = feeds["attention_mask"]
            hidden = self.session.run(None, {k: feeds[k] for k in self.input_names})[0]
            if self.pooling == "cls":
                emb = hidden[:, 0]
            elif self.pooling == "max":
                emb = np.where(mask[..., None] > 0, hidden, -1e9).max(axis=1)
            else:
                m = mask[..., None].astype(np.float32)
                emb = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            out[idx] = emb
        # Retrieval compares normalised vectors whatever the model's last module is.
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def length_sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Tokenise `texts` once, then yield `(rows, feeds)` batches, longest texts first, each padded
    only to its own longest row: `rows` are the batch's positions in `texts`, `feeds` its int64
    arrays input_ids, attention_mask and token_type_ids (zeros where the tokenizer has none)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: memory peaks early
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        type_ids = np.zeros((len(idx), width), dtype=np.int64)
        for r, i in enumerate(idx):
            n = len(ids[i])
            input_ids[r, :n] = ids[i]
            mask[r, :n] = 1
            if types is not None:
                type_ids[r, :n] = types[i]
        yield idx, {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}


def export_onnx(transformer_module, folder: Path, quantize: bool = False) -> Path:
    """Export a sentence-transformers Transformer module's model, fused for ONNX Runtime's CPU
    kernels, to `folder/model.onnx`, or int8-quantised to `folder/model-int8-per-channel.onnx`.

    Every step works in a private temporary folder (quantisation writes side files next to its
    input) and the result is moved into place with os.replace: processes exporting the same model
    at once waste work but never read each other's half-written files.

    The export traces eager attention with the TorchScript exporter: that graph is the one ONNX
    Runtime's transformer optimizer recognises, so attention, embedding + LayerNorm, bias + GELU
    and residual + LayerNorm each become one fused op (about 2x faster than the unfused graph on a
    CPU). Where that exporter or the fusion fails (an unusual architecture), the dynamo exporter's
    graph is used as it is: slower, same numbers.
    """
    import shutil
    import tempfile

    import torch

    hf = transformer_module.auto_model
    tok = transformer_module.tokenizer

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    example = tok(["an example sentence to trace", "a second, longer example sentence with more words"],
                  padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if "token_type_ids" not in example:
        example["token_type_ids"] = torch.zeros_like(example["input_ids"])
    args = tuple(example[n] for n in names)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    was_training = hf.training
    device = next(hf.parameters()).device
    attn = getattr(hf.config, "_attn_implementation", None)
    hf.eval().to("cpu")
    try:
        raw = tmp / "raw.onnx"
        try:
            if attn and attn != "eager":
                hf.set_attn_implementation("eager")
            with torch.no_grad():
                torch.onnx.export(
                    _Wrap(hf), args, str(raw), input_names=names, output_names=["last_hidden_state"],
                    dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]},
                    opset_version=17, dynamo=False,
                )
            _fuse(raw, tmp / FP32_FILE, hf.config)
        except Exception:  # noqa: BLE001 - any failure of the fast path falls back to the plain export
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
            with torch.no_grad():
                torch.onnx.export(
                    _Wrap(hf), args, str(tmp / FP32_FILE), input_names=names,
                    output_names=["last_hidden_state"], dynamic_shapes={n: {0: b, 1: s} for n in names},
                    opset_version=18, dynamo=True, external_data=False, verbose=False,
                )
        result = tmp / FP32_FILE
        if quantize:
            result = quantize_onnx(result, tmp / INT8_FILE)
        folder.mkdir(exist_ok=True)
        os.replace(result, folder / result.name)  # atomic; other files in the folder stay
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if attn and attn != "eager":
            hf.set_attn_implementation(attn)
        hf.to(device)
        hf.train(was_training)
    return folder / (INT8_FILE if quantize else FP32_FILE)


def _fuse(src: Path, dst: Path, config) -> None:
    """ONNX Runtime's BERT fusions (attention, LayerNorm, GELU); raises when attention was not fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden)
    if not model.get_fused_operator_statistics().get("Attention"):
        raise RuntimeError("attention was not fused")
    model.save_model_to_file(str(dst))


def quantize_onnx(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of the weights of `src` into `dst`. ONNX Runtime writes a
    shape-inferred copy next to `src`: call it in a private folder (as `export_onnx` does).

    Per channel: per-tensor scales cost 0.014 NDCG@10 on cranfield (all-MiniLM-L6-v2, unfused graph).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: shape inference cannot type the outputs of fused (contrib) ops.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst
