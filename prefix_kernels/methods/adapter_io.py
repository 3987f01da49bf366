"""Adapter files of every method: their names, the safe readers, and the prefix adapter format.

Only JSON and safetensors are ever read (never pickle); a truncated or corrupted file becomes a ValueError
naming it. The prefix adapter (Prefix Tuning / P-Tuning v2) is PEFT's prefix-tuning format, plus what PEFT
cannot keep:

- `adapter_config.json`: PEFT's `PrefixTuningConfig` fields (`peft_type: PREFIX_TUNING`, `num_layers`,
  `num_attention_heads` = Hkv, `token_dim` = Hkv * D, ...), so PEFT loads it.
- `adapter_model.safetensors`: `prompt_embeddings [P, layers * 2 * Hkv * D]`, MLP output baked in, columns
  `((layer * 2 + {0: K, 1: V}) * Hkv + head) * D + d`.
- `prefix_kernels_config.json`: our config (position offset, dropout, heads, backend) and the model layout.
- `prefix_kernels_state.safetensors`: trainable head weights (`base_model.<name>`) and, for a full training
  state, the prefix encoder with its MLP (`prefix_encoder.<name>`).

Loading a prefix adapter is four steps, the first three before the model is modified:
`read_prefix_adapter` (the files, checked on their own), `prefix_config_from` (the config they describe),
`check_prefix_adapter` (against the model: layers, KV heads, head dim, shapes, head names), then
`PrefixModel.from_pretrained` applies them, rolling the model back if anything fails.

A bank of prefixes (`MultiPrefixModel`) is saved as one prefix adapter per sub-folder plus `prefix_bank.json`
(the adapters' names, in bank order, and their sub-folders). P-Tuning v1 (`PTuningModel`) and the P-Tuning v2
task heads (`PrefixTaskModel`) keep their own files, named here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..transformers.families import ModelLayout, task_type_of
from .config import CONFIG_CLASSES, PrefixTuningConfig
from .encoders import PrefixEncoder

# Prefix adapters (PEFT's format + ours).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX_KERNELS_CONFIG = "prefix_kernels_config.json"
PREFIX_KERNELS_STATE = "prefix_kernels_state.safetensors"
# A bank of prefix adapters.
BANK_INDEX = "prefix_bank.json"
# P-Tuning v1 (`ADAPTER_WEIGHTS` holds its final virtual-token embeddings).
PTUNING_CONFIG = "ptuning_config.json"
PTUNING_ENCODER = "prompt_encoder.safetensors"
# P-Tuning v2 task heads, saved next to a prefix adapter.
TASK_CONFIG = "task_config.json"
TASK_HEADS = "task_heads.safetensors"

# PEFT's prefix tuning puts one prefix on the decoder self-attention of encoder-decoders, its layer i tied to
# layer i + layers/2; an adapter with encoder, decoder and cross-attention prefixes would load there without
# an error and give other logits. This peft_type (not one of PEFT's) makes PEFT refuse it.
PEFT_TYPE = "PREFIX_TUNING"
ENCODER_DECODER_PEFT_TYPE = "PREFIX_KERNELS_ENCODER_DECODER"


# ---------------------------------------------------------------------------------------------- readers/writers
def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; FileNotFoundError / ValueError naming the file if it is missing or not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter file {path} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"adapter file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a safetensors file (CPU); ValueError / TypeError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError (not exported stably) or OSError
        raise ValueError(f"adapter file {path} is not a readable safetensors file (truncated or corrupted?): "
                         f"{exc}") from None
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise TypeError(f"adapter file {path}: tensor {k!r} must be floating point, got {v.dtype}")
    return tensors


def write_json(path: str | os.PathLike, data: dict, *, sort_keys: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write CPU contiguous copies of `tensors` (detached)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def resolve_adapter_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """The local folder of an adapter given as a folder or as a Hugging Face Hub id (`org/name`), downloaded
    through the Hub cache (`HF_HUB_OFFLINE=1` reads the cache only). An existing local folder wins; a path that
    cannot be a Hub id is returned as it is, for the reader to name what is missing."""
    path = Path(name_or_path)
    name = str(name_or_path)
    if path.exists() or name.count("/") > 1 or name.startswith((".", "/", "~")) or "\\" in name:
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # without the Hub client, only local folders
        return path
    try:
        local = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token)
    except HFValidationError:
        return path
    except Exception as exc:  # offline without a cached copy, unknown repository, no network, ...
        raise FileNotFoundError(f"adapter {name} is neither a local folder nor readable from the Hugging Face "
                                f"Hub (revision {revision or 'main'}): {type(exc).__name__}: {exc}") from exc
    return Path(local)


def _field(cfg: dict, key: str, path, kind=int):
    try:
        return kind(cfg[key])
    except KeyError:
        raise ValueError(f"{path} is missing the field {key!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {key!r} must be {kind.__name__}, got {cfg[key]!r}") from None


# ---------------------------------------------------------------------------------------------- prefix adapters
def _peft_config(model: nn.Module, config: PrefixTuningConfig, layout: ModelLayout, heads: list[str],
                 merged: bool) -> dict:
    """adapter_config.json: the fields of PEFT's `PrefixTuningConfig`, so that PEFT loads the adapter."""
    token_dim = layout.num_kv_heads * layout.head_dim
    encoder_decoder = layout.kind == "encoder-decoder"
    extra = {"prefix_kernels_note": (
        "encoder, decoder self- and cross-attention prefixes: PEFT's prefix tuning cannot hold them (it ties "
        "decoder layers), so this adapter loads with prefix_kernels.PrefixModel.from_pretrained only")} \
        if encoder_decoder else {}
    return {
        **extra,
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "encoder_hidden_size": config.encoder_hidden_size or token_dim,
        "inference_mode": True,
        "init_weights": "zero" if config.init == "zero" else None,
        "modules_to_save": list(heads) or None,
        "num_attention_heads": layout.num_kv_heads,
        "num_layers": layout.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "peft_type": ENCODER_DECODER_PEFT_TYPE if encoder_decoder else PEFT_TYPE,
        "prefix_projection": bool(config.prefix_projection and not merged),
        "revision": None,
        "task_type": task_type_of(model),
        "token_dim": token_dim,
    }


