"""Every malformed call raises ValueError/TypeError naming the argument and what was expected, before any
kernel runs (docs/op.md, "Bad input")."""

import pytest
import torch

from prefix_kernels.ops import available_backends, backends, prefix_attention, reference_prefix_attention


def good(B=2, Hq=4, Hkv=2, L=5, S=6, P=3, D=8, dtype=torch.float32):
    return dict(q=torch.randn(B, Hq, L, D, dtype=dtype), k=torch.randn(B, Hkv, S, D, dtype=dtype),
                v=torch.randn(B, Hkv, S, D, dtype=dtype), prefix_k=torch.randn(Hkv, P, D, dtype=dtype),
                prefix_v=torch.randn(Hkv, P, D, dtype=dtype))


def with_(**changes):
    args = good()
    args.update(changes)
    return args


CASES = [
    # (id, arguments, keyword arguments, exception, words the message must contain)
    ("q-rank", with_(q=torch.randn(2, 4, 5)), {}, ValueError, ["q", "[B, Hq, L, D]", "[2, 4, 5]"]),
    ("k-rank", with_(k=torch.randn(2, 6, 8)), {}, ValueError, ["k", "[B, Hkv, S, D]"]),
    ("k-batch", with_(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), {}, ValueError, ["k", "B=2"]),
    ("k-headdim", with_(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), {}, ValueError, ["k", "D=8"]),
    ("v-shape", with_(v=torch.randn(2, 2, 7, 8)), {}, ValueError, ["v", "[2, 2, 6, 8]"]),
    ("heads-not-multiple", with_(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8),
                                 prefix_k=torch.randn(3, 3, 8), prefix_v=torch.randn(3, 3, 8)),
     {}, ValueError, ["Hq=4", "Hkv=3"]),
    ("prefix-rank", with_(prefix_k=torch.randn(3, 8)), {}, ValueError, ["prefix_k", "[Hkv=2, P, D=8]"]),
    ("prefix-heads", with_(prefix_k=torch.randn(1, 3, 8), prefix_v=torch.randn(1, 3, 8)), {}, ValueError,
     ["prefix_k", "Hkv=2"]),
    ("prefix-4d-without-index", with_(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)), {},
     ValueError, ["prefix_k", "prefix_index"]),
    ("prefix-v-shape", with_(prefix_v=torch.randn(2, 4, 8)), {}, ValueError, ["prefix_v", "[2, 3, 8]"]),
    ("index-with-3d-prefix", good(), {"prefix_index": torch.zeros(2, dtype=torch.int64)}, ValueError,
     ["prefix_k", "[T, Hkv=2, P, D=8]"]),
    ("index-dtype", with_(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)),
     {"prefix_index": torch.zeros(2, dtype=torch.int32)}, TypeError, ["prefix_index", "int64"]),
    ("index-shape", with_(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)),
     {"prefix_index": torch.zeros(3, dtype=torch.int64)}, ValueError, ["prefix_index", "[B=2]"]),
    ("index-range", with_(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)),
     {"prefix_index": torch.tensor([0, 2])}, ValueError, ["prefix_index", "[0, T=2)"]),
    ("index-negative", with_(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)),
     {"prefix_index": torch.tensor([-1, 0])}, ValueError, ["prefix_index", "[0, T=2)"]),
    ("dtype-int", with_(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), {}, TypeError, ["q", "float32"]),
    ("dtype-mixed", with_(k=torch.randn(2, 2, 6, 8, dtype=torch.float16)), {}, TypeError,
     ["k", "dtype of q", "torch.float16"]),
    ("prefix-dtype", with_(prefix_v=torch.randn(2, 3, 8, dtype=torch.bfloat16)), {}, TypeError, ["prefix_v"]),
    ("device", with_(v=torch.randn(2, 2, 6, 8, device="meta")), {}, ValueError, ["v", "device"]),
    ("mask-dtype", good(), {"key_padding_mask": torch.ones(2, 6)}, TypeError, ["key_padding_mask", "bool"]),
    ("mask-shape", good(), {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError,
     ["key_padding_mask", "[B=2, S=6]"]),
    ("mask-4d", good(), {"key_padding_mask": torch.ones(2, 1, 5, 6, dtype=torch.bool)}, ValueError,
     ["key_padding_mask", "[B=2, S=6]"]),
    ("head-dim-too-large", with_(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                 v=torch.randn(1, 1, 2, 300), prefix_k=torch.randn(1, 1, 300),
                                 prefix_v=torch.randn(1, 1, 300)), {}, ValueError, ["head dim", "256"]),
    ("empty-queries", with_(q=torch.randn(2, 4, 0, 8)), {}, ValueError, ["q", "L"]),
    ("not-a-tensor", with_(q=[[1.0]]), {}, TypeError, ["q", "torch.Tensor"]),
    ("dropout-range", good(), {"dropout_p": 1.0}, ValueError, ["dropout_p", "[0, 1)"]),
    ("scale-negative", good(), {"scale": -1.0}, ValueError, ["scale", "positive"]),
    ("causal-type", good(), {"causal": "yes"}, TypeError, ["causal", "bool"]),
    ("backend-name", good(), {"backend": "tpu"}, ValueError, ["backend", "'tpu'"]),
    ("float64-kernel", {k: t.double() for k, t in good().items()}, {"backend": "triton"}, TypeError,
     ["float64", "reference"]),
    # the optional features (docs/op.md)
    ("window-zero", good(), {"window": 0}, ValueError, ["window", ">= 1"]),
    ("window-negative", good(), {"window": -3}, ValueError, ["window", "-3"]),
    ("window-float", good(), {"window": 2.5}, ValueError, ["window", "int"]),
    ("window-bool", good(), {"window": True}, ValueError, ["window", "True"]),
    ("softcap-zero", good(), {"softcap": 0.0}, ValueError, ["softcap", "positive"]),
    ("softcap-negative", good(), {"softcap": -30.0}, ValueError, ["softcap", "-30.0"]),
    ("softcap-inf", good(), {"softcap": float("inf")}, ValueError, ["softcap", "finite"]),
    ("sinks-shape", good(), {"sinks": torch.zeros(2)}, ValueError, ["sinks", "[Hq=4]", "[2]"]),
    ("sinks-per-kv-head", good(), {"sinks": torch.zeros(2, 4)}, ValueError, ["sinks", "[Hq=4]"]),
    ("sinks-dtype", good(), {"sinks": torch.zeros(4, dtype=torch.int64)}, TypeError, ["sinks", "float"]),
    ("sinks-device", good(), {"sinks": torch.zeros(4, device="meta")}, ValueError, ["sinks", "cpu"]),
    ("cu-seqlens-dtype", good(B=1, L=6, S=6), {"cu_seqlens": torch.tensor([0, 6])}, TypeError,
     ["cu_seqlens", "int32"]),
    ("cu-seqlens-rank", good(B=1, L=6, S=6), {"cu_seqlens": torch.zeros(1, 2, dtype=torch.int32)}, ValueError,
     ["cu_seqlens", "[n + 1]"]),
    ("cu-seqlens-one-value", good(B=1, L=6, S=6), {"cu_seqlens": torch.zeros(1, dtype=torch.int32)}, ValueError,
     ["cu_seqlens", "n >= 1"]),
    ("cu-seqlens-batch", good(L=6, S=6), {"cu_seqlens": torch.tensor([0, 6], dtype=torch.int32)}, ValueError,
     ["cu_seqlens", "B = 1", "L = S"]),
    ("cu-seqlens-cache", good(B=1, L=1, S=6), {"cu_seqlens": torch.tensor([0, 6], dtype=torch.int32)},
     ValueError, ["cu_seqlens", "L = S"]),
    ("cu-seqlens-padding", good(B=1, L=6, S=6), {"cu_seqlens": torch.tensor([0, 6], dtype=torch.int32),
                                                 "key_padding_mask": torch.ones(1, 6, dtype=torch.bool)},
     ValueError, ["key_padding_mask", "None", "cu_seqlens"]),
    ("cu-seqlens-decreasing", good(B=1, L=6, S=6), {"cu_seqlens": torch.tensor([0, 4, 2, 6], dtype=torch.int32)},
     ValueError, ["cu_seqlens", "non-decreasing", "[0, 4, 2, 6]"]),
    ("cu-seqlens-short", good(B=1, L=6, S=6), {"cu_seqlens": torch.tensor([0, 3, 5], dtype=torch.int32)},
     ValueError, ["cu_seqlens", "end at S=6"]),
    ("cu-seqlens-start", good(B=1, L=6, S=6), {"cu_seqlens": torch.tensor([1, 3, 6], dtype=torch.int32)},
     ValueError, ["cu_seqlens", "start at 0"]),
    ("cu-seqlens-index-per-row", with_(**{n: t[:1, :, :6] if n in "qkv" else t.expand(2, -1, -1, -1)
                                          for n, t in good(L=6, S=6).items()}),
     {"cu_seqlens": torch.tensor([0, 2, 4, 6], dtype=torch.int32), "prefix_index": torch.zeros(1, dtype=torch.int64)},
     ValueError, ["prefix_index", "[n sequences=3]"]),
]


