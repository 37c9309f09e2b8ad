"""The training core shared by every objective: recipes and their validation, DeepSpeed engine,
loop, schedule, checkpoints, metrics, export. An objective (pre-training, SFT, DPO) plugs into the
loop through `doge.training.objective.Objective` and declares its recipe class there."""
