"""Split builds: several workers sketch disjoint batches, one pass 2 finishes the index.

    sharding.py     ``--worker I/N``: worker I's shard (pass 1 on batches b % N == I, its Fisher
                    sums, its data fingerprints), and ``merge`` (checks, copy in batch order,
                    summed Fisher, pass 2)
    distributed.py  torchrun: every rank a worker, the Fisher sums all-reduced, pass 2 spread
                    over the ranks (each indexes its own FAISS part), rank 0 joins the parts
"""
