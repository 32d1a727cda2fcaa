"""The model's kernels, apart from the layers that call them: the grouped matmul of the routed experts
(`grouped_matmul`: blocked XLA with its own VJP, or megablox on TPU) and the ring attention's per-step
Pallas splash kernel (`ring_splash`). Layers import from here; nothing here imports a layer.
"""
