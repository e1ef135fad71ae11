"""CLIP ViT-L/14 text tower and its BPE tokenizer."""
from sd15.clip.text_encoder import CLIP_TINY, CLIPTextConfig, CLIPTextModel
from sd15.clip.tokenizer import Tokenizer

__all__ = ["CLIP_TINY", "CLIPTextConfig", "CLIPTextModel", "Tokenizer"]
