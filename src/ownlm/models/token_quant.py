"""Per-token int8 quantization of activations, as one C loop compiled on first use.

`Int8DynamicLinear` quantizes its input x [m, k] on every call: per row, the largest |x| over the
channels that are not kept in fp32 sets the scale s = max / 127, and q = round(x / s) + 128 (oneDNN's
u8 activations, zero point 128; fp32 channels become 128, i.e. zero), and the fp32 channels are
gathered for their own product. In torch ops that is about ten small kernels per linear (index_fill,
abs, amax, clamp, div, div, round, add, to, index_select), each a few microseconds of dispatch on
a 32 x 576 input: on SmolLM2-135M at 32 decode rows (2 threads) ~20 µs of a 100 µs q/k/v call
(measured by hand, stop 33). torch has no fused eager op for it (inductor writes one when it
compiles a graph; torchao 0.18's per-token path is slower than fp32 here, see quantized_linear), so
this module compiles the one loop below with the system's C compiler (`$CC`, else `cc`) the first
time it is needed, caches the library under $OWNLM_HOME/native/ (keyed by the source, flags and
this CPU's feature flags: `-march=native`), and calls it through ctypes. Without a compiler, or
with OWNLM_NATIVE=0, the same arithmetic runs as torch ops; both give identical bytes (tested).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <math.h>
/* x [m, k] fp32 rows (stride ldx); skip[k] 1 for the channels kept in fp32. Writes q [m, k] u8
   (zero point 128), s [m] and xo [m, n] = x's channels idx. Division and round-half-even (the
   default rounding mode) as torch's div and round, so both paths give the same bytes. */
void quantize_tokens(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *skip,
                     const int64_t *idx, int64_t n, uint8_t *q, float *s, float *xo) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float amax = 0.f;
        #pragma omp simd reduction(max:amax)
        for (int64_t c = 0; c < k; c++) {
            float a = skip[c] ? 0.f : fabsf(xr[c]);
            amax = a > amax ? a : amax;
        }
        float sc = (amax > 1e-8f ? amax : 1e-8f) / 127.f;
        uint8_t *qr = q + r * k;
        #pragma omp simd
        for (int64_t c = 0; c < k; c++) {
            float v = skip[c] ? 0.f : nearbyintf(xr[c] / sc);
            qr[c] = (uint8_t)(int32_t)(v + 128.f);
        }
        s[r] = sc;
        for (int64_t j = 0; j < n; j++) xo[r * n + j] = xr[idx[j]];
    }
}
"""
# -fopenmp-simd: the pragmas only (no OpenMP runtime); they let the max reduction vectorize.
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (torch ops instead) when it cannot be."""
    from ownlm.core.artifacts import ownlm_home

    if os.environ.get("OWNLM_NATIVE") == "0":
        return None
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        log.info("no C compiler (cc): int8 activations are quantized by torch ops (slower)")
        return None
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, cc, _cpu_key()]).encode()).hexdigest()[:16]
    lib = ownlm_home() / "native" / f"token_quant-{key}.so"
    try:
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, out = os.path.join(tmp, "token_quant.c"), os.path.join(tmp, "token_quant.so")
                with open(src, "w", encoding="utf-8") as f:
                    f.write(SOURCE)
                subprocess.run([cc, *FLAGS, "-o", out, src], check=True, capture_output=True, text=True)
                os.replace(out, lib)  # atomic: another process may be building the same file
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("cannot build %s (%s): int8 activations are quantized by torch ops", lib, detail)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    dll.quantize_tokens.argtypes = [p, i64, i64, i64, p, p, i64, p, p, p]
    dll.quantize_tokens.restype = None
    return dll


def quantize_tokens(
    x: torch.Tensor, skip: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] fp32 -> (q [m, k] uint8, zero point 128; s [m, 1]; x[:, idx] [m, len(idx)]); `skip`
    [k] uint8 is 1 at `idx` (see the module docstring)."""
    lib = native_library()
    if lib is None or x.dtype != torch.float32 or x.stride(1) != 1:
        return quantize_tokens_torch(x, idx)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.uint8)
    s = torch.empty(m, 1)
    xo = torch.empty(m, len(idx))
    lib.quantize_tokens(
        x.data_ptr(), m, k, x.stride(0), skip.data_ptr(), idx.data_ptr(), len(idx),
        q.data_ptr(), s.data_ptr(), xo.data_ptr(),
    )  # fmt: skip
    return q, s, xo


def quantize_tokens_torch(
    x: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_tokens` in torch ops: the fallback, and the reference its test compares with."""
    x = x.float()
    inliers = x.index_fill(1, idx, 0.0) if len(idx) else x
    # abs().amax(): linalg.vector_norm(inf) is 12x slower at 32 x 576 (60 against 5 µs)
    s = inliers.abs().amax(-1, keepdim=True).clamp_(min=1e-8).div_(127)
    q = torch.div(inliers, s).round_().add_(128).to(torch.uint8)
    return q, s, x.index_select(1, idx)
