"""The config of a tiny model in InternVL2's remote-code shape (model_type internvl_chat): a patch-embedding vision
part, InternVL's pixel shuffle and projector, and a small Llama language model."""
from transformers import LlamaConfig, PretrainedConfig


class TinyChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, llm_config: dict | None = None, force_image_size: int = 32, patch_size: int = 8,
                 vision_hidden: int = 32, downsample_ratio: float = 0.5, max_dynamic_patch: int = 4,
                 use_thumbnail: bool = True, dynamic_image_size: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.llm_config = LlamaConfig(**(llm_config or {}))
        self.force_image_size = force_image_size
        self.patch_size = patch_size
        self.vision_hidden = vision_hidden
        self.downsample_ratio = downsample_ratio
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        self.dynamic_image_size = dynamic_image_size

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
