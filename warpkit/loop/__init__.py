"""The iterated WARP loop, layered: `config` (WarpConfig), `manifest` (content-addressed resumability),
`rl` (one RL run: TRL's RLOO/GRPO with the EMA anchor), `launch` (runs as `accelerate launch`
subprocesses on GPU slots), `evaluate` (baselines and the frontier of a run), `driver` (Algorithm 1).

Submodules are imported on use: `warpkit.loop.rl` runs inside each `accelerate launch` process and should
not pay for the driver's imports.
"""
