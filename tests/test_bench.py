"""Functional tests of the benchmark code on tiny models (no timing assertions).

They check what the benchmark reports (structure, counts, files, the recorded settings), that
the hand-written DIA-ResNet used as the reference computes exactly what fxattn's compiled model
computes, and that the memory probe sees an allocation it is shown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from models import CifarResNet

import fxattn
from fxattn.bench import interleaved, summarize, train_step_benchmark
from fxattn.cli import main
from fxattn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _load_handwritten() -> object:
    spec = importlib.util.spec_from_file_location(
        "handwritten_dia", ROOT / "benchmarks" / "common" / "handwritten_dia.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("handwritten_dia", module)
    spec.loader.exec_module(module)
    return module


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return CifarResNet(depth=11, num_classes=10).eval()


def test_summarize_percentiles_and_interleaving_order() -> None:
    stats = summarize("x", [i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (stats.runs, stats.p50_ms, stats.p90_ms) == (100, pytest.approx(50.5),
                                                         pytest.approx(90.1))
    order: list[str] = []
    ticks: list[int] = []
    result = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                         runs=3, warmup=1, progress=lambda: ticks.append(1))
    assert order == ["a", "b"] * 4  # A/B alternate, warm-up round first
    assert len(ticks) == 4 and set(result) == {"a", "b"} and result["a"].runs == 3


def test_spinning_times_each_onnx_model_alone_in_alternating_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``spinning=True``: every onnxruntime session spins and is the only live one while it is
    timed; every model gets all its runs, and the result says how it was measured."""
    from fxattn.bench import onnx_models
    from fxattn.export import runtime

    live: list[int] = []  # which session ran, in order
    made: list[tuple[str, bool]] = []
    real = runtime.ort_session

    class Tracked:
        def __init__(self, path: str, spinning: bool, **kwargs: object) -> None:
            self.name, self.session = Path(path).stem, real(path, spinning=spinning, **kwargs)
            self.index = len(made)
            made.append((self.name, spinning))

        def get_inputs(self) -> object:
            return self.session.get_inputs()

        def run(self, *args: object) -> object:
            live.append(self.index)
            return self.session.run(*args)

    monkeypatch.setattr(onnx_models, "ort_session",
                        lambda path, threads=None, spinning=False: Tracked(
                            path, spinning, threads=threads))
    result = fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), ssia=False, batch_sizes=(1,),
                              threads=1, runs=5, warmup=1, engines=("onnxruntime",), cost=False,
                              spinning=True, progress=False, exporter="torchscript")
    stats = result.latency["onnxruntime"][1]
    assert list(stats) == ["original", "lean"] and all(s.runs == 5 for s in stats.values())
    blocks = result.settings["spinning_blocks"]
    assert blocks == 4 and result.machine["ort_allow_spinning"] == 1
    # one spinning session per model and block, the order alternating; each session runs
    # all its runs (warm-up included) before the next one is made
    assert made == [(n, True) for pair in (("original", "lean"), ("lean", "original"))
                    for n in pair] * 2
    assert live == sorted(live) and sorted(set(live)) == list(range(len(made)))
    assert len(live) == 2 * (5 + blocks * 1)  # runs + a warm-up per block, per model
    assert "allow_spinning=1" in result.to_markdown()


