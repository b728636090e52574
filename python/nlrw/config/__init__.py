"""Every stage's options, importable without torch.

One module per stage (``nlrw.config.simulate`` holds :class:`SimulateConfig`, ...), each a
frozen dataclass whose field docstrings are the CLI's help. The stage modules re-export their
config (``from nlrw.simulate import SimulateConfig`` works), but ``nlrw --help``, ``nlrw
status`` and the pipeline's hashes read them from here, so they never import torch.
"""
