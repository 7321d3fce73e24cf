"""Small configs of real architectures (random weights) shared by the tests."""

TINY = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, vocab_size=800, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1200, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, pad_token_id=0),
    "gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=1000),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=512,
                 bos_token_id=0, eos_token_id=0),
    "falcon": dict(model_type="falcon", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=1000, bos_token_id=0, eos_token_id=0),
    "mixtral": dict(model_type="mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_local_experts=4,
                    num_experts_per_tok=2),
}


def build(family: str, dtype=None, attn: str | None = None):
    import torch
    import transformers

    attn = attn or ("eager" if family == "gemma2" else "sdpa")
    cfg = dict(TINY[family])
    mt = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(mt, **cfg)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32,
                                                         attn_implementation=attn)
