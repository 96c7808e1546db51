"""Tiny random-weight models (a Llama, a DeepSeek-shaped MLA model) for trying PegaFlow
with vLLM without downloading a model (``examples/basic_vllm.py``, the connector's
tests). Needs ``torch`` and ``transformers``.

Weights are drawn with a large init range so that any wrong KV byte changes the next
tokens; vLLM's ``load_format="dummy"`` would hide KV bugs behind near-constant outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_VOCAB = 512
TINY_BLOCK_SIZE = 32
"""vLLM's CPU attention needs a block size that is a multiple of 32 and head_dim ≥ 32."""


def build_tiny_llama(path: Path, seed: int = 1234, head_dim: int = 32) -> Path:
    """Saves a 2-layer Llama (head_dim 32, 2 KV heads, float32) with random weights and a
    word-level tokenizer (``t0`` … ``t511``) to ``path``; returns ``path``. GPU attention
    kernels want a larger ``head_dim`` (e.g. 128)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=2048,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    _save_tokenizer(path)
    return path


def build_tiny_deepseek(path: Path, seed: int = 1234) -> Path:
    """Saves a 2-layer DeepSeek-V2-shaped model with MLA (latent KV of ``kv_lora_rank``
    512 + rope 64 = 576 values per token, dense MLPs) with random weights and the same
    word-level tokenizer to ``path``; returns ``path``. vLLM's CPU MLA kernels need a
    block size of 16."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=2,  # every layer dense: MLA is what matters here
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        max_position_embeddings=2048,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    DeepseekV2ForCausalLM(config).to(torch.float32).save_pretrained(path)
    _save_tokenizer(path)
    return path


_TINY_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""Config fields every tiny hybrid model shares: the tokenizer's vocabulary and special
ids, and a large init range (see the module's docstring)."""


def _save_model(path: Path, seed: int, model_class: Any, config: Any, dtype: str) -> Path:
    """Builds ``model_class(config)`` with weights drawn from ``seed``, saves it in
    ``dtype`` with the tiny tokenizer to ``path``; returns ``path``."""
    import torch

    torch.manual_seed(seed)
    model_class(config).to(getattr(torch, dtype)).save_pretrained(path)
    _save_tokenizer(path)
    return path


def build_tiny_gemma3(path: Path, seed: int = 1234) -> Path:
    """Saves a 4-layer Gemma-3 text model (three sliding-window layers with a 64-token
    window, then one full-attention layer; head_dim 64, float32) with random weights and
    the same tokenizer to ``path``; returns ``path``. Under its hybrid manager vLLM gives
    it four KV cache groups of one layer each (three sliding, one full) over one buffer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _save_model(
        path,
        seed,
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **_TINY_COMMON,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            max_position_embeddings=2048,
        ),
        "float32",
    )


def build_tiny_gpt_oss(path: Path, seed: int = 1234) -> Path:
    """Saves a 2-layer gpt-oss model (a 64-token sliding-window layer, then a full one;
    4 experts; bfloat16, which vLLM requires for gpt-oss) with random weights and the same
    tokenizer to ``path``; returns ``path``."""
    from transformers import GptOssConfig, GptOssForCausalLM

    return _save_model(
        path,
        seed,
        GptOssForCausalLM,
        GptOssConfig(
            **_TINY_COMMON,
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=2048,
        ),
        "bfloat16",
    )


def build_tiny_qwen3_next(path: Path, seed: int = 1234) -> Path:
    """Saves a 4-layer Qwen3-Next model (three gated-delta-net linear-attention layers,
    then one full-attention layer; 4 experts; bfloat16, which vLLM's CPU kernels need)
    with random weights and the same tokenizer to ``path``; returns ``path``. vLLM's
    kernels need linear head dims of 128."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    return _save_model(
        path,
        seed,
        Qwen3NextForCausalLM,
        Qwen3NextConfig(
            **_TINY_COMMON,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=1,
            linear_num_value_heads=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            max_position_embeddings=4096,
        ),
        "bfloat16",
    )


def build_tiny_granite_hybrid(path: Path, seed: int = 1234) -> Path:
    """Saves a 4-layer Granite-4.0-H model (three Mamba2 layers, then one attention
    layer; dense MLPs; float32) with random weights and the same tokenizer to ``path``;
    returns ``path``. vLLM raises its block size to 96 to fit a Mamba2 state; its CPU
    Mamba2 kernel needs prefill steps of at most one block with prefix caching."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    return _save_model(
        path,
        seed,
        GraniteMoeHybridForCausalLM,
        GraniteMoeHybridConfig(
            **_TINY_COMMON,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=0,
            num_experts_per_tok=0,
            shared_intermediate_size=256,
            layer_types=["mamba", "mamba", "mamba", "attention"],
            mamba_n_heads=4,
            mamba_n_groups=1,
            mamba_d_state=32,
            mamba_d_head=64,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=64,
            position_embedding_type="rope",
            max_position_embeddings=4096,
        ),
        "float32",
    )


def _save_tokenizer(path: Path) -> None:
    """The word-level tokenizer ``t0`` … ``t511`` of every tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    ).save_pretrained(path)


def cpu_check_keeping_mla_prefix_caching() -> Any:
    """A replacement for vLLM's ``CpuPlatform.check_and_update_config`` that keeps prefix
    caching on for MLA models (vLLM's CPU build turns it off without AMX, and with it the
    connector). For tests and benchmarks only:
    ``CpuPlatform.check_and_update_config = cpu_check_keeping_mla_prefix_caching()``."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
            vllm_config.cache_config.enable_prefix_caching = True

    return classmethod(check)


__all__ = [
    "TINY_BLOCK_SIZE",
    "TINY_VOCAB",
    "build_tiny_deepseek",
    "build_tiny_gemma3",
    "build_tiny_gpt_oss",
    "build_tiny_granite_hybrid",
    "build_tiny_llama",
    "build_tiny_qwen3_next",
    "cpu_check_keeping_mla_prefix_caching",
]
