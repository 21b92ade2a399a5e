"""Where the index and the ranker run, and what the accelerator metric says.

CPU is the default and what these tests run for real: a real FAISS index, a real bundle, a real ONNX Runtime
session and a real ModelManager. There is no GPU on the machines that run this suite, so the GPU selection logic
is tested with FAISS's GPU entry points (get_num_gpus, StandardGpuResources, index_cpu_to_gpu) and ONNX Runtime's
get_available_providers replaced by fakes; those tests say so. scripts/gpu_check.sh runs the real GPU path on a
machine that has one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY

from hyperrec.core import metrics
from hyperrec.core.bundle import Bundle
from hyperrec.core.model_manager import ModelManager, VersionLoadSettings, record_accelerators
from hyperrec.core.pipeline import BundleSlot
from hyperrec.core.ranker import ACCELERATOR_DEVICES, PREFERRED_PROVIDERS, choose_providers, device_of
from hyperrec.index import FLAT, HNSW, IVF, IndexParams, build, faiss_common, load
from tests.helpers import publish_toy

# The "for real" tests describe a machine without a GPU (CI); where FAISS or ONNX Runtime sees one, they do not apply.
cpu_only = pytest.mark.skipif(
    faiss_common.gpu_count() > 0 or device_of(choose_providers()) != "cpu",
    reason="this machine has a GPU build and a GPU: scripts/gpu_check.sh covers it",
)


def accelerator(component: str, device: str) -> float | None:
    return REGISTRY.get_sample_value("hyperrec_accelerator_info", {"component": component, "device": device})


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    out: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return out


# --- CPU, for real ---------------------------------------------------------------------------------------------


@cpu_only
def test_this_machine_has_no_gpu_for_faiss_so_auto_stays_on_cpu(tmp_path: Path, caplog: Any) -> None:
    """Real faiss-cpu: no GPU support, so "auto" (the load default) keeps the index on the CPU and says why."""
    assert faiss_common.gpu_count() == 0
    emb = unit_vectors(1_000, 8)
    built = build(emb, IndexParams(IVF, nlist=16, nprobe=4))
    assert built.device == "cpu"
    built.save(tmp_path / "index.faiss")
    with caplog.at_level(logging.INFO, logger="hyperrec.index.faiss_common"):
        loaded = load(tmp_path / "index.faiss", built.params)
    assert loaded.device == "cpu"
    assert "on cpu (device auto: FAISS has no GPU support or sees no GPU)" in caplog.text
    q = unit_vectors(3, 8, seed=1)
    for left, right in zip(built.search(q, 10), loaded.search(q, 10), strict=True):
        np.testing.assert_array_equal(left, right)


@cpu_only
def test_asking_for_a_gpu_where_there_is_none_fails_and_a_bundle_load_names_the_index(tmp_path: Path) -> None:
    emb = unit_vectors(200, 8)
    with pytest.raises(ValueError, match="index device gpu asked for, but FAISS has no GPU support"):
        build(emb, IndexParams(FLAT), device="gpu")
    with pytest.raises(ValueError, match="index device must be one of"):
        build(emb, IndexParams(FLAT), device="tpu")
    version = publish_toy(tmp_path / "repo", n_items=200)
    with pytest.raises(Exception, match=r"index\.faiss.*index device gpu asked for"):
        Bundle.load(version, index_device="gpu")


@cpu_only
async def test_activating_a_real_bundle_reports_cpu_for_ranker_and_index(tmp_path: Path) -> None:
    """A real bundle served by a real ModelManager on this CPU-only machine: both components report cpu."""
    repo = tmp_path / "repo"
    publish_toy(repo, n_items=300)
    # Start from a state that a previous activation on a GPU machine could have left.
    metrics.ACCELERATOR.labels("index", "cuda").set(1)
    metrics.ACCELERATOR.labels("ranker", "tensorrt").set(1)
    loader = ThreadPoolExecutor(max_workers=1)
    try:
        manager = ModelManager(repo, "toy", BundleSlot(), VersionLoadSettings(warmup_requests=2), loader)
        assert await manager.reconcile() == 1
    finally:
        loader.shutdown(wait=True)
    assert accelerator("index", "cpu") == 1
    assert accelerator("index", "cuda") == 0
    assert accelerator("index", "tensorrt") == 0
    assert accelerator("ranker", "cpu") == 1
    assert accelerator("ranker", "cuda") == 0
    assert accelerator("ranker", "tensorrt") == 0


@cpu_only
def test_a_real_bundle_loads_on_cpu_with_the_cpu_provider(tmp_path: Path) -> None:
    bundle = Bundle.load(publish_toy(tmp_path / "repo", n_items=300))
    assert bundle.index.device == "cpu"
    assert bundle.ranker.providers == ("CPUExecutionProvider",)
    assert bundle.ranker.device == "cpu"


# --- GPU selection logic, with the GPU faked (no GPU exists here) -----------------------------------------------


class FakeGpuIndex:
    """Stands in for a GpuIndex: searches the CPU index it was copied from and counts its calls."""

    def __init__(self, cpu_index: Any) -> None:
        self.cpu_index = cpu_index
        self.searches: list[tuple[int, Any]] = []

    def search(self, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        self.searches.append((k, params))
        scores, rows = self.cpu_index.search(q, k, params=params)
        return scores, rows


class FakeGpu:
    """FAISS's GPU entry points for a machine with `gpus` GPUs; records what was copied and with which resources."""

    def __init__(self, gpus: int = 1) -> None:
        self.gpus = gpus
        self.resources_made = 0
        self.copies: list[tuple[Any, int, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class StandardGpuResources:
            def __init__(self) -> None:
                fake.resources_made += 1

        def index_cpu_to_gpu(resources: Any, device: int, index: Any) -> FakeGpuIndex:
            assert isinstance(resources, StandardGpuResources)
            fake.copies.append((resources, device, type(index).__name__))
            return FakeGpuIndex(index)

        monkeypatch.setattr(faiss, "StandardGpuResources", StandardGpuResources, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: fake.gpus)
        monkeypatch.setattr(faiss_common, "_gpu_resources", None)  # a fresh process as far as the shared resources go


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    """One GPU as far as FAISS can tell (faked: this machine has none)."""
    gpu = FakeGpu()
    gpu.install(monkeypatch)
    return gpu


def test_auto_moves_flat_and_ivf_indexes_to_gpu_0_sharing_one_resources_object(fake_gpu: FakeGpu) -> None:
    """GPU faked (none here): "auto" copies IndexFlatIP and IndexIVFFlat to GPU 0 and searches there."""
    emb = unit_vectors(2_000, 8)
    flat = build(emb, IndexParams(FLAT), device="auto")
    ivf = build(emb, IndexParams(IVF, nlist=32, nprobe=8), device="auto")
    assert (flat.device, ivf.device) == ("cuda", "cuda")
    assert [(device, kind) for _, device, kind in fake_gpu.copies] == [(0, "IndexFlatIP"), (0, "IndexIVFFlat")]
    assert fake_gpu.resources_made == 1 and fake_gpu.copies[0][0] is fake_gpu.copies[1][0]
    assert ivf.kind_name == "IndexIVFFlat"  # checks and saving still see the CPU index
    ivf.check_params()
    q = unit_vectors(2, 8, seed=3)
    _, rows = ivf.search(q, 10)
    assert rows.dtype == np.int64 and rows.shape == (2, 10)
    assert isinstance(ivf, faiss_common.FaissIndex)
    gpu_index = ivf._gpu_index
    assert [(k, p.nprobe) for k, p in gpu_index.searches] == [(10, 8)]  # nprobe reaches the GPU index per call


def test_searches_beyond_gpu_limits_use_the_cpu_copy(fake_gpu: FakeGpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU faked (none here): top-k or nprobe above GPU_MAX_K go to the CPU index, with the same results."""
    monkeypatch.setattr(faiss_common, "GPU_MAX_K", 16)
    emb = unit_vectors(2_000, 8)
    params = IndexParams(IVF, nlist=32, nprobe=8)
    on_gpu = build(emb, params, device="auto")
    on_cpu = build(emb, params)
    q = unit_vectors(1, 8, seed=4)
    assert isinstance(on_gpu, faiss_common.FaissIndex)
    gpu_index = on_gpu._gpu_index
    on_gpu.search(q, 16)
    assert len(gpu_index.searches) == 1
    for exhaustive, k in ((False, 17), (True, 5)):  # k above the limit; nprobe = nlist = 32 above it
        for left, right in zip(
            on_gpu.search(q, k, exhaustive=exhaustive), on_cpu.search(q, k, exhaustive=exhaustive), strict=True
        ):
            np.testing.assert_array_equal(left, right)
    assert len(gpu_index.searches) == 1


def test_auto_keeps_hnsw_on_cpu_and_gpu_refuses_it(fake_gpu: FakeGpu) -> None:
    """GPU faked (none here): an index type GPU FAISS does not run here (HNSW) stays on the CPU under "auto"."""
    emb = unit_vectors(500, 8)
    params = IndexParams(HNSW, hnsw_m=16)
    index = build(emb, params, device="auto")
    assert index.device == "cpu" and index.kind_name == "IndexHNSWFlat"
    assert fake_gpu.copies == []
    _, rows = index.search(unit_vectors(1, 8, seed=5), 5)
    assert rows.shape == (1, 5)
    with pytest.raises(ValueError, match="IndexHNSWFlat does not run on GPU FAISS"):
        build(emb, params, device="gpu")


def test_cpu_never_moves_an_index_even_with_a_gpu(fake_gpu: FakeGpu, tmp_path: Path) -> None:
    """GPU faked (none here): device "cpu", given to an index load or a bundle load, never copies."""
    emb = unit_vectors(500, 8)
    build(emb, IndexParams(FLAT)).save(tmp_path / "index.faiss")
    assert load(tmp_path / "index.faiss", IndexParams(FLAT), device="cpu").device == "cpu"
    version = publish_toy(tmp_path / "repo", n_items=300)
    assert Bundle.load(version, index_device="cpu").index.device == "cpu"
    assert fake_gpu.copies == []
    assert load(tmp_path / "index.faiss", IndexParams(FLAT)).device == "cuda"  # the default is "auto"
    assert Bundle.load(version).index.device == "cuda"
    assert [kind for _, _, kind in fake_gpu.copies] == ["IndexFlatIP", "IndexFlatIP"]


def test_a_failed_copy_keeps_auto_on_cpu_and_fails_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU faked (none here): when the copy raises (say, out of GPU memory), "auto" serves from the CPU."""
    FakeGpu().install(monkeypatch)

    def out_of_memory(resources: Any, device: int, index: Any) -> Any:
        raise RuntimeError("cudaMalloc error out of memory")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", out_of_memory, raising=False)
    emb = unit_vectors(200, 8)
    assert build(emb, IndexParams(FLAT), device="auto").device == "cpu"
    with pytest.raises(ValueError, match="out of memory"):
        build(emb, IndexParams(FLAT), device="gpu")


def test_a_faked_gpu_bundle_sets_the_index_metric_to_cuda(fake_gpu: FakeGpu, tmp_path: Path) -> None:
    """GPU faked for FAISS only (none here): the metric follows the index to cuda; the ranker stays cpu."""
    bundle = Bundle.load(publish_toy(tmp_path / "repo", n_items=300))
    assert bundle.index.device == "cuda"
    record_accelerators(bundle)
    assert [accelerator("index", d) for d in ACCELERATOR_DEVICES] == [0, 1, 0]
    assert [accelerator("ranker", d) for d in ACCELERATOR_DEVICES] == [1, 0, 0]


def test_providers_prefer_tensorrt_then_cuda_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's provider list faked (no GPU build here); the order and the fallback are ours."""
    every = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider"]
    for available, expected in (
        (every, list(PREFERRED_PROVIDERS)),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ([], ["CPUExecutionProvider"]),
    ):
        monkeypatch.setattr(ort, "get_available_providers", lambda available=available: list(available))
        assert choose_providers() == expected
    monkeypatch.setattr(ort, "get_available_providers", lambda: every)
    assert choose_providers(("CUDAExecutionProvider", "CPUExecutionProvider")) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


@cpu_only
def test_the_real_provider_choice_here_is_cpu() -> None:
    assert choose_providers() == ["CPUExecutionProvider"]
    assert device_of(choose_providers()) == "cpu"


def test_device_of_maps_the_first_provider() -> None:
    assert device_of(PREFERRED_PROVIDERS) == "tensorrt"
    assert device_of(("CUDAExecutionProvider", "CPUExecutionProvider")) == "cuda"
    assert device_of(("CPUExecutionProvider",)) == "cpu"
    assert device_of(("AzureExecutionProvider", "CPUExecutionProvider")) == "cpu"
    assert device_of(()) == "cpu"
    assert set(ACCELERATOR_DEVICES) == {"cpu", "cuda", "tensorrt"}


@cpu_only
def test_record_accelerators_is_idempotent_per_bundle(tmp_path: Path) -> None:
    bundle = Bundle.load(publish_toy(tmp_path / "repo", n_items=200))
    for _ in range(2):
        record_accelerators(bundle)
    assert [accelerator("ranker", d) for d in ACCELERATOR_DEVICES] == [1, 0, 0]
    assert [accelerator("index", d) for d in ACCELERATOR_DEVICES] == [1, 0, 0]
