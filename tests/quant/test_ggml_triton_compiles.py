"""Every Triton GGML kernel compiles to a GPU binary (no GPU needed: Triton's own LLVM and ptxas), for
the oldest and the newest GPUs users have (sm_80 and up; RTX 30xx is sm_86, 40xx sm_89, H100/H200
sm_90), and its stores are 16-byte vector stores (the one-pass write the design counts on)."""

import importlib
import re

import pytest
import triton


@pytest.fixture(scope="module")
def jit_kernels():
    """``ggml_triton`` imported with compiled (not interpreted) kernels."""
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    from flux2_core.quant import ggml_triton

    yield importlib.reload(ggml_triton)
    mp.undo()
    importlib.reload(ggml_triton)


def _compile(module, name: str, out: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _, bpp = module.KERNELS[name]
    dst = {0: "*fp32", 1: "*fp16", 2: "*i16"}[out]
    src = ASTSource(
        fn=kernel,
        signature={"src": "*u8", "dst": dst, "n": "i32", "BPP": "constexpr", "OUT": "constexpr"},
        constexprs={"BPP": bpp, "OUT": out},
        attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
    )
    # Triton's Linux wheels bundle ptxas, so this compiles without a GPU; a build without it fails.
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_with_vector_stores(jit_kernels, arch):
    for name in jit_kernels.KERNELS:
        for out in (0, 2):  # float32, bfloat16 (the int16 bit store)
            ptx = _compile(jit_kernels, name, out, arch).asm["ptx"]
            stores = re.findall(r"st\.global\S*", ptx)
            assert stores and all(s.startswith("st.global.v4") for s in stores), (name, out, set(stores))
