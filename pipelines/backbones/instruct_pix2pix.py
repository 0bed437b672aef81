"""InstructPix2Pix: an SD 1.x/2.x UNet with 8 input channels (noisy latents + the source image's
latents), sampled with two guidance scales; our `builtin-edit` is one.

It is its own family because its denoiser cannot draw from text alone (text-to-image tasks
refuse it through `backbones.require`) and its pipeline stacks three guidance rows, not two:
diffusers' `StableDiffusionInstructPix2PixPipeline` runs [instruction + image, image only,
neither] in one batch and combines eps = eps_none + s_img (eps_image - eps_none) +
s_txt (eps_full - eps_image).  Everything else (text tower, layer names, sizes) is SD's.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from .sd import StableDiffusion

#: input channels of an InstructPix2Pix UNet: 4 noisy latent channels + 4 image latent channels
IP2P_IN_CHANNELS = 8


class InstructPix2Pix(StableDiffusion):
    name = "instruct-pix2pix"
    label = "InstructPix2Pix UNet"
    short = "InstructPix2Pix"
    pipeline_classes = ("StableDiffusionInstructPix2PixPipeline",)
    img2img_class = None
    text_to_image = False

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.in_channels == IP2P_IN_CHANNELS

    def row_roles(self, pipe, guidance: float, image_guidance: float = 1.5) -> tuple[str, ...]:
        """The pipeline's rows: ("cond", "image", "uncond") = [instruction + image, image only,
        neither] when it guides (guidance > 1 and image guidance >= 1, diffusers' rule), else one row."""
        return ("cond", "image", "uncond") if guidance > 1 and image_guidance >= 1 else ("cond",)


INSTRUCT_PIX2PIX = InstructPix2Pix()
