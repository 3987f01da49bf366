"""Adapter files: PEFT's prefix-tuning format, plus what PEFT cannot keep.

- `adapter_config.json`: PEFT's `PrefixTuningConfig` fields (`peft_type: PREFIX_TUNING`, `num_layers`,
  `num_attention_heads` = Hkv, `token_dim` = Hkv * D, ...), so PEFT loads it.
- `adapter_model.safetensors`: `prompt_embeddings [P, L * 2 * Hkv * D]`, MLP output baked in, columns
  `((layer * 2 + {0: K, 1: V}) * Hkv + head) * D + d`.
- `prefix_kernels_config.json`: our config (position offset, dropout, heads, backend) and the model layout.
- `prefix_kernels_state.safetensors`: trainable head weights (`base_model.<name>`) and, for a full training
  state, the prefix encoder with its MLP (`prefix_encoder.<name>`).

Loading validates the files against the model (layers, KV heads, head dim, shapes, dtypes, head names) before
the model is modified, reads only JSON and safetensors (never pickle), turns a truncated or corrupted file into
a ValueError naming it, and rolls the model back if anything fails while the adapter is applied.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import CONFIG_CLASSES, PrefixTuningConfig
from .families import detect, model_device, task_type_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUR_CONFIG = "prefix_kernels_config.json"
OUR_STATE = "prefix_kernels_state.safetensors"


def _peft_config(pm, *, merged: bool) -> dict:
    cfg, layout = pm.prefix_config, pm.layout
    token_dim = layout.num_kv_heads * layout.head_dim
    return {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(pm.base_model.config, "_name_or_path", None) or None,
        "encoder_hidden_size": pm.prefix_encoder.encoder_hidden_size or token_dim,
        "inference_mode": True,
        "init_weights": "zero" if cfg.init == "zero" else None,
        "modules_to_save": list(pm.heads) or None,
        "num_attention_heads": layout.num_kv_heads,
        "num_layers": layout.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": bool(cfg.prefix_projection and not merged),
        "revision": None,
        "task_type": task_type_of(pm.base_model),
        "token_dim": token_dim,
    }


def save_adapter(pm, save_directory, *, training_state: bool) -> None:
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ADAPTER_CONFIG, "w") as f:
        json.dump(_peft_config(pm, merged=not training_state), f, indent=2, sort_keys=True)
    save_file({"prompt_embeddings": pm.merged_prompt_embeddings()}, str(d / ADAPTER_WEIGHTS))
    ours = pm.prefix_config.to_dict()
    if not training_state:
        ours["prefix_projection"] = False
    layout = pm.layout
    with open(d / OUR_CONFIG, "w") as f:
        json.dump({"config": ours, "model_type": layout.model_type, "groups": layout.groups,
                   "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                   "heads": list(pm.heads), "training_state": training_state}, f, indent=2)
    state = {}
    for name in pm.heads:
        for k, v in pm.base_model.get_submodule(name).state_dict().items():
            state[f"base_model.{name}.{k}"] = v.detach().cpu().contiguous()
    if training_state:
        for k, v in pm.prefix_encoder.state_dict().items():
            state[f"prefix_encoder.{k}"] = v.detach().cpu().contiguous()
    if state:
        save_file(state, str(d / OUR_STATE))
    elif (d / OUR_STATE).exists():
        (d / OUR_STATE).unlink()


def _mismatch(what: str, expected, got) -> ValueError:
    return ValueError(f"adapter does not fit this model: {what} expected {expected}, got {got}")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter file {path} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"adapter file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict:
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError (not exported stably) or OSError
        raise ValueError(f"adapter file {path} is not a readable safetensors file (truncated or corrupted?): "
                         f"{exc}") from None
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise TypeError(f"adapter file {path}: tensor {k!r} must be floating point, got {v.dtype}")
    return tensors


def _field(cfg: dict, key: str, path: str, kind=int):
    try:
        return kind(cfg[key])
    except KeyError:
        raise ValueError(f"{path} is missing the field {key!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {key!r} must be {kind.__name__}, got {cfg[key]!r}") from None


def load_adapter(cls, model, adapter_dir, *, is_trainable: bool, backend: str | None):
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} must hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    peft = _read_json(d / ADAPTER_CONFIG)
    ours = _read_json(d / OUR_CONFIG) if (d / OUR_CONFIG).is_file() else None
    if ours is not None and (not isinstance(ours.get("config"), dict) or "groups" not in ours):
        raise ValueError(f"{d / OUR_CONFIG} must hold the fields 'config' (an object) and 'groups'")
    if peft.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"adapter peft_type expected 'PREFIX_TUNING', got {peft.get('peft_type')!r}")

    layout = detect(model)
    L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    if ours is None and int(peft.get("num_transformer_submodules", 1)) != 1:
        raise ValueError("PEFT encoder-decoder prefix adapters (num_transformer_submodules=2, decoder layers tied) "
                         "are not supported; expected num_transformer_submodules 1, got "
                         f"{peft.get('num_transformer_submodules')}")
    for key in ("num_layers", "num_attention_heads", "token_dim", "num_virtual_tokens"):
        _field(peft, key, ADAPTER_CONFIG)
    if int(peft["num_layers"]) != L:
        raise _mismatch("num_layers", L, peft["num_layers"])
    if int(peft["num_attention_heads"]) != H:
        raise _mismatch("num_attention_heads (KV heads)", H, peft["num_attention_heads"])
    if int(peft["token_dim"]) != H * D:
        raise _mismatch(f"token_dim (KV heads {H} x head dim {D})", H * D, peft["token_dim"])
    if ours is not None and [list(g) for g in ours["groups"]] != [list(g) for g in layout.groups]:
        raise _mismatch("attention layers per stack", [list(g) for g in layout.groups], ours["groups"])
    P = int(peft["num_virtual_tokens"])

    weights = _read_safetensors(d / ADAPTER_WEIGHTS)
    if "prompt_embeddings" not in weights:
        raise ValueError(f"{ADAPTER_WEIGHTS} must hold 'prompt_embeddings', got keys {sorted(weights)}")
    prompt = weights["prompt_embeddings"]
    if tuple(prompt.shape) != (P, L * 2 * H * D):
        raise _mismatch("prompt_embeddings shape [P, L*2*Hkv*D]", (P, L * 2 * H * D), tuple(prompt.shape))

    state = _read_safetensors(d / OUR_STATE) if (d / OUR_STATE).is_file() else {}
    encoder_state = {k[len("prefix_encoder."):]: v for k, v in state.items() if k.startswith("prefix_encoder.")}
    head_state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}

    if ours is not None:
        cfg_dict = dict(ours["config"])
        config_cls = CONFIG_CLASSES.get(cfg_dict.pop("config_class", "PrefixTuningConfig"), PrefixTuningConfig)
        if not encoder_state:
            cfg_dict["prefix_projection"] = False
        config = config_cls.from_dict(cfg_dict)
    else:  # a PEFT adapter: its prompt_embeddings is the merged prefix
        config = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=False,
                                    modules_to_save=peft.get("modules_to_save") or None)
    if backend is not None:
        config.backend = backend
    config.validate()
    if config.num_virtual_tokens != P:
        raise _mismatch("num_virtual_tokens", config.num_virtual_tokens, P)

    # Check the heads against the model before anything is modified.
    model_state = model.state_dict()
    for k, v in head_state.items():
        if k not in model_state:
            raise _mismatch("head weight", "a parameter of the model", k)
        if tuple(model_state[k].shape) != tuple(v.shape):
            raise _mismatch(f"shape of {k}", tuple(model_state[k].shape), tuple(v.shape))
    if encoder_state:
        from ..encoders import PrefixEncoder

        probe = PrefixEncoder(P, L, H, D, projection=config.prefix_projection,
                              encoder_hidden_size=config.encoder_hidden_size)
        expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in encoder_state.items()}
        if expected != got:
            raise _mismatch("prefix encoder tensors", expected, got)

    # Apply; on any failure undo everything (head weights restored, patch removed): nothing is half-loaded.
    saved_heads = {k: model_state[k].detach().clone() for k in head_state}
    pm = cls(model, config, layout=layout)
    try:
        with torch.no_grad():
            if encoder_state:
                pm.prefix_encoder.load_state_dict(encoder_state)
            else:
                pm.prefix_encoder.load_prompt_embeddings(prompt)
            device = model_device(model)
            for k, v in head_state.items():
                module_name, _, leaf = k.rpartition(".")
                target = model.get_submodule(module_name)
                getattr(target, leaf).copy_(v.to(device))
    except BaseException:
        with torch.no_grad():
            for k, v in saved_heads.items():
                module_name, _, leaf = k.rpartition(".")
                getattr(model.get_submodule(module_name), leaf).copy_(v)
        pm.unload()
        raise
    if not is_trainable:
        for p in pm.prefix_encoder.parameters():
            p.requires_grad_(False)
        for name in pm.heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(False)
    return pm
