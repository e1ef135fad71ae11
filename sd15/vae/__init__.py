"""The SD 1.5 autoencoder (VAE)."""
from sd15.vae.vae import SCALE_FACTOR, VAE_TINY, AutoencoderKL, VAEConfig

__all__ = ["SCALE_FACTOR", "VAE_TINY", "AutoencoderKL", "VAEConfig"]
