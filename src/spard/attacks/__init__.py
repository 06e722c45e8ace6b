"""Attacks: how a user's fine-tuning set is poisoned. One module per attack, each registering an
:class:`~spard.attacks.base.Attack` with its ``Args`` (``attack.name`` in a config picks it)."""
