"""ShapesWorld, the embedded mini world (DESIGN.md "ShapesWorld").

- ``render``: numpy renderer of one coloured shape on a background (scenes -> images).
- ``captions``: surface forms (canonical / train / held-out synonyms), templates,
  colour bias of captions that omit the colour, the closed caption vocabulary.
- ``world``: the world config (``world_config()``).
- ``data``: batches as pure functions of (seed, step): judge, caption, LR/HR pairs.
- ``judge``: the shape/colour/background classifier, its Task, and the FD-judge.
"""
