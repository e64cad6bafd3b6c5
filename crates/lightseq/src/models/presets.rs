//! Configs of real model sizes, for benchmarks and demos with seeded random weights.

use serde_json::{json, Value};

/// Preset names [`config`] knows.
pub const NAMES: &[&str] = &[
    "bert-base",
    "gpt2",
    "transformer-base",
    "transformer-big",
    "bart-base",
];

/// config.json of preset `name`.
pub fn config(name: &str) -> Option<Value> {
    Some(match name {
        "bert-base" => json!({
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
            "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12
        }),
        "gpt2" => json!({
            "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
            "n_layer": 12, "n_head": 12, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5
        }),
        // Transformer for MT in Marian's layout: 6+6 layers, post-LN, sinusoidal positions.
        "transformer-base" => json!({
            "model_type": "marian", "vocab_size": 32000, "d_model": 512, "encoder_layers": 6,
            "decoder_layers": 6, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
            "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "activation_function": "relu",
            "scale_embedding": true, "max_position_embeddings": 1024, "pad_token_id": 31999,
            "decoder_start_token_id": 31999, "eos_token_id": 0
        }),
        "transformer-big" => json!({
            "model_type": "marian", "vocab_size": 32000, "d_model": 1024, "encoder_layers": 6,
            "decoder_layers": 6, "encoder_attention_heads": 16, "decoder_attention_heads": 16,
            "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096, "activation_function": "relu",
            "scale_embedding": true, "max_position_embeddings": 1024, "pad_token_id": 31999,
            "decoder_start_token_id": 31999, "eos_token_id": 0
        }),
        "bart-base" => json!({
            "model_type": "bart", "vocab_size": 50265, "d_model": 768, "encoder_layers": 6,
            "decoder_layers": 6, "encoder_attention_heads": 12, "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "activation_function": "gelu",
            "max_position_embeddings": 1024, "pad_token_id": 1, "bos_token_id": 0,
            "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2
        }),
        _ => return None,
    })
}
