"""Causal language models built from a config (random init: nothing is downloaded)."""

from __future__ import annotations

import importlib

import torch

from rayattr.config import ConfigError, ModelConfig


def load_factory(factory: str):
    """The callable "module:function" names; a ConfigError if it cannot be loaded."""
    module_name, _, fn_name = str(factory).partition(":")
    if not module_name or not fn_name:
        raise ConfigError(f"model.factory must look like 'module:function', got {factory!r}")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.factory {factory!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"model.factory {factory!r} is a {type(fn).__name__}, not a function")
    return fn


def check_model(cfg: ModelConfig) -> None:
    """The model config as the ranks will use it, checked in the driver before Ray starts:
    the factory loads and is callable; model.extra's keys are ones the family's HuggingFace
    config knows (it would keep a misspelt one as an unused attribute, silently)."""
    if cfg.factory:
        load_factory(cfg.factory)
        if cfg.extra:
            raise ConfigError(f"model.extra {sorted(cfg.extra)} is for the HuggingFace families; "
                              "model.factory is called as f(vocab_size, seq_len) and takes none")
        return
    if not cfg.extra:
        return
    import inspect

    from transformers import GPT2Config, LlamaConfig

    cls = GPT2Config if cfg.family == "gpt2" else LlamaConfig
    known = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    try:
        kept = cls(**cfg.extra).to_dict()
    except Exception as e:  # the HF config's own checks, in the driver rather than on every rank
        raise ConfigError(f"model.extra {cfg.extra!r} is refused by {cls.__name__}: {e}") from None
    # a key the config neither knows nor consumes (rope_theta goes into rope_parameters) is
    # kept as a bare attribute: a misspelling that would otherwise change nothing, silently
    unknown = sorted(k for k in cfg.extra if k not in known and k in kept)
    if unknown:
        raise ConfigError(f"model.extra: {unknown} are not {cls.__name__} keys")


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, seed: int = 0) -> torch.nn.Module:
    """A HuggingFace causal LM of the configured family, or the user's factory's model.

    The seed fixes the initial weights, so every rank builds the identical model.
    """
    torch.manual_seed(seed)
    if cfg.factory:
        return load_factory(cfg.factory)(vocab_size, seq_len)
    if cfg.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg_extra = {"bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1, **cfg.extra}
        hf = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **cfg_extra)
        return GPT2LMHeadModel(hf)
    if cfg.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        # model.extra overrides the derived sizes (e.g. Llama-2-7B's intermediate_size 11008)
        hf = LlamaConfig(**{"vocab_size": vocab_size, "max_position_embeddings": seq_len,
                            "hidden_size": cfg.n_embd, "intermediate_size": 4 * cfg.n_embd,
                            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                            "num_key_value_heads": cfg.n_head, "bos_token_id": vocab_size - 1,
                            "eos_token_id": vocab_size - 1, **cfg.extra})
        return LlamaForCausalLM(hf)
    raise ConfigError(f"unknown model.family {cfg.family!r}")
