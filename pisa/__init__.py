"""pisa: Prime Sample Attention for object detection, in pure PyTorch."""

__version__ = "0.1.0"
