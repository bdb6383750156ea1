"""Suite-wide settings: one intra-op thread per test process.

Tests run tiny tensors, where a second thread buys nothing and, on a loaded 2-core machine,
oversubscription slows convolutions by an order of magnitude.
"""

import torch

torch.set_num_threads(1)
