"""Which transformers models the integration supports, and where their attention layers and positions are.

Any model on transformers' attention interface (its attention layers call
`ALL_ATTENTION_FUNCTIONS.get_interface`, which `PreTrainedModel._can_set_attn_implementation` checks) is handled
generically: its attention modules are the submodules that carry `is_causal` and `scaling` (the attributes the
interface's attention functions read). They are grouped into stacks (decoder-only / encoder-only: "self";
encoder-decoder: "encoder", "decoder", "cross"), each with its own prefix per layer, never tied. `FAMILIES`
names the families the tests cover; `UNSUPPORTED` what cannot work and why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from .attention import ATTN_IMPLEMENTATION


@dataclass(frozen=True)
class Family:
    """A family the tests cover by name; `kind` is what its models are ("decoder", "encoder" or
    "encoder-decoder")."""

    name: str
    model_types: tuple[str, ...]
    kind: str


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "decoder"),
    Family("GPT-2", ("gpt2",), "decoder"),
    Family("BERT", ("bert",), "encoder"),
    Family("RoBERTa", ("roberta",), "encoder"),
    Family("BART", ("bart",), "encoder-decoder"),
    # sliding windows, soft-capping, sinks (tests/test_transformers_features.py)
    Family("Mistral", ("mistral",), "decoder"),
    Family("Phi-3", ("phi3",), "decoder"),
    Family("Qwen2", ("qwen2",), "decoder"),
    Family("Gemma 2", ("gemma2",), "decoder"),
    Family("Gemma 3", ("gemma3_text",), "decoder"),
    Family("GPT-OSS", ("gpt_oss",), "decoder"),
)

UNSUPPORTED: dict[str, str] = {
    "t5": "T5 adds a learned relative position bias to the attention scores, which the fused op does not take",
    "mt5": "mT5 adds a learned relative position bias to the attention scores, which the fused op does not take",
    "umt5": "UMT5 adds a learned relative position bias to the attention scores, which the fused op does not take",
    "longt5": "LongT5 uses local/transient-global attention with a position bias",
}


def supported_families_text() -> str:
    tested = ", ".join(f.name for f in FAMILIES)
    return (f"tested families: {tested}; any other model whose attention calls transformers' AttentionInterface "
            f"(Qwen3, Gemma, GPT-NeoX, OPT, XLM-R, ELECTRA, ...) is handled generically")


def family_of(model_type: str) -> Family | None:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return None


@dataclass
class ModelLayout:
    """Where the prefix goes in one model: every attention module with its slot in the prefix encoder."""

    model_type: str
    kind: str
    groups: list[tuple[str, int]]  # (stack name, number of layers), in prefix-encoder order
    attention_modules: list[tuple[str, nn.Module]] = field(repr=False)  # slot i -> (qualified name, module)
    num_kv_heads: int = 0
    head_dim: int = 0
    position_style: str = "none"  # "position_ids", "roberta", "embed_positions", "none"
    rope: bool = False
    max_positions: int | None = None  # size of the absolute position table (None: no limit)
    padding_idx: int | None = None  # RoBERTa-style positions
    position_modules: list[nn.Module] = field(default_factory=list, repr=False)
    # What the position offset cannot shift (a description), when the model has positions no hook moves.
    unshiftable_positions: str | None = None
    # The argument of `model.set_attn_implementation`: the name, or `{sub-config: name}` when only the
    # sub-model that owns the prefix (the language model of a vision-language model) may use it.
    attn_implementation: str | dict = ATTN_IMPLEMENTATION

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)


def _is_attention_module(module: nn.Module) -> bool:
    """A module that calls the attention interface: it carries `is_causal` and its scale (`scaling`), or,
    as ModernBERT's, passes the scale per call and names itself an attention with a `head_dim`."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel) or not hasattr(module, "is_causal"):
        return False
    return hasattr(module, "scaling") or (type(module).__name__.endswith("Attention") and hasattr(module, "head_dim"))


