"""The EMA anchor inside TRL's RLOOTrainer, on a tiny local model: the KL reference follows the policy.

    python examples/ema_anchor_rloo.py      # about a minute on a CPU

Prints the anchor's distance to the policy and the KL term per step, as logged through the Trainer.
"""

import tempfile
from pathlib import Path

from trl import RLOOConfig, RLOOTrainer

from warpkit import EMAAnchorCallback
from warpkit.testing import save_tiny_model
from warpkit.workloads.default import review_prompts, vader_reward

with tempfile.TemporaryDirectory() as tmp:
    model = save_tiny_model(Path(tmp) / "sft", "llama")
    args = RLOOConfig(
        output_dir=str(Path(tmp) / "out"),
        beta=0.1,
        learning_rate=1e-3,
        max_steps=5,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = RLOOTrainer(
        model=str(model), reward_funcs=vader_reward, args=args, train_dataset=review_prompts("train")
    )
    trainer.add_callback(EMAAnchorCallback(trainer, ema_rate=0.1))
    trainer.train()
    for log in trainer.state.log_history:
        if "anchor/distance" in log:
            print(f"step {log['step']}: kl={log['kl']:+.5f}  anchor/distance={log['anchor/distance']:.5f}")
