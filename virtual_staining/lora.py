"""The LoRA of virtual staining is the project's one LoRA implementation: `diffusion.model.lora` (re-exported)."""

from diffusion.model.lora import (  # noqa: F401
    ADAPTER,
    LORA_TARGETS,
    LoRASettings,
    add_lora,
    has_lora,
    load_lora_weights,
    lora_delta_norm,
    lora_parameters,
    lora_state_dict,
    read_lora_file,
    read_lora_settings,
    save_lora_weights,
    save_published_lora,
)
