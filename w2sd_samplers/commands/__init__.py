"""The ``w2sd`` subcommands, on top of the library: each module parses and checks its options and calls the
library (``demo``, ``generate``, ``eval``, ``bench``); :mod:`.common` holds what they share. Nothing in the library
imports this package."""
