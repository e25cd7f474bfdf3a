"""anim_jax.cpu_codegen: XLA:CPU's own loops vectorised for the host's widest registers."""

import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anim_jax import cpu_codegen

OPTION = cpu_codegen.VECTOR_WIDTH_OPTION


@pytest.mark.parametrize("text, bits", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq\n", 512),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", 256),
    ("processor\t: 0\nflags\t\t: fpu sse2 sse4_2\n", 128),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n", 128),  # aarch64's spelling
    ("processor\t: 0\nmodel name\t: something\n", None),
])
def test_host_vector_bits_reads_the_cpu_flags(tmp_path, text, bits):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_codegen.host_vector_bits(str(path)) == bits


def test_host_vector_bits_without_cpuinfo(tmp_path):
    assert cpu_codegen.host_vector_bits(str(tmp_path / "missing")) is None


def test_options_only_for_a_cpu_backend_with_avx512(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert cpu_codegen.compiler_options("cpu", 512) == {OPTION: 512}
    assert cpu_codegen.compiler_options("cpu", 256) is None
    assert cpu_codegen.compiler_options("cpu", 128) is None
    assert cpu_codegen.compiler_options("gpu", 512) is None
    assert cpu_codegen.compiler_options("tpu", 512) is None
    # the user's own setting in XLA_FLAGS is kept: no per-program override
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 --{OPTION}=256")
    assert cpu_codegen.compiler_options("cpu", 512) is None


def _optimised_ir(directory) -> str:
    files = glob.glob(f"{directory}/*ir-with-opt.ll")
    assert files, f"XLA wrote no optimised LLVM IR under {directory}"
    return "".join(open(f).read() for f in files)


def test_jit_compiles_xlas_loops_for_the_hosts_registers(tmp_path):
    """The option reaches LLVM: with AVX-512 the elementwise loop is vectorised 16 floats wide
    (XLA's default: 8); without it the program is compiled exactly as plain jax.jit does."""
    x = jnp.linspace(-3.0, 3.0, 4096, dtype=jnp.float32)
    fn = lambda x: jnp.exp(x) * 2.0 + jnp.tanh(x)
    # LLVM's full optimisation, which the suite's XLA_FLAGS turn off for speed (tests/conftest.py)
    options = lambda name: {"xla_dump_to": str(tmp_path / name), "xla_backend_optimization_level": 3}
    ours = cpu_codegen.jit(fn, compiler_options=options("ours"))
    plain = jax.jit(fn, compiler_options=options("plain"))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(plain(x)), rtol=2e-6, atol=1e-6)
    ours_ir, plain_ir = _optimised_ir(tmp_path / "ours"), _optimised_ir(tmp_path / "plain")
    assert plain_ir.count("<8 x float>") > 0
    if cpu_codegen.host_vector_bits() == 512:
        assert ours_ir.count("<16 x float>") > 10 * max(1, ours_ir.count("<8 x float>"))
        assert plain_ir.count("<16 x float>") < plain_ir.count("<8 x float>")
    else:
        assert ours_ir.count("<16 x float>") == plain_ir.count("<16 x float>")
        assert ours_ir.count("<8 x float>") == plain_ir.count("<8 x float>")


def test_jit_keeps_jits_arguments_and_lowering():
    calls = []

    @cpu_codegen.jit(static_argnames=("power",))
    def f(x, *, power):
        calls.append(power)
        return x**power

    x = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(f(x, power=2)), [0.0, 1.0, 4.0, 9.0])
    np.testing.assert_array_equal(np.asarray(f(x + 1, power=2)), [1.0, 4.0, 9.0, 16.0])
    assert calls == [2]  # traced once for both calls: one compiled program per static argument
    np.testing.assert_array_equal(np.asarray(f(x, power=3)), [0.0, 1.0, 8.0, 27.0])
    assert calls == [2, 3]
    assert f.__name__ == "f"
    text = f.lower(x, power=2).as_text()  # the static power is folded into the program: x * x
    assert "stablehlo.multiply" in text and "stablehlo.power" not in text
    assert f.eval_shape(x, power=2).shape == (4,)
