"""A living index: change the training set without a rebuild (docs/design.md, "Living index").

Each change is a new generation of the index directory, committed like a build (config.json
last); readers keep their snapshot and pick up the newest generation.

    fisher.py   the next generation's Fisher sums from the cached ones (new rows added,
                removed rows subtracted)
    commit.py   committing a generation: the store's record, pass 2, config.json, build.json;
                the kept IVF quantizer and its drift
    remove.py   remove_examples: ids out of FAISS, the Fisher and every reader's results
    grow.py     add_examples: pass 1 on the new examples only (a short last batch filled up in
                place), then the next generation
"""
from .commit import settle
from .grow import add_examples, grows, same_data
from .remove import check_ids, remove_examples

__all__ = ["add_examples", "check_ids", "grows", "remove_examples", "same_data",
           "settle"]
