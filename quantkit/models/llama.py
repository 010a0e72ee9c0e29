"""Llama-layout decoders (pre-norm, separate q/k/v, gated MLP): their smoothing folds."""

from quantkit.models.base import Family, Fold

FAMILY = Family(
    name="llama",
    # also the text models of LLaVA-style VLMs (found through text_config.model_type), Qwen2-VL's and Qwen3-VL's
    # (its q/k norms act after q_proj/k_proj, on the head dimension: the folds keep the logits)
    model_types=("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"),
    smooth_folds=(
        Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Fold("self_attn.v_proj", ("self_attn.o_proj",)),  # only without grouped key/value heads; v's bias divides too
        Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Fold("mlp.up_proj", ("mlp.down_proj",)),  # down reads act(gate) * up: linear in up's rows
    ),
)
