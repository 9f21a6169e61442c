"""`djc bench`: measurements side by side in one run, as ratios or against a baseline on the same data.

quality.py      every method against the k-means baselines, over data sets and seeds (docs/results.md)
throughput.py   djc's training step against a plain PyTorch loop doing the same work (reference.py)
data.py         local disk vs S3 vs the local cache, read and training-step rates (docs/storage.md)
"""
