"""wavesweep: prune trained networks in the wavelet domain, by magnitude and at random,
at the same budget, and report the truth about the result."""

__version__ = "0.1.0"
