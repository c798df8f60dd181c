"""Models: the paper's shapes as presets, any other transformers causal LM, and how a model is built.

``presets`` (named shapes and their arithmetic), ``configs`` (``model.config`` / ``model.init_from``: any decoder-only
causal LM's config and weights, and the families TST refuses), ``build`` (meta-device construction, materialising,
seeded initialisation, parameter counts, the MoE router loss). Everything callers use is imported here.
"""

from .build import (
    CAUSAL_SDPA,
    build_model,
    family_defaults,
    init_weights,
    materialize,
    parameter_counts,
    router_aux_loss,
    use_autocast_experts,
    use_causal_sdpa,
)
from .configs import check_trainable, custom_config, pretrained_config, quiet_transformers, read_pretrained
from .presets import (
    PRESETS,
    Preset,
    attention_parameters,
    describe_presets,
    expected_parameter_counts,
    get_preset,
    mlp_parameters,
    model_config,
    moe_shape,
    resolve_head_dim,
)

__all__ = [
    "CAUSAL_SDPA",
    "PRESETS",
    "Preset",
    "attention_parameters",
    "build_model",
    "check_trainable",
    "custom_config",
    "describe_presets",
    "expected_parameter_counts",
    "family_defaults",
    "get_preset",
    "init_weights",
    "materialize",
    "mlp_parameters",
    "model_config",
    "moe_shape",
    "parameter_counts",
    "pretrained_config",
    "quiet_transformers",
    "read_pretrained",
    "resolve_head_dim",
    "router_aux_loss",
    "use_autocast_experts",
    "use_causal_sdpa",
]