@pytest.mark.parametrize("args,kwargs,exc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(args, kwargs, exc, words, monkeypatch):
    def no_kernel(record):
        raise AssertionError(f"the {record.name} op was reached before validation failed")

    monkeypatch.setattr(backends.Backend, "fwd", property(no_kernel))
    monkeypatch.setattr(backends.Backend, "bwd", property(no_kernel))
    with pytest.raises(exc) as info:
        prefix_attention(**args, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton.*CUDA tensors"):
        prefix_attention(**good(), backend="triton")


# ---- more malformed calls, one row of docs/bad_input.md each -------------------------------------------------

def _multi(T=2):
    return with_(prefix_k=torch.randn(T, 2, 3, 8), prefix_v=torch.randn(T, 2, 3, 8))


MORE_CASES = [
    ("batch-empty", with_(q=torch.randn(0, 4, 5, 8), k=torch.randn(0, 2, 6, 8), v=torch.randn(0, 2, 6, 8)), {},
     ValueError, ["q", "B, Hq and L >= 1"]),
    ("kv-heads-zero", with_(k=torch.randn(2, 0, 6, 8), v=torch.randn(2, 0, 6, 8)), {}, ValueError, ["Hkv=0"]),
    ("head-dim-zero", with_(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 6, 0), v=torch.randn(2, 2, 6, 0),
                            prefix_k=torch.randn(2, 3, 0), prefix_v=torch.randn(2, 3, 0)), {}, ValueError,
     ["head dim", "between 1 and 256", "D=0"]),
    ("q-rank-5", with_(q=torch.randn(1, 2, 4, 5, 8)), {}, ValueError, ["q", "4 dims"]),
    ("prefix-T-zero", _multi(T=0), {"prefix_index": torch.zeros(2, dtype=torch.int64)}, ValueError,
     ["prefix_k", "T >= 1"]),
    ("index-not-tensor", _multi(), {"prefix_index": [0, 1]}, TypeError, ["prefix_index", "torch.Tensor"]),
    ("index-2d", _multi(), {"prefix_index": torch.zeros(2, 1, dtype=torch.int64)}, ValueError,
     ["prefix_index", "[B=2]"]),
    ("index-far-out-of-range", _multi(), {"prefix_index": torch.tensor([0, 10**9])}, ValueError,
     ["prefix_index", "[0, T=2)", "1000000000"]),
    ("index-device", _multi(), {"prefix_index": torch.zeros(2, dtype=torch.int64, device="meta")}, ValueError,
     ["prefix_index", "meta"]),
    ("prefix-device", with_(prefix_k=torch.randn(2, 3, 8, device="meta")), {}, ValueError, ["prefix_k", "device"]),
    ("mask-uint8", good(), {"key_padding_mask": torch.ones(2, 6, dtype=torch.uint8)}, TypeError,
     ["key_padding_mask", "bool", "torch.uint8"]),
    ("mask-not-tensor", good(), {"key_padding_mask": [[True] * 6] * 2}, TypeError,
     ["key_padding_mask", "torch.Tensor"]),
    ("mask-transposed", good(), {"key_padding_mask": torch.ones(6, 2, dtype=torch.bool)}, ValueError,
     ["key_padding_mask", "[B=2, S=6]", "[6, 2]"]),
    ("mask-device", good(), {"key_padding_mask": torch.ones(2, 6, dtype=torch.bool, device="meta")}, ValueError,
     ["key_padding_mask", "meta"]),
    ("scale-zero", good(), {"scale": 0.0}, ValueError, ["scale", "positive"]),
    ("scale-nan", good(), {"scale": float("nan")}, ValueError, ["scale", "positive finite"]),
    ("scale-inf", good(), {"scale": float("inf")}, ValueError, ["scale", "positive finite"]),
    ("scale-tensor", good(), {"scale": torch.tensor(0.5)}, ValueError, ["scale", "float"]),
    ("dropout-negative", good(), {"dropout_p": -0.1}, ValueError, ["dropout_p", "[0, 1)"]),
    ("dropout-nan", good(), {"dropout_p": float("nan")}, ValueError, ["dropout_p"]),
    ("deterministic-type", good(), {"deterministic": "yes"}, TypeError, ["deterministic", "bool"]),
    ("dtype-bool", with_(q=torch.ones(2, 4, 5, 8, dtype=torch.bool)), {}, TypeError, ["q", "float32"]),
    ("float64-cpu", {k: t.double() for k, t in good().items()}, {"backend": "cpu"}, TypeError,
     ["float64", "reference"]),
    ("backend-unavailable", good(), {"backend": "cuda"}, RuntimeError, ["'cuda'", "unavailable", "cuda tensors"]),
]


@pytest.mark.parametrize("args,kwargs,exc,words", [c[1:] for c in MORE_CASES], ids=[c[0] for c in MORE_CASES])
def test_more_bad_input_is_named(args, kwargs, exc, words, monkeypatch):
    test_bad_input_is_named(args, kwargs, exc, words, monkeypatch)


@pytest.mark.parametrize("D", [1, 7, 200, 256])
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_any_head_dim_up_to_256_runs(backend, D):
    """Head dims that are not a power of two (or tiny) are supported by every backend, not a fault."""
    args = good(B=1, Hq=2, Hkv=1, L=3, S=4, P=2, D=D)
    out = prefix_attention(**args, backend=backend)
    want = reference_prefix_attention(**{k: t.double() for k, t in args.items()})
    assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_odd_strides_are_safe(backend):
    """A stride-0 (expanded) prefix, a storage offset, a non-contiguous mask and a GQA group of 4: no
    out-of-bounds read, the same result as contiguous copies."""
    base = good(B=2, Hq=4, Hkv=1, L=3, S=5, P=2, D=8)
    big_q = torch.randn(3, 4, 3, 8)
    q = big_q[1:]  # storage offset
    pk = torch.randn(1, 1, 8).expand(1, 2, 8)  # stride 0 over P
    mask = torch.ones(5, 2, dtype=torch.bool).t()  # non-contiguous
    mask[1, 0] = False
    args = dict(base, q=q, prefix_k=pk)
    out = prefix_attention(**args, key_padding_mask=mask, backend=backend)
    want = reference_prefix_attention(**{k: t.double().contiguous() for k, t in args.items()},
                                      key_padding_mask=mask.contiguous())
    assert (out.double() - want).abs().max() < 1e-5
