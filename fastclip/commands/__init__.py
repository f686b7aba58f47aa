"""Commands a person runs on a trained model: ``fastclip index | search | classify | moderate | eval``.

Each module has ``main(argv) -> int``; :mod:`fastclip.commands.common` loads models and embeds images and text.
"""
