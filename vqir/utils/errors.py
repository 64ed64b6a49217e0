"""The one kind of error the commands report without a traceback.

An :class:`InputError` is the user's to fix: an options file, a command-line argument, a
checkpoint, an image, a weights file that is missing. Its message names the file and what is
wrong, so ``train.py``, ``test.py`` and ``vqir-rescale`` print it as one ``error:`` line and exit
with status 1. Every other exception (a CUDA out-of-memory, a shape bug) is a fault of the run or
of the code and keeps its traceback.

Each concrete error also derives from the built-in class callers have always caught
(``OptionsError`` is a ``ValueError``, ``LPIPSWeightsNotFoundError`` a ``FileNotFoundError``).
"""

__all__ = ['InputError']


class InputError(Exception):
    """Base of the errors whose message is all the user needs (see the module docstring)."""
