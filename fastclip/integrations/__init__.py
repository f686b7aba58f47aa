"""Adoption in one line by other training codebases.

- ``fastclip.integrations.open_clip``: ``patch()`` makes open_clip's ``create_loss`` build fastclip's losses (and,
  with ``attention=True``, its models use fastclip's attention); ``replace_attention(model)`` for a live model.
- ``python -m fastclip.integrations.open_clip_train <open_clip_train arguments>``: open_clip's own training program
  with both.
- ``fastclip.integrations.transformers``: ``patch(model)`` for Hugging Face ``CLIPModel`` / ``SiglipModel``, and
  ``attn_implementation="fastclip"``.

Each module imports the library it adapts only when used; fastclip itself does not depend on them.
"""
