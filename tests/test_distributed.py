"""Distributed training of a prefix: DDP with 2 processes (gloo, CPU) gives the same prefix parameters after
N steps as one process on the whole batch; so does FSDP2 (`fully_shard`) on CPU.

Both run in one pair of spawned processes (a module fixture) to pay the start-up of torch + transformers once.
A failure in a process is recorded with its traceback and fails the test that needed it."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two spawned processes importing torch + transformers: ~20-70 s

WORLD = 2
STEPS = 3
BATCH, SEQ = 8, 12
LR = 0.5


def has_fully_shard() -> bool:
    if not torch.distributed.is_available():
        return False
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build():
    """A tiny Llama with a reparameterized prefix (MLP) on every layer; identical in every process."""
    import prefix_kernels as pk
    from tiny_models import llama

    model = llama()
    torch.manual_seed(1)
    return pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                            encoder_hidden_size=32, backend="cpu"))


def batch(step: int):
    from tiny_models import tokens

    ids = tokens(BATCH, SEQ, seed=100 + step)
    mask = torch.ones_like(ids)
    return ids, mask


def train(module, params, rows: slice, steps: int = STEPS):
    """SGD on the causal-LM loss (a mean over the rank's tokens; every row has SEQ tokens, so the mean of
    the ranks' gradients is the gradient of the whole batch)."""
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(steps):
        ids, mask = batch(step)
        ids, mask = ids[rows], mask[rows]
        out = module(input_ids=ids, attention_mask=mask, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def prefix_params(pm) -> dict:
    out = {}
    for name, p in pm.prefix_encoder.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 DTensor shard
            t = t.full_tensor()
        out[name] = t.clone()
    return out


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    result = {}
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        pm = build()
        ddp = DDP(pm)
        params = [p for p in ddp.parameters() if p.requires_grad]
        result["ddp_losses"] = train(ddp, params, rows)
        result["ddp"] = prefix_params(pm)
        result["ddp_trainable"] = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    except Exception:
        result["ddp_error"] = traceback.format_exc()
    dist.barrier()
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        pm = build()
        fully_shard(pm.prefix_encoder, mesh=mesh)
        fully_shard(pm, mesh=mesh)
        params = [p for p in pm.parameters() if p.requires_grad]
        result["fsdp_losses"] = train(pm, params, rows)
        result["fsdp"] = prefix_params(pm)
    except Exception:
        result["fsdp_error"] = traceback.format_exc()
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    mp.start_processes(_worker, args=(WORLD, free_port(), outdir), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pm = build()
        single_losses = train(pm, [p for p in pm.parameters() if p.requires_grad], slice(None))
        single = prefix_params(pm)
    finally:
        torch.set_num_threads(threads)
    return ranks, single, single_losses


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(runs):
    ranks, single, single_losses = runs
    for r in ranks:
        assert "ddp_error" not in r, r.get("ddp_error")
    # the prefix (and only the prefix) trains; the ranks agree bit for bit (DDP's all-reduce)
    assert all(n.startswith("prefix_encoder.") for n in ranks[0]["ddp_trainable"])
    assert max_diff(ranks[0]["ddp"], ranks[1]["ddp"]) == 0.0
    start = build()
    moved = max_diff(prefix_params(start), single)
    assert moved > 1e-3  # the steps really changed the prefix
    diff = max_diff(ranks[0]["ddp"], single)
    print(f"DDP(2 x {BATCH // WORLD} rows) vs 1 x {BATCH} rows after {STEPS} steps: max |diff| = {diff:.3e} "
          f"(prefix moved by {moved:.3e})")
    assert diff < 1e-5
    # the mean of the ranks' losses is the whole-batch loss
    for step in range(STEPS):
        mean = sum(r["ddp_losses"][step] for r in ranks) / WORLD
        assert abs(mean - single_losses[step]) < 1e-5


@pytest.mark.skipif(not has_fully_shard(), reason=f"torch {torch.__version__} has no FSDP2 fully_shard")
def test_fsdp2_fully_shard_on_cpu(runs):
    ranks, single, _ = runs
    for r in ranks:
        assert "fsdp_error" not in r, r.get("fsdp_error")
    assert max_diff(ranks[0]["fsdp"], ranks[1]["fsdp"]) == 0.0
    diff = max_diff(ranks[0]["fsdp"], single)
    print(f"FSDP2(2 x {BATCH // WORLD} rows) vs 1 x {BATCH} rows after {STEPS} steps: max |diff| = {diff:.3e}")
    assert diff < 1e-5