def save_prefix_adapter(directory: str | os.PathLike, *, model: nn.Module, config: PrefixTuningConfig,
                        layout: ModelLayout, prompt_embeddings: torch.Tensor, heads: list[str] = (),
                        encoder_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a prefix adapter for `model`: `prompt_embeddings [P, layers*2*Hkv*D]` (the merged prefix), the
    weights of the `heads` submodules, and with `encoder_state` (a full training state) the prefix encoder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    merged = encoder_state is None
    write_json(d / ADAPTER_CONFIG, _peft_config(model, config, layout, heads, merged), sort_keys=True)
    write_safetensors(d / ADAPTER_WEIGHTS, {"prompt_embeddings": prompt_embeddings})
    ours = config.to_dict()
    if merged:
        ours["prefix_projection"] = False
    write_json(d / PREFIX_KERNELS_CONFIG, {
        "config": ours, "model_type": layout.model_type, "groups": layout.groups,
        "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim, "heads": list(heads),
        "training_state": not merged})
    state = {f"base_model.{name}.{k}": v for name in heads for k, v in model.get_submodule(name).state_dict().items()}
    if not merged:
        state.update({f"prefix_encoder.{k}": v for k, v in encoder_state.items()})
    if state:
        write_safetensors(d / PREFIX_KERNELS_STATE, state)
    elif (d / PREFIX_KERNELS_STATE).exists():
        (d / PREFIX_KERNELS_STATE).unlink()


@dataclass
class PrefixAdapterFiles:
    """The contents of a prefix adapter folder, checked on their own (not yet against a model)."""

    directory: Path
    peft: dict  # adapter_config.json
    ours: dict | None  # prefix_kernels_config.json (None: a PEFT adapter)
    prompt_embeddings: torch.Tensor  # [P, layers * 2 * Hkv * D]
    encoder_state: dict[str, torch.Tensor] = field(default_factory=dict)  # full prefix encoder, MLP included
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)  # base-model head weights

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.peft["num_virtual_tokens"])


