"""tuneloop: fine-tune pretrained language models into task specialists and keep them good."""

import logging

# transformers imports torchao (the int8 export's library) at start-up, and torchao then tries to load its
# compiled CUDA kernels (cutlass, mxfp8), built for another Python: two "Failed to load ..._C_*.so" warnings
# on every command. The CPU paths tuneloop uses need none of them; only those two lines are dropped, any other
# torchao warning still shows.
logging.getLogger("torchao").addFilter(
    lambda record: not (str(record.msg).startswith("Failed to load") and "/_C" in str(record.msg)))

# torchao also registers two of its enums with torch.compile the deprecated way: one warning each, from torch's
# pytree module, on every command. Dropped the same way, that message only.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "register_constant() on Enum subclasses is deprecated" not in str(record.msg))

__version__ = "0.1.0"
