"""The training signal: from accepted scenarios to optimizer steps.

examples.py          Scenario -> Encoded (spec stripped, chat template, loss on the reply only)
mix.py               kind_quotas (how many of each kind a cycle dreams) and make_batches: one
                     pass, >= general_share general examples in every batch
context_frozen.py    the context under no_grad in the cache, the reply with grad (reply_nll);
                     which path and layout a batch takes, by length (wants_frozen, per_example)
optim.py             APOLLO / AdamW param groups; an optimizer state_dict weights_only can read
bf16.py              fp32 work weights around each step; stochastic rounding into bf16
activation_memory.py bytes saved for backward (the CPU peak-memory measure)
trainer.py           Trainer.train_pass: one StepResult per optimizer step; exact resume
checkpoint.py        atomic checkpoint directories (weights, trainer, run state, RNGs), retention
"""
