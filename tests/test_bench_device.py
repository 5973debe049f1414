"""The device side of the benchmark, checked on the CPU: a missing GPU is a clear error, the
operator account counts what DIA adds, every PyTorch mode that runs on a CPU runs through
``fxattn.benchmark`` and ``fxattn bench``, and ``benchmarks/gpu.py`` smoke-runs.

The CUDA-only parts (CUDA-graph replay, peak GPU memory, kernel counts, onnxruntime's GPU
providers) run only where ``torch.cuda.is_available()``; ``benchmarks/gpu.py`` is their check.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from models import CifarResNet

import fxattn
from fxattn.bench import (
    count_aten_ops,
    op_account,
    ops_per_site,
    ort_gpu_providers,
    resolve_device,
    step_ops,
)
from fxattn.cli import main
from fxattn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()
#: where DIA has fused operators, the benchmark's anchors include today's decomposed graph
FUSED = "fused" in {f.name for f in dataclasses.fields(fxattn.DIA)}
DECOMPOSED = fxattn.DIA(fused=False) if FUSED else fxattn.DIA()


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return CifarResNet(depth=11, num_classes=10).eval()


def test_a_missing_device_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(ConfigError, match="'cuda-graph' needs a CUDA device"):
        fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), modes=("cuda-graph",))
    providers, note = ort_gpu_providers()
    assert bool(note) == (len(providers) < 2)  # says plainly which GPU provider is missing
    if NO_CUDA:
        with pytest.raises(ConfigError, match="no CUDA device"):
            fxattn.benchmark(_tiny(), torch.randn(2, 3, 32, 32), device="cuda")
        code = main(["bench", "models:CifarResNet", "--input-shape", "2,3,32,32",
                     "--device", "cuda"])
        err = capsys.readouterr().err
        assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_op_account_counts_what_dia_adds_per_site() -> None:
    counts = count_aten_ops(lambda: torch.ones(3).add(1).relu())
    assert counts == {"aten.ones.default": 1, "aten.add.Tensor": 1, "aten.relu.default": 1}
    model, x = _tiny(), torch.randn(2, 3, 32, 32)
    account = op_account(model, x, dia=DECOMPOSED)
    assert account.sites == 3 and account.taps >= 1
    for ops in (account.original, account.dia, account.dia_ssia):
        assert all(isinstance(n, int) and n > 0 for n in ops.to_dict().values())
    per_site = account.dia_per_site
    assert per_site is not None and all(v > 0 for v in per_site.values())  # decomposed DIA
    assert account.ssia_per_tap is not None and account.ssia_per_tap["train_forward"] > 0
    assert account.dia_ssia.eval_forward == account.dia.eval_forward  # SSIA is training only
    # the same figures from the parts, and the caller's model untouched
    assert step_ops(model, x) == account.original and not model.training
    captured = fxattn.transform(model, x, dia=False, ssia=False)  # the baseline: nothing inserted
    assert account.captured == step_ops(captured, x)
    assert account.captured.eval_forward == account.original.eval_forward  # torch.fx: same ops
    assert ops_per_site(account.captured, account.dia, account.sites) == per_site
    assert json.loads(json.dumps(account.to_dict()))["sites"] == 3


def test_op_account_of_an_exported_capture_counts_dia_not_the_capture() -> None:
    """A model served by the torch.export capture (a Hugging Face causal LM with its cache on)
    runs an aten graph with other operators than its eager forward: the per-site figures count
    from that captured graph, so they are DIA's alone (and within issue 31's targets)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    account = op_account(model, ids, dia=fxattn.DIA(), ssia=True)
    assert account.captured != account.original  # the capture's own difference
    per_site, per_tap = account.dia_per_site, account.ssia_per_tap
    assert per_site is not None and per_tap is not None
    assert per_site["eval_forward"] <= 3 and per_site["train_forward"] <= 4, per_site
    assert per_site["backward"] <= 8 and per_tap["train_forward"] <= 3, (per_site, per_tap)
    assert "| original as captured |" in "\n".join(account.markdown())


