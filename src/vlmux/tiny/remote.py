"""A tiny remote-code model folder: its own configuration and modeling files (InternVL2's `chat` shape, model_type
internvl_chat), `auto_map` in config.json, random weights as safetensors and the offline tokenizer. It loads only
with trust_remote_code, like OpenGVLab's InternVL2 / 2.5 checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlmux.tiny.remote_code.configuration_tinychat import TinyChatConfig
from vlmux.tiny.remote_code.modeling_tinychat import TinyChatModel
from vlmux.tiny.text import CHATML_SPECIALS, llama, tokenizer

CODE = Path(__file__).parent / "remote_code"
AUTO_MAP = {"AutoConfig": "configuration_tinychat.TinyChatConfig", "AutoModel": "modeling_tinychat.TinyChatModel"}


def build_remote_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny remote-code model to out_dir and return the path; same seed, same weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer([*CHATML_SPECIALS, "<img>", "</img>", "<IMG_CONTEXT>"], add_bos=False, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>")
    config = TinyChatConfig(llm_config=llama(tok).to_dict(), architectures=["TinyChatModel"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyChatModel(config).float()
        with torch.no_grad():  # the usual 0.02 leaves a two-layer model's answer blind to the picture (tiny.text)
            for param in model.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.15)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("configuration_tinychat.py", "modeling_tinychat.py"):
        shutil.copyfile(CODE / name, out / name)
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**written, "auto_map": AUTO_MAP}, indent=2))
    return out
