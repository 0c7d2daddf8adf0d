"""Data sources: images for gate training, fine-tuning and honest held-out evaluation.

`load_data(recipe, ...)` returns a `DataBundle`: a `TensorBundle` (small sources, decoded once
into one uint8 tensor) or a `StreamBundle` (folders too large for memory, decoded by DataLoader
workers batch by batch). Modules: `arrays` (idx, digits, mnist-5k, npz, synthetic), `folder`
(ImageFolder layout and decoding one image), `bundle` (the bundles' interface, in-memory
batches, batched augmentation), `stream` (the DataLoader path), `load` (the entry point).
"""

from hawada.core.data.arrays import DEFAULT_FASHION_MNIST_DIR
from hawada.core.data.bundle import Batch, DataBundle, TensorBundle
from hawada.core.data.load import load_data, resolve_augment
from hawada.core.data.stream import StreamBundle

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "Batch",
    "DataBundle",
    "StreamBundle",
    "TensorBundle",
    "load_data",
    "resolve_augment",
]
