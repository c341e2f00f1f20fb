"""diffusers pipelines for exported models: GNPipeline (class labels and classifier-free
guidance, any scheduler), and the pipeline object an export is written from.

    from diffusers import DiffusionPipeline
    from gn_diffusion.sample.pipeline import register_with_diffusers
    register_with_diffusers()  # makes GNUNet and GNPipeline findable by diffusers
    pipe = DiffusionPipeline.from_pretrained("runs/digits_cond/model")   # a GNPipeline
    images = pipe(class_labels=[3, 7], guidance_scale=3, num_inference_steps=50).images

diffusers resolves a component library named in model_index.json other than its own (here
["gn_diffusion.model.unet", "GNUNet"]) only from modules already imported, since importing one
named by a folder would run its code; and it looks a pipeline's _class_name up on the diffusers
module. Importing this module imports gn_diffusion.model.unet; register_with_diffusers() adds
GNPipeline and GNDDPMPipeline to the diffusers namespace. Nothing is read from the folder but
configs and safetensors.
"""

from typing import Optional, Union

import torch
from diffusers import DDPMPipeline, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion.schedules import make_scheduler
from ..model.unet import GNUNet
from .generate import denoise

Generators = Union[torch.Generator, list[torch.Generator], None]


class GNPipeline(DiffusionPipeline):
    """A GNUNet and a scheduler; samples as sample.py does. With one generator per image,
    seeded_generator(sample.seed, i) for image i, it makes sample.py's images exactly."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: GNUNet, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[list[int], torch.Tensor, None] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: Generators = None,
        batch_size: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for `class_labels` (one per label; -1 for an unconditional image) or, without
        labels, `batch_size` unconditional ones (default: one per generator, else 1).
        `guidance_scale` is classifier-free guidance, as sample.guidance_scale."""

        labels = self._labels(class_labels, batch_size, generator)
        c = self.unet.config
        shape = (len(labels), c.in_channels, c.sample_size, c.sample_size)
        device = self._execution_device
        noise = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        x = denoise(self.unet, self.scheduler, noise, labels.to(device), guidance_scale, num_inference_steps, generator)
        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def _labels(self, class_labels, batch_size: Optional[int], generator: Generators) -> torch.Tensor:
        """int64 labels, -1 meaning unconditional, after checking them against the model."""
        classes = self.unet.config.num_classes
        if class_labels is None:
            n = batch_size or (len(generator) if isinstance(generator, list) else 1)
            return torch.full((n,), -1, dtype=torch.int64)
        labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
        if not classes and bool((labels >= 0).any()):
            raise ValueError("class_labels needs a class-conditional model; this one is unconditional.")
        if bool(((labels < -1) | (labels >= classes)).any()):
            raise ValueError(f"class_labels must be in 0..{classes - 1} (or -1 for unconditional).")
        if batch_size is not None and batch_size != len(labels):
            raise ValueError(f"batch_size is {batch_size} but {len(labels)} class_labels were given.")
        return labels


class GNDDPMPipeline(DDPMPipeline):
    """diffusers' DDPMPipeline, unchanged but for declaring that its unet may be a GNUNet:
    DiffusionPipeline.from_pretrained checks each component against the pipeline's annotations,
    and DDPMPipeline's (UNet2DModel only) made it warn about every unconditional export."""

    def __init__(self, unet: Union[GNUNet, UNet2DModel], scheduler: SchedulerMixin):
        super().__init__(unet=unet, scheduler=scheduler)


def pipeline_for(model: GNUNet, cfg) -> DiffusionPipeline:
    """What an export writes: for an unconditional model a GNDDPMPipeline (the DDPMPipeline
    diffusers' own training script writes), for a class-conditional one a GNPipeline; both with
    the DDPM scheduler of the run's schedule (the one training noised with)."""

    scheduler = make_scheduler(cfg.diffusion, "ddpm")
    cls = GNPipeline if model.config.num_classes else GNDDPMPipeline
    return cls(unet=model, scheduler=scheduler)


# Where exports made before the package's folders were its layers say GNUNet lives.
OLD_UNET_MODULE = "gn_diffusion.unet"


def register_with_diffusers() -> None:
    """Put GNPipeline and GNDDPMPipeline on the diffusers module, where
    DiffusionPipeline.from_pretrained looks a model_index.json's _class_name up, and answer
    the unet module name older exports give with ours, so they load too. Called by whoever
    loads an export through diffusers; idempotent."""
    import sys

    import diffusers

    from ..model import unet

    for pipeline in (GNPipeline, GNDDPMPipeline):
        setattr(diffusers, pipeline.__name__, pipeline)
    sys.modules.setdefault(OLD_UNET_MODULE, unet)