def test_benchmark_on_cpu_times_modes_precisions_training_and_anchors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch.compile with its eager backend: the same wiring, without Inductor's compile time
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = _tiny()
    made = []

    def reference(lean: torch.nn.Module) -> torch.nn.Module:
        made.append(lean)
        return copy.deepcopy(lean)

    result = fxattn.benchmark(
        model, torch.randn(2, 3, 32, 32), device="cpu", engines=("torch",), batch_sizes=(2,),
        threads=1, runs=1, warmup=0, modes=("eager", "compile"), precisions=("fp32", "bf16"),
        train_batch=2, ops=True, anchors=True, extra={"reference": reference},
        progress=False)
    assert len(made) == 1  # the extra model is made once, from the lean module
    assert list(result.latency) == ["torch", "torch-bf16", "compile", "compile-bf16"]
    names = ["original", "lean", "reference", "se-per-block", *(["lean-decomposed"] * FUSED)]
    assert all(list(by_batch[2]) == names for by_batch in result.latency.values())
    training = result.training
    assert training is not None and training.batch == 2 and not training.memory  # CPU
    assert list(training.latency) == ["fp32", "bf16"]
    assert list(training.latency["bf16"]) == ["original", "dia", "dia+ssia", "reference",
                                              "se-per-block", *(["dia-decomposed"] * FUSED)]
    assert result.ops is not None and result.ops.sites == 3 and not result.kernels
    assert result.settings["device"] == "cpu" and result.machine["device"] == "cpu"
    assert set(result.settings["prepare_seconds"]) >= {"compile batch 2 lean"}
    text = result.to_markdown()
    assert "| compile-bf16 | 2 | lean |" in text and "| bf16 | dia+ssia |" in text
    assert "DIA per site (3 sites)" in text
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["training"]["latency"]["fp32"]["dia"]["ratio_vs_original"] > 0
    assert saved["ops"]["dia_per_site"]["backward"] > 0
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_cli_bench_device_flags(tmp_path: Path) -> None:
    code = main(["bench", "models:CifarResNet", "--model-kwargs",
                 '{"depth": 11, "num_classes": 10}', "--input-shape", "2,3,32,32", "--no-ssia",
                 "--batch", "1", "--threads", "1", "--runs", "1", "--warmup", "1",
                 "--engines", "torch", "--device", "cpu", "--modes", "eager",
                 "--precisions", "fp32,bf16", "--train-batch", "2", "--ops",
                 "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert list(saved["latency"]) == ["torch", "torch-bf16"]
    assert list(saved["training"]["latency"]["fp32"]) == ["original", "dia"]
    assert saved["ops"]["dia_ssia"] is None and saved["ops"]["dia_per_site"]["eval_forward"] > 0
    assert saved["settings"]["device"] == "cpu" and saved["settings"]["train_batch"] == 2


def _gpu_script() -> object:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_quick_smoke_on_cpu(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gpu = _gpu_script()
    if NO_CUDA:
        assert gpu.main(["--out", str(tmp_path)]) == 2  # refuses without --quick/--allow-cpu
        assert "no CUDA device" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())
    assert gpu.main(["--quick", "--device", "cpu", "--threads", "1", "--commit", "abc123",
                     "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "gpu_cpu_quick.json").read_text())
    meta = saved["meta"]
    assert meta["git_commit"] == "abc123" and meta["device_name"] == "cpu" and meta["quick"]
    assert meta["torch"] == torch.__version__ and meta["time_utc"]
    main_run = saved["main"]
    assert set(main_run["latency"]["torch"]["2"]) == {
        "original", "lean", "hand-dia", "se-per-block", *(["lean-decomposed"] * FUSED)}
    assert main_run["ops"]["dia_per_site"]["eval_forward"] > 0
    assert "hand-dia" in main_run["training"]["latency"]["fp32"]
    text = (tmp_path / "gpu_cpu_quick.md").read_text()
    assert "commit `abc123`" in text and "DIA per site" in text


def test_op_account_script_writes_its_table(tmp_path: Path) -> None:
    """``benchmarks/op_account.py`` on one of its models (the 5-D video ResNet, the cheapest):
    fused and decomposed counts side by side, the verdict against issue 31's targets."""
    spec = importlib.util.spec_from_file_location("op_account_script",
                                                  ROOT / "benchmarks" / "op_account.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--only", "r3d_18", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "op_account.json").read_text())["models"][0]
    fused, decomposed = row["fused"]["dia_per_site"], row["decomposed"]["dia_per_site"]
    assert fused["eval_forward"] <= 3 < 20 < decomposed["eval_forward"], (fused, decomposed)
    assert row["fused"]["ssia_per_tap"]["train_forward"] < row["decomposed"]["ssia_per_tap"][
        "train_forward"]
    text = (tmp_path / "op_account.md").read_text()
    assert "| r3d_18 | (B, C, T, H, W)" in text and "| yes |" in text and "commit `" in text
