"""The opt-in TMA forward (PREFIX_KERNELS_TRITON_FWD=tma, docs/kernels.md "TMA"): prefix_attention_fwd moves its
tiles through tensor descriptors. Triton's interpreter emulates the descriptors (zero-filling what lies past a
tensor's bounds), so on CPU the TMA forward runs against the float64 oracle over odd shapes, at the interpreter's
tile and at the shipped ones, and against the pointer forward bit for bit. Calls that TMA cannot take (packed
sequences, tensors it cannot address) run on pointers, and the mode is refused where it cannot run. The `gpu`
tests force every shipped forward tile under TMA on a GPU that has it (sm_90 and newer)."""

from __future__ import annotations

import pytest
import torch

from attention_cases import Case, assert_matches_reference, make_inputs, op_call, packed_case
from prefix_kernels.ops import available_backends, prefix_attention
from prefix_kernels.ops.backends import TRITON_FWD_ENV, triton_fwd_mode
from prefix_kernels.ops.triton import interpreting
from test_triton_bwd_fused import CASES, DEVICE

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

if "triton" in available_backends(DEVICE):
    from prefix_kernels.ops.triton import configs, launch

# The odd shapes of the backward tests that TMA takes (not packed), plus the decode step's shape through the
# regular forward.
TMA_CASES = [case for case in CASES if not case.packed]


def spy_forwards(monkeypatch) -> list[bool]:
    """For each prefix_attention_fwd launch, in order, whether it ran with tensor descriptors (TMA)."""
    flags = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        if getattr(getattr(kernel, "fn", None), "__name__", "") == "prefix_attention_fwd":
            flags.append(bool(kwargs["TMA"]))
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    return flags


@pytest.fixture
def tma(monkeypatch) -> list[bool]:
    monkeypatch.setenv(TRITON_FWD_ENV, "tma")
    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)  # short queries too go through prefix_attention_fwd
    return spy_forwards(monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=Case.id)
def test_tma_forward_matches_the_reference(tma, case, dtype):
    assert_matches_reference(case, dtype, DEVICE, "triton")
    assert tma == [True], tma


def test_tma_forward_with_dropout_and_features(tma):
    assert_matches_reference(Case(Hq=4, Hkv=2, L=20, S=23, P=7, padding=True, T=2), torch.float32, DEVICE, "triton",
                             dropout_p=0.3, seed=1234)
    assert_matches_reference(Case(Hq=4, Hkv=2, L=30, S=30, P=5, window=7, softcap=3.0, sinks=True), torch.float16,
                             DEVICE, "triton")
    assert tma == [True, True], tma


@pytest.mark.skipif(not interpreting(), reason="bit-for-bit equality is the interpreter's (one evaluation order); "
                                               "on a GPU test_every_shipped_forward_tile_under_tma compares them")
@pytest.mark.parametrize("case", [Case(B=3, Hq=4, Hkv=2, L=21, S=26, P=9, T=2, padding=True),
                                  Case(D=40, L=18, S=18, P=0, causal=False, layout="hf")], ids=Case.id)
def test_tma_forward_is_the_pointer_forward_bit_for_bit(monkeypatch, case):
    """Same tiles, same order of operations: only where the tiles come from differs, so out and lse are equal."""
    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)
    data = make_inputs(case, torch.float32, DEVICE)
    fwd = torch.ops.prefix_kernels.triton_fwd.default
    kw = data["kwargs"]
    t = data["tensors"]

    def run():
        return fwd(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], kw.get("key_padding_mask"),
                   kw.get("prefix_index"), None, None, case.causal, 0, 0.0, case.D ** -0.5, 0.0, 0, True)

    flags = spy_forwards(monkeypatch)
    monkeypatch.setenv(TRITON_FWD_ENV, "pointers")
    out, lse = run()
    monkeypatch.setenv(TRITON_FWD_ENV, "tma")
    out_tma, lse_tma = run()
    assert flags == [False, True], flags
    assert torch.equal(out, out_tma) and torch.equal(lse, lse_tma)


