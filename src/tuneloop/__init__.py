"""tuneloop: fine-tune pretrained language models into task specialists and keep them good."""

__version__ = "0.1.0"
