"""LoRA and hierarchical LoRA: the training loop and config (``loop``), the frozen base model's
states that trials share (``frozen``) and the unrelated code rows only the KL sees (``anchors``)."""
