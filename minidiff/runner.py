"""Deprecated: kept only so that `from minidiff.runner import ...` works while its importers move on
(fake_models -> minidiff.fake; Models, load_models, MissingPlugins -> minidiff.restoration; the CLI record
and folder rules -> tools/_restore_cli.py). To be deleted."""
from minidiff.fake import FAKE_WARNING, fake_models  # noqa: F401
from minidiff.restoration import MissingPlugins, Models, load_models  # noqa: F401
