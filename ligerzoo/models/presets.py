"""Named model shapes that benchmarks and tests share: released models' config.json fields that
shape the computation (no weights: `build_model(ModelConfig(**PRESETS[name]))` gives random ones),
and toy sizes of them for the CPU."""

LLAMA_3_2_1B = dict(  # 1.24B parameters, tied embeddings
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
LLAMA_3_1_8B = dict(  # 8.03B parameters
    LLAMA_3_2_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
    tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
MIXTRAL_8X7B_2_LAYERS = dict(  # Mixtral-8x7B's layers, 2 of them: 3.16B parameters
    model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
    max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)
TINY_LLAMA = dict(  # every code path of the others (GQA, an untied head, Llama 3 RoPE) at toy size
    LLAMA_3_2_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
)

PRESETS = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B, "mixtral-8x7b-2-layers": MIXTRAL_8X7B_2_LAYERS,
           "tiny-llama": TINY_LLAMA}
