"""One WARP RL run: TRL's RLOO (or GRPO) with the EMA anchor, on the policy given by the config.

    accelerate launch --config_file accelerate_configs/<x>.yaml trainers/rl.py --config configs/<y>.yaml

Every field of RLOOConfig/GRPOConfig, TRL's ModelConfig (use_peft, lora_r, ...) and warpkit.loop.rl.RLArguments
(algorithm, reward_funcs, dataset, anchor, ema_rate, ...) is settable in the YAML or as --field VALUE.
The script body lives in warpkit.loop.rl, which the WARP driver launches as
`accelerate launch -m warpkit.loop.rl`.
"""

from warpkit.loop.rl import main

if __name__ == "__main__":
    main()
