"""Policy optimisation through TRL on (hierarchical) LoRA adapters: DPO (``dpo``) and GRPO
(``grpo``), their shared trainer loop (``trl_loop``) and GRPO's rewards (``rewards``)."""
