"""Tiny random-weight causal LMs of the transformers families torch_wsl.optimize knows (no downloads).

``tiny_causal_lm(family)`` builds one (hidden 32, 1 layer, vocab 128 unless told), with every
dropout at 0 so a deepcopy computes the same in training mode."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]


def tiny_causal_lm(family: str, *, vocab: int = 128, hidden: int = 32, layers: int = 1, seed: int = 0, **extra):
    import transformers as T

    torch.manual_seed(seed)
    if family == "gpt2":
        config = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **extra)
        return T.GPT2LMHeadModel(config)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    head_dim = {"head_dim": hidden // 4}
    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", head_dim),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", head_dim),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**head_dim, "final_logit_softcapping": 2.0}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**head_dim, "final_logit_softcapping": 2.0}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    }
    config_name, model_name, own = classes[family]
    config = getattr(T, config_name)(**{**common, **own, **extra})
    return getattr(T, model_name)(config)


class OpNames(TorchDispatchMode):
    """Records the names of the operators a region dispatches (``with OpNames() as seen: ...; seen.names``)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))
