"""Library notices that tell an EasyRef user nothing, dropped narrowly where they arise.

EasyRef reads images with PIL and never installs torchvision (the CUDA wheel pins torch alone). transformers then
answers every import of an image processor's default name (``CLIPImageProcessor``, ``SiglipImageProcessor``) with
"`X` requires torchvision (not installed); falling back to `XPil` ...", once per class and process. diffusers' SDXL
pipeline module imports both, so every training, generation, evaluation and serving process printed them (18 lines in
``make demo``). The fallback is exactly what EasyRef wants; the notice is dropped, and only that notice: the filter
sits on the one logger that emits it and matches its wording; every other record of that logger passes.
"""

from __future__ import annotations

import logging
import re

LOGGER = "transformers.utils.import_utils"
"""The logger of transformers' lazy-import module, which emits the fallback notice."""
NOTICE = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)


class _PilFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOTICE.match(record.getMessage()) is None


def quiet_pil_fallback() -> None:
    """Drop transformers' torchvision-to-PIL fallback notice (idempotent); call before importing an SDXL pipeline."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, _PilFallbackNotice) for f in logger.filters):
        logger.addFilter(_PilFallbackNotice())