def test_tma_forward_at_the_shipped_tiles(tma):
    """configs.shipped_tiles(): the interpreter runs the TMA forward at the first shipped tile of its table (128
    queries by 64 keys at D 64, 128 x 32 at D 128) over several blocks with ragged edges, so that the descriptor
    coordinates and block shapes are those of a GPU launch; with the features on, at the feature table's tile."""
    with configs.shipped_tiles():
        assert_matches_reference(Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=70, D=64, padding=True, T=2),
                                 torch.float32, DEVICE, "triton")
        assert_matches_reference(Case(B=1, Hq=2, Hkv=1, L=140, S=140, P=33, D=96), torch.float32, DEVICE, "triton")
        assert_matches_reference(Case(B=1, Hq=2, Hkv=1, L=90, S=90, P=5, D=64, window=40, softcap=5.0, sinks=True),
                                 torch.float32, DEVICE, "triton")
    assert tma == [True, True, True], tma


def _misaligned(case: Case, dtype):
    """Inputs whose q starts 2 elements past a 16-byte boundary (a slice of a larger buffer)."""
    data = make_inputs(case, dtype, DEVICE)
    q = data["tensors"]["q"]
    buffer = torch.empty(q.numel() + 2, dtype=dtype, device=DEVICE)
    shifted = buffer[2:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16 != 0
    data["tensors"]["q"] = shifted
    return data


@pytest.mark.parametrize("what", ["packed", "head dim past 128", "row bytes not a multiple of 16", "strided head dim",
                                  "misaligned base"])
def test_calls_tma_cannot_take_run_on_pointers(tma, what):
    """TMA needs the sequences to end at the tensor's bounds, 16-byte aligned, unit-stride rows, and D_PAD at most
    configs.TMA_MAX_D_PAD (128): other calls run the pointer forward, with the same results."""
    if what == "packed":
        case, dtype = packed_case((7, 19, 4), Hq=4, Hkv=2, P=5, T=2), torch.float32
    elif what == "head dim past 128":
        case, dtype = Case(D=136, L=9, S=12, P=3), torch.float32  # D_PAD 256
    elif what == "row bytes not a multiple of 16":
        case, dtype = Case(D=36, L=9, S=12, P=3), torch.float16  # 72-byte rows
    elif what == "strided head dim":
        case, dtype = Case(L=12, S=12, P=4, layout="strided"), torch.float32
    else:
        case, dtype = Case(L=12, S=12, P=4), torch.float16
    if what == "misaligned base":
        data = _misaligned(case, dtype)
        out = prefix_attention(**data["tensors"], **data["kwargs"], backend="triton")
        want = prefix_attention(**{n: x.double() for n, x in data["tensors"].items()}, **data["kwargs"],
                                backend="reference")
        torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)
    else:
        assert_matches_reference(case, dtype, DEVICE, "triton")
    assert tma == [False], tma


def test_unknown_forward_mode_is_refused_before_any_launch(monkeypatch):
    monkeypatch.setenv(TRITON_FWD_ENV, "tmaa")
    flags = spy_forwards(monkeypatch)
    data = make_inputs(Case(), torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"PREFIX_KERNELS_TRITON_FWD='tmaa': expected one of pointers, tma"):
        op_call("triton")(**data["tensors"], **data["kwargs"])
    assert flags == []


def test_tma_mode_needs_sm90(monkeypatch):
    monkeypatch.delenv(TRITON_FWD_ENV, raising=False)
    assert triton_fwd_mode(80) == triton_fwd_mode(None) == "pointers"
    monkeypatch.setenv(TRITON_FWD_ENV, "tma")
    with pytest.raises(ValueError, match=r"needs a GPU with TMA \(compute capability 9.0 or newer\); this one is 8.6"):
        triton_fwd_mode(86)
    assert triton_fwd_mode(90) == triton_fwd_mode(100) == triton_fwd_mode(None) == "tma"


@pytest.mark.skipif(DEVICE != "cpu", reason="runs the model on CPU tensors in Triton's interpreter; on a GPU "
                                            "test_every_shipped_forward_tile_under_tma runs TMA")