def test_benchmark_reports_every_model_engine_and_batch(tmp_path: Path) -> None:
    model = _tiny()
    copy_in_training_mode = CifarResNet(depth=11, num_classes=10)
    result = fxattn.benchmark(
        model, torch.randn(2, 3, 32, 32), dia=True, ssia=True, batch_sizes=(1, 2), threads=1,
        runs=2, warmup=1, extra={"copy": copy_in_training_mode},
        dia_weights=("int8", "fp32+fold"), out_dir=tmp_path, progress=False, command="test",
    )
    onnx_models = ["original", "lean", "copy", "lean-int8", "lean-fp32+fold"]
    assert copy_in_training_mode.training  # timed as an eval copy; the caller's module untouched
    assert list(result.latency) == ["torch", "onnxruntime"]
    assert list(result.latency["torch"]) == [1, 2]
    assert list(result.latency["torch"][1]) == ["original", "lean", "copy"]
    assert list(result.latency["onnxruntime"][2]) == onnx_models
    assert all(st.runs == 2 for by_b in result.latency.values() for by_m in by_b.values()
               for st in by_m.values())
    assert result.ratio("onnxruntime", 1, "original") == 1.0
    # DIA adds parameters and nodes; an identical copy exports the identical node list
    base, lean = result.models["original"], result.models["lean"]
    assert lean.parameters > base.parameters and lean.onnx_nodes > base.onnx_nodes
    assert result.same_onnx_ops("original", "copy") and not result.same_onnx_ops("original", "lean")
    # every DIA Gemm left after export_onnx's exact rewrites (the state fold included) is
    # quantised; folding again finds nothing more
    dia_gemms = lean.onnx_ops.count("Gemm") - base.onnx_ops.count("Gemm")
    assert 0 < dia_gemms < 4 * 3  # 3 sites, the first of each group folded
    assert result.models["lean-int8"].onnx_ops.count("MatMulNBits") == dia_gemms
    assert result.models["lean-fp32+fold"].onnx_nodes == lean.onnx_nodes
    assert set(result.cost) == {"lean", "copy", "lean-int8", "lean-fp32+fold"}
    assert lean.transform_seconds is not None and lean.export_seconds is not None
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["ort_allow_spinning"] == 0
    assert saved["machine"]["torch_num_threads"] == 1
    assert saved["machine"]["ort_intra_op_num_threads"] == 1
    assert set(saved["latency"]["onnxruntime"]["1"]) == set(onnx_models)
    text = (tmp_path / "bench.md").read_text()
    assert "test" in text and "allow_spinning=0" in text and "| onnxruntime | 2 | lean |" in text
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "lean.onnx").exists()


def test_ssia_only_lean_model_exports_the_original_node_list() -> None:
    result = fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), dia=False, ssia=True,
                              batch_sizes=(2,), threads=1, runs=1, warmup=0,
                              engines=("onnxruntime",), progress=False, exporter="torchscript")
    assert result.same_onnx_ops("original", "lean")
    assert result.models["lean"].parameters == result.models["original"].parameters
    assert "torch" not in result.latency


def test_benchmark_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="engines"):
        fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), engines=("tvm",))
    with pytest.raises(ConfigError, match="batch sizes"):
        fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), batch_sizes=(0,))
    with pytest.raises(ConfigError, match="exporter must be one of auto, dynamo, torchscript"):
        fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), exporter="jit")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_handwritten_dia_resnet_equals_fxattn_lean_model(name: str) -> None:
    handwritten = _load_handwritten()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, dia=True, ssia=False))
    hand = handwritten.hand_dia_resnet(name, num_classes=10).eval()
    handwritten.load_fxattn_dia(hand, lean)
    assert sum(p.numel() for p in hand.parameters()) == sum(p.numel() for p in lean.parameters())
    with torch.no_grad():
        torch.testing.assert_close(hand(x), lean(x), rtol=0, atol=1e-5)