def _text_submodel(model: nn.Module) -> tuple[str | None, str]:
    """For a model with sub-configs (vision-language models): the sub-config key and the qualified name of
    the sub-model that owns the text config; (None, "") when the model is its own text model."""
    from transformers import PreTrainedModel

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is config:
        return None, ""
    key = next((k for k in getattr(type(config), "sub_configs", {}) if getattr(config, k, None) is text_config), None)
    if key is None:
        return None, ""
    for name, module in model.named_modules():
        if name and isinstance(module, PreTrainedModel) and module.config is text_config:
            return key, name
    return None, ""


def _is_cross(name: str, module: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return (bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower()
            or last in ("encoder_attn", "crossattention", "cross_attn", "encdecattention"))


def _kv_heads_and_head_dim(config) -> tuple[int, int, list[str]]:
    problems = []
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "is_encoder_decoder", False):
        enc, dec = getattr(config, "encoder_attention_heads", heads), getattr(config, "decoder_attention_heads", heads)
        if enc != dec:
            problems.append(f"encoder and decoder must have the same number of attention heads, got {enc} and {dec}")
    if not head_dim or not kv_heads:
        problems.append("could not read num_attention_heads / hidden_size / head_dim from the model config")
    qk_head_dim = getattr(config, "qk_head_dim", None) or (
        (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0))
    v_head_dim = getattr(config, "v_head_dim", None)
    if v_head_dim and qk_head_dim and v_head_dim != qk_head_dim:
        problems.append(f"attention with different key and value head sizes (multi-head latent attention: "
                        f"qk_head_dim {qk_head_dim}, v_head_dim {v_head_dim}) is not supported: the fused op "
                        f"takes one head size for keys and values")
    return kv_heads, head_dim, problems


