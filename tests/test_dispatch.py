"""Backend choice: explicit names, the environment override, and the one-time fallback log."""

import logging

import pytest
import torch

import prefix_kernels
from prefix_kernels.ops import dispatch


def small_inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen) for s in [(1, 2, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8), (2, 2, 8), (2, 2, 8)]]


def test_reference_is_always_available():
    assert "reference" in prefix_kernels.available_backends("cpu")
    assert "reference" in prefix_kernels.available_backends("cuda")


def test_interpreter_makes_triton_available_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in prefix_kernels.available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in prefix_kernels.available_backends("cpu")


def test_env_var_overrides_default_but_not_explicit_argument(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_kernels.prefix_attention(*small_inputs())


def test_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_PREFERENCE", {"cpu": ("cuda", "reference")})
    dispatch._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        for _ in range(3):
            assert dispatch.choose_backend(None, torch.device("cpu")) == "reference"
    messages = [r.getMessage() for r in caplog.records if r.name == "prefix_kernels"]
    assert len(messages) == 1 and "reference backend" in messages[0] and "cuda" in messages[0], messages


def test_default_backend_result_matches_reference():
    args = small_inputs()
    out = prefix_kernels.prefix_attention(*args)
    want = prefix_kernels.reference_prefix_attention(*args)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
