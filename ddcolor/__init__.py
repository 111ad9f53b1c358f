"""ddcolor: train, evaluate, version and serve DDColor image-colorization models.

DDColor: Kang et al., "DDColor: Towards Photo-Realistic Image Colorization via Dual Decoders", ICCV 2023.
Upstream code and weights (Apache-2.0): https://github.com/piddnad/DDColor
"""

__version__ = "0.1.0"
