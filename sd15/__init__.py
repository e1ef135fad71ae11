"""sd15: Stable Diffusion 1.5 in plain PyTorch."""
