"""blockmig: a userspace block-device emulator with live migration between storage arrays.

The emulator lives in ``emulator`` and the volume manager in ``control``; this package holds
what a user imports from outside: :mod:`blockmig.testing`, a pytest plugin that starts real
arrays for a test, creates volumes on them, attaches and migrates them.
"""
