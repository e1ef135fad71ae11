"""sd15: Stable Diffusion 1.5 written from scratch in plain PyTorch.

    import sd15
    model = sd15.load("weights/v1-5-pruned-emaonly.safetensors")

`load`, `load_vae`, `StableDiffusion` and `CheckpointError` are imported on first use (PEP 562), so that
`import sd15.schema` or `sd15 --help` does not import torch.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "CheckpointError":
        from sd15.checkpoint import CheckpointError
        return CheckpointError
    if name in ("StableDiffusion", "load", "load_vae"):
        from sd15 import model
        return getattr(model, name)
    raise AttributeError(f"module 'sd15' has no attribute {name!r}")
