"""EasyRef: group-image-referenced Stable Diffusion XL through a multimodal LLM.

The library every pipeline step reuses: configuration, the model, the DDIM sampler, data handling, training,
metrics and the model registry. Heavy dependencies (torch, diffusers, transformers) are imported by the modules
that need them, so ``import easyref`` and ``easyref --help`` stay fast.
"""

__version__ = "0.1.0"
