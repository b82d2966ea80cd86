"""ownlm: build your own assistant model end to end, on hardware you own."""

import logging

__version__ = "0.1.0"

# torchao (QAT) ships CUDA-only extension libraries and warns "Failed to load ..." for each, and
# torch warns about the enums it registers, on every import on a CPU machine; transformers imports
# torchao whenever it is installed.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
