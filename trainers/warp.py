"""The iterated WARP loop: M RL runs per iteration, SLERP of their policies, LITI, I iterations.

    python trainers/warp.py configs/warp_tiny.yaml [--output_dir DIR] [--rl.beta 0.05 ...]

Same as `warpkit train`. Runs in a plain process; each RL run is its own `accelerate launch` subprocess.
"""

from warpkit.loop.driver import main

if __name__ == "__main__":
    main()
