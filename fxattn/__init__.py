"""fxattn: free attention for any PyTorch model.

Insert DIA (Dense-and-Implicit Attention, kept at inference) and SSIA (Self-Supervised
Implicit Attention, training only) into a model you did not write, with ``torch.fx``; strip
SSIA for deployment; export a lean ONNX model verified in onnxruntime; benchmark it.

>>> import torch, torchvision, fxattn
>>> model = torchvision.models.resnet18()
>>> net = fxattn.transform(model, torch.randn(2, 3, 64, 64))
>>> lean = fxattn.strip_ssia(net)
"""

from .analysis import Plan
from .bench import BenchmarkResult, benchmark
from .capture import TraceOptions
from .config import DIA, SSIA
from .deploy import OrtCpuReport, compile_ort_cpu
from .diagnostics import CorrelationReport, attention_correlation
from .errors import (
    AlreadyTransformedError,
    AnalysisError,
    CheckpointError,
    ConfigError,
    ExportError,
    FxAttnError,
    InputError,
    ModelSpecError,
    NotTransformedError,
    SSIALossUnavailableError,
    TraceError,
    VerificationError,
)
from .export import ExportReport, OnnxOptimize, export_onnx
from .finetune import param_groups
from .modules.graph_module import AttentionGraphModule
from .scope import ScopePlan
from .serialization import Checkpoint, load, load_checkpoint, save
from .ssia_logging import log_ssia
from .transform import inspect, set_ssia_scale, ssia_loss, strip_ssia, transform

__version__ = "0.1.0"

__all__ = [
    "compile_ort_cpu",
    "OrtCpuReport",
    "log_ssia",
    "DIA",
    "SSIA",
    "AlreadyTransformedError",
    "AnalysisError",
    "AttentionGraphModule",
    "CorrelationReport",
    "BenchmarkResult",
    "ExportReport",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "FxAttnError",
    "InputError",
    "ModelSpecError",
    "NotTransformedError",
    "OnnxOptimize",
    "Plan",
    "SSIALossUnavailableError",
    "ScopePlan",
    "TraceError",
    "TraceOptions",
    "VerificationError",
    "benchmark",
    "attention_correlation",
    "export_onnx",
    "inspect",
    "load",
    "load_checkpoint",
    "param_groups",
    "save",
    "set_ssia_scale",
    "ssia_loss",
    "strip_ssia",
    "transform",
]
