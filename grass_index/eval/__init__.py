"""Attribution quality: the linear datamodeling score (LDS).

    from grass_index.eval import make_subsets, train_ground_truth, lds
    subsets = make_subsets(n_train, m=50, alpha=0.5, seed=0)
    gt = train_ground_truth(task_train, train, query, loss, subsets, seeds=[0, 1, 2], cache_dir="gt/")
    mean, per_query = lds(idx.score(model, query, loss), gt.subsets, gt.losses)

`run_eval` does all of it for an index directory (what `grass-index eval` calls). Tasks
opt in by defining ``train(train_data_subset, seed) -> nn.Module`` (see groundtruth.py).
"""
from .errors import EvalError
from .groundtruth import GroundTruth, load_ground_truth, train_ground_truth
from .lds import group_scores, lds
from .subsets import as_masks, make_subsets

__all__ = ["EvalError", "make_subsets", "as_masks", "train_ground_truth", "load_ground_truth", "GroundTruth",
           "lds", "group_scores", "run_eval", "EvalResult"]


def __getattr__(name):  # run_eval imports the index pipeline; keep `import grass_index.eval` light
    if name in ("run_eval", "EvalResult", "task_train_fn"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'grass_index.eval' has no attribute {name!r}")
