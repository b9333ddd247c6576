"""Counting denoiser calls per role, so every comparison can report NFE."""
import collections


class CallCounter:
    """``counter.wrap(denoiser, 'weak')`` returns a denoiser that counts its calls under 'weak'.

    ``counter.counts`` maps role -> calls; ``counter.total`` is the NFE.
    """

    def __init__(self):
        self.counts = collections.Counter()

    def wrap(self, denoiser, role):
        def counted(x, sigma, **extra_args):
            self.counts[role] += 1
            return denoiser(x, sigma, **extra_args)
        return counted

    @property
    def total(self):
        return sum(self.counts.values())
