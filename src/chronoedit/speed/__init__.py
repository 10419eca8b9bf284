"""Faster edits, at the same numbers or (step caches, by choice) close to them.

- :mod:`.attention`: attention backends by name (``--attention sage``) -> diffusers' attention dispatcher;
- :mod:`.compile`: regional ``torch.compile`` (``--compile``): each block compiled, one graph shared by all;
- :mod:`.caches`: step caches by name (``first-block:0.05``) -> diffusers' cache configs (no torch import);
- :mod:`.guidance`: the per-step model evaluation: CFG in one batch, cross-attention keys and values once per edit,
  one cache context per CFG branch.
"""
