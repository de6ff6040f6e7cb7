"""Fused quantized matmul on CPU: a small C kernel (csrc/qmatmul.c) built at first use.

``linear_cpu(x, w)`` has the signature of ``matmul.linear_ref``. For a QuantWeight and a
small batch (M <= ``MAX_FUSED_M`` rows) it runs the C kernel, which dequantizes each block
in registers and never materializes W in float32; otherwise it is ``linear_ref``
(dequantize + F.linear, faster once M is large enough to amortize the dequantization).

The kernel is compiled with the system C compiler (``$CC`` or ``cc``), no torch headers,
into a per-user cache (``$EXACTLLM_CACHE`` or ``$XDG_CACHE_HOME/exactllm`` or
``~/.cache/exactllm``), keyed by a hash of the source, compiler and flags, and loaded with
ctypes. Without a compiler, or if the build fails, ``linear_cpu`` warns once and falls back
to ``linear_ref``.

Numerics: W is dequantized bit-exactly as ``QuantWeight.dequantize``; the dot product uses
a fixed float32 summation order that depends only on K (see the C file), so results are
deterministic and independent of M and of the thread count. They are not bit-equal to
F.linear (MKL sums in another order).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels.matmul import linear_ref

SOURCE = Path(__file__).with_name("csrc") / "qmatmul.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast")
QTYPE_ID = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
# Above this many rows dequantize + F.linear (MKL) is as fast or faster (bench/cpu_qmatmul.py:
# the fused kernel runs near the FMA peak, so it beats dequant + F.linear up to M ~ 64-128).
MAX_FUSED_M = 64

_lock = threading.Lock()
_lib: "ctypes.CDLL | None" = None
_failed: str | None = None  # why the kernel is unavailable, once known


def _cache_dir() -> Path:
    if os.environ.get("EXACTLLM_CACHE"):
        return Path(os.environ["EXACTLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "exactllm"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; raises RuntimeError on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found ({os.environ.get('CC', 'cc')!r} not on PATH)")
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run {cc}: {e}") from e
    key = hashlib.sha256(b"\0".join([src, cc.encode(), version, " ".join(CFLAGS).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"qmatmul-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name then rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"cannot compile {SOURCE.name}: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    f = lib.exactllm_qmatmul
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    f.restype = ctypes.c_int
    return lib


def _load() -> "ctypes.CDLL | None":
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except (RuntimeError, OSError) as e:
                _failed = str(e)
                warnings.warn(f"exactllm: fused CPU quantized matmul unavailable, using dequantize + "
                              f"F.linear instead: {_failed}", RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    """Whether the C kernel is built and loaded (builds it on first call)."""
    return _load() is not None


def qmatmul(x: torch.Tensor, w: QuantWeight, nthreads: int | None = None) -> torch.Tensor:
    """The C kernel itself, for any M: x [M, K] float32 on CPU -> [M, N] float32.

    Raises RuntimeError if the kernel is unavailable (``linear_cpu`` falls back instead).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fused CPU quantized matmul unavailable: {_failed}")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError("qmatmul runs on CPU tensors only")
    x = x.to(torch.float32).contiguous()
    qs, scale = w.qs.contiguous(), w.scale.contiguous()
    mn = None if w.min is None else w.min.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = lib.exactllm_qmatmul(QTYPE_ID[w.qtype], x.data_ptr(), x.shape[0], k, qs.data_ptr(),
                              scale.data_ptr(), None if mn is None else mn.data_ptr(), n,
                              y.data_ptr(), torch.get_num_threads() if nthreads is None else nthreads)
    if rc != 0:
        raise RuntimeError(f"exactllm_qmatmul rejected its arguments (rc={rc}, {w.qtype}, x {tuple(x.shape)})")
    return y


def linear_cpu(x: torch.Tensor, w: "torch.Tensor | QuantWeight") -> torch.Tensor:
    """x [..., K] @ w[N, K].T -> [..., N] in x's dtype; same contract as ``linear_ref``.

    Uses the fused kernel for a QuantWeight on CPU with M <= MAX_FUSED_M, else ``linear_ref``.
    """
    if (isinstance(w, QuantWeight) and x.dim() >= 1 and x.numel() // max(x.shape[-1], 1) <= MAX_FUSED_M
            and x.device.type == "cpu" and w.device.type == "cpu" and _load() is not None):
        return qmatmul(x.reshape(-1, x.shape[-1]), w).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    return linear_ref(x, w)


if __name__ == "__main__":  # `python -m exactllm.kernels.cpu_qmatmul`: build and report
    print("available:", available(), "" if _failed is None else _failed, file=sys.stderr)
