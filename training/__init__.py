"""PyTorch training for anatomy-node's axial CT body-region classifier.

See training/README.md and docs/contracts.md. Modules: data (dataset contract, pack), augment
(batched tensor augmentation), model (the CNN), train (loop, checkpoints), calibrate
(temperature scaling), metrics (error, AUC), export (ONNX), cli (`python -m training`).
"""
