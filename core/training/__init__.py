"""The training loop shared by pretrain and finetune: checkpoints, memory, the loop."""
