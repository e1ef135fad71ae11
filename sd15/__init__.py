"""sd15: Stable Diffusion 1.5 written from scratch in plain PyTorch.

    import sd15
    model = sd15.load("weights/v1-5-pruned-emaonly.safetensors")
"""
from sd15.checkpoint import CheckpointError
from sd15.model import StableDiffusion, load, load_vae

__all__ = ["CheckpointError", "StableDiffusion", "load", "load_vae"]
__version__ = "0.1.0"
