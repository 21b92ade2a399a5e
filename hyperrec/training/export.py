"""Export the ranker to ONNX and prove the export computes what PyTorch computes.

The server only ever sees the ONNX file, so a publish is gated on
`check_parity`: random inputs of several batch sizes and candidate counts go
through both the PyTorch module and ONNX Runtime, and any difference beyond
the tolerance stops the publish with `ParityError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from hyperrec.core.ranker import (
    INPUT_CONTEXT,
    INPUT_ITEM_FEATURES,
    INPUT_ITEMS,
    INPUT_USER,
    OUTPUT_SCORES,
    OnnxRanker,
    check_signature,
)

log = logging.getLogger(__name__)

OPSET_VERSION = 18
#: Candidate counts cycled through by the parity check (1 catches broadcasting mistakes).
PARITY_CANDIDATES: tuple[int, ...] = (1, 7, 50, 200)
#: Rows (users) per parity batch, cycled until the requested number of rows is reached.
PARITY_BATCHES: tuple[int, ...] = (1, 3, 16, 64, 100)
#: Loggers of the exporter's stack that report every pass at INFO level or warn about optional packages.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


class ParityError(Exception):
    """The exported ONNX ranker disagrees with the PyTorch ranker beyond the tolerance."""

    def __init__(self, max_abs_diff: float, tolerance: float) -> None:
        """Record the observed and the allowed difference."""
        super().__init__(f"ONNX and PyTorch rankers differ by up to {max_abs_diff:.3g} (tolerance {tolerance:.3g})")
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


def export_ranker_onnx(ranker: nn.Module, embedding_dim: int, context_dim: int) -> bytes:
    """The ranker as a self-contained ONNX model with dynamic batch and candidate axes.

    Inputs are named "user", "context", "items" and the output "scores", as the
    server's contract requires. The module is exported in eval mode and left in
    whatever mode it was in.
    """
    features = item_feature_dim(ranker)
    example = _example_inputs(embedding_dim, context_dim, features)
    batch, candidates = Dim("batch"), Dim("candidates")
    dynamic_shapes = {
        INPUT_USER: {0: batch},
        INPUT_CONTEXT: {0: batch},
        INPUT_ITEMS: {0: batch, 1: candidates},
    }
    names = [INPUT_USER, INPUT_CONTEXT, INPUT_ITEMS]
    if features:
        dynamic_shapes[INPUT_ITEM_FEATURES] = {0: batch, 1: candidates}
        names.append(INPUT_ITEM_FEATURES)
    was_training = ranker.training
    ranker.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            path = Path(tmp) / "ranker.onnx"
            torch.onnx.export(
                ranker,
                example,
                str(path),
                input_names=names,
                output_names=[OUTPUT_SCORES],
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET_VERSION,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            data = path.read_bytes()
    finally:
        ranker.train(was_training)
    log.info("exported ranker to ONNX (%d bytes)", len(data))
    return data


def check_parity(
    ranker: nn.Module,
    onnx_bytes: bytes,
    embedding_dim: int,
    context_dim: int,
    rows: int = 1000,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> float:
    """Max |PyTorch - ONNX Runtime| score over `rows` random rows; ParityError when above `tolerance`.

    The rows are spread over batches of varying size and candidate count. The
    ONNX model is also checked against the serving contract (names, ranks,
    widths) with the same function the server uses when it loads a bundle.
    """
    session = _session(onnx_bytes)
    features = item_feature_dim(ranker)
    check_signature(session, "ranker.onnx", embedding_dim, context_dim, features)
    onnx_ranker = OnnxRanker(session)
    rng = np.random.default_rng(seed)
    was_training = ranker.training
    ranker.eval()
    worst = 0.0
    try:
        for batch, candidates in _parity_shapes(rows):
            user, context, items = _random_inputs(rng, batch, candidates, embedding_dim, context_dim)
            extra = rng.standard_normal((batch, candidates, features), dtype=np.float32) if features else None
            tensors = [torch.from_numpy(a) for a in (user, context, items) + ((extra,) if extra is not None else ())]
            with torch.no_grad():
                expected = ranker(*tensors).numpy()
            got = onnx_ranker.score(user, context, items, extra)
            if got.shape != expected.shape:
                raise ParityError(float("inf"), tolerance)
            worst = max(worst, float(np.max(np.abs(got - expected))))
    finally:
        ranker.train(was_training)
    if not worst <= tolerance:
        raise ParityError(worst, tolerance)
    log.info("ONNX parity: max abs diff %.3g over %d rows", worst, rows)
    return worst


def item_feature_dim(ranker: nn.Module) -> int:
    """How many per-item features the ranker takes (0 for rankers without them)."""
    return int(getattr(ranker, "item_feature_dim", 0))


def _example_inputs(embedding_dim: int, context_dim: int, features: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; batch 2 and 3 candidates so that neither axis gets specialised to 1."""
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, embedding_dim, generator=generator),
        torch.randn(2, context_dim, generator=generator),
        torch.randn(2, 3, embedding_dim, generator=generator),
    )
    return (*inputs, torch.randn(2, 3, features, generator=generator)) if features else inputs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back the exporter's progress prints, warnings and chatty loggers; they are noise in training logs.

    What it printed is passed on at DEBUG level; logger levels are restored afterwards.
    """
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    if sink.getvalue():
        log.debug("torch.onnx.export printed: %s", sink.getvalue().strip())


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    """A CPU ONNX Runtime session over the serialized model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _parity_shapes(rows: int) -> list[tuple[int, int]]:
    """(batch, candidates) pairs whose batches add up to exactly `rows`."""
    shapes: list[tuple[int, int]] = []
    left, step = rows, 0
    while left > 0:
        batch = min(left, PARITY_BATCHES[step % len(PARITY_BATCHES)])
        shapes.append((batch, PARITY_CANDIDATES[step % len(PARITY_CANDIDATES)]))
        left -= batch
        step += 1
    return shapes


def _random_inputs(
    rng: np.random.Generator, batch: int, candidates: int, embedding_dim: int, context_dim: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Standard-normal user, context and item tensors of the given shape."""
    user = rng.standard_normal((batch, embedding_dim), dtype=np.float32)
    context = rng.standard_normal((batch, context_dim), dtype=np.float32)
    items = rng.standard_normal((batch, candidates, embedding_dim), dtype=np.float32)
    return user, context, items