def read_prefix_adapter(directory: str | os.PathLike, *, with_state: bool = True) -> PrefixAdapterFiles:
    """Read a prefix adapter folder (ours or PEFT's). `with_state=False` skips the head weights and the full
    prefix encoder (a reader that needs the merged prefix only)."""
    d = Path(directory)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} must hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    peft = read_json(d / ADAPTER_CONFIG)
    ours = read_json(d / PREFIX_KERNELS_CONFIG) if (d / PREFIX_KERNELS_CONFIG).is_file() else None
    if ours is not None and (not isinstance(ours.get("config"), dict) or "groups" not in ours):
        raise ValueError(f"{d / PREFIX_KERNELS_CONFIG} must hold the fields 'config' (an object) and 'groups'")
    ours_only = ours is not None and peft.get("peft_type") == ENCODER_DECODER_PEFT_TYPE
    if peft.get("peft_type") != PEFT_TYPE and not ours_only:
        raise ValueError(f"adapter peft_type expected {PEFT_TYPE!r}, got {peft.get('peft_type')!r}")
    if ours is None and peft.get("num_transformer_submodules", 1) != 1:
        raise ValueError("PEFT encoder-decoder prefix adapters (num_transformer_submodules=2, decoder layers tied) "
                         "are not supported; expected num_transformer_submodules 1, got "
                         f"{peft.get('num_transformer_submodules')}")
    for key in ("num_layers", "num_attention_heads", "token_dim", "num_virtual_tokens"):
        _field(peft, key, d / ADAPTER_CONFIG)
    weights = read_safetensors(d / ADAPTER_WEIGHTS)
    if "prompt_embeddings" not in weights:
        raise ValueError(f"{d / ADAPTER_WEIGHTS} must hold 'prompt_embeddings', got keys {sorted(weights)}")
    files = PrefixAdapterFiles(d, peft, ours, weights["prompt_embeddings"])
    if with_state and (d / PREFIX_KERNELS_STATE).is_file():
        state = read_safetensors(d / PREFIX_KERNELS_STATE)
        files.encoder_state = _strip(state, "prefix_encoder.")
        files.head_state = _strip(state, "base_model.")
    return files


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prefix_config_from(files: PrefixAdapterFiles, *, backend: str | None = None) -> PrefixTuningConfig:
    """The config the files describe: ours, or for a PEFT adapter a plain prefix of its P (its
    prompt_embeddings is the merged prefix). Without the full encoder state the MLP is gone, so the prefix
    loads unprojected. `backend` replaces the saved backend when given."""
    if files.ours is not None:
        cfg = dict(files.ours["config"])
        config_cls = CONFIG_CLASSES.get(cfg.pop("config_class", "PrefixTuningConfig"), PrefixTuningConfig)
        if not files.encoder_state:
            cfg["prefix_projection"] = False
        config = config_cls.from_dict(cfg)
    else:
        config = PrefixTuningConfig(num_virtual_tokens=files.num_virtual_tokens, prefix_projection=False,
                                    modules_to_save=files.peft.get("modules_to_save") or None)
    if backend is not None:
        config.backend = backend
    config.validate()
    return config


def _mismatch(files: PrefixAdapterFiles, what: str, expected, got) -> ValueError:
    return ValueError(f"adapter {files.directory} does not fit this model: {what} expected {expected}, got {got}")


def check_prefix_geometry(files: PrefixAdapterFiles, layout: ModelLayout) -> None:
    """The merged prefix fits the model: layers, KV heads, head dim, attention stacks, tensor shape."""
    layers, Hkv, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
    peft = files.peft
    if int(peft["num_layers"]) != layers:
        raise _mismatch(files, "num_layers", layers, peft["num_layers"])
    if int(peft["num_attention_heads"]) != Hkv:
        raise _mismatch(files, "num_attention_heads (KV heads)", Hkv, peft["num_attention_heads"])
    if int(peft["token_dim"]) != Hkv * D:
        raise _mismatch(files, f"token_dim (KV heads {Hkv} x head dim {D})", Hkv * D, peft["token_dim"])
    groups = [list(g) for g in layout.groups]
    if files.ours is not None and [list(g) for g in files.ours["groups"]] != groups:
        raise _mismatch(files, "attention layers per stack", groups, files.ours["groups"])
    expected = (files.num_virtual_tokens, layers * 2 * Hkv * D)
    if tuple(files.prompt_embeddings.shape) != expected:
        raise _mismatch(files, "prompt_embeddings shape [P, layers*2*Hkv*D]", expected,
                        tuple(files.prompt_embeddings.shape))


