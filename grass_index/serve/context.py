"""What every route works with: the loaded engine, the micro-batcher that runs its work, the
request limits and the upload budget (one object, on ``app.state.served``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from grass_index.input_budget import InputBudget

from .batching import MicroBatcher
from .engine import Engine
from .errors import ApiError
from .params import Limits
from .stats import ServerStats


@dataclass
class Served:
    engine: Engine
    batcher: MicroBatcher
    limits: Limits
    budget: InputBudget   # what an uploaded file may unpack to (from the index's item signature)
    frozen: int = 0       # objects frozen out of the collector at start (counting them walks them)
    stats: ServerStats = field(default_factory=ServerStats)  # GC pauses, request/batch times

    def split(self, name: str):
        """The task's query or training data, or a 400 when the task has no query data."""
        data = self.engine.split(name)
        if data is None:
            raise ApiError(400, f"task {self.engine.task.ref} has no query data",
                           "use split=train, POST a text or an input file, or add "
                           "query_data() to the task")
        return data
