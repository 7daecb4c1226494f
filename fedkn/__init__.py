"""fedkn: which normalization layer should a CNN use in federated, non-IID, small-batch training?"""

__version__ = "0.1.0"
