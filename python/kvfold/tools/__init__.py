"""The ``kvfold`` command's tools: ``demo``, ``eval``, ``generate`` and ``bench``.

They use the library (``kvfold.MemoryCache``, ``kvfold.rules``, ``kvfold.hf``) and are not part of it.
"""
