"""Training in plain PyTorch (+ torch.distributed): config, trainer loop, checkpoints, metrics, tasks."""
