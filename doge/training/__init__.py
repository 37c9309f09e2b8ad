"""The training core shared by every objective: recipe and its validation, DeepSpeed engine,
loop, schedule, checkpoints, metrics. An objective (pre-training today) plugs into the loop
through `doge.training.objective.Objective`."""
