"""AUTOMATIC1111 compatibility around the core: prompt syntax (`prompt`), prompts to CLIP conditioning
(`conditioning`), infotexts (`infotext`), image-side steps (`images`) and inpainting (`inpaint`)."""
