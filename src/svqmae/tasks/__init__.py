"""Tasks: what a user runs on top of the model (here: the Hugging Face transformers integration, ``hf/``)."""
