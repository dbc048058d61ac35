"""tuneloop: fine-tune pretrained language models into task specialists and keep them good."""

import os

# transformers imports torchao (the int8 export's library) at start-up, and torchao then tries its compiled
# CUDA kernels (cutlass, mxfp8), built for other torch versions: two "Failed to load" lines on every
# command. The int8 paths tuneloop uses on CPU need none of them; a user who sets the variable keeps theirs.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

__version__ = "0.1.0"
