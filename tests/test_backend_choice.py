"""Backend choice (prefix_kernels.ops.backends): explicit names, records, the environment override, the default
per device, why a backend is unavailable, and the one-time fallback log."""

import logging

import pytest
import torch

from prefix_kernels.ops import (
    Backend,
    available_backends,
    backends,
    prefix_attention,
    reference_prefix_attention,
    resolve_backend,
)


def small_inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen) for s in [(1, 2, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8), (2, 2, 8), (2, 2, 8)]]


def test_every_backend_has_its_two_ops():
    assert set(backends.BACKENDS) == {"triton", "cuda", "cpu", "reference"}
    for name in backends.BACKENDS:
        record = backends.backend(name)
        assert record.name == name
        assert record.fwd is getattr(torch.ops.prefix_kernels, f"{name}_fwd").default
        assert record.bwd is getattr(torch.ops.prefix_kernels, f"{name}_bwd").default


def test_reference_is_always_available():
    assert "reference" in available_backends("cpu")
    assert "reference" in available_backends("cuda")
    assert resolve_backend("reference", "cpu").name == "reference"


def test_interpreter_makes_triton_available_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends("cpu")
    assert "CUDA tensors" in backends.unavailable_reason("triton", "cpu")


def test_compiled_backends_need_their_device():
    assert "cuda tensors" in backends.unavailable_reason("cuda", "cpu")
    assert "cpu tensors" in backends.unavailable_reason("cpu", "cuda")
    if not torch.cuda.is_available():
        assert "cuda" not in available_backends("cuda")


def test_default_on_cpu_is_the_cpu_kernels_when_built(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "reference"
    assert resolve_backend(None, "cpu").name == expected


def test_a_record_is_used_as_is():
    record = resolve_backend("reference", "cpu")
    assert isinstance(record, Backend) and resolve_backend(record, "cuda") is record


def test_env_var_overrides_default_but_not_explicit_argument(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert resolve_backend(None, torch.device("cpu")).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")).name == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(*small_inputs())


def test_unknown_and_unavailable_backends_say_why(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of .* got 'tpu'"):
        resolve_backend("tpu", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton' is unavailable: the triton backend needs CUDA tensors"):
        resolve_backend("triton", "cpu")


def test_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_PREFERENCE", {"cpu": ("cuda", "reference")})
    backends._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        for _ in range(3):
            assert resolve_backend(None, torch.device("cpu")).name == "reference"
    messages = [r.getMessage() for r in caplog.records if r.name == "prefix_kernels"]
    assert len(messages) == 1 and "reference backend" in messages[0] and "cuda" in messages[0], messages


def test_default_backend_result_matches_reference():
    args = small_inputs()
    out = prefix_attention(*args)
    want = reference_prefix_attention(*args)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
