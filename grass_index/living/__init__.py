"""A living index: change the training set without a rebuild (docs/design.md, "Living index").

Each change is a new generation of the index directory, committed like a build (config.json
last); readers keep their snapshot and pick up the newest generation.

    fisher.py   the next generation's Fisher sums from the cached ones (new rows added,
                removed rows subtracted)
    commit.py   committing a generation: the store's record, pass 2, config.json, build.json;
                the kept IVF quantizer and its drift
    remove.py   remove_examples: ids out of FAISS, the Fisher and every reader's results
    grow.py     add_in_process: pass 1 on the new examples only (a short last batch filled up
                in place), then the next generation
    workers.py  add_examples (one process, or every torchrun rank); add_shard (`add --worker
                I/N`: one worker's share into adds/I-of-N) and merge_added (the shards copied
                in as one process writes them, then the same commit); refuse_grown_shard
                (`build --worker I/N` over grown data names the add instead)
"""
from .commit import settle
from .grow import grows, same_data
from .remove import check_ids, remove_examples
from .workers import add_examples, add_shard, merge_added, pending, refuse_grown_shard

__all__ = ["add_examples", "add_shard", "check_ids", "grows", "merge_added", "pending",
           "refuse_grown_shard", "remove_examples", "same_data", "settle"]
