"""minidiff's exception classes, in one module that every layer may import (it imports nothing).

Each class is a problem the user can act on: the tools print its message as one line "error: ..." on
stderr and exit with the status named in its docstring (the one table of tools/_cli.py, documented in the
README: 0 done, 1 failed, 2 usage or data, 3 non-finite, 130 Ctrl-C, 143 SIGTERM). The base classes
(ValueError, FileNotFoundError, ...) keep `except ValueError` callers working.
"""


class UsageError(ValueError):
    """A mistake in the command line or in the input data, found before work is done. Exit status 2."""


class ImageError(ValueError):
    """An image file that cannot be used (one-line message naming the file). Exit status 2 (data)."""


class MetricsError(ValueError):
    """A problem with the inputs of a metric (empty folder, unreadable image, mismatched or non-finite
    statistics). Exit status 2 (data)."""


class NonFiniteError(FloatingPointError):
    """A NaN or infinite value: a sampling run's latent (naming the plugin and the step) or a training loss
    (naming the step and the last good checkpoint, which stays the latest). Exit status 3."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not the model it should be. Exit status 1."""


class PluginMismatchError(ValueError):
    """A plugin whose widths do not fit the loaded UNet / CLIP vision model. Exit status 1."""


class MissingPlugins(FileNotFoundError):
    """Plugin files asked for but not in the plugin folder; `paths` lists where they were expected.
    Exit status 1."""

    def __init__(self, paths):
        super().__init__(f"missing plugins: {', '.join(paths)}")
        self.paths = paths


class DownloadError(RuntimeError):
    """A download that failed (network, HTTP status, size or hash mismatch). Exit status 1."""
