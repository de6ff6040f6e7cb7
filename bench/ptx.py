"""The PTX of the kernel a call launches (bench scripts read which MMA instructions Triton emitted)."""
from __future__ import annotations


def launched_ptx(kernel, call) -> str:
    """PTX of the last launch of the @triton.jit ``kernel`` while ``call()`` runs ("" if none)."""
    got = []
    orig = kernel.run

    def run(*a, **kw):
        got.append(orig(*a, **kw))
        return got[-1]
    kernel.run = run
    try:
        call()
    finally:
        del kernel.run
    return getattr(got[-1], "asm", {}).get("ptx", "") if got else ""
