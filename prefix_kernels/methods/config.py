"""Configurations of the prefix methods (names follow Hugging Face PEFT so that its users feel at home).

`PrefixTuningConfig` is Prefix Tuning (Li & Liang, 2021): per-layer prefix keys and values, optionally
reparameterized by an MLP during training. `PTuningV2Config` is P-Tuning v2 (Liu et al., 2022): the same
deep prompts, without reparameterization by default and with dropout on the prefix as in its reference code.
Both describe only the prefix; the model-dependent sizes (layers, KV heads, head dim) are read from the model
when the config is applied with `prefix_kernels.get_prefix_model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..ops.backends import BACKENDS

INITS = ("random", "zero")


class DictConfig:
    """The dict form of a dataclass config, as saved in adapter files. `from_dict` ignores keys that are not
    fields of the class (such as `config_class`), so that files written by other versions still load."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config_class"] = type(self).__name__
        return d

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PrefixTuningConfig(DictConfig):
    """Prefix Tuning.

    Args:
        num_virtual_tokens: P, the number of prefix key/value vectors per layer and KV head.
        prefix_projection: reparameterize the prefix as Embedding(P, Hkv*D) -> Linear -> Tanh -> Linear, as in
            the paper and PEFT; the MLP is dropped when the prefix is exported (`PrefixModel.export_merged`).
        encoder_hidden_size: hidden size of that MLP (default: Hkv * D, PEFT's `token_dim`).
        init: "random" (N(0, 1), PEFT's default) or "zero" (zero prefix, or zero last MLP layer; PEFT's
            `init_weights="zero"`).
        position_offset: the n real tokens of a row sit at positions P .. P+n-1 (PEFT and the P-Tuning v2 code
            do this, so their checkpoints give identical outputs); False puts them at 0 .. n-1.
        prefix_dropout: dropout on the prefix keys and values in training.
        modules_to_save: names of base-model modules kept trainable (e.g. a classification head). None: the
            task head of classification / QA models ("classifier", "score", "classification_head",
            "qa_outputs") when present, nothing otherwise.
        backend: prefix_attention backend for the attention layers (None: fastest for the device).
    """

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    position_offset: bool = True
    prefix_dropout: float = 0.0
    modules_to_save: list[str] | None = None
    backend: str | None = None
    peft_type: str = field(default="PREFIX_TUNING", init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise TypeError / ValueError naming the field, what is expected and what was given."""
        P = self.num_virtual_tokens
        if isinstance(P, bool) or not isinstance(P, int):
            raise TypeError(f"num_virtual_tokens must be an int, got {type(P).__name__}")
        if P < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {P}")
        for name in ("prefix_projection", "position_offset"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        h = self.encoder_hidden_size
        if h is not None:
            if isinstance(h, bool) or not isinstance(h, int):
                raise TypeError(f"encoder_hidden_size must be an int or None, got {type(h).__name__}")
            if h < 1:
                raise ValueError(f"encoder_hidden_size must be >= 1, got {h}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        d = self.prefix_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise TypeError(f"prefix_dropout must be a float, got {type(d).__name__}")
        if not 0.0 <= d < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {d}")
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise TypeError(f"modules_to_save must be a list of module names or None, got {self.modules_to_save!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-Tuning v2: deep prompts in every layer, no reparameterization by default, dropout 0.1 on the prefix
    (the reference code applies the backbone's hidden dropout to its prefix). Same fields as
    `PrefixTuningConfig`. Prompt lengths of ~16-64 suit classification and ~100-224 sequence labeling; train
    the prefix and the head at lr 1e-2 to 5e-2 for several times the epochs fine-tuning needs (about 1e-3 with
    `prefix_projection=True`): measured in docs/methods.md ("What the knobs do")."""

    prefix_dropout: float = 0.1


CONFIG_CLASSES = {"PrefixTuningConfig": PrefixTuningConfig, "PTuningV2Config": PTuningV2Config}
