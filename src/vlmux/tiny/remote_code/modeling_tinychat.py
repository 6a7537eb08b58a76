"""A tiny model in InternVL2's remote-code shape: `chat` and `batch_chat` take a tokenizer, tiles of pixel values
and a question with `<image>` in it, as OpenGVLab's modeling_internvl_chat.py does, and answer with the text."""
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .configuration_tinychat import TinyChatConfig

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class TinyChatModel(PreTrainedModel):
    config_class = TinyChatConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: TinyChatConfig) -> None:
        super().__init__(config)
        hidden, vision = config.llm_config.hidden_size, config.vision_hidden
        scale = int(1 / config.downsample_ratio)
        self.patch_embed = nn.Conv2d(3, vision, config.patch_size, stride=config.patch_size)
        self.vision_norm = nn.LayerNorm(vision)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vision * scale**2), nn.Linear(vision * scale**2, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden))
        self.language_model = AutoModelForCausalLM.from_config(config.llm_config)
        grid = config.force_image_size // config.patch_size
        self.num_image_token = int(grid**2 * config.downsample_ratio**2)
        self.img_context_token_id = None
        self.post_init()

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """InternVL's: every 2x2 patch block becomes one token of 4x the channels."""
        n, w, h, c = x.size()
        r = self.config.downsample_ratio
        x = x.view(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
        return x.view(n, int(h * r), int(w * r), int(c / (r * r))).permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)  # tiles x vision x grid x grid
        x = self.vision_norm(x.flatten(2).transpose(1, 2))
        grid = int(x.shape[1] ** 0.5)
        x = self.pixel_shuffle(x.reshape(x.shape[0], grid, grid, -1))
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **generate_kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.extract_feature(pixel_values.to(self.dtype))
            selected = input_ids == self.img_context_token_id
            embeds[selected] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def _query(self, question: str, history, num_patches_list) -> str:
        turns = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
                        for q, a in (history or []))
        query = f"{turns}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        for patches in num_patches_list:
            query = query.replace("<image>", IMG_START + IMG_CONTEXT * self.num_image_token * patches + IMG_END, 1)
        return query

    def _answer(self, tokenizer, pixel_values, queries, generation_config) -> list[str]:
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        tokenizer.padding_side = "left"
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        options = {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, **generation_config}
        output = self.generate(pixel_values=pixel_values, input_ids=inputs.input_ids.to(self.device),
                               attention_mask=inputs.attention_mask.to(self.device),
                               generation_config=GenerationConfig(**options))
        return [text.split("<|im_end|>")[0].strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, verbose=False):
        if pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        answer = self._answer(tokenizer, pixel_values, [self._query(question, history, num_patches_list)],
                              generation_config)[0]
        return (answer, [*(history or []), (question, answer)]) if return_history else answer

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None, history=None,
                   return_history=False, verbose=False):
        queries = []
        for index, patches in enumerate(num_patches_list):
            question = questions[index]
            if pixel_values is not None and "<image>" not in question:
                question = "<image>\n" + question
            queries.append(self._query(question, history, [patches]))
        return self._answer(tokenizer, pixel_values, queries, generation_config)
