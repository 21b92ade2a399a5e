"""The context-aware ranker, an ONNX model run by ONNX Runtime.

Contract (checked at load time against the bundle's feature spec):
  inputs  user    float32 [batch, embedding_dim]
          context float32 [batch, context_dim]
          items   float32 [batch, candidates, embedding_dim]
          item_features float32 [batch, candidates, item_feature_dim]   (only when the spec has item features)
  output  scores  float32 [batch, candidates]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hyperrec.core.errors import BundleError

log = logging.getLogger(__name__)

INPUT_USER = "user"
INPUT_CONTEXT = "context"
INPUT_ITEMS = "items"
INPUT_ITEM_FEATURES = "item_features"
OUTPUT_SCORES = "scores"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Devices a ranker can run on (the `device` label of hyperrec_accelerator_info), by execution provider.
DEVICE_OF_PROVIDER = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}
ACCELERATOR_DEVICES = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class RankerOptions:
    """ONNX Runtime session settings."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] | None = None  # None: best available from PREFERRED_PROVIDERS


def choose_providers(requested: tuple[str, ...] | None = None) -> list[str]:
    """TensorRT, then CUDA, then CPU, restricted to what this onnxruntime build offers."""
    available = set(ort.get_available_providers())
    wanted = requested or PREFERRED_PROVIDERS
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


class RankingStopped(Exception):
    """A ranking run gave up because its `RankingRun.stop()` was called (it ran past its budget)."""


class RankingRun:
    """Stop handle of one ranking call: `stop()`, from any thread, makes a run in progress give up at its next
    operator (ONNX Runtime's terminate flag) and a run not yet started give up at once."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()

    def stop(self) -> None:
        self.options.terminate = True

    @property
    def stopped(self) -> bool:
        return bool(self.options.terminate)


def device_of(providers: Sequence[str]) -> str:
    """The device a session with `providers` (in priority order) runs on: its first provider's, "cpu" by default.

    ONNX Runtime assigns each node to the first provider that can run it, so the first one names where the model
    mostly runs (TensorRT sessions also list CUDA and CPU for the nodes TensorRT leaves out)."""
    return DEVICE_OF_PROVIDER.get(providers[0], "cpu") if providers else "cpu"


class OnnxRanker:
    """Scores candidate items for users in contexts. `score` is safe to call from several threads."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.providers = tuple(session.get_providers())
        self.device = device_of(self.providers)

    @classmethod
    def load(
        cls, path: Path, embedding_dim: int, context_dim: int, options: RankerOptions, item_feature_dim: int = 0
    ) -> OnnxRanker:
        """Open `path` and check its inputs and output against the feature spec."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the few cores that gRPC and FAISS also need.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), so, providers=choose_providers(options.providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
            raise BundleError(path.name, f"ONNX Runtime cannot load it: {exc}") from exc
        check_signature(session, path.name, embedding_dim, context_dim, item_feature_dim)
        ranker = cls(session)
        log.info("ranker %s loaded with providers %s (device %s)", path, ",".join(ranker.providers), ranker.device)
        return ranker

    def score(
        self,
        user: np.ndarray,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray | None = None,
        run: RankingRun | None = None,
    ) -> np.ndarray:
        """Scores [batch, candidates]. Raises RankingStopped when `run` was stopped before or during the run."""
        feeds = {INPUT_USER: user, INPUT_CONTEXT: context, INPUT_ITEMS: items}
        if item_features is not None:
            feeds[INPUT_ITEM_FEATURES] = item_features
        try:
            (scores,) = self._session.run([OUTPUT_SCORES], feeds, None if run is None else run.options)
        except Exception as exc:  # onnxruntime's Fail carries the terminate flag as a message only
            if run is not None and run.stopped:
                raise RankingStopped("ranking stopped past its budget") from exc
            raise
        return np.asarray(scores, dtype=np.float32)


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def check_signature(
    session: ort.InferenceSession, file: str, embedding_dim: int, context_dim: int, item_feature_dim: int = 0
) -> None:
    """Raise BundleError naming `file` when the model's inputs or output don't match the spec."""
    expected = {
        INPUT_USER: (2, {1: embedding_dim}),
        INPUT_CONTEXT: (2, {1: context_dim}),
        INPUT_ITEMS: (3, {2: embedding_dim}),
    }
    if item_feature_dim:
        expected[INPUT_ITEM_FEATURES] = (3, {2: item_feature_dim})
    inputs = {i.name: i for i in session.get_inputs()}
    if set(inputs) != set(expected):
        raise BundleError(file, f"inputs are {sorted(inputs)}, expected {sorted(expected)}")
    for name, (rank, fixed) in expected.items():
        arg = inputs[name]
        if arg.type != "tensor(float)":
            raise BundleError(file, f"input {name!r} has type {arg.type}, expected tensor(float)")
        if len(arg.shape) != rank:
            raise BundleError(file, f"input {name!r} has rank {len(arg.shape)}, expected {rank}")
        for axis, size in fixed.items():
            if _fixed(arg.shape[axis]) != size:
                raise BundleError(
                    file, f"input {name!r} has width {arg.shape[axis]} on axis {axis}, feature spec says {size}"
                )
    outputs = {o.name: o for o in session.get_outputs()}
    if OUTPUT_SCORES not in outputs:
        raise BundleError(file, f"outputs are {sorted(outputs)}, expected one named {OUTPUT_SCORES!r}")
    scores = outputs[OUTPUT_SCORES]
    if scores.type != "tensor(float)" or len(scores.shape) != 2:
        raise BundleError(
            file,
            f"output {OUTPUT_SCORES!r} is {scores.type} of rank {len(scores.shape)}, expected tensor(float) [b, n]",
        )
