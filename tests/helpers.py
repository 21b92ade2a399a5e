"""Builders for small real bundles, without training: an ONNX ranker written with onnx.helper.

The ranker computes scores[b, n] = sum_d(items * user) + context @ w, a real ONNX
graph run by ONNX Runtime; tests choose `w` to plant a context effect.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from hyperrec.core.bundle import BundleContents, ColdStart, publish_bundle
from hyperrec.core.features import FeatureSpec, default_feature_spec
from hyperrec.index import IndexParams


def make_ranker_onnx(
    embedding_dim: int,
    context_dim: int,
    context_weights: np.ndarray | None = None,
    input_names: tuple[str, str, str] = ("user", "context", "items"),
    item_feature_dim: int = 0,
    scores_rank3: bool = False,
) -> bytes:
    """A dot-product ranker with a linear context term (plus the sum of the item features, when it takes them)."""
    w = np.zeros((context_dim, 1), np.float32) if context_weights is None else context_weights.reshape(-1, 1)
    u_name, c_name, i_name = input_names
    nodes = [
        helper.make_node("Unsqueeze", [u_name, "axis1"], ["u3"]),
        helper.make_node("Mul", [i_name, "u3"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axis2"], ["dot"], keepdims=0),
        helper.make_node("MatMul", [c_name, "w"], ["ctx_score"]),
        helper.make_node("Add", ["dot", "ctx_score"], ["scores" if not item_feature_dim else "base"]),
    ]
    extra_inputs = []
    if item_feature_dim:
        nodes += [
            helper.make_node("ReduceSum", ["item_features", "axis2"], ["feature_sum"], keepdims=0),
            helper.make_node("Add", ["base", "feature_sum"], ["scores"]),
        ]
        extra_inputs = [helper.make_tensor_value_info("item_features", TensorProto.FLOAT, ["b", "n", item_feature_dim])]
    scores_shape: list[str | int] = ["b", "n"]
    if scores_rank3:  # a broken export: scores [b, n, 1]
        nodes[-1].output[0] = "flat_scores"
        nodes.append(helper.make_node("Unsqueeze", ["flat_scores", "axis2"], ["scores"]))
        scores_shape = ["b", "n", 1]
    graph = helper.make_graph(
        nodes,
        "test_ranker",
        [
            helper.make_tensor_value_info(u_name, TensorProto.FLOAT, ["b", embedding_dim]),
            helper.make_tensor_value_info(c_name, TensorProto.FLOAT, ["b", context_dim]),
            helper.make_tensor_value_info(i_name, TensorProto.FLOAT, ["b", "n", embedding_dim]),
            *extra_inputs,
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, scores_shape)],
        initializer=[
            numpy_helper.from_array(w.astype(np.float32), "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_contents(
    n_items: int = 300,
    dim: int = 8,
    seed: int = 0,
    model_name: str = "toy",
    index_params: IndexParams | None = None,
    spec: FeatureSpec | None = None,
    ranker: bytes | None = None,
    categories: int = 0,
) -> BundleContents:
    """Random unit-norm item embeddings, a dot-product ranker and popularity lists.

    With `categories` > 0, item i belongs to category f"cat-{i % categories}" and its embedding lies near
    that category's random centre, so engaging with a category moves a folded-in user vector toward it.
    """
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_items, dim)).astype(np.float32)
    item_categories = None
    if categories:
        centres = rng.normal(size=(categories, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        emb = centres[np.arange(n_items) % categories] + 0.25 * emb / np.sqrt(dim)
        item_categories = [(f"cat-{i % categories}",) for i in range(n_items)]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"item-{i:05d}" for i in range(n_items)]
    spec = spec or default_feature_spec(dim)
    popular = tuple((ids[i], round(1.0 / (i + 1), 6)) for i in range(min(n_items, 50)))
    mobile_evening = tuple((ids[i], 0.5) for i in range(n_items - 1, n_items - 11, -1))
    return BundleContents(
        model_name=model_name,
        item_ids=ids,
        item_embeddings=emb,
        ranker_onnx=ranker or make_ranker_onnx(dim, spec.context_dim),
        feature_spec=spec,
        cold_start=ColdStart(popular, {"device=mobile|daypart=evening": mobile_evening}),
        index_params=index_params or IndexParams.choose(n_items),
        embedding_space=uuid.uuid4().hex,
        training={"kind": "test fixture"},
        item_categories=item_categories,
    )


def publish_toy(repo: Path, **kwargs: object) -> Path:
    return publish_bundle(repo, make_contents(**kwargs))  # type: ignore[arg-type]


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A Prometheus sample of the default registry (this process's server), 0 when it has none yet."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- waiting for a condition ------------------------------------------------------------------------------------
# A test that needs something to have happened (a server up, a version picked up, a call in flight) polls for it
# with a bound, instead of sleeping a guessed time: fast when the machine is fast, and a clear failure when the
# thing never happens. The bound is generous (a slow, shared machine must not fail a correct server); how long
# the wait took is never asserted.

Description = str | Callable[[], str]


def _timed_out(what: Description, timeout_s: float) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {text}")


def wait_until(
    condition: Callable[[], object], what: Description, timeout_s: float = 15.0, interval_s: float = 0.05
) -> Any:
    """Call `condition` every `interval_s` until it returns something truthy, and return that.

    Fails with an AssertionError naming `what` (a string, or a function giving one at that moment, to show the
    last state seen) once `timeout_s` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s)
        time.sleep(interval_s)


async def wait_until_async(
    condition: Callable[[], object], what: Description, timeout_s: float = 15.0, interval_s: float = 0.05
) -> Any:
    """`wait_until` on the event loop: `condition` may be a plain or an async function; the loop keeps running
    between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s)
        await asyncio.sleep(interval_s)


# --- grpc.health.v1 -----------------------------------------------------------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 5.0) -> int:
    """The health status of `service` ("" is the whole server) over an asyncio channel; a failed call raises."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the generated stub's types describe the sync API
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return int(reply.status)


def health_status_sync(health: Any, service: str = "") -> int | None:
    """The health status of `service` from a sync HealthStub, or None when the call fails (a server still
    starting, or gone)."""
    try:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status)
    except grpc.RpcError:
        return None


def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    """Wait until the server at `target` (a process still starting up) says SERVING on its health service."""
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: health_status_sync(health) == SERVING, f"{target} to report SERVING", timeout_s, 0.1)
