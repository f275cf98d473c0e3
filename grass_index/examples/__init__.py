"""Example tasks shipped with the package: ``digits`` is the default task of `grass-index build`
(an MLP on scikit-learn's bundled 8x8 digits; needs the ``examples`` extra, scikit-learn)."""
