//! Configs of real model sizes, for benchmarks and demos with seeded random weights.

use serde_json::{json, Value};

/// Preset names [`config`] knows.
pub const NAMES: &[&str] = &["bert-base", "gpt2"];

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
        _ => return None,
    })
}
