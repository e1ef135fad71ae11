"""The SD 1.5 denoising UNet."""
from sd15.unet.unet import UNET_TINY, UNetConfig, UNetModel

__all__ = ["UNET_TINY", "UNetConfig", "UNetModel"]