def test_tma_forward_in_a_wrapped_model_through_trainer_and_generate(monkeypatch, tmp_path):
    """As users run it: a tiny Mistral on Mistral-7B-v0.1's sliding_window (4096), wrapped by get_prefix_model on
    the triton backend, trained by transformers.Trainer with evaluation, checkpoints and a resume from one, then
    generate. Under PREFIX_KERNELS_TRITON_FWD=tma every forward launch runs TMA, and the eval losses, the trained
    prefix, the resumed run and the generated tokens are those of the pointer forward, exactly."""
    from tiny_models import mistral, randomize_prefix, tokens
    from transformers import Trainer, TrainingArguments

    import prefix_kernels as pk

    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)  # the decode steps too go through prefix_attention_fwd
    data = [dict(input_ids=tokens(1, 7, seed=i)[0], labels=tokens(1, 7, seed=i)[0]) for i in range(6)]

    def build(seed):
        model = pk.get_prefix_model(mistral(sliding_window=4096), pk.PrefixTuningConfig(num_virtual_tokens=4,
                                                                                         backend="triton"))
        return randomize_prefix(model, seed=seed, scale=0.5)

    def train(model, out, resume=None):
        args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                                 eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                                 report_to=[], use_cpu=True, logging_strategy="no", dataloader_num_workers=0,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2])
        trainer.train(resume_from_checkpoint=resume)
        return [row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row]

    runs = {}
    for mode in ("pointers", "tma"):
        monkeypatch.setenv(TRITON_FWD_ENV, mode)
        flags = spy_forwards(monkeypatch)
        model = build(1)
        losses = train(model, tmp_path / mode)
        resumed = build(5)  # another initial prefix: only the checkpoint can make it equal the straight run
        train(resumed, tmp_path / f"{mode}-resumed", resume=str(tmp_path / mode / "checkpoint-2"))
        prefix = {n: p.detach().clone() for n, p in model.prefix_encoder.named_parameters()}
        for n, p in resumed.prefix_encoder.named_parameters():
            torch.testing.assert_close(p, prefix[n], rtol=0, atol=1e-6, msg=n)
        generated = model.generate(input_ids=tokens(2, 5, seed=9), attention_mask=torch.ones(2, 5, dtype=torch.long),
                                   max_new_tokens=4, do_sample=False)
        assert flags and all(flag == (mode == "tma") for flag in flags), (mode, len(flags), set(flags))
        runs[mode] = losses, prefix, generated
    (losses, prefix, generated), (tma_losses, tma_prefix, tma_generated) = runs["pointers"], runs["tma"]
    assert len(losses) == 2 and tma_losses == losses
    assert all(torch.equal(tma_prefix[n], prefix[n]) for n in prefix)
    assert torch.equal(tma_generated, generated)


HEAD_DIM_OF_BUCKET = {64: 64, 128: 96, 256: 200}
FWD_TABLES = {"plain": configs.TILE_CONFIGS, "dropout": configs.DROPOUT_TILE_CONFIGS,
              "features": configs.FEATURE_TILE_CONFIGS} if "triton" in available_backends(DEVICE) else {}


@pytest.mark.gpu
@pytest.mark.parametrize("table,bucket,tile", [(name, bucket, tile) for name, t in FWD_TABLES.items()
                                               for bucket, tiles in t["fwd"].items() for tile in tiles
                                               if bucket <= configs.TMA_MAX_D_PAD],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_forward_tile_under_tma(monkeypatch, table, bucket, tile):
    """Each forward tile of the plain, dropout and feature tables at the head dims TMA takes (D_PAD up to 128),
    forced under TMA, bf16, against the float64 oracle: padding and several prefixes (plain), with dropout
    replayed by the reference (dropout), a window, softcap and sinks (features)."""
    from test_triton_backend import force_tiles

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or newer")
    D = HEAD_DIM_OF_BUCKET[bucket]
    monkeypatch.setenv(TRITON_FWD_ENV, "tma")
    launched = force_tiles(monkeypatch, {"fwd": tile})
    flags = spy_forwards(monkeypatch)
    if table == "features":
        case = Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=D, window=100, softcap=5.0, sinks=True)
    else:
        case = Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=D, padding=True, T=2)
    dropout = dict(dropout_p=0.2, seed=99) if table == "dropout" else {}
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", **dropout)
    assert launched == [("fwd", tile)] and flags == [True], (launched, flags)