def test_train_step_benchmark_trains_each_candidate() -> None:
    model = _tiny()
    net = fxattn.transform(model, torch.randn(2, 3, 32, 32), dia=True, ssia=True)
    target = torch.tensor([1, 2])
    ce = torch.nn.functional.cross_entropy
    before = {k: v.clone() for k, v in net.state_dict().items() if "fxattn_dia" in k}
    stats = train_step_benchmark(
        {"baseline": (model, lambda m, x: ce(m(x), target)),
         "dia+ssia": (net, lambda m, x: ce(m(x), target) + fxattn.ssia_loss(m))},
        torch.randn(2, 3, 32, 32), runs=2, warmup=1)
    assert set(stats) == {"baseline", "dia+ssia"} and stats["baseline"].runs == 2
    after = net.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # DIA was trained


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_step_memory_sees_a_step_allocation() -> None:
    # a fresh process with large allocations mmap-ed, as benchmarks/training.py runs it
    code = (
        "import json, torch\n"
        "from fxattn.bench import peak_step_memory\n"
        "def step():\n"
        "    buffer = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched\n"
        "    del buffer\n"
        "print(json.dumps(peak_step_memory(step, steps=2)))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    memory = json.loads(out.strip().splitlines()[-1])
    assert 60 <= memory["delta_mb"] <= 80  # one 64 MB buffer at a time, freed between steps
    assert memory["peak_mb"] == pytest.approx(memory["rss_before_mb"] + memory["delta_mb"])


def test_cli_bench_writes_json_markdown_and_png(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "models:CifarResNet", "--model-kwargs",
                 '{"depth": 11, "num_classes": 10}', "--input-shape", "2,3,32,32",
                 "--no-ssia", "--batch", "1,2", "--threads", "1", "--runs", "2", "--warmup", "1",
                 "--engines", "onnxruntime", "--dia-weights", "int4", "--spinning",
                 "--exporter", "torchscript", "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["latency"]["onnxruntime"]["2"]) == {"original", "lean", "lean-int4"}
    assert saved["settings"]["batch_sizes"] == [1, 2] and saved["settings"]["spinning"]
    assert saved["settings"]["exporter"] == "torchscript"
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.png").exists()
    assert "| onnxruntime | 1 | lean-int4 |" in capsys.readouterr().out


def test_cost_account_counts_dia_matrix_bytes_and_extra_passes() -> None:
    """One DIA site per group (64, 128, 256 channels): the folded lean model reads the input
    path's two matrices per site, the first composed with the pooled convolution (C/4 x C/4,
    then 4C x C/4: 4.25 C^2 bytes in fp32), the unoptimised one both paths' (10 C^2); the
    exact rewrites leave fewer extra activation bytes in onnxruntime's graph (the pool
    runs blocked, on the narrower input of the last convolution where that reads less)."""
    torch.manual_seed(0)
    model = CifarResNet(depth=11, num_classes=10).eval()
    result = fxattn.benchmark(model, torch.randn(2, 3, 32, 32), ssia=False, batch_sizes=(1, 2),
                              threads=1, runs=2, warmup=1, engines=("onnxruntime",),
                              unoptimized=True, dia_weights=("int8",), progress=False)
    lean, noopt, int8 = (result.cost[name][2] for name in ("lean", "lean-noopt", "lean-int8"))
    assert lean.dia_matrix_bytes == 17 * (64**2 + 128**2 + 256**2) // 4
    assert noopt.dia_matrix_bytes == 10 * (64**2 + 128**2 + 256**2)
    assert int8.dia_matrix_bytes < lean.dia_matrix_bytes / 3  # 1 byte a weight + block scales
    assert lean.extra_activation_bytes < noopt.extra_activation_bytes
    assert noopt.extra_ops["ReduceMean"] == 3 and "GlobalAveragePool" not in noopt.extra_ops
    assert lean.extra_ops["GlobalAveragePool"] == 3 and "ReduceMean" not in lean.extra_ops
    assert lean.bandwidth_gb_s > 0 and lean.lower_bound_ms > 0 and lean.multiple is not None
    # the traffic limit: each site's branch output (batch 2, 32x32 input) written and read once
    # more; onnxruntime's graph moves at least that, and a hand-written DIA has no fxattn sites
    assert lean.site_bytes == 2 * 4 * (64 * 32**2 + 128 * 16**2 + 256 * 8**2)
    assert lean.extra_activation_bytes >= 2 * lean.site_bytes
    assert 0 < lean.traffic_limit_ms < lean.lower_bound_ms and lean.multiple_of_limit is not None
    saved = result.to_dict()["cost"]["lean"]["1"]
    assert saved["dia_matrix_mb_per_image"] == pytest.approx(lean.dia_matrix_bytes / 1e6)
    assert "DIA's cost account" in result.to_markdown()


def test_compiled_variants_are_timed_at_their_own_batch(tmp_path: Path) -> None:
    """``compiled=True``: ``lean`` and each low-precision variant compiled for onnxruntime's CPU
    at every batch size, timed beside the portable files (both timing protocols), with a cost
    account whose branch-output bytes come from the portable source and whose passes include
    the fused depthwise convolutions."""
    from fxattn.deploy import nchwc_block_size

    torch.manual_seed(0)
    model = CifarResNet(depth=11, num_classes=10).eval()
    for spinning in (False, True):  # TorchScript exports: fused as dynamo's (test_ort_cpu)
        result = fxattn.benchmark(model, torch.randn(2, 3, 32, 32), ssia=False,
                                  batch_sizes=(1, 2), threads=1, runs=2, warmup=1,
                                  engines=("onnxruntime",), dia_weights=("int8",), compiled=True,
                                  spinning=spinning, cost=not spinning, exporter="torchscript",
                                  out_dir=tmp_path / str(spinning), progress=False)
        compiled_names = ["original-ort-cpu", "lean-ort-cpu", "lean-int8-ort-cpu"]
        names = ["original", "lean", "lean-int8", *compiled_names]
        for batch in (1, 2):
            assert list(result.latency["onnxruntime"][batch]) == names
            written = sorted(p.name for p in (tmp_path / str(spinning)).glob(f"*.b{batch}.onnx"))
            assert written == sorted(f"{name}.b{batch}.onnx" for name in compiled_names)
        entry = result.models["lean-ort-cpu"]
        fused = 3 if nchwc_block_size() else 0
        assert entry.parameters == result.models["lean"].parameters
        assert f"DIA multiplies fused {fused} of 3" in entry.note
        assert result.settings["compiled"] is True
        if spinning:
            continue  # the cost account does not depend on the timing protocol
        assert "original-ort-cpu" not in result.cost  # the compiled models' baseline
        compiled, portable = result.cost["lean-ort-cpu"][2], result.cost["lean"][2]
        stats = result.latency["onnxruntime"][2]
        assert compiled.added_ms == stats["lean-ort-cpu"].p50_ms - stats["original-ort-cpu"].p50_ms
        assert compiled.site_bytes == portable.site_bytes
        assert compiled.dia_matrix_bytes == portable.dia_matrix_bytes
        if fused:  # one convolution a site: the fused multiply, or the scaling of the weights
            # that h is folded into (the scaled convolution replaces the original's)
            assert compiled.extra_ops.get("Conv", 0) == 3
            assert 0 < compiled.extra_activation_bytes < portable.extra_activation_bytes


def test_a_low_precision_variant_that_fails_its_tolerance_is_reported_not_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """int4 DIA weights held to a tolerance no quantisation meets fail verification: the
    benchmark still times every other model and records why that one is missing."""
    from fxattn.config import Tolerance
    from fxattn.export import lowp

    real = lowp.tolerance
    monkeypatch.setattr(lowp, "tolerance", lambda mode, base: Tolerance(
        atol=1e-12, rtol=1e-12, float64_check=False) if mode == "int4" else real(mode, base))
    result = fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), ssia=False, batch_sizes=(1,),
                              threads=1, runs=2, warmup=1, engines=("onnxruntime",),
                              dia_weights=("int8", "int4"), progress=False,
                              exporter="torchscript")
    assert "lean-int4" not in result.models and "lean-int8" in result.models
    assert set(result.latency["onnxruntime"][1]) == {"original", "lean", "lean-int8"}
    (error,) = result.settings["dia_weights_failed_verification"].values()
    assert "onnxruntime and PyTorch disagree" in error