def check_prefix_adapter(files: PrefixAdapterFiles, config: PrefixTuningConfig, model: nn.Module,
                         layout: ModelLayout) -> None:
    """Everything in the files fits `model` and `config`, checked before the model is modified."""
    check_prefix_geometry(files, layout)
    if config.num_virtual_tokens != files.num_virtual_tokens:
        raise ValueError(f"adapter {files.directory} is inconsistent: {PREFIX_KERNELS_CONFIG} says "
                         f"num_virtual_tokens={config.num_virtual_tokens}, {ADAPTER_CONFIG} says "
                         f"{files.num_virtual_tokens}")
    model_state = model.state_dict()
    for k, v in files.head_state.items():
        if k not in model_state:
            raise _mismatch(files, "head weight", "a parameter of the model", k)
        if tuple(model_state[k].shape) != tuple(v.shape):
            raise _mismatch(files, f"shape of {k}", tuple(model_state[k].shape), tuple(v.shape))
    if files.encoder_state:
        probe = PrefixEncoder(config.num_virtual_tokens, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                              projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size)
        expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in files.encoder_state.items()}
        if expected != got:
            raise _mismatch(files, "prefix encoder tensors", expected, got)


# ---------------------------------------------------------------------------------------------- banks
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def bank_folders(names: list[str]) -> dict[str, str]:
    """The sub-folder of each adapter of a bank: its name when that is a plain file name, else its number."""
    folders = {}
    for i, name in enumerate(names):
        plain = _PLAIN_NAME.fullmatch(name) is not None and name.lower() != BANK_INDEX
        folders[name] = name if plain else f"adapter_{i}"
    if len({f.lower() for f in folders.values()}) != len(folders):  # case-insensitive file systems
        folders = {name: f"adapter_{i}" for i, name in enumerate(names)}
    return folders


def write_bank_index(directory: str | os.PathLike, folders: dict[str, str]) -> None:
    write_json(Path(directory) / BANK_INDEX,
               {"adapters": [{"name": name, "path": path} for name, path in folders.items()]})


def is_bank(directory: str | os.PathLike) -> bool:
    return (Path(directory) / BANK_INDEX).is_file()


def read_bank_index(directory: str | os.PathLike) -> dict[str, Path]:
    """`{adapter name: its folder}` in bank order, from a folder written by `MultiPrefixModel.save_pretrained`."""
    d = Path(directory)
    if not is_bank(d):
        raise FileNotFoundError(f"{d} must hold {BANK_INDEX} (a bank saved by MultiPrefixModel.save_pretrained)")
    entries = read_json(d / BANK_INDEX).get("adapters")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{d / BANK_INDEX} must hold a non-empty list 'adapters'")
    folders = {}
    for entry in entries:
        name, path = (entry.get("name"), entry.get("path")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str) or _PLAIN_NAME.fullmatch(path) is None:
            raise ValueError(f"{d / BANK_INDEX}: each adapter must be {{'name': str, 'path': a sub-folder name}}, "
                             f"got {entry!r}")
        if name in folders:
            raise ValueError(f"{d / BANK_INDEX}: adapter name {name!r} appears twice")
        folders[name] = d / path
    return folders


# ---- transformers.Trainer checkpoints: a wrapper's state_dict (AdapterStateDict) in one file ----------------

CHECKPOINT_WEIGHTS = "model.safetensors"  # what transformers.Trainer writes for a model that is not a PreTrainedModel
CHECKPOINT_META = "prefix_kernels_meta"


def encode_meta(meta: dict) -> torch.Tensor:
    """A JSON object as a uint8 tensor: the one way to put a config into the single tensor file Trainer writes."""
    return torch.frombuffer(bytearray(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8).clone()


def decode_meta(tensor: torch.Tensor, where) -> dict:
    try:
        meta = json.loads(bytes(tensor.to(torch.uint8).cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: tensor {CHECKPOINT_META!r} is not a JSON object: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: tensor {CHECKPOINT_META!r} must hold a JSON object")
    return meta


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(meta, tensors) of a folder written by `transformers.Trainer` for a wrapper whose `state_dict` is an
    `AdapterStateDict`; None when the folder holds no such file."""
    path = Path(directory) / CHECKPOINT_WEIGHTS
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError (not exported stably) or OSError
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from None
    if CHECKPOINT_META not in tensors:
        raise ValueError(f"{path} holds no {CHECKPOINT_META!r}: not a checkpoint of a prefix_kernels model (a "
                         f"full model's weights?)")
    meta = decode_meta(tensors.pop(CHECKPOINT_META), path)
    for k, v in tensors.items():
        if CHECKPOINT_META not in k and not v.is_floating_point():
            raise TypeError(f"{path}: tensor {k!r} must be floating point, got {v.dtype}")
    return meta, tensors


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
