"""Tiny models the tests build from a config (no hub): shared by the test files."""
import torch


def llama(vocab_size: int, seed: int = 0, **kw):
    """A randomly initialised ``LlamaForCausalLM`` (eval mode): 2 layers, hidden 32, 4 heads over 2 KV heads, BOS 1,
    EOS and pad 0; ``kw`` overrides any LlamaConfig field. The same weights for the same arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
               bos_token_id=1, eos_token_id=0, pad_token_id=0)
    cfg.update(kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**cfg)).eval()
