"""Per-request LoRA for the generator: the file library, its five layouts, and the PEFT adapter cache."""
