"""A tiny random-weight Llama for trying PegaFlow with vLLM without downloading a model
(``examples/basic_vllm.py``, the connector's tests). Needs ``torch`` and ``transformers``.

Weights are drawn with a large init range so that any wrong KV byte changes the next
tokens; vLLM's ``load_format="dummy"`` would hide KV bugs behind near-constant outputs.
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 512
TINY_BLOCK_SIZE = 32
"""vLLM's CPU attention needs a block size that is a multiple of 32 and head_dim ≥ 32."""


def build_tiny_llama(path: Path, seed: int = 1234) -> Path:
    """Saves a 2-layer Llama (head_dim 32, 2 KV heads, float32) with random weights and a
    word-level tokenizer (``t0`` … ``t511``) to ``path``; returns ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    ).save_pretrained(path)
    return path


__all__ = ["TINY_BLOCK_SIZE", "TINY_VOCAB", "build_tiny_llama"]
