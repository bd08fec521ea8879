"""Drop-ins for other libraries' OT code, solved by eotfast: one module per peer library.

Each module imports without its peer installed (it needs the peer only to patch it or to read
its objects, and says so in an ImportError), so ``import eotfast.integrations.<peer>`` is
always safe:

- :mod:`eotfast.integrations.torchcfm`: ``OTPlanSampler``, a drop-in for torchcfm's sampler of
  OT-paired mini-batches, ``use_eotfast(flow_matcher)`` and ``patch_torchcfm()``.
"""
