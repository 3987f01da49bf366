"""transformers.Trainer on a wrapped tiny Llama, run by tests/test_trainer_processes.py: in the test's own
process (one process, the whole batch) and as the script that `torchrun` / `accelerate launch` start in every
process (`python tests/trainer_worker.py OUT_DIR PER_DEVICE_BATCH OPTIM[,OPTIM...]`).

For each optimizer, one after the other in the same processes (their start-up is most of the time), every
process writes OUT_DIR/OPTIM/rank{R}.pt: its final prefix, the rows it trained on per step, the losses and what
the Trainer set up (world size, parallel mode, process-group backend, whether it wrapped the model in DDP);
the main process also leaves the Trainer's checkpoint in OUT_DIR/OPTIM/checkpoint-{STEPS}."""

from __future__ import annotations

import os
import sys
import warnings

import torch

STEPS = 3
SEQ = 12
P = 4
LR = {"sgd": 0.5, "adamw_torch": 1e-2}


def build():
    import prefix_kernels as pk
    from tiny_models import llama

    model = llama()
    torch.manual_seed(1)
    return pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                            encoder_hidden_size=32, backend="cpu"))


def dataset(rows: int):
    """Equal-length rows without padding: every process's loss is a mean over the same number of tokens, so
    the mean of the ranks' gradients (DDP's all-reduce) is the gradient of the whole batch."""
    from tiny_models import tokens

    ids = tokens(rows, SEQ, seed=7)
    # row id in column 0 (token ids start at 3, rows < 100 keep it in the vocabulary), so that each process
    # can report which rows it trained on
    ids[:, 0] = torch.arange(rows) + 3
    return [dict(input_ids=ids[i], labels=ids[i].clone()) for i in range(rows)]


def prefix_params(pm) -> dict:
    return {n: p.detach().clone() for n, p in pm.prefix_encoder.named_parameters()}


def run(out_dir: str, per_device_batch: int, optim: str, world: int = 1) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class RecordRows(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.rows_seen.append((inputs["input_ids"][:, 0] - 3).tolist())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class RecordLoss(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    pm = build()
    start = prefix_params(pm)
    # "sequential": the whole-batch run's step k takes rows [k*2b, (k+1)*2b); accelerate's batch sharding gives
    # the processes the per-device batches 2k and 2k+1 of the same order, i.e. the same rows.
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=per_device_batch,
                             learning_rate=LR[optim], optim=optim, lr_scheduler_type="constant", weight_decay=0.0,
                             train_sampling_strategy="sequential", use_cpu=True,
                             # gloo in a single unlaunched process makes accelerate expect a process group
                             ddp_backend="gloo" if world > 1 else None,
                             ddp_find_unused_parameters=False, save_strategy="steps", save_steps=STEPS,
                             logging_strategy="steps", logging_steps=1, report_to=[], dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    losses = RecordLoss()
    trainer = RecordRows(model=pm, args=args, train_dataset=dataset(STEPS * per_device_batch * world),
                         callbacks=[losses])
    trainer.rows_seen = []
    trainer.train()
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return dict(
        rank=args.process_index, world_size=args.world_size, parallel_mode=str(args.parallel_mode),
        backend=torch.distributed.get_backend() if dist else None,
        wrapped=type(trainer.model_wrapped).__name__, model_is_pm=trainer.model is pm,
        trainable=sorted(n for n, p in pm.named_parameters() if p.requires_grad),
        rows=trainer.rows_seen, losses=losses.losses, global_step=trainer.state.global_step,
        start=start, prefix=prefix_params(pm),
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    out_dir, per_device_batch, optims = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for optim in optims:
        sub = os.path.join(out_dir, optim)
        os.makedirs(sub, exist_ok=True)
        result = run(sub, per_device_batch, optim, world)
        torch.save(result, os.path.join(sub, f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    main()
