"""The prefix methods, built on the op (`prefix_kernels.ops`) and the transformers glue
(`prefix_kernels.transformers`); nothing below imports this package. Public names are exported by
`prefix_kernels` itself.

    config.py        PrefixTuningConfig, PTuningV2Config (and the dict form shared by every config)
    encoders.py      PrefixEncoder: the trainable prefix of every layer, in PEFT's layout
    prefix_model.py  PrefixModel / get_prefix_model, and PrefixState (what the attention function reads)
    bank.py          MultiPrefixModel: several adapters served in one batch through prefix_index
    tasks.py         PrefixTaskModel: P-Tuning v2 task heads on a shared prefix
    ptuning.py       P-Tuning v1: PTuningConfig, PromptEncoder, PTuningModel
    adapter_io.py    every adapter file: names, safe readers, the prefix adapter format, bank index
    trainable.py     requires_grad helpers and PEFT's parameter counts
    pooling.py       the last real token of each row
"""