# The layer types whose attention the op applies: full attention and causal sliding windows (the window and the
# layer's other features, soft-capping and sinks, come with each call: `attention.attention_features`).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _attention_features_not_supported(config, modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Attention features the fused op does not apply, read from the config when the model is wrapped, so that
    such a model is refused before it runs rather than at its first forward (or, for a window longer than the
    inputs of a test, not at all). Causal sliding windows (Mistral, Phi-3, Qwen2, Gemma 2/3, GPT-OSS), logit
    soft-capping (Gemma 2) and sinks (GPT-OSS) are applied per call; what is refused here: layer types other than
    full and sliding attention (chunked, linear, ...), chunked attention, and sliding windows in layers that
    are not causal (ModernBERT's local layers, Gemma 3 with bidirectional attention: a symmetric window)."""
    found = []
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # the per-layer truth where transformers gives one (Qwen2's use_sliding_window, Gemma 2/3)
        other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if other:
            found.append(f"layer types {other} (supported: {', '.join(SUPPORTED_LAYER_TYPES)})")
        sliding = "sliding_attention" in layer_types
    else:
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None:
        found.append(f"chunked attention (attention_chunk_size={chunk})")
    bidirectional = sorted({type(m).__name__ for _, m in modules if not getattr(m, "is_causal", True)})
    if sliding and bidirectional:
        found.append(f"bidirectional (symmetric) sliding-window attention (sliding_window="
                     f"{getattr(config, 'sliding_window', None)} in the local layers of {', '.join(bidirectional)}, "
                     f"which are not causal)")
    return [f"prefix_kernels does not support {what}" for what in found]


def detect(model: nn.Module) -> ModelLayout:
    """Check that `model` can take a fused prefix and find its attention modules; raise before touching it."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type in UNSUPPORTED:
        raise ValueError(f"model type {model_type!r} ({type(model).__name__}) is not supported: "
                         f"{UNSUPPORTED[model_type]}. Supported: {supported_families_text()}")
    if not model._can_set_attn_implementation():
        raise ValueError(f"model type {model_type!r} ({type(model).__name__}) is not on transformers' attention "
                         f"interface (AttentionInterface), so its attention cannot be switched to the fused prefix "
                         f"op. Supported: {supported_families_text()}")

    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    # Only the text model takes the prefix; other towers (vision) keep their own attention.
    text_key, text_root = _text_submodel(model)
    buckets: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not _is_attention_module(module):
            continue
        if text_root and not name.startswith(text_root + "."):
            continue
        parts = name.split(".")
        if _is_cross(name, module):
            group = "cross"
        elif enc_dec and "encoder" in parts:
            group = "encoder"
        elif enc_dec and "decoder" in parts:
            group = "decoder"
        else:
            group = "self"
        buckets.setdefault(group, []).append((name, module))
    if not buckets:
        raise ValueError(f"found no attention module (a submodule with `is_causal` and `scaling`) in "
                         f"{type(model).__name__}. Supported: {supported_families_text()}")
    order = [g for g in ("self", "encoder", "decoder", "cross") if g in buckets]
    modules = [m for g in order for m in buckets[g]]
    groups = [(g, len(buckets[g])) for g in order]

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads, head_dim, problems = _kv_heads_and_head_dim(text_config)
    problems += _attention_features_not_supported(text_config, modules)
    if problems:
        raise ValueError(f"{type(model).__name__}: " + "; ".join(problems))

    family = family_of(model_type)
    kind = family.kind if family else ("encoder-decoder" if enc_dec else
                                       ("decoder" if any(m.is_causal for _, m in modules) else "encoder"))
    layout = ModelLayout(model_type=model_type, kind=kind, groups=groups, attention_modules=modules,
                         num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                         attn_implementation={text_key: ATTN_IMPLEMENTATION} if text_key else ATTN_IMPLEMENTATION)
    _find_positions(model, layout)
    return layout


def current_attn_implementation(model: nn.Module) -> str | dict:
    """The model's attention implementation in the form `set_attn_implementation` takes back: per sub-config
    when it has sub-configs, so that restoring it leaves each tower as it was."""
    config = model.config
    keys = [k for k in getattr(type(config), "sub_configs", {})
            if hasattr(getattr(config, k, None), "_attn_implementation")]
    if not keys:
        return config._attn_implementation
    return {"": config._attn_implementation, **{k: getattr(config, k)._attn_implementation for k in keys}}


def check_position_offset(layout: ModelLayout, position_offset: bool) -> None:
    """Refuse `position_offset=True` for a model whose positions the wrapper cannot shift."""
    if position_offset and layout.unshiftable_positions:
        raise ValueError(f"position_offset=True needs to shift the positions of real tokens by P, but "
                         f"{layout.model_type} has {layout.unshiftable_positions}, which take no position_ids: "
                         f"use position_offset=False")


def _find_positions(model: nn.Module, layout: ModelLayout) -> None:
    """How real-token positions are given to this model, and how many absolute positions it has."""
    layout.rope = any(hasattr(m, "inv_freq") for m in model.modules())
    tables = []
    roberta_style = None
    offset_modules = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if hasattr(module, "create_position_ids_from_input_ids") and hasattr(module, "padding_idx"):
            roberta_style = module
        if isinstance(module, nn.Embedding) and last in ("wpe", "position_embeddings", "embed_positions"):
            offset = int(getattr(module, "offset", 0) or 0)
            tables.append(module.num_embeddings - offset)
            if last == "embed_positions" and hasattr(module, "offset"):
                offset_modules.append(module)
    layout.max_positions = min(tables) if tables else None
    sinusoidal = sorted({type(m).__name__ for m in model.modules() if "Sinusoidal" in type(m).__name__})
    accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
    if roberta_style is not None and accepts_position_ids:
        layout.position_style = "roberta"
        layout.padding_idx = int(roberta_style.padding_idx)
        layout.max_positions = (layout.max_positions - layout.padding_idx - 1) if layout.max_positions else None
    elif offset_modules:
        layout.position_style = "embed_positions"
        layout.position_modules = offset_modules
    elif accepts_position_ids:
        layout.position_style = "position_ids"
    else:
        layout.position_style = "none"
    if sinusoidal and layout.position_style in ("none", "embed_positions"):
        layout.unshiftable_positions = f"sinusoidal positions ({', '.join(sinusoidal)})"


def task_type_of(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


def default_heads(model: nn.Module) -> list[str]:
    if task_type_of(model) in ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"):
        return []
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
