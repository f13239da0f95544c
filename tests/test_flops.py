"""Model FLOPs for MFU (unclip_jax.utils.flops): closed forms, and the benchmark's count agrees
with the CPU compiler's (which, unlike XLA GPU's, keeps convolutions as HLO ops)."""
import os
import re

import jax
import jax.numpy as jnp
import pytest

from unclip_jax.utils.flops import conv_flops, lowered_flops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_flops_closed_form(groups):
    b, h, w, cin, cout, k = 2, 16, 12, 8, 12, 3
    x = jax.ShapeDtypeStruct((b, h, w, cin), jnp.float32)
    kern = jax.ShapeDtypeStruct((k, k, cin // groups, cout), jnp.float32)

    def conv(x, kern):
        return jax.lax.conv_general_dilated(x, kern, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    got = lowered_flops(jax.jit(conv).lower(x, kern))
    assert got == conv_flops(b, (h - k + 1, w - k + 1), (k, k), cin, cout, groups)


def test_matmul_flops_closed_form_and_grad_is_about_three_forwards():
    b, n, m = 4, 32, 16
    x = jax.ShapeDtypeStruct((b, n), jnp.float32)
    w = jax.ShapeDtypeStruct((n, m), jnp.float32)
    f = lambda x, w: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
    fwd = lowered_flops(jax.jit(f).lower(x, w))
    assert 2 * b * n * m <= fwd < 2 * b * n * m * 1.2  # the matmul + a few elementwise ops
    both = lowered_flops(jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, w))
    assert 2.8 * 2 * b * n * m <= both < 3.6 * 2 * b * n * m


def test_train_throughput_counts_the_model_flops(capsys, monkeypatch):
    """The benchmark's FLOPs (lowered HLO) match the CPU executable's own count for a real UNet
    train step, within 5%: the count it reports on a GPU is the same model's."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import train_throughput

    train_throughput.main(["--config", os.path.join(ROOT, "experiments", "tiny.py"),
                           "--stage", "decoder", "--batch", "2", "--steps", "1"])
    out = capsys.readouterr().out
    m = re.search(r"tflops_per_step=([0-9.]+) .*own count: ([0-9.]+) TFLOP", out)
    assert m, out
    ours, xla = float(m.group(1)), float(m.group(2))
    assert ours > 0 and abs(ours - xla) <= 0.05 * xla, out
    # --count-only (abstract shapes, no compile) counts the same step
    train_throughput.main(["--config", os.path.join(ROOT, "experiments", "tiny.py"),
                           "--stage", "decoder", "--batch", "2", "--count-only"])
    only = capsys.readouterr().out
    m2 = re.search(r"tflops_per_step=([0-9.]+)", only)
    assert m2 and float(m2.group(1)) == ours, only


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("TPU v5 lite", 197.0), ("TPU v5p", 459.0),
                                        ("TPU v4", 275.0), ("cpu", None)])
def test_mfu_peak_is_the_devices_dense_bf16_peak(monkeypatch, kind, peak):
    """MFU divides by the right peak: the PCIe H100 (756 TFLOP/s) is not taken for the SXM one."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import train_throughput

    class Dev:
        device_kind = kind

    assert train_throughput.peak_tflops(Dev()) == peak
