"""torch_wsl's benchmark harness: torch_wsl vs eager PyTorch vs torch.compile, side by side."""
