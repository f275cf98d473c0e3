"""run_eval and `grass-index eval` end to end on a tiny ridge-regression task."""
import json
import textwrap

import numpy as np
import pytest

TASK = textwrap.dedent('''
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g)
    Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 * torch.randn(40, generator=g)
    XQ = torch.randn(6, 4, generator=g)
    YQ = XQ @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def train(subset, seed):
        """Ridge regression in closed form: deterministic, so seeds agree."""
        ids = torch.as_tensor(list(subset.indices))
        x, y = X[ids], Y[ids]
        x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
        w = torch.linalg.solve(x1.T @ x1 + 1e-2 * torch.eye(5), x1.T @ y)
        m = nn.Linear(4, 1)
        with torch.no_grad():
            m.weight.copy_(w[:4][None]); m.bias.copy_(w[4:])
        return m

    class _All:
        indices = range(40)

    def model():
        return train(_All(), 0)

    def train_data():
        return torch.utils.data.TensorDataset(X, Y)

    def query_data():
        return torch.utils.data.TensorDataset(XQ, YQ)

    def loss(model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2
''')


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import grass_index as gi

    d = tmp_path_factory.mktemp("evalrun")
    (d / "ridge.py").write_text(TASK)
    (d / "nolearn.py").write_text(TASK.replace("def train(", "def _train("))
    task = gi.load_task(d / "ridge.py")
    gi.build_index(task.model(), task.train_data(), task.loss, d / "idx", sparsification="identity",
                   projection="identity", hessian="eFIM", damping=1e-3, task=task.ref,
                   progress=False, batch_size=16)
    return d


def test_run_eval_scores_ridge_well_and_caches(built):
    from grass_index.eval import run_eval

    res = run_eval(built / "idx", task=str(built / "ridge.py"), num_subsets=12, seeds=[0],
                   ground_truth=built / "gt", progress=False)
    assert res.n_query == 6 and res.per_query.shape == (6,)
    assert res.lds > 0.5  # influence is close to exact for ridge regression
    assert (built / "gt" / "meta.json").is_file()
    again = run_eval(built / "idx", task=str(built / "ridge.py"), num_subsets=12, seeds=[0],
                     ground_truth=built / "gt",
                     progress=False, max_queries=3)
    assert again.n_query == 3 and np.allclose(again.per_query, res.per_query[:3])
    assert again.seconds["ground_truth"] < res.seconds["ground_truth"] + 1.0  # cache reused
    json.dumps(again.to_dict())


def test_run_eval_needs_train(built):
    from grass_index.eval import run_eval
    from grass_index.eval.run import EvalError

    with pytest.raises(EvalError, match=r"defines no train\(train_data_subset, seed\)"):
        run_eval(built / "idx", task=str(built / "nolearn.py"), num_subsets=5, seeds=[0],
                 ground_truth=built / "gt2", progress=False)


def test_cli_eval_json_and_errors(built):
    import typer
    from typer.testing import CliRunner

    from grass_index.cli.eval_cmd import register

    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command so typer keeps sub-command names
    def _noop():
        pass

    r = CliRunner().invoke(app, ["eval", str(built / "idx"), "--task", str(built / "ridge.py"),
                                 "--subsets", "12", "--seeds", "0",
                                 "--ground-truth", str(built / "gt"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["lds"] > 0.5
    r = CliRunner().invoke(app, ["eval", str(built / "idx"), "--seeds", "a,b"])
    assert r.exit_code != 0 and "--seeds" in r.output
    r = CliRunner().invoke(app, ["eval", str(built / "idx"), "--task", str(built / "nolearn.py"),
                                 "--subsets", "5", "--ground-truth", str(built / "gt3")])
    assert r.exit_code == 1 and "train(" in r.output


# --- issue 20 §5 ("realdata"): cached ground truth is keyed by content, not the task's path --

def test_ground_truth_of_an_edited_task_is_never_reused(tmp_path, monkeypatch):
    """Editing train() and query_data() in the same file: eval retrains (default cache) or
    refuses the old cache naming what changed (--ground-truth DIR); never the old LDS."""
    import grass_index as gi
    import grass_index.task as task_module
    from grass_index.eval import run_eval
    from grass_index.eval.run import EvalError

    monkeypatch.setenv("GRASS_INDEX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "ridge.py"
    path.write_text(TASK)
    task = gi.load_task(path)
    gi.build_index(task.model(), task.train_data(), task.loss, tmp_path / "idx",
                   sparsification="identity", projection="identity", damping=1e-3,
                   task=task.ref, progress=False, batch_size=16)
    kw = dict(num_subsets=8, seeds=[0], progress=False)
    first = run_eval(tmp_path / "idx", task=str(path), **kw)
    kept = run_eval(tmp_path / "idx", task=str(path), **kw)
    assert kept.ground_truth_dir == first.ground_truth_dir and kept.lds == first.lds
    # same path, new content: train() regularises harder, query_data() asks other targets
    path.write_text(TASK.replace("1e-2 * torch.eye(5)", "30.0 * torch.eye(5)")
                    .replace("YQ = XQ @", "YQ = -XQ @"))
    monkeypatch.setattr(task_module, "_LOADED", {})  # as a new process: the file is re-read
    edited = run_eval(tmp_path / "idx", task=str(path), **kw)
    assert edited.ground_truth_dir != first.ground_truth_dir
    assert edited.lds != first.lds
    with pytest.raises(EvalError, match=r"other content than this run \(changed: query_data, "
                                        r"task_sha256\)"):
        run_eval(tmp_path / "idx", task=str(path), ground_truth=first.ground_truth_dir, **kw)
