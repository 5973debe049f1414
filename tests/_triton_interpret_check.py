"""Run by tests/test_triton_kernels.py in a fresh process: the Triton kernels of
fxattn.ops.triton_dia in Triton's interpreter (CPU tensors) against the composite backend, for
the DIA-LSTM and SE forward and backward on every layout, fp32 and bf16.

TRITON_INTERPRET must be set before the kernels are defined, hence a separate process (robust
under pytest-xdist, whatever the worker imported before).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fxattn.ops import triton_dia as td  # noqa: E402
from fxattn.ops._common import TORCH_BACKEND  # noqa: E402
from fxattn.ops.dia_lstm import Weights, lstm_backward, lstm_forward  # noqa: E402
from fxattn.ops.dia_se import se_backward, se_forward  # noqa: E402

torch.manual_seed(0)
tb = td.TRITON_BACKEND
CASES = [((2, 8, 5), 1, False), ((2, 8, 3, 5), 1, False), ((2, 8, 3, 5), 1, True),
         ((2, 7, 8), -1, False), ((2, 3, 4, 8), -1, False), ((2, 8, 2, 3, 3), 1, False),
         ((3, 8), 1, False), ((2, 20, 5, 30), 1, False)]

def check(shape: tuple[int, ...], cd: int, channels_last: bool, dtype: torch.dtype) -> None:
    x = torch.randn(*shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    c_ = x.shape[cd]
    w = Weights(*(torch.randn(*s) for s in [(2, c_), (2,), (4 * c_, 2), (4 * c_,)] * 2))
    h, c = torch.rand(x.shape[0], c_), torch.randn(x.shape[0], c_)
    gate = torch.randn(c_)
    tol = ({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
           else {"atol": 2e-2, "rtol": 2e-2})
    for h0, c0, gate0 in [(h, c, gate), (None, None, None)]:
        ref = lstm_forward(TORCH_BACKEND, x, h0, c0, w, gate0, cd)
        got = lstm_forward(tb, x, h0, c0, w, gate0, cd)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, **tol)
        assert got[0].stride() == ref[0].stride()
        gh, gc = torch.randn_like(h), torch.randn_like(c)
        rb = lstm_backward(TORCH_BACKEND, g, gh, gc, x, h0, c0, w, gate0, cd)
        gb = lstm_backward(tb, g, gh, gc, x, h0, c0, w, gate0, cd)
        for a, b in zip(gb, rb, strict=True):
            torch.testing.assert_close(a, b, **tol)
        se = (w.w_in1, w.b_in1, w.w_in2[:c_], w.b_in2[:c_], gate0)
        torch.testing.assert_close(se_forward(tb, x, *se, cd),
                                   se_forward(TORCH_BACKEND, x, *se, cd), **tol)
        for a, b in zip(se_backward(tb, g, x, *se, cd), se_backward(TORCH_BACKEND, g, x, *se, cd),
                        strict=True):
            torch.testing.assert_close(a, b, **tol)


for case in CASES:
    for dtype in (torch.float32, torch.bfloat16):
        check(*case, dtype)
print("TRITON-INTERPRETER-OK")
